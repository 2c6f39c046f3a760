//! Updates over HTTP(S) from a local server started by each test (loopback, a port from the
//! OS): the happy path into a file-backed slot, a broken connection resumed with a range
//! request, and the transport attacks — slow retrieval, endless data, an announced size
//! above the cap, a server outside the configured CA.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::server::{Fault, Server};
use common::{Fleet, SIGNERS};
use wardgate_agent::http::{Fetcher, Limits};
use wardgate_agent::slots::{Appliance, BootControl, BootState, Record, Slot, StateFile};
use wardgate_agent::trial::Health;
use wardgate_agent::update::{self, Source, Version};

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

fn source(f: &Fleet, server: &Server, scheme: &str, fetcher: Fetcher) -> Source {
    Source {
        metadata_url: server.url(scheme, "metadata/"),
        targets_url: server.url(scheme, "targets/"),
        trusted_root: f.p("repo/metadata/1.root.json"),
        datastore: f.p("store"),
        fetcher,
    }
}

/// The progress an earlier attempt at `c` leaves after keeping 4 MiB in slot B.
fn kept_4mib(f: &Fleet, c: &update::Candidate) -> update::Progress {
    update::Progress {
        target: c.target.clone(),
        digest: c.digest.clone(),
        length: c.length,
        slot: f.p("slot-b.img"),
        offset: 4 << 20,
    }
}

fn fetcher(limits: Limits) -> Fetcher {
    Fetcher::new(limits, None)
}

/// Limits for tests: quick to resume, and a rate floor a healthy loopback passes easily.
fn quick() -> Limits {
    Limits {
        resume_backoff: Duration::from_millis(50),
        low_speed_bytes_per_sec: 4096,
        low_speed_window: Duration::from_secs(1),
        ..Limits::default()
    }
}

/// A fleet with bundle 1.1.0 (11 000 bytes of image), served by a new server.
async fn served() -> (Fleet, Server) {
    let f = Fleet::new(1);
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    let server = Server::start(f.p("repo"), None).await;
    (f, server)
}

fn image(f: &Fleet) -> Vec<u8> {
    std::fs::read(common::find(&f.p("repo/targets"), "wardgate-1.1.0.img")).unwrap()
}

/// Nothing was made bootable: the boot state is untouched and no update is pending.
fn nothing_installed(a: &Appliance<StateFile>) {
    assert_eq!(
        a.boot.state().unwrap(),
        BootState {
            default: Slot::A,
            trial: None
        }
    );
    assert_eq!(a.last(), None);
}

#[tokio::test]
async fn a_bundle_downloads_over_http_into_slot_b_and_a_healthy_trial_commits() {
    let (f, server) = served().await;
    let repo = update::load(&source(&f, &server, "http", fetcher(quick())))
        .await
        .unwrap();
    let c = update::newest(&repo, "qemu-virt", &v("1.0.0"))
        .unwrap()
        .unwrap();
    let mut a = common::appliance(&f);
    assert_eq!(a.install(&repo, &c).await.unwrap(), Slot::B);
    let want = image(&f);
    assert_eq!(&std::fs::read(f.p("slot-b.img")).unwrap()[..], &want[..]);
    // The metadata and the image came over HTTP; 2.root.json was asked for and not found.
    assert!(!server.requests("timestamp.json").is_empty());
    assert_eq!(server.requests("2.root.json").len(), 1);
    assert_eq!(server.requests("wardgate-1.1.0.img").len(), 1);

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
}

#[tokio::test]
async fn an_interrupted_download_resumes_from_where_it_stopped() {
    let (f, server) = served().await;
    server.fault("wardgate-1.1.0.img", Fault::CutOnceAfter(4000));
    let repo = update::load(&source(&f, &server, "http", fetcher(quick())))
        .await
        .unwrap();
    let c = update::newest(&repo, "rpi4", &v("0")).unwrap().unwrap();
    let mut a = common::appliance(&f);
    a.install(&repo, &c).await.unwrap();
    assert_eq!(std::fs::read(f.p("slot-b.img")).unwrap(), image(&f));
    let reqs = server.requests("wardgate-1.1.0.img");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    assert_eq!(reqs[0].sent, 4000);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=4000-"));
    assert_eq!(
        reqs[0].sent + reqs[1].sent,
        c.length,
        "each byte was sent once"
    );
}

