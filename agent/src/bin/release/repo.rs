//! The repository behind `wardgate-release`, the fleet manager's side (a binary of its own:
//! nothing on the appliance builds repositories). Keys, a TUF repository (root, targets,
//! snapshot, timestamp) and bundles in it, built with the `tough` crate.
//!
//! Layout of a repository directory:
//!
//! ```text
//! REPO/metadata/   1.root.json (and N.root.json after rotations), root.json (latest),
//!                  N.targets.json, N.snapshot.json, timestamp.json   (consistent snapshots)
//! REPO/targets/    SHA256.NAME for every bundle file
//! ```
//!
//! A bundle is two targets: the image (`{version}-{file}`) whose `custom` metadata holds
//! `version`, `hardware` (the boards it fits) and `sbom` (the SBOM target's name), and the
//! SBOM itself (`{version}-sbom-{file}`). Target names hold no `/`, so that every TUF
//! client finds a target at the same `targets/SHA256.NAME`; metadata times are whole
//! seconds, as the specification writes them. Keys are Ed25519 PKCS#8 files, mode 0600.
//!
//! Tested by `agent/tests/it/release.rs`, which builds repositories with this tool and loads
//! them with tough's client, as the agent will, and by `agent/tests/it/python_tuf.rs`, where
//! python-tuf's client (an independent implementation) reads and downloads them.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aws_lc_rs::rand::SystemRandom;
use tough::editor::signed::SignedRole;
use tough::editor::RepositoryEditor;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Target};
use tough::{RepositoryLoader, TargetName};

/// The TUF specification version written into metadata.
pub const SPEC_VERSION: &str = "1.0.0";

/// Writes a new Ed25519 private key (PKCS#8) to `out`, mode 0600; refuses to overwrite.
/// Returns its TUF key id.
pub async fn keygen(out: &Path) -> anyhow::Result<String> {
    let rng = SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("cannot generate a key"))?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .with_context(|| format!("{} (refusing to overwrite a key)", out.display()))?;
        f.write_all(pkcs8.as_ref())?;
        f.sync_all()?;
    }
    key_id(out).await
}

fn source(path: &Path) -> Box<dyn KeySource> {
    Box::new(LocalKeySource {
        path: path.to_owned(),
    })
}

