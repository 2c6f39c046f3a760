//! The agent's view of an update repository: which bundle, if any, this appliance should
//! install.
//!
//! The repository is loaded with tough from the newest root this appliance has trusted: the
//! one tough keeps in the datastore after following a rotation, or the image's root at
//! first use (or when the image's is newer, after an update shipped one). Starting from the
//! image's root every time would forget a rotation away from leaked keys — a mirror
//! withholding the new root could then serve metadata signed with the old ones — and would
//! make tough drop the trusted timestamp and snapshot at every check (it does when the
//! keys differ from the root it started from), losing rollback protection. A datastore
//! root that cannot be read is an error, never a reason to fall back to the image's.
//! The datastore of the metadata this appliance has already trusted makes TUF refuse a replayed older
//! timestamp or snapshot (mix-and-match, rollback of metadata), expired metadata (freeze),
//! signatures by keys the root does not name and signatures below a threshold. On top of
//! that the agent refuses a bundle for other hardware and any version at or below its
//! persistent version floor (rollback of software).
//!
//! Tested by `agent/tests/it/update.rs` against repositories built by `wardgate-release`.

use std::fmt;
use std::path::{Path, PathBuf};

pub use crate::version::Version;

/// Where updates come from, and what this appliance already trusts.
#[derive(Debug, Clone)]
pub struct Source {
    /// `file:///…/metadata/` or `https://…/metadata/`.
    pub metadata_url: url::Url,
    pub targets_url: url::Url,
    /// The root shipped in the image.
    pub trusted_root: PathBuf,
    /// Metadata trusted so far (persisted between checks).
    pub datastore: PathBuf,
    /// `file://` and HTTP(S), with the agent's rate floor, caps and resume.
    pub fetcher: crate::http::Fetcher,
}

/// A bundle this appliance may install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub target: String,
    pub version: Version,
    pub length: u64,
    /// The signed digest of the image, hex: its SHA-256, or its SHA-512 when the repository
    /// lists only that.
    pub digest: String,
    pub sbom: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("the update repository is not trustworthy: {0}")]
    Metadata(String),
    #[error("bundle {target}: version {version} is not above the version floor {floor} (rollback refused)")]
    BelowFloor {
        target: String,
        version: Version,
        floor: Version,
    },
    #[error("bundle {target} is for {fits:?}, not for this hardware ({hardware})")]
    Incompatible {
        target: String,
        fits: Vec<String>,
        hardware: String,
    },
    #[error("no bundle of version {0} in the repository")]
    NoSuchVersion(String),
    #[error("bundle {0} has no valid version in its metadata")]
    BadBundle(String),
    #[error("download refused: {0}")]
    Download(String),
    /// What arrived is not the signed image (hash, or more than its signed length).
    #[error("download refused: {0}")]
    Verify(String),
    #[error("slot: {0}")]
    Slot(String),
}

/// Loads the repository through TUF (see the module docs).
pub async fn load(source: &Source) -> Result<tough::Repository, UpdateError> {
    std::fs::create_dir_all(&source.datastore)
        .map_err(|e| UpdateError::Metadata(format!("datastore: {e}")))?;
    let kept = kept_copy(&source.datastore);
    restore(&source.datastore, &kept)?;
    let root = trusted_root(source)?;
    let repo = tough::RepositoryLoader::new(
        &root,
        source.metadata_url.clone(),
        source.targets_url.clone(),
    )
    .datastore(source.datastore.clone())
    .transport(source.fetcher.clone())
    .load()
    .await
    .map_err(|e| UpdateError::Metadata(e.to_string()))?;
    keep(&source.datastore, &kept)?;
    Ok(repo)
}

