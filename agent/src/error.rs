//! What the agent's steps can fail with: one enum, [`AgentError`], over the errors of its
//! parts and the refusals of the state machine. What it says is what the journal and the
//! fleet read.

use std::path::PathBuf;

use crate::files::FileError;
use crate::install::InstallError;
use crate::slots::{Slot, SlotError};
use crate::update::{UpdateError, Version};

/// Why a step of the agent did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Update(#[from] UpdateError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}: {why}", path.display())]
    Cmdline { path: PathBuf, why: String },
    #[error("{base}: {source}")]
    Url {
        base: url::Url,
        source: url::ParseError,
    },
    #[error(
        "the system clock ({now}) is behind the last trusted check ({last}); refusing to \
         judge metadata expiry until the time is set (NTP)"
    )]
    ClockBehind {
        now: jiff::Timestamp,
        last: jiff::Timestamp,
    },
    #[error("bundle {version} is {length} bytes, above max_bundle_bytes {max}")]
    TooLarge {
        version: Version,
        length: u64,
        max: u64,
    },
    #[error("bundle {version} is {length} bytes; slot {slot} holds {capacity}")]
    SlotTooSmall {
        version: Version,
        length: u64,
        slot: Slot,
        capacity: u64,
    },
    #[error("slot {}: {source}", path.display())]
    SlotUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "slot {booted} is running but slot {default} is the default: refusing to write the \
         running slot"
    )]
    RunningSlot { booted: Slot, default: Slot },
    #[error("slot {0} is not on trial: nothing to mark good")]
    NotOnTrial(Slot),
    #[error(
        "slot {0} was invalidated (a download that failed verification) or is empty; it \
         cannot be booted"
    )]
    Invalidated(Slot),
    #[error(
        "slot {slot} holds an unfinished download of {target} ({offset} of {length} bytes); \
         it cannot be booted"
    )]
    UnfinishedDownload {
        slot: Slot,
        target: String,
        offset: u64,
        length: u64,
    },
    #[error(
        "slot {0} is committed and no update is pending; `rollback --force` makes slot {other} \
         the default, whatever it holds",
        other = .0.other()
    )]
    NothingToRollBack(Slot),
    #[error("empty reboot command")]
    EmptyReboot,
    #[error("reboot command {argv:?}: {why}")]
    Reboot { argv: Vec<String>, why: String },
}
