//! The agent's state directory (`[appliance] state_dir`, on the data partition, outside the
//! slots): one name for every file the agent keeps there, as `pki::PkiDir` names the
//! gateway's keys. Nothing else in the agent joins a file name onto the directory.

use std::path::{Path, PathBuf};

use crate::files::FileError;

/// The files of one agent's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Makes the directory if it is missing.
    pub fn create(&self) -> Result<(), FileError> {
        std::fs::create_dir_all(&self.0).map_err(FileError::at(&self.0))
    }

    /// What the agent last did with an update (`slots::Record`), versioned.
    pub fn record(&self) -> PathBuf {
        self.0.join("update.json")
    }

    /// The version floor: the highest version ever committed.
    pub fn floor(&self) -> PathBuf {
        self.0.join("floor")
    }

    /// An interrupted download's progress (`update::Progress`).
    pub fn download(&self) -> PathBuf {
        self.0.join("download.json")
    }

    /// Every step, one JSON line each, fsynced: the reports' outbox.
    pub fn journal(&self) -> PathBuf {
        self.0.join("journal.jsonl")
    }

    /// The journal offset the broker acknowledged.
    pub fn reported(&self) -> PathBuf {
        self.0.join("journal.reported")
    }

    /// The last check's time, repository and result, for `status`.
    pub fn last_check(&self) -> PathBuf {
        self.0.join("last-check.json")
    }

    /// The time of the last repository this agent trusted: the clock must not be behind it.
    pub fn clock_floor(&self) -> PathBuf {
        self.0.join("clock-floor")
    }

    /// The kernel's boot id when the pending update was installed.
    pub fn installed_boot_id(&self) -> PathBuf {
        self.0.join("installed-boot-id")
    }

    /// tough's datastore of trusted metadata (its kept copy is beside it).
    pub fn datastore(&self) -> PathBuf {
        self.0.join("datastore")
    }
}