/// The TUF key id (hex) of the private key at `path`.
pub async fn key_id(path: &Path) -> anyhow::Result<String> {
    let signer = source(path)
        .as_sign()
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let id = signer
        .tuf_key()
        .key_id()
        .with_context(|| format!("{}: no key id", path.display()))?;
    Ok(id.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// The keys of one role and how many must sign.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    pub keys: Vec<PathBuf>,
    pub threshold: u64,
}

fn metadata_dir(repo: &Path) -> PathBuf {
    repo.join("metadata")
}

fn targets_dir(repo: &Path) -> PathBuf {
    repo.join("targets")
}

/// `days` from now, in whole seconds: the TUF specification's metadata times carry none
/// finer ("YYYY-MM-DDTHH:MM:SSZ"), and python-tuf refuses metadata whose do.
fn expiry(days: u64) -> anyhow::Result<jiff::Timestamp> {
    let secs = i64::try_from(days.saturating_mul(86_400)).unwrap_or(i64::MAX);
    jiff::Timestamp::now()
        .as_second()
        .checked_add(secs)
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .context("expiry out of range")
}

/// Creates a repository: a root (version 1) naming the keys and thresholds of every role,
/// signed by the root keys, and empty targets, snapshot and timestamp.
pub async fn init(
    repo: &Path,
    roles: &HashMap<RoleType, RoleSpec>,
    root_days: u64,
    other_days: u64,
) -> anyhow::Result<()> {
    let meta = metadata_dir(repo);
    if meta.join("root.json").exists() {
        bail!("{} already holds a repository", repo.display());
    }
    std::fs::create_dir_all(&meta)?;
    std::fs::create_dir_all(targets_dir(repo))?;
    let mut root = Root {
        spec_version: SPEC_VERSION.to_owned(),
        consistent_snapshot: true,
        version: NonZeroU64::MIN,
        expires: expiry(root_days)?,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    for role in [
        RoleType::Root,
        RoleType::Targets,
        RoleType::Snapshot,
        RoleType::Timestamp,
    ] {
        let spec = roles
            .get(&role)
            .with_context(|| format!("no keys for the {role} role"))?;
        if spec.threshold == 0 || spec.threshold > spec.keys.len() as u64 {
            bail!(
                "{role}: threshold {} with {} keys",
                spec.threshold,
                spec.keys.len()
            );
        }
        let mut keyids = Vec::new();
        for k in &spec.keys {
            let signer = source(k)
                .as_sign()
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))?;
            let key = signer.tuf_key();
            let id: Decoded<Hex> = key.key_id().context("key id")?;
            root.keys.insert(id.clone(), key);
            keyids.push(id);
        }
        root.roles.insert(
            role,
            RoleKeys {
                keyids,
                threshold: NonZeroU64::new(spec.threshold).context("threshold")?,
                _extra: HashMap::new(),
            },
        );
    }
    let root_sources: Vec<Box<dyn KeySource>> = roles[&RoleType::Root]
        .keys
        .iter()
        .map(|k| source(k))
        .collect();
    let signed = SignedRole::new(
        root.clone(),
        &KeyHolder::Root(root),
        &root_sources,
        &SystemRandom::new(),
    )
    .await?;
    let threshold = roles[&RoleType::Root].threshold;
    if (signed.signed().signatures.len() as u64) < threshold {
        bail!("root signed by fewer keys than its threshold");
    }
    signed.write(&meta, true).await?;
    std::fs::copy(meta.join("1.root.json"), meta.join("root.json"))?;

    let mut editor = RepositoryEditor::new(meta.join("root.json")).await?;
    let first = Versions {
        targets: 1,
        snapshot: 1,
        timestamp: 1,
    };
    stamp(&mut editor, first, other_days)?;
    let all: Vec<PathBuf> = roles
        .iter()
        .filter(|(r, _)| **r != RoleType::Root)
        .flat_map(|(_, s)| s.keys.clone())
        .collect();
    sign_and_write(editor, repo, &all).await.map(|_| ())
}

/// Versions of targets, snapshot and timestamp, each its own: `refresh` raises snapshot
/// and timestamp alone, so they run ahead of targets.
#[derive(Debug, Clone, Copy)]
struct Versions {
    targets: u64,
    snapshot: u64,
    timestamp: u64,
}

impl Versions {
    /// One above each of the repository's current versions: versions only ever grow.
    fn next(r: &tough::Repository) -> anyhow::Result<Versions> {
        let up = |v: NonZeroU64| v.get().checked_add(1).context("version overflow");
        Ok(Versions {
            targets: up(r.targets().signed.version)?,
            snapshot: up(r.snapshot().signed.version)?,
            timestamp: up(r.timestamp().signed.version)?,
        })
    }
}

/// Sets versions and expiries of targets, snapshot and timestamp.
fn stamp(editor: &mut RepositoryEditor, v: Versions, days: u64) -> anyhow::Result<()> {
    let nz = |n: u64| NonZeroU64::new(n).context("version");
    let e = expiry(days)?;
    editor
        .targets_version(nz(v.targets)?)?
        .targets_expires(e)?
        .snapshot_version(nz(v.snapshot)?)
        .snapshot_expires(e)
        .timestamp_version(nz(v.timestamp)?)
        .timestamp_expires(e);
    Ok(())
}

/// Signs every role the editor holds with `keys` and writes the metadata.
async fn sign_and_write(
    editor: RepositoryEditor,
    repo: &Path,
    keys: &[PathBuf],
) -> anyhow::Result<tough::editor::signed::SignedRepository> {
    let sources: Vec<Box<dyn KeySource>> = keys.iter().map(|k| source(k)).collect();
    let signed = editor
        .sign(&sources)
        .await
        .context("signing failed: every role needs keys of its own up to its threshold")?;
    signed.write(metadata_dir(repo)).await?;
    Ok(signed)
}

