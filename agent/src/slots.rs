//! A/B slots, boot control and the persistent version floor.
//!
//! [`BootControl`] is the small trait the boot loaders sit behind. [`StateFile`] is the
//! backend the QEMU image uses: a text file on the boot partition that its U-Boot script
//! reads (`default=A`, and during a trial `try=B` and `tries=1`); [`power_on`] is that
//! script's decision, so tests can boot without a boot loader. A trial boots the new slot
//! once; unless the agent commits it after a good health check, the next boot is the
//! default slot again.
//!
//! Every state file is written atomically (temporary file, fsync, rename), so a power cut
//! leaves the old state or the new one, never half of one.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) use crate::files::write_atomic;
use crate::files::FileError;
use crate::state::StateDir;
use crate::version::{NotAVersion, Version};

/// The appliance's two root slots (named alike in the reports the gateway relays).
pub use wardgate_proto::Slot;

/// What the boot loader will do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootState {
    pub default: Slot,
    /// A slot on trial, and how many boots it has left.
    pub trial: Option<(Slot, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("boot state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("boot state {path}: line {line:?} is not understood")]
    Corrupt { path: PathBuf, line: String },
}

/// Why the slots, the floor or the record could not be read, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}: {source}", path.display())]
    Floor { path: PathBuf, source: NotAVersion },
    #[error("the update record's version: {0}")]
    Version(#[from] NotAVersion),
    #[error("update record: {0}")]
    Encode(serde_json::Error),
    #[error("{unreadable}; rewriting it as default={default} failed: {source}")]
    Repair {
        unreadable: BootError,
        default: Slot,
        source: BootError,
    },
    #[error(
        "slot {slot} is armed for a trial boot: no install until it is committed or rolled back"
    )]
    TrialArmed { slot: Slot },
    #[error(
        "update {version} in slot {slot} awaits its trial's verdict: no install until it is \
         committed or rolled back"
    )]
    AwaitsVerdict { version: String, slot: Slot },
}

pub trait BootControl: fmt::Debug {
    fn state(&self) -> Result<BootState, BootError>;
    /// Writes `s` as the boot loader's next decision, in one step.
    fn set(&mut self, s: BootState) -> Result<(), BootError>;
    /// Boot `slot` on the next boot only; if it is not committed, the default boots after.
    fn try_once(&mut self, slot: Slot) -> Result<(), BootError> {
        let s = self.state()?;
        self.set(BootState {
            trial: Some((slot, 1)),
            ..s
        })
    }
    /// Make `slot` the default (after a good health check); ends any trial.
    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        self.set(BootState {
            default: slot,
            trial: None,
        })
    }
    /// End a trial without committing: the default boots next.
    fn abandon(&mut self) -> Result<(), BootError> {
        let s = self.state()?;
        self.set(BootState { trial: None, ..s })
    }
}

impl<T: BootControl + ?Sized> BootControl for Box<T> {
    fn state(&self) -> Result<BootState, BootError> {
        (**self).state()
    }
    fn set(&mut self, s: BootState) -> Result<(), BootError> {
        (**self).set(s)
    }
}

/// What the boot loader does at power-on with `state`: the slot it boots, and the state it
/// leaves (a trial boot uses up one try).
pub fn power_on(state: BootState) -> (Slot, BootState) {
    match state.trial {
        Some((slot, tries)) if tries > 0 => (
            slot,
            BootState {
                trial: Some((slot, tries - 1)),
                ..state
            },
        ),
        _ => (
            state.default,
            BootState {
                trial: None,
                ..state
            },
        ),
    }
}

/// The boot-partition state file backend.
#[derive(Debug, Clone)]
pub struct StateFile {
    pub path: PathBuf,
}

