//! Quarantine: devices the gateway no longer admits until an engineer releases them.
//!
//! A device is quarantined when it breaks its ACL `acl_violations` times within
//! `violation_window` (`[policy]`). Quarantine is persisted (sled, `data_dir/state`, tree
//! `quarantine`: device id → JSON `{since_ms, reason}`, flushed before it takes effect), so
//! it survives restarts; a quarantined device is refused at CONNECT (CONNACK 5) and its
//! spooled data is kept and forwarded. Every quarantine and release is audited
//! (`device.quarantined`, `device.released`). An engineer quarantines or releases a device
//! by hand through the admin socket (`wardgate device quarantine|release`); the edge also
//! quarantines a device that stays throttled past `[policy] throttle_limit`.
//!
//! Tested by the unit tests below and the system test of repeated ACL violations.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::device::DeviceId;
use crate::policy::{sanction, Offence, Sanction};

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("quarantine store: {0}")]
    Store(#[from] sled::Error),
}

/// Opens the gateway's state store (`data_dir/state`): quarantine and registry changes.
pub fn open_state(data_dir: &Path) -> Result<sled::Db, StateError> {
    let path = data_dir.join("state");
    // No background flusher: every change here is flushed before it takes effect, and
    // without that thread the store is released as soon as it is dropped.
    sled::Config::new()
        .path(&path)
        .cache_capacity(1 << 20)
        .flush_every_ms(None)
        .open()
        .map_err(|source| StateError { path, source })
}

#[derive(Debug, thiserror::Error)]
#[error("state store {path}: {source}")]
pub struct StateError {
    path: PathBuf,
    #[source]
    source: sled::Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub since_ms: u64,
    pub reason: String,
}

/// Version of a stored entry (tree `quarantine`, key = device id): 2 is
/// `{"v":2,"since_ms":…,"reason":…}`; 1, written before, had no `v`, and is still read.
pub const ENTRY_VERSION: u8 = 2;

#[derive(Serialize)]
struct StoredEntry<'a> {
    v: u8,
    #[serde(flatten)]
    entry: &'a Entry,
}

#[derive(Deserialize)]
struct ReadEntry {
    /// Absent in version 1.
    #[serde(default = "version_1")]
    v: u8,
    #[serde(flatten)]
    entry: Entry,
}

fn version_1() -> u8 {
    1
}

/// Why a stored entry cannot be read.
#[derive(Debug, thiserror::Error)]
enum EntryError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("format version {0}, newer than this wardgate's {ENTRY_VERSION}")]
    Newer(u8),
}

/// A stored entry of this version or the one before.
fn decode_entry(bytes: &[u8]) -> Result<Entry, EntryError> {
    let read: ReadEntry = serde_json::from_slice(bytes)?;
    if read.v > ENTRY_VERSION {
        return Err(EntryError::Newer(read.v));
    }
    Ok(read.entry)
}

pub use crate::config::Threshold;

pub struct Quarantine {
    db: sled::Db,
    tree: sled::Tree,
    threshold: Threshold,
    current: Mutex<HashMap<DeviceId, Entry>>,
    recent: Mutex<HashMap<DeviceId, VecDeque<Instant>>>,
    /// Called after every quarantine and release (the firewall's sets follow).
    on_change: std::sync::OnceLock<ChangeHook>,
    events: crate::events::Events,
}

type ChangeHook = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Quarantine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quarantine")
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

impl Quarantine {
    pub fn open(
        db: &sled::Db,
        threshold: Threshold,
        events: crate::events::Events,
    ) -> Result<Quarantine, QuarantineError> {
        let tree = db.open_tree("quarantine")?;
        let mut current = HashMap::new();
        for item in tree.iter() {
            let (k, v) = item?;
            let device = std::str::from_utf8(&k)
                .ok()
                .and_then(|d| DeviceId::parse(d).ok());
            match (device, decode_entry(&v)) {
                (Some(d), Ok(e)) => {
                    current.insert(d, e);
                }
                // The device stays quarantined (fail closed) until someone releases it.
                (Some(d), Err(error)) => {
                    tracing::error!(
                        event = "quarantine.unreadable_entry",
                        device = %d,
                        error = %error,
                        "unreadable quarantine entry: the device stays quarantined until released"
                    );
                    let reason = format!("quarantine entry unreadable ({error}); release to clear");
                    current.insert(
                        d,
                        Entry {
                            since_ms: 0,
                            reason,
                        },
                    );
                }
                // Not a device's entry: it cannot be honoured or released by name.
                (None, _) => tracing::error!(
                    event = "quarantine.unreadable_entry",
                    key = ?String::from_utf8_lossy(&k),
                    "quarantine entry under a key that is not a device id ignored"
                ),
            }
        }
        Ok(Quarantine {
            db: db.clone(),
            tree,
            threshold,
            current: Mutex::new(current),
            recent: Mutex::new(HashMap::new()),
            on_change: std::sync::OnceLock::new(),
            events,
        })
    }