/// Loads the repository in `repo` the way a client does, trusting `root` (default: the
/// repository's first root, as an appliance image ships it).
pub async fn load(repo: &Path, root: Option<&Path>) -> anyhow::Result<tough::Repository> {
    load_with(repo, root, tough::ExpirationEnforcement::Safe).await
}

/// The repository for editing by its owner: every signature is checked, expiry is not
/// (re-signing is how lapsed metadata is renewed).
async fn load_own(repo: &Path) -> anyhow::Result<tough::Repository> {
    load_with(repo, None, tough::ExpirationEnforcement::Unsafe).await
}

async fn load_with(
    repo: &Path,
    root: Option<&Path>,
    expiry: tough::ExpirationEnforcement,
) -> anyhow::Result<tough::Repository> {
    let meta = metadata_dir(repo);
    let root_path = root.map_or_else(|| meta.join("1.root.json"), Path::to_path_buf);
    let root_bytes = std::fs::read(&root_path)
        .with_context(|| format!("trusted root {}", root_path.display()))?;
    let dir_url = |p: &Path| -> anyhow::Result<url::Url> {
        let abs = std::fs::canonicalize(p)?;
        url::Url::from_directory_path(&abs)
            .map_err(|()| anyhow::anyhow!("{} is not a directory path", abs.display()))
    };
    let repository =
        RepositoryLoader::new(&root_bytes, dir_url(&meta)?, dir_url(&targets_dir(repo))?)
            .expiration_enforcement(expiry)
            .load()
            .await?;
    Ok(repository)
}

/// A bundle to add.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub image: PathBuf,
    pub version: String,
    pub hardware: Vec<String>,
    pub sbom: PathBuf,
}

/// Adds a bundle and re-signs targets, snapshot and timestamp (one version up).
pub async fn add(repo: &Path, bundle: &Bundle, keys: &[PathBuf], days: u64) -> anyhow::Result<()> {
    let current = load_own(repo).await?;
    let next = Versions::next(&current)?;
    if current
        .targets()
        .signed
        .targets
        .values()
        .any(|t| t.custom.get("version").and_then(|v| v.as_str()) == Some(&bundle.version))
    {
        bail!("version {} is already in the repository", bundle.version);
    }
    let file_name = |p: &Path| -> anyhow::Result<String> {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .with_context(|| format!("{} has no file name", p.display()))
    };
    // Flat names (no '/'): a hash-prefixed file is then `HASH.NAME` for every client.
    // With a directory in the name, tough prefixes the whole path (`HASH.1.0/x.img`) where
    // the specification, and python-tuf, prefix the file name (`1.0/HASH.x.img`).
    let image_name = TargetName::new(format!("{}-{}", bundle.version, file_name(&bundle.image)?))?;
    let sbom_name = TargetName::new(format!(
        "{}-sbom-{}",
        bundle.version,
        file_name(&bundle.sbom)?
    ))?;
    let mut image = Target::from_path(&bundle.image).await?;
    image
        .custom
        .insert("version".into(), bundle.version.clone().into());
    image
        .custom
        .insert("hardware".into(), serde_json::json!(bundle.hardware));
    image
        .custom
        .insert("sbom".into(), sbom_name.raw().to_owned().into());
    let sbom = Target::from_path(&bundle.sbom).await?;

    let root = metadata_dir(repo).join("root.json");
    let mut editor = RepositoryEditor::from_repo(&root, current).await?;
    editor
        .add_target(image_name.clone(), image)?
        .add_target(sbom_name.clone(), sbom)?;
    stamp(&mut editor, next, days)?;
    let signed = sign_and_write(editor, repo, keys).await?;
    // Target files under their hash-prefixed names (consistent snapshots).
    for (name, path) in [(&image_name, &bundle.image), (&sbom_name, &bundle.sbom)] {
        signed
            .copy_target(
                path,
                &targets_dir(repo),
                tough::editor::signed::PathExists::Skip,
                Some(name),
            )
            .await?;
    }
    Ok(())
}