impl StateFile {
    fn io(&self, source: std::io::Error) -> BootError {
        BootError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The second copy, beside the first (`wardgate-boot.bak` for `wardgate-boot.txt`):
    /// read when the first is missing or unreadable, by this backend and the boot script.
    pub fn backup(&self) -> PathBuf {
        self.path.with_extension("bak")
    }

    /// Writes both copies, the first, then the second: whenever one is being written, the
    /// other holds a whole state.
    pub fn write(&self, s: BootState) -> Result<(), BootError> {
        let mut text = format!("default={}\n", s.default);
        if let Some((slot, tries)) = s.trial {
            text.push_str(&format!("try={slot}\ntries={tries}\n"));
        }
        write_atomic(&self.path, &text).map_err(|e| self.io(e))?;
        write_atomic(&self.backup(), &text).map_err(|e| BootError::Io {
            path: self.backup(),
            source: e,
        })
    }

    /// One copy's state.
    fn read(&self, path: &Path) -> Result<BootState, BootError> {
        let text = std::fs::read_to_string(path).map_err(|source| BootError::Io {
            path: path.to_owned(),
            source,
        })?;
        // U-Boot's `env export -t` ends what it writes with a NUL.
        let text = text.trim_end_matches('\0');
        let (mut default, mut try_slot, mut tries) = (None, None, None);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let corrupt = || BootError::Corrupt {
                path: path.to_owned(),
                line: line.to_owned(),
            };
            let (k, v) = line.split_once('=').ok_or_else(corrupt)?;
            match k.trim() {
                "default" => default = Some(Slot::parse(v.trim()).ok_or_else(corrupt)?),
                "try" => try_slot = Some(Slot::parse(v.trim()).ok_or_else(corrupt)?),
                "tries" => tries = Some(v.trim().parse::<u32>().map_err(|_| corrupt())?),
                _ => return Err(corrupt()),
            }
        }
        let default = default.ok_or_else(|| BootError::Corrupt {
            path: path.to_owned(),
            line: "(no default=)".into(),
        })?;
        Ok(BootState {
            default,
            trial: try_slot.map(|s| (s, tries.unwrap_or(0))),
        })
    }
}

impl BootControl for StateFile {
    /// The first copy's state, or the second's if the first is missing or unreadable (a
    /// power cut while it was written); an error if neither can be read — never a guess at
    /// the committed slot.
    fn state(&self) -> Result<BootState, BootError> {
        match self.read(&self.path) {
            Ok(s) => Ok(s),
            Err(first) => self.read(&self.backup()).map_err(|_| first),
        }
    }

    fn set(&mut self, s: BootState) -> Result<(), BootError> {
        self.write(s)
    }
}

/// Zeroes the head of a slot (its first MiB, or all of a smaller file), where file systems
/// and kernels keep their headers, so a half-written image cannot be mistaken for one.
pub(crate) fn invalidate(path: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let len = f.seek(SeekFrom::End(0))?.min(1 << 20);
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(1 << 20)])?;
    f.sync_all()
}

/// What a slot that did not come up holds, as far as its head tells: blank, no ext4 file
/// system, or one whose boot never reached the health check.
pub fn what_a_slot_holds(path: &Path) -> String {
    use std::io::Read;
    let mut head = Vec::with_capacity(1 << 20);
    if let Err(e) = std::fs::File::open(path).and_then(|f| f.take(1 << 20).read_to_end(&mut head)) {
        return format!("{} cannot be read: {e}", path.display());
    }
    if head.iter().all(|&b| b == 0) {
        return "its first MiB is zeros: a blank or invalidated image".into();
    }
    // The ext4 superblock starts at 1024; its magic 0xEF53 is at 56 within it.
    if head.get(1080..1082) != Some(&[0x53, 0xEF][..]) {
        return "it holds no ext4 file system".into();
    }
    "it holds an ext4 file system: the boot never reached the health check (no kernel, or \
     a crash, a hang or a power cut first)"
        .into()
}

/// Whether the slot at `path` was invalidated ([`invalidate`]: its first MiB, or all of it
/// if shorter, is zeros — no bootable image starts so) or holds nothing.
pub fn is_invalidated(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(1 << 20);
    std::fs::File::open(path)?
        .take(1 << 20)
        .read_to_end(&mut head)?;
    Ok(head.iter().all(|&b| b == 0))
}

/// The lowest version this appliance will ever install again: raised when a slot is
/// committed, never lowered, kept across updates (outside the slots).
#[derive(Debug, Clone)]
pub struct Floor {
    pub path: PathBuf,
    /// The version of the image the board shipped with (a file holding it), if known: a
    /// fresh board never installs anything older.
    pub factory: Option<PathBuf>,
}

