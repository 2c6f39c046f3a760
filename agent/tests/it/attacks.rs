//! One test per attack on the update path, against `wardgate-agent` as a process on a
//! simulated board (see `common/board.rs`), the repository served over HTTP by a local
//! server. The attacker edits what the server serves; where the attack needs signatures,
//! `common/forge.rs` makes them with whatever keys the attacker holds.
//!
//! Each attack must be refused with a clear error, reported in the agent's journal, and
//! leave the board as it was: no trial armed, no reboot, and — where the attack is caught
//! before the download, as every metadata attack is — the inactive slot untouched. An
//! attack caught during the download by verification (a bad hash, endless data) leaves the
//! slot invalidated (its head zeroed); a slow or broken download leaves what arrived for a
//! later resume, whose hash check covers it. Neither is ever armed.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::board::{Board, Options};
use common::forge::{self, Signers};
use common::server::Fault;
use wardgate_agent::slots::{BootControl, BootState, Slot, StateFile};

const FACTORY: &[u8] = b"factory image";

/// `check --now` fails with `want` in its message and leaves no trace but the refusal.
fn refused(b: &Board, want: &str) -> String {
    let (ok, out) = b.agent(&["check", "--now"]);
    eprintln!("{want}: {out}");
    assert!(!ok, "the attack was not refused: {out}");
    assert!(
        out.to_lowercase().contains(&want.to_lowercase()),
        "{want:?} not in {out}"
    );
    unharmed(b);
    let e = b.events();
    let last = e.last().unwrap();
    assert_eq!(last["event"], "refused", "{last}");
    out
}

fn unharmed(b: &Board) {
    let boot = StateFile {
        path: b.fleet.p("boot-state.txt"),
    };
    assert_eq!(
        boot.state().unwrap(),
        BootState {
            default: Slot::A,
            trial: None
        },
        "the boot state changed"
    );
    assert_eq!(b.reboots(), 0, "the board rebooted");
    assert_eq!(std::fs::read(b.fleet.p("slot-a.img")).unwrap(), FACTORY);
}

fn slot_b(b: &Board) -> Vec<u8> {
    std::fs::read(b.fleet.p("slot-b.img")).unwrap()
}

fn invalidated(b: &Board) {
    let s = slot_b(b);
    assert!(
        !s.is_empty() && s.iter().all(|&x| x == 0),
        "slot B is not invalidated"
    );
}