/// Re-signs snapshot and timestamp with new versions and expiry, so that clients keep
/// accepting the repository: run it before they expire. Needs only the snapshot and
/// timestamp keys; the signed targets metadata is left exactly as it is.
pub async fn refresh(repo: &Path, keys: &[PathBuf], days: u64) -> anyhow::Result<()> {
    let current = load_own(repo).await?;
    let meta = metadata_dir(repo);
    let root: tough::schema::Signed<Root> =
        serde_json::from_slice(&std::fs::read(meta.join("root.json"))?)?;
    let holder = KeyHolder::Root(root.signed);
    let sources: Vec<Box<dyn KeySource>> = keys.iter().map(|k| source(k)).collect();
    let rng = SystemRandom::new();
    let e = expiry(days)?;

    let mut snapshot = current.snapshot().signed.clone();
    snapshot.version = snapshot
        .version
        .checked_add(1)
        .context("snapshot version")?;
    snapshot.expires = e;
    let snapshot = SignedRole::new(snapshot, &holder, &sources, &rng)
        .await
        .context("signing the snapshot needs its keys up to its threshold")?;

    let mut timestamp = current.timestamp().signed.clone();
    timestamp.version = timestamp
        .version
        .checked_add(1)
        .context("timestamp version")?;
    timestamp.expires = e;
    timestamp.meta.insert(
        "snapshot.json".to_owned(),
        tough::schema::Metafile {
            length: Some(*snapshot.length()),
            hashes: Some(tough::schema::Hashes {
                sha256: snapshot.sha256().to_vec().into(),
                _extra: HashMap::new(),
            }),
            version: snapshot.signed().signed.version,
            _extra: HashMap::new(),
        },
    );
    let timestamp = SignedRole::new(timestamp, &holder, &sources, &rng)
        .await
        .context("signing the timestamp needs its keys up to its threshold")?;
    // Snapshot first: a client reading the new timestamp must find its snapshot.
    snapshot.write(&meta, true).await?;
    timestamp.write(&meta, true).await?;
    Ok(())
}

/// Replaces the root keys with `new_keys` (threshold `threshold`) in a new root version,
/// signed by the current root keys up to the current threshold and by the new keys up to
/// the new one; refused otherwise. Clients that trust an older root follow the chain.
pub async fn rotate(
    repo: &Path,
    old_keys: &[PathBuf],
    new_keys: &[PathBuf],
    threshold: u64,
    days: u64,
) -> anyhow::Result<u64> {
    let meta = metadata_dir(repo);
    let current: tough::schema::Signed<Root> = serde_json::from_slice(
        &std::fs::read(meta.join("root.json")).context("the repository's root.json")?,
    )?;
    let old = current.signed;
    if threshold == 0 || threshold > new_keys.len() as u64 {
        bail!("threshold {threshold} with {} new keys", new_keys.len());
    }
    let mut new = old.clone();
    new.version = old.version.checked_add(1).context("root version")?;
    new.expires = expiry(days)?;
    let mut keyids = Vec::new();
    for k in new_keys {
        let key = source(k)
            .as_sign()
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))?
            .tuf_key();
        let id: Decoded<Hex> = key.key_id().context("key id")?;
        new.keys.insert(id.clone(), key);
        keyids.push(id);
    }
    new.roles.insert(
        RoleType::Root,
        RoleKeys {
            keyids,
            threshold: NonZeroU64::new(threshold).context("threshold")?,
            _extra: HashMap::new(),
        },
    );
    // Keys no role names any more leave the root.
    let named: std::collections::HashSet<Decoded<Hex>> = new
        .roles
        .values()
        .flat_map(|r| r.keyids.iter().cloned())
        .collect();
    new.keys.retain(|id, _| named.contains(id));

    let rng = SystemRandom::new();
    let sources =
        |keys: &[PathBuf]| -> Vec<Box<dyn KeySource>> { keys.iter().map(|k| source(k)).collect() };
    let by_new = SignedRole::new(
        new.clone(),
        &KeyHolder::Root(new.clone()),
        &sources(new_keys),
        &rng,
    )
    .await?;
    let by_old = SignedRole::new(
        new.clone(),
        &KeyHolder::Root(old.clone()),
        &sources(old_keys),
        &rng,
    )
    .await
    .context("the old keys given are not the current root keys: a rotation needs both")?;
    let count = |sigs: &[tough::schema::Signature], role: &RoleKeys| {
        sigs.iter()
            .filter(|s| role.keyids.contains(&s.keyid))
            .count() as u64
    };
    let old_role = &old.roles[&RoleType::Root];
    if count(&by_old.signed().signatures, old_role) < old_role.threshold.get() {
        bail!(
            "the current root keys given sign below the current threshold ({}): a rotation needs both",
            old_role.threshold
        );
    }
    let new_role = &new.roles[&RoleType::Root];
    if count(&by_new.signed().signatures, new_role) < new_role.threshold.get() {
        bail!("the new root keys sign below the new threshold ({threshold})");
    }
    let signed = by_new.add_old_signatures(by_old.signed().signatures.clone())?;
    let version = new.version.get();
    signed.write(&meta, true).await?;
    std::fs::copy(
        meta.join(format!("{version}.root.json")),
        meta.join("root.json"),
    )?;
    Ok(version)
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listing {
    pub targets_version: u64,
    pub expires: String,
    /// (name, version, hardware) of every image.
    pub images: Vec<(String, String, Vec<String>)>,
}

