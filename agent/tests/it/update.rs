//! The agent's choice of bundle, against repositories built by `wardgate-release`: the
//! newest bundle for this hardware above the version floor; software rollback, other
//! hardware and a replayed older snapshot and timestamp (mix-and-match) are refused with a
//! clear error.

#![allow(clippy::unwrap_used)]

use crate::common;

use common::{Fleet, SIGNERS};
use wardgate_agent::update::{self, Source, UpdateError, Version};

fn source(f: &Fleet, datastore: &str) -> Source {
    Source {
        metadata_url: update::dir_url(&f.p("repo/metadata")).unwrap(),
        targets_url: update::dir_url(&f.p("repo/targets")).unwrap(),
        trusted_root: f.p("repo/metadata/1.root.json"),
        datastore: f.p(datastore),
        fetcher: wardgate_agent::http::Fetcher::new(Default::default(), None),
    }
}

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

#[tokio::test]
async fn the_newest_bundle_for_this_hardware_above_the_floor_is_chosen() {
    let f = Fleet::new(1);
    for version in ["1.0.0", "1.2.0", "1.10.0"] {
        assert!(f.add(version, &SIGNERS, &[]).0);
    }
    let repo = update::load(&source(&f, "store")).await.unwrap();
    let c = update::newest(&repo, "rpi4", &v("1.0.0")).unwrap().unwrap();
    assert_eq!(c.version, v("1.10.0"), "numeric, not lexical, order");
    assert!(c.sbom.unwrap().contains("1.10.0"));
    assert_eq!(update::newest(&repo, "rpi4", &v("1.10.0")).unwrap(), None);
    assert_eq!(update::newest(&repo, "rpi5", &v("0")).unwrap(), None);
}

#[tokio::test]
async fn rollback_to_a_version_at_or_below_the_floor_is_refused() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    let repo = update::load(&source(&f, "store")).await.unwrap();
    let e = update::select(&repo, "1.0.0", "rpi4", &v("1.1.0")).unwrap_err();
    assert!(matches!(e, UpdateError::BelowFloor { .. }), "{e}");
    assert!(e.to_string().contains("rollback refused"), "{e}");
    assert!(update::select(&repo, "1.1.0", "rpi4", &v("1.1.0")).is_err());
    assert!(update::select(&repo, "1.1.0", "rpi4", &v("1.0.0")).is_ok());
}

#[tokio::test]
async fn a_bundle_for_other_hardware_is_refused() {
    let f = Fleet::new(1);
    assert!(f.add("2.0.0", &SIGNERS, &[]).0);
    let repo = update::load(&source(&f, "store")).await.unwrap();
    let e = update::select(&repo, "2.0.0", "beaglebone", &v("1.0.0")).unwrap_err();
    assert!(matches!(e, UpdateError::Incompatible { .. }), "{e}");
    assert!(e.to_string().contains("not for this hardware"), "{e}");
}

#[tokio::test]
async fn a_replayed_older_snapshot_and_timestamp_are_refused() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    // The appliance checks and trusts this state.
    update::load(&source(&f, "store")).await.unwrap();
    let meta = f.p("repo/metadata");
    let old_timestamp = std::fs::read(meta.join("timestamp.json")).unwrap();
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    let repo = update::load(&source(&f, "store")).await.unwrap();
    assert!(update::newest(&repo, "rpi4", &v("1.0.0"))
        .unwrap()
        .is_some());
    // An attacker (or a stale mirror) serves the older timestamp, which names the older
    // snapshot: the appliance has seen newer ones and refuses.
    std::fs::write(meta.join("timestamp.json"), old_timestamp).unwrap();
    let e = update::load(&source(&f, "store")).await.unwrap_err();
    assert!(matches!(e, UpdateError::Metadata(_)), "{e}");
    assert!(e.to_string().to_lowercase().contains("version"), "{e}");
    // A fresh appliance without that memory would accept it: the datastore is the defence.
    assert!(update::load(&source(&f, "fresh-store")).await.is_ok());
}

#[tokio::test]
async fn an_expired_timestamp_freezes_nothing_in() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &["--days", "0"]).0);
    let e = update::load(&source(&f, "store")).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
}

/// A repository with bundle 1.1.0, loaded, and that bundle chosen for rpi4.
async fn one_bundle() -> (Fleet, tough::Repository, update::Candidate) {
    let f = Fleet::new(1);
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    let repo = update::load(&source(&f, "store")).await.unwrap();
    let c = update::newest(&repo, "rpi4", &v("1.0.0")).unwrap().unwrap();
    (f, repo, c)
}

/// The image target's file in the repository.
fn image_file(f: &Fleet, version: &str) -> std::path::PathBuf {
    common::find(&f.p("repo/targets"), &format!("wardgate-{version}.img"))
}

