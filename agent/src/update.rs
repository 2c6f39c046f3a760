//! The agent's view of an update repository: which bundle, if any, this appliance should
//! install.
//!
//! The repository is loaded with tough from the image's trusted root, with a datastore of
//! the metadata this appliance has already trusted, so that TUF refuses a replayed older
//! timestamp or snapshot (mix-and-match, rollback of metadata), expired metadata (freeze),
//! signatures by keys the root does not name and signatures below a threshold. On top of
//! that the agent refuses a bundle for other hardware and any version at or below its
//! persistent version floor (rollback of software).
//!
//! Tested by `agent/tests/update.rs` against repositories built by `wardgate-release`.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A bundle version: dot-separated numbers, compared numerically ("1.10.0" > "1.9.2").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(Vec<u64>);

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Version, String> {
        let parts: Result<Vec<u64>, _> = s.split('.').map(str::parse).collect();
        match parts {
            Ok(p) if !p.is_empty() => Ok(Version(p)),
            _ => Err(format!(
                "{s:?} is not a version (numbers separated by dots)"
            )),
        }
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.0.len().max(other.0.len());
        for i in 0..n {
            let (a, b) = (
                self.0.get(i).copied().unwrap_or(0),
                other.0.get(i).copied().unwrap_or(0),
            );
            match a.cmp(&b) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        Ordering::Equal
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

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
    #[error("slot: {0}")]
    Slot(String),
}

/// Loads the repository through TUF (see the module docs).
pub async fn load(source: &Source) -> Result<tough::Repository, UpdateError> {
    let root = std::fs::read(&source.trusted_root).map_err(|e| {
        UpdateError::Metadata(format!(
            "trusted root {}: {e}",
            source.trusted_root.display()
        ))
    })?;
    std::fs::create_dir_all(&source.datastore)
        .map_err(|e| UpdateError::Metadata(format!("datastore: {e}")))?;
    tough::RepositoryLoader::new(
        &root,
        source.metadata_url.clone(),
        source.targets_url.clone(),
    )
    .datastore(source.datastore.clone())
    .transport(source.fetcher.clone())
    .load()
    .await
    .map_err(|e| UpdateError::Metadata(e.to_string()))
}

/// Every bundle in the repository: (target name, version, hardware, length, sbom).
fn bundles(repo: &tough::Repository) -> Result<Vec<(Candidate, Vec<String>)>, UpdateError> {
    let mut out = Vec::new();
    for (name, t) in &repo.targets().signed.targets {
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
        out.push((
            Candidate {
                target: name.raw().to_owned(),
                version,
                length: t.length,
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

/// Streams the bundle's image into the (inactive) slot at `slot`, as tough reads it: a
/// target longer than its signed length, or whose hash does not match, fails the copy. The
/// slot is written in place — no temporary copy of the image — and synced; it is only ever
/// made bootable after this returns `Ok` (by the boot backend, a later step).
pub async fn write_to_slot(
    repo: &tough::Repository,
    candidate: &Candidate,
    slot: &Path,
) -> Result<u64, UpdateError> {
    use futures_util::StreamExt;
    use std::io::Write;
    let name = tough::TargetName::new(candidate.target.clone())
        .map_err(|e| UpdateError::Metadata(e.to_string()))?;
    let mut stream = repo
        .read_target(&name)
        .await
        .map_err(|e| UpdateError::Download(e.to_string()))?
        .ok_or_else(|| {
            UpdateError::Download(format!("{} is not in the repository", candidate.target))
        })?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(slot)
        .map_err(|e| UpdateError::Slot(format!("{}: {e}", slot.display())))?;
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| UpdateError::Download(e.to_string()))?;
        written += chunk.len() as u64;
        if written > candidate.length {
            return Err(UpdateError::Download(format!(
                "more than the signed length of {} bytes",
                candidate.length
            )));
        }
        out.write_all(&chunk)
            .map_err(|e| UpdateError::Slot(format!("{}: {e}", slot.display())))?;
    }
    if written != candidate.length {
        return Err(UpdateError::Download(format!(
            "{written} bytes, not the signed length of {}",
            candidate.length
        )));
    }
    out.sync_all()
        .map_err(|e| UpdateError::Slot(format!("{}: {e}", slot.display())))?;
    Ok(written)
}

/// A directory as a `file://` URL (for a repository on a USB stick or in tests).
pub fn dir_url(dir: &Path) -> Result<url::Url, UpdateError> {
    let abs = std::fs::canonicalize(dir)
        .map_err(|e| UpdateError::Metadata(format!("{}: {e}", dir.display())))?;
    url::Url::from_directory_path(&abs)
        .map_err(|()| UpdateError::Metadata(format!("{} is not a directory", abs.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("1.10.0") > v("1.9.2"));
        assert!(v("2") > v("1.99"));
        assert_eq!(v("1.2"), v("1.2"));
        assert_eq!(v("1.2").cmp(&v("1.2.0")), Ordering::Equal);
        assert!("1.x".parse::<Version>().is_err());
        assert!("".parse::<Version>().is_err());
    }
}