/// Loads the repository as a client would, checks that versions only grew (every versioned
/// snapshot and targets file holds the version its name says, and the newest is the one in
/// force), checks every target's length and hash, and lists the images.
pub async fn verify(repo: &Path, root: Option<&Path>) -> anyhow::Result<Listing> {
    let r = load(repo, root).await?;
    check_versions(
        &metadata_dir(repo),
        "snapshot",
        r.snapshot().signed.version.get(),
    )?;
    check_versions(
        &metadata_dir(repo),
        "targets",
        r.targets().signed.version.get(),
    )?;
    let mut images = Vec::new();
    for (name, t) in &r.targets().signed.targets {
        // Reading a target checks its length and hash against the signed metadata.
        let stream = r
            .read_target(name)
            .await?
            .with_context(|| format!("target {} is missing", name.raw()))?;
        drain(stream)
            .await
            .with_context(|| format!("target {}", name.raw()))?;
        if let Some(v) = t.custom.get("version").and_then(|v| v.as_str()) {
            let hardware = t
                .custom
                .get("hardware")
                .and_then(|h| serde_json::from_value(h.clone()).ok())
                .unwrap_or_default();
            images.push((name.raw().to_owned(), v.to_owned(), hardware));
        }
    }
    images.sort();
    Ok(Listing {
        targets_version: r.targets().signed.version.get(),
        expires: r.targets().signed.expires.to_string(),
        images,
    })
}

/// Every `N.{role}.json` in `meta` must hold version N, and none may be above `in_force`
/// (what the timestamp, through the snapshot, names): a newer file that is not in force
/// means a version went down, and clients that saw it refuse the repository.
fn check_versions(meta: &Path, role: &str, in_force: u64) -> anyhow::Result<()> {
    let suffix = format!(".{role}.json");
    for entry in std::fs::read_dir(meta)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_suffix(&suffix)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let text = std::fs::read(meta.join(&name))?;
        let held: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{name} is not readable metadata"))?;
        let version = held["signed"]["version"].as_u64();
        if version != Some(n) {
            bail!("{name} holds version {version:?}: a versioned file was overwritten");
        }
        if n > in_force {
            bail!(
                "{name} is newer than the {role} in force (version {in_force}): a version went \
                 down, and clients that saw {n} refuse the repository"
            );
        }
    }
    Ok(())
}

async fn drain(
    mut stream: impl futures_core::Stream<Item = tough::error::Result<bytes::Bytes>> + Unpin,
) -> anyhow::Result<u64> {
    use futures_util::StreamExt;
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        n += chunk?.len() as u64;
    }
    Ok(n)
}

/// How long metadata stays valid by default.
pub const DEFAULT_ROOT_DAYS: u64 = 365;
pub const DEFAULT_DAYS: u64 = 7;