#[tokio::test]
async fn the_image_streams_into_the_slot_exactly() {
    let (f, repo, c) = one_bundle().await;
    let slot = f.p("slot-b.img");
    std::fs::write(&slot, vec![0u8; 64]).unwrap();
    let n = update::write_to_slot(&repo, &c, &slot, None).await.unwrap();
    assert_eq!(n, c.length);
    let want = std::fs::read(image_file(&f, "1.1.0")).unwrap();
    assert_eq!(&std::fs::read(&slot).unwrap()[..want.len()], &want[..]);
}

#[tokio::test]
async fn a_target_with_a_flipped_bit_fails_the_copy() {
    let (f, repo, c) = one_bundle().await;
    let file = image_file(&f, "1.1.0");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[7] ^= 0x80;
    std::fs::write(&file, bytes).unwrap();
    let e = update::write_to_slot(&repo, &c, &f.p("slot-b.img"), None)
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::Verify(_)), "{e}");
    assert!(e.to_string().to_lowercase().contains("hash"), "{e}");
}

#[tokio::test]
async fn endless_data_beyond_the_signed_length_is_cut_off() {
    let (f, repo, c) = one_bundle().await;
    let file = image_file(&f, "1.1.0");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend(std::iter::repeat_n(0xAA, 1 << 20));
    std::fs::write(&file, bytes).unwrap();
    let slot = f.p("slot-b.img");
    let e = update::write_to_slot(&repo, &c, &slot, None)
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::Verify(_)), "{e}");
    assert!(e.to_string().contains("Maximum size"), "{e}");
    let len = std::fs::metadata(&slot).map(|m| m.len()).unwrap_or(0);
    assert!(
        len <= c.length,
        "wrote {len} bytes, more than the signed {}",
        c.length
    );
}

use wardgate_agent::slots::{BootControl, Record, Slot};
use wardgate_agent::trial::Health;

#[tokio::test]
async fn install_tries_the_other_slot_once_and_a_healthy_boot_commits_it() {
    let (f, repo, c) = one_bundle().await;
    let mut a = common::appliance(&f);
    assert_eq!(a.install(&repo, &c).await.unwrap(), Slot::B);
    assert_eq!(
        a.boot.state().unwrap().trial,
        Some((Slot::B, 1)),
        "try-boot flag set"
    );
    let want = std::fs::read(image_file(&f, "1.1.0")).unwrap();
    assert_eq!(
        &std::fs::read(f.p("slot-b.img")).unwrap()[..want.len()],
        &want[..]
    );

    let booted = common::reboot(&a);
    assert_eq!(booted, Slot::B);
    let r = a.after_boot(booted, Health::Good).unwrap().unwrap();
    assert_eq!(
        r,
        Record::Committed {
            version: "1.1.0".into(),
            slot: Slot::B
        }
    );
    assert_eq!(common::reboot(&a), Slot::B, "B is the default now");
    assert_eq!(a.floor.get().unwrap(), v("1.1.0"));
    // The same version again is a rollback now.
    assert!(a
        .install(&repo, &c)
        .await
        .unwrap_err()
        .to_string()
        .contains("rollback refused"));
}

#[tokio::test]
async fn a_failed_health_check_rolls_back_and_says_why() {
    let (f, repo, c) = one_bundle().await;
    let mut a = common::appliance(&f);
    a.install(&repo, &c).await.unwrap();
    let booted = common::reboot(&a);
    let r = a
        .after_boot(
            booted,
            Health::Failed("nft table inet wardgate missing".into()),
        )
        .unwrap()
        .unwrap();
    match &r {
        Record::RolledBack { reason, slot, .. } => {
            assert_eq!(*slot, Slot::B);
            assert!(reason.contains("inet wardgate"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(common::reboot(&a), Slot::A, "the old slot boots again");
    assert_eq!(a.floor.get().unwrap(), v("0"), "the floor did not move");
    assert_eq!(a.last(), Some(r));
}

#[tokio::test]
async fn a_new_slot_that_never_comes_up_falls_back_and_is_recorded() {
    let (f, repo, c) = one_bundle().await;
    let mut a = common::appliance(&f);
    a.install(&repo, &c).await.unwrap();
    // The trial boot dies before the agent runs: its try is spent, the next boot is A.
    assert_eq!(common::reboot(&a), Slot::B);
    let booted = common::reboot(&a);
    assert_eq!(booted, Slot::A);
    let r = a.after_boot(booted, Health::Good).unwrap().unwrap();
    assert!(
        matches!(&r, Record::RolledBack { reason, .. } if reason.contains("did not come up")),
        "{r:?}"
    );
}
