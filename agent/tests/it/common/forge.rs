//! An attacker's tools: edits a repository's metadata and signs it with whatever keys the
//! attacker holds, ignoring thresholds and the root's key lists — what `wardgate-release`
//! refuses to do. Signatures are made as TUF makes them: Ed25519 over the canonical JSON
//! of `signed`, under the key's TUF key id.

use std::path::Path;

use serde::Serialize;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{
    Hashes, Metafile, Root, Signature, Signed, Snapshot, Target, Targets, Timestamp,
};

use super::Fleet;

async fn sign<T: Serialize>(f: &Fleet, role: T, keys: &[&str]) -> Signed<T> {
    let mut data = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut data, olpc_cjson::CanonicalFormatter::new());
    role.serialize(&mut ser).unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut signatures = Vec::new();
    for k in keys {
        let source = LocalKeySource {
            path: f.p(&format!("{k}.key")),
        };
        let signer = source.as_sign().await.unwrap();
        let sig = signer.sign(&data, &rng).await.unwrap();
        signatures.push(Signature {
            keyid: signer.tuf_key().key_id().unwrap(),
            sig: sig.into(),
        });
    }
    Signed {
        signed: role,
        signatures,
    }
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Signed<T> {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn sha256(b: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn write<T: Serialize>(path: &Path, s: &Signed<T>) -> Vec<u8> {
    let bytes = serde_json::to_vec_pretty(s).unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Whose signatures each role of a forged release carries.
pub struct Signers<'a> {
    pub targets: &'a [&'a str],
    pub snapshot: &'a [&'a str],
    pub timestamp: &'a [&'a str],
}

/// Publishes an image for `version` (both test hardwares) as the attacker: a new targets,
/// snapshot and timestamp, each signed by the given keys.
pub async fn bundle(f: &Fleet, version: &str, by: &Signers<'_>) {
    let meta = f.p("repo/metadata");
    let ts: Signed<Timestamp> = read(&meta.join("timestamp.json"));
    let sv = ts.signed.meta["snapshot.json"].version;
    let snap: Signed<Snapshot> = read(&meta.join(format!("{sv}.snapshot.json")));
    let tv = snap.signed.meta["targets.json"].version;
    let mut targets: Signed<Targets> = read(&meta.join(format!("{tv}.targets.json")));

    let image = format!("malicious {version}").repeat(1000).into_bytes();
    let digest = sha256(&image);
    let name = format!("{version}/wardgate-{version}.img");
    let dir = f.p(&format!("repo/targets/{}.{version}", hex(&digest)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("wardgate-{version}.img")), &image).unwrap();
    let mut custom = std::collections::HashMap::new();
    custom.insert("version".to_owned(), serde_json::json!(version));
    custom.insert(
        "hardware".to_owned(),
        serde_json::json!(["rpi4", "qemu-virt"]),
    );
    targets.signed.targets.insert(
        tough::TargetName::new(name).unwrap(),
        Target {
            length: image.len() as u64,
            hashes: Hashes {
                sha256: digest.into(),
                _extra: Default::default(),
            },
            custom,
            _extra: Default::default(),
        },
    );
    targets.signed.version = targets.signed.version.checked_add(1).unwrap();
    let tv = targets.signed.version;
    let targets = sign(f, targets.signed, by.targets).await;
    let tbytes = write(&meta.join(format!("{tv}.targets.json")), &targets);

    let mut snap = snap.signed;
    let entry = snap.meta.get_mut("targets.json").unwrap();
    entry.version = tv;
    if entry.length.is_some() {
        entry.length = Some(tbytes.len() as u64);
    }
    if entry.hashes.is_some() {
        entry.hashes = Some(Hashes {
            sha256: sha256(&tbytes).into(),
            _extra: Default::default(),
        });
    }
    snap.version = snap.version.checked_add(1).unwrap();
    let sv = snap.version;
    let snap = sign(f, snap, by.snapshot).await;
    let sbytes = write(&meta.join(format!("{sv}.snapshot.json")), &snap);

    let mut ts = ts.signed;
    ts.meta.insert(
        "snapshot.json".to_owned(),
        Metafile {
            length: Some(sbytes.len() as u64),
            hashes: Some(Hashes {
                sha256: sha256(&sbytes).into(),
                _extra: Default::default(),
            }),
            version: sv,
            _extra: Default::default(),
        },
    );
    ts.version = ts.version.checked_add(1).unwrap();
    let ts = sign(f, ts, by.timestamp).await;
    write(&meta.join("timestamp.json"), &ts);
}

/// A new root version that makes `new_key` the only root key, signed by `signers`.
pub async fn root(f: &Fleet, new_key: &str, signers: &[&str]) {
    let meta = f.p("repo/metadata");
    let mut n = 1;
    while meta.join(format!("{}.root.json", n + 1)).exists() {
        n += 1;
    }
    let mut root: Signed<Root> = read(&meta.join(format!("{n}.root.json")));
    let source = LocalKeySource {
        path: f.p(&format!("{new_key}.key")),
    };
    let key = source.as_sign().await.unwrap().tuf_key();
    let id = key.key_id().unwrap();
    root.signed.keys.insert(id.clone(), key);
    let role = root
        .signed
        .roles
        .get_mut(&tough::schema::RoleType::Root)
        .unwrap();
    role.keyids = vec![id];
    root.signed.version = root.signed.version.checked_add(1).unwrap();
    let v = root.signed.version;
    let signed = sign(f, root.signed, signers).await;
    write(&meta.join(format!("{v}.root.json")), &signed);
}

/// A new root version in which each `(role, key)` of `roles` has `key` as its only key
/// (a rotation away from leaked online keys), signed by `signers`.
pub async fn rotate_roles(f: &Fleet, roles: &[(tough::schema::RoleType, &str)], signers: &[&str]) {
    let meta = f.p("repo/metadata");
    let mut n = 1;
    while meta.join(format!("{}.root.json", n + 1)).exists() {
        n += 1;
    }
    let mut root: Signed<Root> = read(&meta.join(format!("{n}.root.json")));
    for (role, key) in roles {
        let source = LocalKeySource {
            path: f.p(&format!("{key}.key")),
        };
        let key = source.as_sign().await.unwrap().tuf_key();
        let id = key.key_id().unwrap();
        root.signed.keys.insert(id.clone(), key);
        root.signed.roles.get_mut(role).unwrap().keyids = vec![id];
    }
    root.signed.version = root.signed.version.checked_add(1).unwrap();
    let v = root.signed.version;
    let signed = sign(f, root.signed, signers).await;
    write(&meta.join(format!("{v}.root.json")), &signed);
}