/// A bundle published by an attacker whose targets signatures are `targets`' (and who holds
/// the snapshot and timestamp keys, the online ones, the most exposed), on a fleet whose
/// targets role needs `threshold` signatures: refused before any download.
async fn forged_targets(threshold: u64, targets: &[&str]) {
    let b = Board::new(
        &[],
        Options {
            targets_threshold: threshold,
            ..Options::default()
        },
    )
    .await;
    let by = Signers {
        targets,
        snapshot: &["snapshot"],
        timestamp: &["timestamp"],
    };
    forge::bundle(&b.fleet, "9.9.9", &by).await;
    refused(&b, "signature threshold");
    assert_eq!(slot_b(&b), FACTORY);
    assert!(b.server.requests("wardgate-9.9.9.img").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsigned_target_is_refused() {
    forged_targets(1, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_signed_by_a_wrong_key_is_refused() {
    forged_targets(1, &["stranger"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_below_the_threshold_are_refused() {
    // Two of the two targets keys are needed; the attacker holds one.
    forged_targets(2, &["targets"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_with_a_flipped_bit_is_refused_and_its_slot_invalidated() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let file = common::find(&b.fleet.p("repo/targets"), "wardgate-1.1.0.img");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[5000] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    refused(&b, "hash");
    invalidated(&b);
    // Issue 13, item 9: and nobody can make it the default by hand.
    let (ok, out) = b.agent(&["rollback", "--force"]);
    assert!(!ok && out.contains("invalidated"), "{out}");
    unharmed(&b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_to_an_older_version_is_refused() {
    let b = Board::new(&["1.0.0", "1.1.0"], Options::default()).await;
    b.healthy(true);
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    b.power_cycle();
    let (ok, out) = b.agent(&["mark-good"]);
    assert!(ok, "{out}");
    let before = slot_b(&b);
    // Asked for 1.0.0 (say, by someone who found a flaw in it): below the floor.
    let url = b.server.url("http", "").to_string();
    let (ok, out) = b.agent(&["install", &url, "--version", "1.0.0", "--now"]);
    assert!(!ok && out.contains("rollback refused"), "{out}");
    assert_eq!(slot_b(&b), before);
    assert_eq!(b.reboots(), 1, "only the update's own reboot");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_older_snapshot_is_refused() {
    let b = Board::new(&[], Options::default()).await;
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("up to date"), "{out}");
    let meta = b.fleet.p("repo/metadata");
    let old = std::fs::read(meta.join("timestamp.json")).unwrap();
    // The fleet publishes 1.1.0; the board sees it (and installs it, reboot waiting).
    assert!(b.fleet.add("1.1.0", &common::SIGNERS, &[]).0);
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    assert_eq!(b.reboots(), 1);
    let after = slot_b(&b);
    // Its trial passes: nothing is pending any more.
    b.power_cycle();
    let (ok, out) = b.agent(&["mark-good"]);
    assert!(ok, "{out}");
    // A mirror (or attacker) now serves the old timestamp, naming the old snapshot.
    std::fs::write(meta.join("timestamp.json"), old).unwrap();
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(!ok && out.to_lowercase().contains("version"), "{out}");
    assert_eq!(slot_b(&b), after);
    assert_eq!(b.reboots(), 1);
    assert_eq!(b.events().last().unwrap()["event"], "refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_timestamp_is_refused() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let f = &b.fleet;
    common::ok(&args![
        "refresh",
        "--repo",
        f.s("repo"),
        "--key",
        f.s("snapshot.key"),
        "--key",
        f.s("timestamp.key"),
        "--days",
        "0"
    ]);
    refused(&b, "expired");
    assert_eq!(slot_b(&b), FACTORY);
}

#[tokio::test(flavor = "multi_thread")]
async fn endless_data_is_cut_off_at_the_signed_length() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    b.server.fault("wardgate-1.1.0.img", Fault::Endless);
    refused(&b, "maximum size");
    invalidated(&b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_retrieval_is_abandoned() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    // 64 bytes every 100 ms, under the floor of 1 KiB/s over the board's 2 s window.
    b.server.fault(
        "wardgate-1.1.0.img",
        Fault::Trickle(64, Duration::from_millis(100)),
    );
    refused(&b, "slow retrieval");
    // Not armed; what arrived stays for a resume (the hash decides at the end).
    assert!(b.events().last().unwrap()["detail"]
        .as_str()
        .unwrap()
        .contains("the next attempt resumes"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_for_other_hardware_is_refused() {
    let b = Board::new(
        &["1.1.0"],
        Options {
            hardware: "beaglebone",
            ..Options::default()
        },
    )
    .await;
    // Nothing for this board: a check finds nothing to do.
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok && out.contains("up to date"), "{out}");
    // Asked for by hand: refused.
    let url = b.server.url("http", "").to_string();
    let (ok, out) = b.agent(&["install", &url, "--version", "1.1.0", "--now"]);
    assert!(!ok && out.contains("not for this hardware"), "{out}");
    unharmed(&b);
    assert_eq!(slot_b(&b), FACTORY);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_above_the_size_cap_is_refused_before_its_download() {
    let b = Board::new(
        &["1.1.0"],
        Options {
            repository: "max_bundle_bytes = 4096".into(),
            ..Options::default()
        },
    )
    .await;
    refused(&b, "above max_bundle_bytes");
    assert_eq!(slot_b(&b), FACTORY);
    assert!(b.server.requests("wardgate-1.1.0.img").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_rotation_is_followed_only_with_both_thresholds() {
    // Signed by the new key alone (an attacker who made or stole just that key): refused.
    let b = Board::new(&["1.1.0"], Options::default()).await;
    common::ok(&args!["keygen", b.fleet.s("newroot.key")]);
    forge::root(&b.fleet, "newroot", &["newroot"]).await;
    refused(&b, "signature");
    assert_eq!(slot_b(&b), FACTORY);

    // The fleet manager's rotation, signed by the old and the new root keys: followed.
    let b = Board::new(&["1.1.0"], Options::default()).await;
    common::ok(&args!["keygen", b.fleet.s("newroot.key")]);
    common::ok(&args![
        "rotate",
        "--repo",
        b.fleet.s("repo"),
        "--old-key",
        b.fleet.s("root.key"),
        "--new-key",
        b.fleet.s("newroot.key")
    ]);
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("bundle 1.1.0 installed"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clock_set_back_cannot_make_expired_metadata_fresh() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    // The agent once trusted the repository at a time later than the board's clock now
    // (a board without a battery-backed clock, booted before NTP).
    std::fs::create_dir_all(b.fleet.p("state")).unwrap();
    std::fs::write(b.fleet.p("state/clock-floor"), "2099-01-01T00:00:00Z\n").unwrap();
    refused(&b, "the system clock");
    assert_eq!(slot_b(&b), FACTORY);
    assert!(b.server.log().is_empty(), "nothing was even fetched");
}

/// A board of a hardware no bundle names (`imx8`): what its checks show is which metadata
/// it trusts, never what it installs.
async fn board_no_bundle_fits() -> Board {
    let o = Options {
        hardware: "imx8",
        ..Options::default()
    };
    Board::new(&[], o).await
}

/// The fleet rotates its online keys (targets, snapshot, timestamp) away from leaked ones:
/// a new root, signed by the root key, and metadata signed by the new keys. The board
/// follows it once.
async fn rotated_away_from_leaked_keys() -> Board {
    use tough::schema::RoleType;
    let b = board_no_bundle_fits().await;
    for k in ["newtargets", "newsnapshot", "newtimestamp"] {
        common::ok(&args!["keygen", b.fleet.s(&format!("{k}.key"))]);
    }
    let roles = [
        (RoleType::Targets, "newtargets"),
        (RoleType::Snapshot, "newsnapshot"),
        (RoleType::Timestamp, "newtimestamp"),
    ];
    forge::rotate_roles(&b.fleet, &roles, &["root"]).await;
    // New metadata, signed by the new keys.
    forge::bundle(&b.fleet, "0.9.0", &NEW_KEYS).await;
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("up to date"), "{out}");
    b
}

const NEW_KEYS: Signers<'static> = Signers {
    targets: &["newtargets"],
    snapshot: &["newsnapshot"],
    timestamp: &["newtimestamp"],
};

/// Issue 13, item 1: a root rotation sticks. After the board followed the fleet's new root,
/// a mirror that withholds it and serves a bundle signed with the leaked old keys is
/// refused: the board checks from the root it last trusted, not the one in its image.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_rotation_sticks_when_a_mirror_withholds_the_new_root() {
    let b = rotated_away_from_leaked_keys().await;
    std::fs::remove_file(b.fleet.p("repo/metadata/2.root.json")).unwrap();
    forge::bundle(
        &b.fleet,
        "9.9.9",
        &Signers {
            targets: &["targets"],
            snapshot: &["snapshot"],
            timestamp: &["timestamp"],
        },
    )
    .await;
    refused(&b, "signature");
    assert_eq!(slot_b(&b), FACTORY);
}

/// Issue 13, item 2: rollback protection survives a timestamp and snapshot key rotation.
/// After the rotation the board trusts newer metadata; a mirror replaying an older
/// timestamp, validly signed by the new key, is refused.
#[tokio::test(flavor = "multi_thread")]
async fn rollback_protection_survives_a_key_rotation() {
    let b = rotated_away_from_leaked_keys().await;
    let meta = b.fleet.p("repo/metadata");
    let old = std::fs::read(meta.join("timestamp.json")).unwrap();
    forge::bundle(&b.fleet, "0.9.1", &NEW_KEYS).await;
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("up to date"), "{out}");
    std::fs::write(meta.join("timestamp.json"), old).unwrap();
    refused(&b, "version");
}

/// Issue 13, item 8: trusted metadata a crash left truncated does not let a replayed older
/// timestamp in: the datastore is reset to the copy kept (crash-safely) after the last
/// successful check; without such a copy (an agent upgraded from one that kept none), an
/// unreadable trusted file is an error, never skipped.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_trusted_metadata_does_not_let_a_replay_in() {
    let b = board_no_bundle_fits().await;
    let meta = b.fleet.p("repo/metadata");
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("up to date"), "{out}");
    let old = std::fs::read(meta.join("timestamp.json")).unwrap();
    assert!(b.fleet.add("1.1.0", &common::SIGNERS, &[]).0);
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("up to date"), "{out}");
    // A crash while tough rewrote its trusted metadata, and a mirror replaying the old.
    for f in ["timestamp.json", "snapshot.json"] {
        std::fs::write(b.fleet.p(&format!("state/datastore/{f}")), b"").unwrap();
    }
    std::fs::write(meta.join("timestamp.json"), old).unwrap();
    refused(&b, "version");
    // No kept copy: the truncated file is refused as unreadable.
    std::fs::remove_dir_all(b.fleet.p("state/datastore.trusted")).unwrap();
    std::fs::write(b.fleet.p("state/datastore/timestamp.json"), b"").unwrap();
    refused(&b, "unreadable");
}

/// Issue 13, item 7: one check with the clock ahead does not block every later one. What a
/// check with the clock two years ahead leaves behind (the agent's clock floor and tough's
/// latest known time, both in the future) is refused while the clock is not set by NTP,
/// and once it is (systemd-timesyncd's mark), the agent recovers: it forgets those stamps,
/// re-verifies timestamp and snapshot from the trusted root, and goes on checking.
#[tokio::test(flavor = "multi_thread")]
async fn a_check_with_the_clock_ahead_is_recovered_from_once_ntp_sets_it() {
    let b = board_no_bundle_fits().await;
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("up to date"), "{out}");
    let ahead = "\"2028-12-01T00:00:00Z\"";
    for dir in ["state/datastore", "state/datastore.trusted"] {
        std::fs::write(b.fleet.p(&format!("{dir}/latest_known_time.json")), ahead).unwrap();
    }
    std::fs::write(b.fleet.p("state/clock-floor"), "2028-12-01T00:00:00Z\n").unwrap();
    refused(&b, "the system clock");

    std::fs::write(b.fleet.p("timesync-synchronized"), "").unwrap();
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("up to date"), "{out}");
    assert!(b.has_event("clock_recovered"));
    let (ok, out) = b.agent(&["check"]);
    assert!(ok && out.contains("up to date"), "and after: {out}");
}