/// Forgets what a clock that ran ahead stamped: tough's latest known time, and the trusted
/// timestamp, snapshot and targets (the next load re-verifies them from the trusted root,
/// which is kept), in the datastore and its kept copy.
pub fn forget_time(datastore: &Path) -> Result<(), crate::files::FileError> {
    for dir in [datastore.to_owned(), kept_copy(datastore)] {
        for f in [
            "latest_known_time.json",
            "timestamp.json",
            "snapshot.json",
            "targets.json",
        ] {
            match std::fs::remove_file(dir.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(crate::files::FileError::at(&dir.join(f))(e))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Where the metadata of the last successful load is kept, written crash-safely.
fn kept_copy(datastore: &Path) -> PathBuf {
    let mut name = datastore.file_name().unwrap_or_default().to_owned();
    name.push(".trusted");
    datastore.with_file_name(name)
}

/// tough writes its datastore in place, so a crash can leave a file truncated, and it
/// skips a file it cannot parse — a truncated `timestamp.json` would let a replayed older
/// one in. So the datastore is reset before each load to the copy kept after the last
/// successful one. Before there is such a copy (first use, or after an upgrade), a
/// datastore file that does not parse is an error, never skipped.
fn restore(datastore: &Path, kept: &Path) -> Result<(), UpdateError> {
    let err = |what: &Path, e: &dyn fmt::Display| {
        UpdateError::Metadata(format!("trusted metadata {}: {e}", what.display()))
    };
    let files = |dir: &Path| -> Result<Vec<PathBuf>, UpdateError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| err(dir, &e))? {
            let path = entry.map_err(|e| err(dir, &e))?.path();
            if path.extension().is_some_and(|x| x == "json") {
                out.push(path);
            }
        }
        Ok(out)
    };
    if !kept.is_dir() {
        for path in files(datastore)? {
            let bytes = std::fs::read(&path).map_err(|e| err(&path, &e))?;
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| err(&path, &format!("unreadable ({e}); refusing to skip it")))?;
        }
        return Ok(());
    }
    for path in files(datastore)? {
        std::fs::remove_file(&path).map_err(|e| err(&path, &e))?;
    }
    for path in files(kept)? {
        let to = datastore.join(path.file_name().unwrap_or_default());
        std::fs::copy(&path, &to).map_err(|e| err(&to, &e))?;
    }
    Ok(())
}

/// Keeps the datastore of a successful load: each file written crash-safely (temporary
/// file, fsync, rename, fsync of the directory), and files tough removed removed.
fn keep(datastore: &Path, kept: &Path) -> Result<(), UpdateError> {
    let err = |what: &Path, e: &dyn fmt::Display| {
        UpdateError::Metadata(format!("keeping trusted metadata {}: {e}", what.display()))
    };
    std::fs::create_dir_all(kept).map_err(|e| err(kept, &e))?;
    let mut names = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(datastore).map_err(|e| err(datastore, &e))? {
        let path = entry.map_err(|e| err(datastore, &e))?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| err(&path, &e))?;
        let name = path.file_name().unwrap_or_default().to_owned();
        crate::files::write_atomic(&kept.join(&name), &text).map_err(|e| err(&path, &e))?;
        names.insert(name);
    }
    for entry in std::fs::read_dir(kept).map_err(|e| err(kept, &e))? {
        let path = entry.map_err(|e| err(kept, &e))?.path();
        if path.extension().is_some_and(|x| x == "json")
            && !names.contains(path.file_name().unwrap_or_default())
        {
            std::fs::remove_file(&path).map_err(|e| err(&path, &e))?;
        }
    }
    Ok(())
}

/// The root to start from: the datastore's (the last one tough verified and followed) or
/// the image's, whichever has the higher version. tough verifies it again (its own
/// signatures) before use.
fn trusted_root(source: &Source) -> Result<Vec<u8>, UpdateError> {
    let version = |path: &Path, bytes: &[u8]| -> Result<u64, UpdateError> {
        serde_json::from_slice::<tough::schema::Signed<tough::schema::Root>>(bytes)
            .map(|r| r.signed.version.get())
            .map_err(|e| UpdateError::Metadata(format!("trusted root {}: {e}", path.display())))
    };
    let image = std::fs::read(&source.trusted_root).map_err(|e| {
        UpdateError::Metadata(format!(
            "trusted root {}: {e}",
            source.trusted_root.display()
        ))
    })?;
    let stored_path = source.datastore.join("root.json");
    let stored = match std::fs::read(&stored_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(image),
        Err(e) => {
            return Err(UpdateError::Metadata(format!(
                "trusted root {}: {e}",
                stored_path.display()
            )))
        }
    };
    let stored_version = version(&stored_path, &stored)?;
    if stored_version >= version(&source.trusted_root, &image)? {
        Ok(stored)
    } else {
        Ok(image)
    }
}