/// An install of 1.1.0 from a server that misbehaves with `fault` on the image: it must
/// fail; returns what the test needs to look at, the error last.
async fn install_against(fault: Fault) -> (Fleet, Server, update::Candidate, String) {
    let (f, server) = served().await;
    server.fault("wardgate-1.1.0.img", fault);
    let repo = update::load(&source(&f, &server, "http", fetcher(quick())))
        .await
        .unwrap();
    let c = update::newest(&repo, "rpi4", &v("0")).unwrap().unwrap();
    let mut a = common::appliance(&f);
    let e = a.install(&repo, &c).await.unwrap_err().to_string();
    eprintln!("refused: {e}");
    nothing_installed(&a);
    (f, server, c, e)
}

#[tokio::test]
async fn a_server_trickling_bytes_is_abandoned_as_slow_retrieval() {
    // 64 bytes every 50 ms is about 1.3 KB/s, under the floor of 4 KB/s.
    let (_f, server, c, e) = install_against(Fault::Trickle(64, Duration::from_millis(50))).await;
    assert!(e.contains("slow retrieval"), "{e}");
    let sent = server.requests("wardgate-1.1.0.img")[0].sent;
    assert!(sent < c.length, "abandoned before the end: {sent} bytes");
}

#[tokio::test]
async fn endless_data_from_the_server_is_cut_at_the_signed_length() {
    let (f, _server, c, e) = install_against(Fault::Endless).await;
    assert!(e.contains("Maximum size"), "{e}");
    let len = std::fs::metadata(f.p("slot-b.img")).unwrap().len();
    assert!(len <= c.length, "the slot got {len} bytes");
}

#[tokio::test]
async fn a_response_announcing_more_than_the_cap_is_refused_before_its_body() {
    let (f, _server, _c, e) = install_against(Fault::Announce(1 << 40)).await;
    assert!(e.contains("above the cap"), "{e}");
    assert_eq!(std::fs::read(f.p("slot-b.img")).unwrap(), vec![0u8; 16]);
}

#[tokio::test]
async fn https_is_trusted_under_the_configured_ca_only() {
    let f = Fleet::new(1);
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    let acceptor = common::server::tls(&f.p("ca.pem"));
    let server = Server::start(f.p("repo"), Some(acceptor)).await;
    let ok = Fetcher::new(quick(), Some(&f.p("ca.pem")));
    let repo = update::load(&source(&f, &server, "https", ok))
        .await
        .unwrap();
    assert!(update::newest(&repo, "rpi4", &v("0")).unwrap().is_some());

    // Another CA (say, a mirror's own): the TLS handshake fails, nothing is loaded.
    let _other = common::server::tls(&f.p("other-ca.pem"));
    let wrong = Fetcher::new(quick(), Some(&f.p("other-ca.pem")));
    let mut src = source(&f, &server, "https", wrong);
    src.datastore = f.p("store-2");
    let e = update::load(&src).await.unwrap_err().to_string();
    eprintln!("refused: {e}");
    assert!(e.contains("TLS"), "{e}");
}