impl Floor {
    /// The floor: the highest committed version, and at least the factory image's; "0"
    /// with neither.
    pub fn get(&self) -> Result<Version, SlotError> {
        let read = |path: &Path| -> Result<Option<Version>, SlotError> {
            match std::fs::read_to_string(path) {
                Ok(t) => t
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|source| SlotError::Floor {
                        path: path.to_owned(),
                        source,
                    }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(FileError::at(path)(e).into()),
            }
        };
        let committed = read(&self.path)?;
        let factory = match &self.factory {
            Some(p) => read(p)?,
            None => None,
        };
        match committed.max(factory) {
            Some(v) => Ok(v),
            None => Ok("0".parse()?),
        }
    }

    /// Raises the floor to `v` (never lowers it).
    pub fn raise(&self, v: &Version) -> Result<(), SlotError> {
        if &self.get()? >= v {
            return Ok(());
        }
        write_atomic(&self.path, &format!("{v}\n")).map_err(FileError::at(&self.path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_boots_once_then_the_default_again_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = StateFile {
            path: dir.path().join("wardgate-boot.txt"),
        };
        b.write(BootState {
            default: Slot::A,
            trial: None,
        })
        .unwrap();
        b.try_once(Slot::B).unwrap();
        let (first, after) = power_on(b.state().unwrap());
        assert_eq!(first, Slot::B);
        b.write(after).unwrap();
        // The new slot never got to commit: the next boot is A.
        let (second, after) = power_on(b.state().unwrap());
        assert_eq!(second, Slot::A);
        assert_eq!(after.trial, None, "the spent trial is cleared");
        // This time it commits: B from now on.
        b.try_once(Slot::B).unwrap();
        let (booted, after) = power_on(b.state().unwrap());
        b.write(after).unwrap();
        b.commit(booted).unwrap();
        assert_eq!(power_on(b.state().unwrap()).0, Slot::B);
        assert_eq!(std::fs::read_to_string(&b.path).unwrap(), "default=B\n");
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let b = StateFile {
            path: dir.path().join("s.txt"),
        };
        std::fs::write(&b.path, "default=C\n").unwrap();
        let e = b.state().unwrap_err().to_string();
        assert!(e.contains("default=C"), "{e}");
        std::fs::write(&b.path, "try=B\n").unwrap();
        assert!(b.state().unwrap_err().to_string().contains("no default"));
    }

    #[test]
    fn a_state_file_cut_short_is_read_from_its_second_copy_and_neither_is_never_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile {
            path: dir.path().join("wardgate-boot.txt"),
        };
        let b = BootState {
            default: Slot::B,
            trial: None,
        };
        f.write(b).unwrap();
        assert_eq!(std::fs::read(f.backup()).unwrap(), b"default=B\n");
        std::fs::write(&f.path, b"defa").unwrap();
        assert_eq!(f.state().unwrap(), b);
        std::fs::remove_file(f.backup()).unwrap();
        assert!(f.state().is_err(), "no copy readable: an error, not slot A");
    }

    #[test]
    fn an_unreadable_boot_state_is_rewritten_from_the_record_never_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Appliance {
            slots: [dir.path().join("a"), dir.path().join("b")],
            boot: StateFile {
                path: dir.path().join("boot.txt"),
            },
            floor: Floor {
                path: dir.path().join("floor"),
                factory: None,
            },
            state: StateDir::new(dir.path()),
        };
        let garble = || {
            std::fs::write(dir.path().join("boot.txt"), "default=?\n").unwrap();
            std::fs::write(dir.path().join("boot.bak"), "").unwrap();
        };
        let repair = |a: &mut Appliance<StateFile>, booted| {
            a.repair_boot_state(booted).unwrap().map(|(s, _)| s.default)
        };
        // No record: the slot running (the boot loader's own choice).
        garble();
        assert_eq!(repair(&mut a, Slot::A), Some(Slot::A));
        assert_eq!(repair(&mut a, Slot::A), None, "readable now: left alone");
        // Committed to B, but the boot loader fell back to A: B stays the default.
        a.save(&Record::Committed {
            version: "1.1.0".into(),
            slot: Slot::B,
        })
        .unwrap();
        garble();
        assert_eq!(repair(&mut a, Slot::A), Some(Slot::B));
        // Installed to A beside B, or rolled back from A: B.
        for r in [
            Record::Pending {
                version: "1.2.0".into(),
                slot: Slot::A,
            },
            Record::RolledBack {
                version: "1.2.0".into(),
                slot: Slot::A,
                reason: String::new(),
            },
        ] {
            a.save(&r).unwrap();
            garble();
            assert_eq!(repair(&mut a, Slot::A), Some(Slot::B));
            assert_eq!(a.boot.state().unwrap().trial, None);
        }
    }