/// Every bundle in the repository: (target name, version, hardware, length, sbom). Those
/// delegated roles list count too (tough has checked each against its role's paths).
fn bundles(repo: &tough::Repository) -> Result<Vec<(Candidate, Vec<String>)>, UpdateError> {
    let mut out = Vec::new();
    for (name, t) in repo.targets().signed.targets_iter() {
        let Some(v) = t.custom.get("version") else {
            continue; // an SBOM
        };
        let version = v
            .as_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| UpdateError::BadBundle(name.raw().to_owned()))?;
        let fits: Vec<String> = t
            .custom
            .get("hardware")
            .and_then(|h| serde_json::from_value(h.clone()).ok())
            .unwrap_or_default();
        let sbom = t
            .custom
            .get("sbom")
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        let digest = t
            .hashes
            .digest()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push((
            Candidate {
                target: name.raw().to_owned(),
                version,
                length: t.length,
                digest,
                sbom,
            },
            fits,
        ));
    }
    Ok(out)
}

/// The newest bundle for `hardware` above `floor`, or `None` if there is nothing to do.
pub fn newest(
    repo: &tough::Repository,
    hardware: &str,
    floor: &Version,
) -> Result<Option<Candidate>, UpdateError> {
    Ok(bundles(repo)?
        .into_iter()
        .filter(|(c, fits)| fits.iter().any(|h| h == hardware) && &c.version > floor)
        .map(|(c, _)| c)
        .max_by(|a, b| a.version.cmp(&b.version)))
}

/// The bundle of exactly `version` (a manual install), refused if it is for other hardware
/// or not above `floor`.
pub fn select(
    repo: &tough::Repository,
    version: &str,
    hardware: &str,
    floor: &Version,
) -> Result<Candidate, UpdateError> {
    let want: Version = version
        .parse()
        .map_err(|_| UpdateError::NoSuchVersion(version.to_owned()))?;
    let (c, fits) = bundles(repo)?
        .into_iter()
        .find(|(c, _)| c.version == want)
        .ok_or_else(|| UpdateError::NoSuchVersion(version.to_owned()))?;
    if !fits.iter().any(|h| h == hardware) {
        return Err(UpdateError::Incompatible {
            target: c.target,
            fits,
            hardware: hardware.to_owned(),
        });
    }
    if &c.version <= floor {
        return Err(UpdateError::BelowFloor {
            target: c.target,
            version: c.version,
            floor: floor.clone(),
        });
    }
    Ok(c)
}

/// How often a download's progress is made durable (slot synced, then the progress file),
/// so that an interrupted download resumes from there.
pub const PROGRESS_EVERY: u64 = 4 << 20;

/// Where an interrupted download of a target into a slot stopped; kept in the agent's
/// state directory between attempts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub target: String,
    /// The image's signed digest ([`Candidate::digest`]); `sha256` in earlier versions.
    #[serde(alias = "sha256")]
    pub digest: String,
    pub length: u64,
    pub slot: PathBuf,
    /// Bytes of the target synced to the slot.
    pub offset: u64,
}

impl Progress {
    pub fn load(path: &Path) -> Option<Progress> {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    pub fn save(&self, path: &Path) -> Result<(), UpdateError> {
        let text = serde_json::to_string(self).map_err(|e| UpdateError::Slot(e.to_string()))?;
        crate::files::write_atomic(path, &text)
            .map_err(|e| UpdateError::Slot(format!("{}: {e}", path.display())))
    }
}

/// Resuming across attempts: the transport to hand the slot's prefix to, and the progress
/// file.
#[derive(Debug, Clone, Copy)]
pub struct Resume<'a> {
    pub fetcher: &'a crate::http::Fetcher,
    pub progress: &'a Path,
}