    /// Why `device` is quarantined, if it is.
    pub fn reason(&self, device: &DeviceId) -> Option<String> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .map(|e| e.reason.clone())
    }

    /// Registers `hook`, called after every quarantine and release (once; later calls are
    /// ignored).
    pub fn on_change(&self, hook: ChangeHook) {
        let _ = self.on_change.set(hook);
    }

    fn changed(&self) {
        if let Some(hook) = self.on_change.get() {
            hook();
        }
    }

    /// Every quarantined device, by id.
    pub fn list(&self) -> Vec<(DeviceId, Entry)> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = current
            .iter()
            .map(|(d, e)| (d.clone(), e.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn entry(&self, device: &DeviceId) -> Option<Entry> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .cloned()
    }

    /// Quarantines `device` (persisted before this returns). False if it already was.
    pub fn quarantine(&self, device: &DeviceId, reason: &str) -> Result<bool, QuarantineError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.contains_key(device) {
            return Ok(false);
        }
        let entry = Entry {
            since_ms: crate::clock::now_ms(),
            reason: reason.to_owned(),
        };
        let stored = StoredEntry {
            v: ENTRY_VERSION,
            entry: &entry,
        };
        let value = serde_json::to_vec(&stored).unwrap_or_default();
        self.tree.insert(device.as_str(), value)?;
        self.db.flush()?;
        current.insert(device.clone(), entry);
        drop(current);
        self.events.device_quarantined(device, reason);
        self.changed();
        Ok(true)
    }

    /// Releases `device`. False if it was not quarantined.
    pub fn release(&self, device: &DeviceId, by: &str) -> Result<bool, QuarantineError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.remove(device).is_none() {
            return Ok(false);
        }
        self.tree.remove(device.as_str())?;
        self.db.flush()?;
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(device);
        drop(current);
        self.events.device_released(device, by);
        self.changed();
        Ok(true)
    }

    /// Carries out what `offence` costs `device` ([`crate::policy::sanction`]): a counted
    /// offence joins its history; a quarantine is persisted before this returns.
    pub fn punish(
        &self,
        device: &DeviceId,
        offence: Offence<'_>,
        now: Instant,
    ) -> Result<Sanction, QuarantineError> {
        let sanction = {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            let history = recent.entry(device.clone()).or_default();
            let s = sanction(offence, &self.threshold, history.make_contiguous(), now);
            if s.counted {
                history.push_back(now);
            }
            // Only the window's offences are kept: the history stays bounded.
            while history
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > self.threshold.window)
            {
                history.pop_front();
            }
            s
        };
        if let Some(reason) = &sanction.quarantine {
            self.quarantine(device, reason)?;
        }
        Ok(sanction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T: Threshold = Threshold {
        violations: 3,
        window: Duration::from_secs(60),
    };

    #[test]
    fn violations_within_the_window_quarantine_and_it_persists() {
        let dir = tempfile::tempdir().unwrap();
        let d = DeviceId::parse("pump-1").unwrap();
        // One store for every "run": what a new run reads is the tree (reopening the path
        // at once can race sled's background work for the file lock).
        let db = open_state(dir.path()).unwrap();
        {
            let q = Quarantine::open(&db, T, crate::events::Events::unaudited()).unwrap();
            let t0 = Instant::now();
            let v = crate::policy::Violation::PublishDenied { topic: "x".into() };
            let punish = |at| {
                q.punish(&d, Offence::Violation(&v), at)
                    .unwrap()
                    .quarantine
                    .is_some()
            };
            assert!(!punish(t0));
            // The first one falls out of the window.
            assert!(!punish(t0 + Duration::from_secs(61)));
            assert!(!punish(t0 + Duration::from_secs(62)));
            assert!(punish(t0 + Duration::from_secs(63)));
            assert!(q.reason(&d).unwrap().contains("3 ACL violations"));
        }
        let q = Quarantine::open(&db, T, crate::events::Events::unaudited()).unwrap();
        assert!(q.reason(&d).is_some(), "quarantine survives a restart");
        assert!(q.release(&d, "test").unwrap());
        assert!(!q.release(&d, "test").unwrap());
        drop(q);
        assert!(Quarantine::open(&db, T, crate::events::Events::unaudited())
            .unwrap()
            .reason(&d)
            .is_none());
    }

    #[test]
    fn entries_of_the_previous_format_are_read_and_an_unreadable_one_stays_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_state(dir.path()).unwrap();
        let tree = db.open_tree("quarantine").unwrap();
        // As wardgate wrote them before entries carried a version.
        tree.insert(
            "pump-1",
            &br#"{"since_ms":5,"reason":"3 ACL violations within 10m"}"#[..],
        )
        .unwrap();
        tree.insert("pump-2", &br#"{"v":9,"since_ms":5,"reason":"x"}"#[..])
            .unwrap();
        tree.insert("pump-3", &b"\xff garbled"[..]).unwrap();
        let q = Quarantine::open(&db, T, crate::events::Events::unaudited()).unwrap();
        let one = q.entry(&DeviceId::parse("pump-1").unwrap()).unwrap();
        assert_eq!(
            (one.since_ms, one.reason.as_str()),
            (5, "3 ACL violations within 10m")
        );
        for (d, why) in [
            ("pump-2", "newer than this wardgate's 2"),
            ("pump-3", "unreadable"),
        ] {
            let reason = q.reason(&DeviceId::parse(d).unwrap()).unwrap();
            assert!(reason.contains(why), "{d}: {reason}");
        }
        // What this version writes, it reads.
        let four = DeviceId::parse("pump-4").unwrap();
        assert!(q.quarantine(&four, "by hand").unwrap());
        let stored = tree.get("pump-4").unwrap().unwrap();
        assert!(stored.starts_with(br#"{"v":2,"#), "{stored:?}");
        assert_eq!(decode_entry(&stored).unwrap().reason, "by hand");
    }
}