    #[test]
    fn a_slot_that_did_not_boot_is_described_by_its_head() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("slot");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(what_a_slot_holds(&p).contains("zeros"));
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        assert!(what_a_slot_holds(&p).contains("no ext4"));
        let mut ext4 = vec![0u8; 4096];
        ext4[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
        std::fs::write(&p, ext4).unwrap();
        assert!(what_a_slot_holds(&p).contains("never reached the health check"));
        assert!(what_a_slot_holds(&dir.path().join("none")).contains("cannot be read"));
    }

    #[test]
    fn the_floor_only_rises_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let f = Floor {
            path: dir.path().join("floor"),
            factory: None,
        };
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert_eq!(f.get().unwrap(), v("0"));
        f.raise(&v("1.2.0")).unwrap();
        f.raise(&v("1.1.0")).unwrap();
        let again = Floor {
            path: f.path.clone(),
            factory: None,
        };
        assert_eq!(again.get().unwrap(), v("1.2.0"));
        // The factory image's version is a floor from the start.
        std::fs::write(dir.path().join("version"), "1.5.0\n").unwrap();
        let fresh = Floor {
            path: dir.path().join("fresh-floor"),
            factory: Some(dir.path().join("version")),
        };
        assert_eq!(fresh.get().unwrap(), v("1.5.0"));
    }

    #[test]
    fn a_record_of_the_previous_format_is_read_and_a_newer_one_refused() {
        // As the agent wrote it before records carried a version.
        let old = br#"{"state":"committed","version":"1.2.0","slot":"B"}"#;
        assert_eq!(
            decode_record(old).unwrap(),
            Record::Committed {
                version: "1.2.0".into(),
                slot: Slot::B
            }
        );
        let newer = br#"{"v":3,"state":"committed","version":"1.2.0","slot":"B"}"#;
        assert!(decode_record(newer)
            .unwrap_err()
            .to_string()
            .contains("newer than this agent's 2"));
        // What this version writes, it reads; the previous version's reader (no `v`
        // field known) reads it too.
        let r = Record::RolledBack {
            version: "1.3.0".into(),
            slot: Slot::A,
            reason: "health check failed".into(),
        };
        let text = serde_json::to_string(&StoredRecord {
            v: RECORD_VERSION,
            record: &r,
        })
        .unwrap();
        assert!(
            text.starts_with(r#"{"v":2,"state":"rolled_back""#),
            "{text}"
        );
        assert_eq!(decode_record(text.as_bytes()).unwrap(), r);
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }
}

/// What the agent last did with an update, kept beside the floor (and reported).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Record {
    /// Written to `slot`, which boots once on trial.
    Pending { version: String, slot: Slot },
    /// The trial passed its health check: `slot` is the default, the floor is `version`.
    Committed { version: String, slot: Slot },
    /// The trial failed; the old slot runs again.
    RolledBack {
        version: String,
        slot: Slot,
        reason: String,
    },
}

/// Version of the record file (`update.json`): 2 is the record with `"v":2` beside its
/// `state`; 1, written before, had no `v`, and is still read. Agents of version 1 ignore the
/// field, so a rolled-back agent reads what a newer one wrote.
pub const RECORD_VERSION: u8 = 2;

#[derive(serde::Serialize)]
struct StoredRecord<'a> {
    v: u8,
    #[serde(flatten)]
    record: &'a Record,
}

#[derive(serde::Deserialize)]
struct ReadRecord {
    #[serde(default = "version_1")]
    v: u8,
    #[serde(flatten)]
    record: Record,
}

fn version_1() -> u8 {
    1
}