/// Streams the bundle's image into the (inactive) slot at `slot`, as tough reads it: a
/// target longer than its signed length, or whose hash does not match, fails the copy
/// ([`UpdateError::Verify`]). The slot is written in place — no temporary copy of the
/// image — and synced; it is only ever made bootable after this returns `Ok` (by the boot
/// backend, a later step).
///
/// With `resume`, progress is made durable every [`PROGRESS_EVERY`] bytes; an attempt for
/// the same target and slot after an interruption feeds the bytes already in the slot to
/// tough's hash and downloads only the rest. A failed verification forgets the progress.
pub async fn write_to_slot(
    repo: &tough::Repository,
    candidate: &Candidate,
    slot: &Path,
    resume: Option<Resume<'_>>,
) -> Result<u64, UpdateError> {
    let here = Progress {
        target: candidate.target.clone(),
        digest: candidate.digest.clone(),
        length: candidate.length,
        slot: slot.to_owned(),
        offset: 0,
    };
    let start = resume
        .and_then(|r| Progress::load(r.progress))
        .filter(|p| {
            Progress {
                offset: 0,
                ..p.clone()
            } == here
                && p.offset <= candidate.length
        })
        .map_or(0, |p| p.offset);
    if let Some(r) = resume {
        r.fetcher
            .resume_from((start > 0).then(|| crate::http::Prefix {
                name: candidate.target.clone(),
                file: slot.to_owned(),
                len: start,
            }));
    }
    let result = stream_into(repo, candidate, slot, start, resume, &here).await;
    if let Some(r) = resume {
        r.fetcher.resume_from(None);
        match &result {
            Ok(_) | Err(UpdateError::Verify(_)) => {
                let _ = std::fs::remove_file(r.progress);
            }
            Err(_) => {} // kept: the next attempt resumes
        }
    }
    result
}

async fn stream_into(
    repo: &tough::Repository,
    candidate: &Candidate,
    slot: &Path,
    start: u64,
    resume: Option<Resume<'_>>,
    here: &Progress,
) -> Result<u64, UpdateError> {
    use futures_util::StreamExt;
    use std::io::{Seek, SeekFrom, Write};
    let name = tough::TargetName::new(candidate.target.clone())
        .map_err(|e| UpdateError::Metadata(e.to_string()))?;
    let mut stream = repo
        .read_target(&name)
        .await
        .map_err(|e| UpdateError::Download(e.to_string()))?
        .ok_or_else(|| {
            UpdateError::Download(format!("{} is not in the repository", candidate.target))
        })?;
    // The kept prefix is left in the slot only if the transport really streamed it from
    // there through the hash; if it fetched the whole target from the source instead, every
    // byte is written: what is armed is exactly what was hashed.
    let start = match resume {
        Some(r) if start > 0 && r.fetcher.prefix_pending() => {
            r.fetcher.resume_from(None);
            0
        }
        _ => start,
    };
    let slot_err = |e: std::io::Error| UpdateError::Slot(format!("{}: {e}", slot.display()));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(slot)
        .map_err(slot_err)?;
    out.seek(SeekFrom::Start(start)).map_err(slot_err)?;
    let mut written = 0u64;
    let mut synced = start;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if failed_verification(&e) {
                UpdateError::Verify(e.to_string())
            } else {
                UpdateError::Download(e.to_string())
            }
        })?;
        let before = written;
        written += chunk.len() as u64;
        if written > candidate.length {
            return Err(UpdateError::Verify(format!(
                "more than the signed length of {} bytes",
                candidate.length
            )));
        }
        // The first `start` bytes are in the slot already (they only pass through the hash).
        if written > start {
            let from = usize::try_from(start.saturating_sub(before)).unwrap_or(0);
            out.write_all(&chunk[from..]).map_err(slot_err)?;
        }
        if let Some(r) = resume {
            if written >= synced + PROGRESS_EVERY {
                out.sync_data().map_err(slot_err)?;
                synced = written;
                Progress {
                    offset: written,
                    ..here.clone()
                }
                .save(r.progress)?;
                crate::crash_point("progress-saved");
            }
        }
    }
    if written != candidate.length {
        return Err(UpdateError::Verify(format!(
            "{written} bytes, not the signed length of {}",
            candidate.length
        )));
    }
    out.sync_all().map_err(slot_err)?;
    Ok(written)
}

/// Whether tough refused the bytes themselves (hash, or past the signed length), anywhere
/// in the error's chain (tough wraps its checks in transport errors).
fn failed_verification(e: &tough::error::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(
            tough::error::Error::HashMismatch { .. } | tough::error::Error::MaxSizeExceeded { .. },
        ) = x.downcast_ref::<tough::error::Error>()
        {
            return true;
        }
        cur = x.source();
    }
    false
}

/// A directory as a `file://` URL (for a repository on a USB stick or in tests).
pub fn dir_url(dir: &Path) -> Result<url::Url, UpdateError> {
    let abs = std::fs::canonicalize(dir)
        .map_err(|e| UpdateError::Metadata(format!("{}: {e}", dir.display())))?;
    url::Url::from_directory_path(&abs)
        .map_err(|()| UpdateError::Metadata(format!("{} is not a directory", abs.display())))
}