#[tokio::test]
async fn a_resume_reads_the_rest_from_a_usb_directory_and_verifies_the_prefix_too() {
    let f = Fleet::new(1);
    let image = f.add_large("2.0.0", 6 << 20);
    let fetcher = fetcher(quick());
    let src = Source {
        metadata_url: update::dir_url(&f.p("repo/metadata")).unwrap(),
        targets_url: update::dir_url(&f.p("repo/targets")).unwrap(),
        trusted_root: f.p("repo/metadata/1.root.json"),
        datastore: f.p("store"),
        fetcher: fetcher.clone(),
    };
    let repo = update::load(&src).await.unwrap();
    let c = update::newest(&repo, "rpi4", &v("0")).unwrap().unwrap();
    let mut a = common::appliance(&f);
    let progress = kept_4mib(&f, &c);
    // An earlier attempt left the first 4 MiB in slot B, and its progress.
    std::fs::write(f.p("slot-b.img"), &image[..4 << 20]).unwrap();
    progress.save(&a.download_path()).unwrap();
    a.install_resumable(&repo, &c, &fetcher).await.unwrap();
    assert!(std::fs::read(f.p("slot-b.img")).unwrap() == image);
    assert!(!a.download_path().exists());
    // That install's trial is settled (abandoned here), so another install may start.
    a.boot.abandon().unwrap();
    std::fs::remove_file(a.state.record()).unwrap();

    // The same, but a byte of the kept prefix changed on the card: the hash covers it.
    let mut bad = image[..4 << 20].to_vec();
    bad[1000] ^= 0x40;
    std::fs::write(f.p("slot-b.img"), &bad).unwrap();
    progress.save(&a.download_path()).unwrap();
    let e = a
        .install_resumable(&repo, &c, &fetcher)
        .await
        .unwrap_err()
        .to_string();
    eprintln!("refused: {e}");
    assert!(
        e.contains("Hash mismatch") && e.contains("invalidated"),
        "{e}"
    );
    assert!(
        !a.download_path().exists(),
        "a failed verification forgets the progress"
    );
}

/// Issue 13, item 4: what is armed is exactly what was hashed. A target whose name holds a
/// space (percent-encoded in its URL), fetched over HTTP and resumed from 4 MiB kept in
/// slot B: with the real
/// first 4 MiB kept, the resume completes and the slot holds the image; with a mirror's
/// own 4 MiB kept, they are hashed and refused — never left at the head of an armed slot.
#[tokio::test]
async fn a_resumed_target_with_an_encoded_name_arms_only_hashed_bytes() {
    let f = Fleet::new(1);
    let image: Vec<u8> = (0..6u32 << 20).map(|i| (i % 251) as u8).collect();
    let path = f.p("wardgate 2.0.0.img");
    std::fs::write(&path, &image).unwrap();
    let sbom = f.p("sbom-2.0.0.json");
    std::fs::write(&sbom, "{}").unwrap();
    let mut args = args![
        "add",
        "--repo",
        f.s("repo"),
        "--image",
        path.display(),
        "--version",
        "2.0.0",
        "--hardware",
        "rpi4",
        "--sbom",
        sbom.display()
    ]
    .to_vec();
    for k in SIGNERS {
        args.extend(args!["--key", f.s(&format!("{k}.key"))]);
    }
    common::ok(&args);
    let server = Server::start(f.p("repo"), None).await;
    let fetcher = fetcher(quick());
    let repo = update::load(&source(&f, &server, "http", fetcher.clone()))
        .await
        .unwrap();
    let c = update::newest(&repo, "rpi4", &v("0")).unwrap().unwrap();
    assert!(c.target.contains(' '), "{}", c.target);
    let progress = kept_4mib(&f, &c);

    // A mirror's own 4 MiB kept: hashed with the rest, refused, the slot invalidated.
    let mut a = common::appliance(&f);
    std::fs::write(f.p("slot-b.img"), vec![0xAB; 4 << 20]).unwrap();
    progress.save(&a.download_path()).unwrap();
    let e = a
        .install_resumable(&repo, &c, &fetcher)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Hash mismatch") && e.contains("invalidated"),
        "{e}"
    );
    let slot = std::fs::read(f.p("slot-b.img")).unwrap();
    assert!(slot[..1 << 20].iter().all(|&b| b == 0), "not invalidated");

    // The real first 4 MiB kept: the resume completes with the image.
    std::fs::write(f.p("slot-b.img"), &image[..4 << 20]).unwrap();
    progress.save(&a.download_path()).unwrap();
    a.install_resumable(&repo, &c, &fetcher).await.unwrap();
    assert!(std::fs::read(f.p("slot-b.img")).unwrap() == image);
}