/// Why a record file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("format version {0}, newer than this agent's {RECORD_VERSION}")]
    Newer(u8),
}

/// A record file of this version or the one before.
pub fn decode_record(bytes: &[u8]) -> Result<Record, RecordError> {
    let read: ReadRecord = serde_json::from_slice(bytes)?;
    if read.v > RECORD_VERSION {
        return Err(RecordError::Newer(read.v));
    }
    Ok(read.record)
}

/// One appliance's update state: its two slots, boot control, floor, and the state
/// directory that holds its record.
#[derive(Debug)]
pub struct Appliance<B: BootControl> {
    pub slots: [PathBuf; 2],
    pub boot: B,
    pub floor: Floor,
    pub state: StateDir,
}

impl<B: BootControl> Appliance<B> {
    pub(crate) fn slot_path(&self, s: Slot) -> &Path {
        match s {
            Slot::A => &self.slots[0],
            Slot::B => &self.slots[1],
        }
    }

    /// The last record, if there is one this agent can read (an unreadable one is
    /// logged and taken as none).
    pub fn last(&self) -> Option<Record> {
        let path = self.state.record();
        let bytes = std::fs::read(&path).ok()?;
        decode_record(&bytes)
            .map_err(|e| {
                tracing::error!(
                    event = "agent.record_unreadable",
                    path = %path.display(),
                    error = %e,
                    "update record unreadable; taken as none"
                );
            })
            .ok()
    }

    pub fn save(&self, r: &Record) -> Result<(), SlotError> {
        let stored = StoredRecord {
            v: RECORD_VERSION,
            record: r,
        };
        let text = serde_json::to_string(&stored).map_err(SlotError::Encode)?;
        let path = self.state.record();
        write_atomic(&path, &text).map_err(FileError::at(&path))?;
        Ok(())
    }

    /// Where an interrupted download's progress is kept.
    pub fn download_path(&self) -> PathBuf {
        self.state.download()
    }

    /// Rewrites a boot state that cannot be read (both copies of the state file garbled, an
    /// environment lost) from what this appliance recorded, since the boot loader will not
    /// guess (it boots slot A and writes nothing): the committed slot is the one the last
    /// update was committed to, or, after an install or a rollback, the other one; with no
    /// update ever recorded, the slot `booted`. Any trial is dropped: one that was armed has
    /// lost its boot. Returns the state written and why, or `None` if the state was readable.
    pub fn repair_boot_state(
        &mut self,
        booted: Slot,
    ) -> Result<Option<(BootState, String)>, SlotError> {
        let unreadable = match self.boot.state() {
            Ok(_) => return Ok(None),
            Err(e) => e,
        };
        let (default, from) = match self.last() {
            Some(Record::Committed { version, slot }) => (
                slot,
                format!("update {version} was committed to slot {slot}"),
            ),
            Some(Record::Pending { version, slot }) => (
                slot.other(),
                format!("update {version} was installed to slot {slot}, beside the default"),
            ),
            Some(Record::RolledBack { version, slot, .. }) => (
                slot.other(),
                format!("update {version} was rolled back from slot {slot}"),
            ),
            None => (
                booted,
                format!("no update was ever recorded; slot {booted} is running"),
            ),
        };
        let s = BootState {
            default,
            trial: None,
        };
        if let Err(source) = self.boot.set(s) {
            return Err(SlotError::Repair {
                unreadable,
                default,
                source,
            });
        }
        Ok(Some((
            s,
            format!("{unreadable}; rewritten as default={default} ({from})"),
        )))
    }

    /// Disarms a trial the boot loader holds when no pending install is recorded (a crash
    /// between arming it and saving the record); returns its slot.
    /// Whether an install may start: never while a trial is undecided, since the slot that
    /// is not the default may then be the one running on trial or armed to boot next, and
    /// the default is the fallback.
    pub fn may_install(&self) -> Result<(), SlotError> {
        if let Some((slot, _)) = self.boot.state()?.trial {
            return Err(SlotError::TrialArmed { slot });
        }
        if let Some(Record::Pending { version, slot }) = self.last() {
            return Err(SlotError::AwaitsVerdict { version, slot });
        }
        Ok(())
    }
}
