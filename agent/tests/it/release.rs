//! `wardgate-release` end to end: repositories built by the tool in a temporary directory
//! and loaded with tough's client (what the agent will do); tampering, a wrong key, too few
//! signatures, expiry and a foreign root are each refused with a clear error.

#![allow(clippy::unwrap_used)]

use crate::common;

use common::{find, ok, release, Fleet, SIGNERS};

#[test]
fn bundles_are_listed_with_version_and_hardware_after_a_client_side_load() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    let (good, out) = f.verify();
    assert!(good, "{out}");
    let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listing["targets_version"], 3);
    let images = listing["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[1][1], "1.1.0");
    assert_eq!(images[1][2], serde_json::json!(["rpi4", "qemu-virt"]));
    let (again, err) = f.add("1.1.0", &SIGNERS, &[]);
    assert!(!again && err.contains("already in the repository"), "{err}");
}

#[test]
fn a_flipped_bit_in_an_image_is_refused() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    let image = find(&f.p("repo/targets"), "wardgate-1.0.0.img");
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&image, bytes).unwrap();
    let (good, out) = f.verify();
    assert!(!good, "{out}");
    assert!(out.to_lowercase().contains("hash"), "{out}");
}

#[test]
fn targets_signed_by_a_key_the_root_does_not_name_are_refused_and_nothing_changes() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    let (added, out) = f.add("2.0.0", &["stranger", "snapshot", "timestamp"], &[]);
    assert!(!added, "{out}");
    assert!(out.contains("signing failed"), "{out}");
    let (good, listing) = f.verify();
    assert!(good && !listing.contains("2.0.0"), "{listing}");
}

#[test]
fn signatures_below_the_threshold_are_refused() {
    let f = Fleet::new(2);
    let (added, out) = f.add("1.0.0", &SIGNERS, &[]);
    assert!(!added, "one of two targets keys must not do: {out}");
    let (added, out) = f.add(
        "1.0.0",
        &["targets", "targets2", "snapshot", "timestamp"],
        &[],
    );
    assert!(added, "{out}");
    assert!(f.verify().0);
}

#[test]
fn expired_metadata_is_refused() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &["--days", "0"]).0);
    let (good, out) = f.verify();
    assert!(!good, "{out}");
    assert!(out.to_lowercase().contains("expired"), "{out}");
}

#[test]
fn a_repository_is_refused_under_another_fleets_root() {
    let (f, other) = (Fleet::new(1), Fleet::new(1));
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    let foreign = other.s("repo/metadata/1.root.json");
    let (good, out) = release(&args!["verify", "--repo", f.s("repo"), "--root", foreign]);
    assert!(!good, "{out}");
    assert!(out.to_lowercase().contains("signature"), "{out}");
}

#[test]
fn keygen_refuses_to_overwrite_and_makes_private_files() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fleet::new(1);
    let mode = std::fs::metadata(f.p("root.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (made, out) = release(&args!["keygen", f.s("root.key")]);
    assert!(!made && out.contains("refusing to overwrite"), "{out}");
}

#[test]
fn refresh_renews_snapshot_and_timestamp_with_their_keys_alone() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    let repo = f.s("repo");
    let (snap, ts) = (f.s("snapshot.key"), f.s("timestamp.key"));
    // Let snapshot and timestamp lapse: refused; refreshed: accepted again.
    ok(&args![
        "refresh", "--repo", &repo, "--key", &snap, "--key", &ts, "--days", "0"
    ]);
    let (good, out) = f.verify();
    assert!(!good && out.to_lowercase().contains("expired"), "{out}");
    ok(&args![
        "refresh", "--repo", &repo, "--key", &snap, "--key", &ts
    ]);
    let (good, out) = f.verify();
    assert!(good && out.contains("1.0.0"), "{out}");
    // Without the timestamp key it cannot be done.
    let (done, out) = release(&args!["refresh", "--repo", &repo, "--key", &snap]);
    assert!(!done && out.contains("timestamp"), "{out}");
}

#[test]
fn root_rotation_needs_both_thresholds_and_clients_follow_it() {
    let f = Fleet::new(1);
    ok(&args!["keygen", f.s("newroot.key")]);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    let repo = f.s("repo");
    // Without the current root key: refused, nothing written.
    let (rotated, out) = release(&args![
        "rotate",
        "--repo",
        repo,
        "--old-key",
        f.s("stranger.key"),
        "--new-key",
        f.s("newroot.key")
    ]);
    assert!(!rotated && out.contains("a rotation needs both"), "{out}");
    assert!(!f.p("repo/metadata/2.root.json").exists());
    // With both: a client that trusts root 1 follows to root 2.
    ok(&args![
        "rotate",
        "--repo",
        repo,
        "--old-key",
        f.s("root.key"),
        "--new-key",
        f.s("newroot.key")
    ]);
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    let (good, out) = f.verify();
    assert!(good && out.contains("1.1.0"), "{out}");

    // A root 2 carrying only the new key's signature (an attacker holding only that key)
    // is refused by a client that trusts root 1.
    let path = f.p("repo/metadata/2.root.json");
    let mut root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let keep = root["signed"]["roles"]["root"]["keyids"][0].clone();
    root["signatures"]
        .as_array_mut()
        .unwrap()
        .retain(|s| s["keyid"] == keep);
    std::fs::write(&path, serde_json::to_vec(&root).unwrap()).unwrap();
    let (good, out) = f.verify();
    assert!(
        !good,
        "a root without the old key's signature was accepted: {out}"
    );
}

/// Issue 13, item 6: versions only ever grow. `add` after `refresh` (which raised snapshot
/// and timestamp alone) raises each role from its own version, overwriting no versioned
/// file; and `verify` refuses a repository where a version went down.
#[test]
fn add_after_refresh_raises_every_version_and_verify_checks_they_grew() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    let repo = f.s("repo");
    let (snap, ts) = (f.s("snapshot.key"), f.s("timestamp.key"));
    ok(&args![
        "refresh", "--repo", &repo, "--key", &snap, "--key", &ts
    ]);
    let meta = f.p("repo/metadata");
    let version = |file: &str| -> u64 {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(meta.join(file)).unwrap()).unwrap();
        v["signed"]["version"].as_u64().unwrap()
    };
    let (t1, s1) = (version("timestamp.json"), version("3.snapshot.json"));
    let refreshed = std::fs::read(meta.join("3.snapshot.json")).unwrap();
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    assert!(version("timestamp.json") > t1);
    assert_eq!(
        std::fs::read(meta.join("3.snapshot.json")).unwrap(),
        refreshed,
        "a versioned snapshot was overwritten"
    );
    assert!(meta.join(format!("{}.snapshot.json", s1 + 1)).exists());
    let (good, out) = f.verify();
    assert!(good, "{out}");

    // A snapshot newer than the one in force: a version went down.
    let mut newer: serde_json::Value = serde_json::from_slice(&refreshed).unwrap();
    newer["signed"]["version"] = serde_json::json!(9);
    std::fs::write(meta.join("9.snapshot.json"), newer.to_string()).unwrap();
    let (good, out) = f.verify();
    assert!(!good && out.contains("went down"), "{out}");
}
