//! `wardgate-agent` as a process, on a simulated board: file-backed slots, the state-file
//! boot backend, a kernel command line file naming the booted slot, and a reboot command
//! that only records that it ran (the test then power-cycles the board with the boot
//! script's logic, [`power_on`]). Updates come over HTTP from a local server started by the
//! test, which also serves the health endpoint.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::board::{stop, wait_for, Board, Options, AGENT};
use common::server::Fault;
use wardgate_agent::slots::Slot;

#[tokio::test(flavor = "multi_thread")]
async fn run_installs_reboots_into_the_trial_and_a_healthy_slot_is_committed() {
    let b = Board::new(&["1.0.0", "1.1.0"], Options::default()).await;
    b.healthy(true);
    let agent = b.spawn_run();
    // No windows: the first check installs the newest bundle and reboots at once.
    wait_for("the reboot command", Duration::from_secs(30), || {
        b.reboots() == 1
    });
    stop(agent);
    assert_eq!(
        &std::fs::read(b.fleet.p("slot-b.img")).unwrap()[..],
        &b.image("1.1.0")[..]
    );
    assert!(b.has_event("installed"));
    let s = b.status();
    assert_eq!(s["boot"]["trial"]["slot"], "B", "{s}");

    assert_eq!(b.power_cycle(), Slot::B);
    let agent = b.spawn_run();
    wait_for("the commit", Duration::from_secs(30), || {
        b.has_event("committed")
    });
    stop(agent);
    let s = b.status();
    assert_eq!(s["boot"]["default"], "B", "{s}");
    assert_eq!(s["boot"]["trial"], serde_json::Value::Null);
    assert_eq!(s["version_floor"], "1.1.0");
    assert_eq!(s["last_update"]["state"], "committed");
    assert_eq!(b.reboots(), 1, "no further reboot");
    assert_eq!(b.power_cycle(), Slot::B, "B from now on");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_health_check_rolls_back_reboots_and_records_why() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    b.healthy(false);
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    assert_eq!(b.reboots(), 1);
    assert_eq!(b.power_cycle(), Slot::B);

    // The health endpoint answers 404 until the 3 s deadline.
    let agent = b.spawn_run();
    wait_for("the rollback", Duration::from_secs(30), || {
        b.has_event("rolled_back")
    });
    wait_for(
        "the reboot into the old slot",
        Duration::from_secs(10),
        || b.reboots() == 2,
    );
    stop(agent);
    let s = b.status();
    let reason = s["last_update"]["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("health check failed") && reason.contains("404"),
        "{reason}"
    );
    assert_eq!(s["last_update"]["state"], "rolled_back");
    assert_eq!(s["version_floor"], "0", "the floor did not move");
    assert_eq!(b.power_cycle(), Slot::A, "the old slot boots again");
    assert_eq!(
        &std::fs::read(b.fleet.p("slot-a.img")).unwrap()[..],
        b"factory image"
    );

    // Back on A, the agent does not try the failed version again by itself.
    let agent = b.spawn_run();
    wait_for("a check", Duration::from_secs(30), || {
        b.has_event("checked")
    });
    stop(agent);
    assert_eq!(b.reboots(), 2);
    assert_eq!(
        b.events()
            .iter()
            .filter(|e| e["event"] == "installed")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn outside_the_maintenance_window_the_reboot_waits_and_can_be_cancelled() {
    // A window that opens two hours from now.
    let now = wardgate_agent::agent::minute_of_day();
    let at = |m: u32| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let window = format!("{}-{}", at(now + 120), at(now + 180));
    let b = Board::new(
        &["1.1.0"],
        Options {
            windows: vec![window.clone()],
            ..Options::default()
        },
    )
    .await;
    let (ok, out) = b.agent(&["check"]);
    assert!(ok, "{out}");
    assert!(out.contains("waits for a maintenance window"), "{out}");
    assert_eq!(b.reboots(), 0);
    let s = b.status();
    assert_eq!(s["awaiting_reboot"]["version"], "1.1.0", "{s}");
    assert_eq!(s["in_window"], false);

    // `run` keeps waiting for the window rather than rebooting: it says so once it has
    // looked at the window (a loop that rebooted instead would never say it).
    let agent = b.spawn_run();
    wait_for("the wait for the window", Duration::from_secs(10), || {
        b.has_event("reboot_waiting")
    });
    stop(agent);
    assert_eq!(b.reboots(), 0);
    assert_eq!(b.status()["awaiting_reboot"]["slot"], "B");

    // The ward engineer cancels it: no trial, slot A stays.
    let (ok, out) = b.agent(&["rollback"]);
    assert!(ok, "{out}");
    let s = b.status();
    assert_eq!(s["boot"]["trial"], serde_json::Value::Null, "{s}");
    assert_eq!(s["last_update"]["state"], "rolled_back");
    assert_eq!(b.power_cycle(), Slot::A);
}

#[tokio::test(flavor = "multi_thread")]
async fn install_from_a_usb_directory_by_hand_and_refuse_a_rollback_afterwards() {
    let b = Board::new(&["1.0.0", "1.1.0"], Options::default()).await;
    b.healthy(true);
    // A copy of the repository on a "USB stick", installed by version.
    let usb = b.fleet.p("usb");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(b.fleet.p("repo"))
        .arg(&usb)
        .status()
        .unwrap();
    assert!(cp.success());
    let (ok, out) = b.agent(&[
        "install",
        usb.to_str().unwrap(),
        "--version",
        "1.0.0",
        "--now",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("bundle 1.0.0 installed to slot B"), "{out}");
    assert!(
        b.server.log().is_empty(),
        "nothing came over the network: {:?}",
        b.server.log()
    );
    assert_eq!(b.power_cycle(), Slot::B);
    let (ok, out) = b.agent(&["mark-good"]);
    assert!(ok, "{out}");
    assert_eq!(b.status()["version_floor"], "1.0.0");

    // 1.0.0 again, or anything older, is a rollback.
    let (ok, out) = b.agent(&["install", usb.to_str().unwrap(), "--version", "1.0.0"]);
    assert!(!ok);
    assert!(out.contains("rollback refused"), "{out}");
    assert!(b.has_event("refused"));
    // Without a pending update, a manual rollback needs --force.
    let (ok, out) = b.agent(&["rollback"]);
    assert!(!ok && out.contains("--force"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_by_hand_ends_a_trial_and_force_switches_a_committed_slot() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    assert_eq!(b.power_cycle(), Slot::B);
    // On trial, the ward engineer sees something wrong before the agent decides.
    let (ok, out) = b.agent(&["rollback"]);
    assert!(ok && out.contains("rebooting into slot A"), "{out}");
    assert_eq!(b.reboots(), 2);
    assert_eq!(
        b.status()["last_update"]["reason"],
        "ended by hand during its trial"
    );
    assert_eq!(b.power_cycle(), Slot::A);

    // Installed again by hand (the automatic checks leave a failed version alone), committed
    // by hand, then switched back with --force: the old slot is the default again.
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok && out.contains("up to date"), "{out}");
    let url = b.server.url("http", "").to_string();
    let (ok, out) = b.agent(&["install", &url, "--version", "1.1.0", "--now"]);
    assert!(ok, "{out}");
    assert_eq!(b.power_cycle(), Slot::B);
    let (ok, out) = b.agent(&["mark-good"]);
    assert!(ok, "{out}");
    let (ok, out) = b.agent(&["rollback", "--force"]);
    assert!(ok && out.contains("slot A is the default"), "{out}");
    assert_eq!(b.power_cycle(), Slot::A);
    let s = b.status();
    assert_eq!(s["boot"]["default"], "A", "{s}");
    assert_eq!(s["version_floor"], "1.1.0", "the floor stays");
    assert_eq!(s["last_update"]["state"], "rolled_back");
}

/// A Raspberry Pi: `autoboot.txt` keeps its `[tryboot]` section after a failed tryboot, so
/// only the boot id tells the agent that the trial had its boot.
#[tokio::test(flavor = "multi_thread")]
async fn a_trial_that_never_came_up_is_recorded_and_not_tried_again() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let dir = b.fleet.dir.path().display().to_string();
    let cfg = std::fs::read_to_string(&b.config).unwrap().replace(
        &format!("backend = \"state-file\"\nstate_file = \"{dir}/boot-state.txt\""),
        &format!("backend = \"rpi-tryboot\"\nautoboot = \"{dir}/autoboot.txt\""),
    );
    assert!(cfg.contains("rpi-tryboot"));
    std::fs::write(&b.config, cfg).unwrap();
    std::fs::write(
        b.fleet.p("autoboot.txt"),
        "[all]\ntryboot_a_b=1\nboot_partition=2\n",
    )
    .unwrap();
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    assert_eq!(b.reboots(), 1);
    let autoboot = std::fs::read_to_string(b.fleet.p("autoboot.txt")).unwrap();
    assert!(
        autoboot.contains("[tryboot]\nboot_partition=3"),
        "{autoboot}"
    );

    // The tryboot kernel hangs; the watchdog resets the board, which boots [all]: slot A.
    b.power_cycle(); // only the boot id and the command line matter here
    std::fs::write(b.fleet.p("cmdline"), "wardgate.slot=A\n").unwrap();
    let agent = b.spawn_run();
    wait_for("the rollback record", Duration::from_secs(30), || {
        b.has_event("rolled_back")
    });
    wait_for("a check", Duration::from_secs(30), || {
        b.has_event("checked")
    });
    stop(agent);
    let s = b.status();
    let reason = s["last_update"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("did not come up"), "{s}");
    assert_eq!(b.reboots(), 1, "no second try of the failed slot");
    assert_eq!(s["awaiting_reboot"], serde_json::Value::Null);
    assert!(!std::fs::read_to_string(b.fleet.p("autoboot.txt"))
        .unwrap()
        .contains("[tryboot]"));
}

/// Both copies of the boot state garbled while a trial is armed: the boot loader boots
/// slot A and leaves the state alone. The agent rewrites it from its update record (A, the
/// slot the update was installed beside), records the update as rolled back saying why,
/// and the next check runs instead of failing on the state for ever.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_boot_state_is_rewritten_from_the_update_record() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    b.healthy(true);
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    assert_eq!(b.reboots(), 1);
    for f in ["boot-state.txt", "boot-state.bak"] {
        std::fs::write(b.fleet.p(f), b"\xff\xfe garbled\n").unwrap();
    }
    assert_eq!(b.power_cycle(), Slot::A);
    let agent = b.spawn_run();
    wait_for("the rollback record", Duration::from_secs(30), || {
        b.has_event("rolled_back")
    });
    wait_for("a check", Duration::from_secs(30), || {
        b.has_event("checked")
    });
    stop(agent);
    let repaired = b
        .events()
        .into_iter()
        .find(|e| e["event"] == "boot_state_repaired")
        .expect("a boot_state_repaired step");
    let why = repaired["detail"].as_str().unwrap();
    assert!(
        why.contains("boot-state.txt") && why.contains("rewritten as default=A"),
        "{why}"
    );
    let s = b.status();
    assert_eq!(s["boot"]["default"], "A", "{s}");
    assert_eq!(s["boot"]["trial"], serde_json::Value::Null, "{s}");
    assert_eq!(s["last_update"]["state"], "rolled_back", "{s}");
    let reason = s["last_update"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("slot B was never tried") && reason.contains("could not read its state"),
        "{reason}"
    );
    assert_eq!(
        std::fs::read_to_string(b.fleet.p("boot-state.txt")).unwrap(),
        "default=A\n"
    );
    assert_eq!(b.reboots(), 1, "slot A is the committed one: no reboot");
    let (ok, out) = b.agent(&["check"]);
    assert!(ok, "a check after the repair: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_cut_off_resumes_after_a_restart_from_its_last_durable_point() {
    // No resumes within the attempt: the cut ends it, as a power cut would.
    let b = Board::new(
        &[],
        Options {
            repository: "max_resumes = 0".into(),
            ..Options::default()
        },
    )
    .await;
    let image = b.fleet.add_large("2.0.0", 10 << 20);
    b.server
        .fault("wardgate-2.0.0.img", Fault::CutOnceAfter(9 << 20));
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(!ok, "{out}");
    // Progress is made durable about every 4 MiB: of the 9 MiB that arrived, more than 8 are
    // kept.
    let kept: u64 = out
        .split("slot B keeps ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no kept bytes in {out}"));
    assert!((8 << 20..=9 << 20).contains(&kept), "{kept}");
    assert!(out.contains("the next attempt resumes there"), "{out}");
    assert_eq!(b.reboots(), 0);
    assert_eq!(b.status()["boot"]["trial"], serde_json::Value::Null);
    // A manual rollback cannot make the half-written slot the default.
    let (ok, out) = b.agent(&["rollback", "--force"]);
    assert!(!ok && out.contains("unfinished download"), "{out}");

    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    let reqs = b.server.requests("wardgate-2.0.0.img");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].range, Some(format!("bytes={kept}-")));
    assert_eq!(
        reqs[1].sent,
        image.len() as u64 - kept,
        "only the rest was sent"
    );
    assert!(
        std::fs::read(b.fleet.p("slot-b.img")).unwrap() == image,
        "slot B is the image"
    );
    assert_eq!(b.reboots(), 1);
    assert!(!b.fleet.p("state/download.json").exists());
}

/// A loop device over a file of `size` bytes, detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(file: &std::path::Path, size: u64) -> Loop {
        std::fs::File::create(file).unwrap().set_len(size).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup failed (root and loop devices needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Slots on block devices, as on the appliance: an image larger than the inactive slot is
/// refused before its download; one that fits is written to the device.
#[tokio::test(flavor = "multi_thread")]
async fn slots_on_block_devices_are_written_and_a_too_small_one_is_refused() {
    need_root();
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let image = b.image("1.1.0");
    let with_slot_b = |dev: &str| {
        let dir = b.fleet.dir.path().display().to_string();
        let cfg = std::fs::read_to_string(&b.config).unwrap().replace(
            &format!("slot_b = \"{dir}/slot-b.img\""),
            &format!("slot_b = \"{dev}\""),
        );
        assert!(cfg.contains(dev));
        std::fs::write(&b.config, cfg).unwrap();
    };
    let small = Loop::new(&b.fleet.p("small.img"), 8192);
    with_slot_b(&small.dev);
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(!ok && out.contains("slot B holds 8192"), "{out}");
    assert!(b.server.requests("wardgate-1.1.0.img").is_empty());
    assert_eq!(b.reboots(), 0);
    let dev = small.dev.clone();
    drop(small);

    let large = Loop::new(&b.fleet.p("large.img"), 64 << 10);
    std::fs::write(
        &b.config,
        std::fs::read_to_string(&b.config)
            .unwrap()
            .replace(&dev, &large.dev),
    )
    .unwrap();
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    drop(large);
    let written = std::fs::read(b.fleet.p("large.img")).unwrap();
    assert_eq!(&written[..image.len()], &image[..]);
    assert_eq!(b.status()["boot"]["trial"]["slot"], "B");
}

/// Runs as root: each agent gets a network namespace of its own (`unshare --net`), with
/// or without the `inet wardgate` table the health check asks for.
#[tokio::test(flavor = "multi_thread")]
async fn the_health_check_reads_the_kernels_nftables_units_and_commands() {
    need_root();
    let opts = |extra: &str| Options {
        no_http: true,
        health: extra.to_owned(),
        health_deadline: "2s",
        ..Options::default()
    };
    // Healthy: the table is loaded in the agent's namespace, the command exits 0.
    let b = Board::new(
        &["1.1.0"],
        opts("nft_tables = [\"inet wardgate\"]\ncommands = [[\"test\", \"-d\", \"/\"]]"),
    )
    .await;
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    b.power_cycle();
    let table = "nft add table inet wardgate && exec \"$0\" \"$@\"";
    let agent = b.spawn_run_with(&["unshare", "--net", "--", "sh", "-c", table]);
    wait_for("the commit", Duration::from_secs(30), || {
        b.has_event("committed")
    });
    stop(agent);

    // Three boards whose trial fails, each for one reason.
    for (extra, reason) in [
        (
            "nft_tables = [\"inet wardgate\"]",
            "nft table inet wardgate is not loaded",
        ),
        (
            "units = [\"wardgate-nonexistent.service\"]",
            "unit wardgate-nonexistent.service is not active",
        ),
        (
            "commands = [[\"sh\", \"-c\", \"echo spool not writable >&2; exit 3\"]]",
            "spool not writable",
        ),
    ] {
        let b = Board::new(&["1.1.0"], opts(extra)).await;
        let (ok, out) = b.agent(&["check", "--now"]);
        assert!(ok, "{out}");
        b.power_cycle();
        let agent = b.spawn_run_with(&["unshare", "--net", "--"]);
        wait_for("the rollback", Duration::from_secs(30), || {
            b.has_event("rolled_back")
        });
        stop(agent);
        let s = b.status();
        let got = s["last_update"]["reason"].as_str().unwrap_or_default();
        assert!(got.contains(reason), "{reason:?} not in {got:?}");
        assert_eq!(b.power_cycle(), Slot::A);
    }
}

fn need_root() {
    let out = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "this test needs root (network namespaces and nftables); run it as root, as CI does"
    );
    let nft = Command::new("sh")
        .args(["-c", "command -v nft"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(
        nft.success(),
        "nft is missing: apt-get install nftables (scripts/test does)"
    );
}

#[test]
fn a_broken_config_is_refused_with_every_error_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[repository]\nurl = \"ftp://x\"\ntrusted_root = \"/r\"\n[appliance]\nhardware = \"\"\n\
         state_dir = \"/s\"\nslot_a = \"/a\"\nslot_b = \"/b\"\n[boot]\nbackend = \"grub\"\n",
    )
    .unwrap();
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in ["repository.url", "appliance.hardware", "boot.backend"] {
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// Issue 13, item 3: nothing is installed while a trial is undecided, and never into the
/// slot that runs. With 1.1.0 booted on trial in slot B (its health not yet judged), the
/// fleet publishes 1.2.0: `check` refuses, and slot B still holds what runs. The same with
/// a crash between arming the trial and saving the record (a trial armed, no pending
/// record), and with the board running its non-default slot.
#[tokio::test(flavor = "multi_thread")]
async fn no_install_while_a_trial_is_undecided_nor_into_the_running_slot() {
    use wardgate_agent::slots::{BootState, StateFile};
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok && out.contains("bundle 1.1.0 installed"), "{out}");
    assert_eq!(b.power_cycle(), Slot::B);
    assert!(b.fleet.add("1.2.0", &common::SIGNERS, &[]).0);
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(!ok && out.contains("no install until"), "{out}");
    assert_eq!(
        &std::fs::read(b.fleet.p("slot-b.img")).unwrap()[..],
        &b.image("1.1.0")[..],
        "the running slot was written"
    );

    // A trial armed but no record of it (a crash in between): still no install.
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let boot = StateFile {
        path: b.fleet.p("boot-state.txt"),
    };
    boot.write(BootState {
        default: Slot::A,
        trial: Some((Slot::B, 1)),
    })
    .unwrap();
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(!ok && out.contains("armed for a trial"), "{out}");

    // Running B while A is the default (the boot loader fell back to it): B is not written.
    let b = Board::new(&["1.1.0"], Options::default()).await;
    std::fs::write(b.fleet.p("cmdline"), "wardgate.slot=B\n").unwrap();
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(
        !ok && out.contains("refusing to write the running slot"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(b.fleet.p("slot-b.img")).unwrap(),
        b"factory image"
    );
}

/// Issue 13, item 5: `run` without `[report] broker` (no one can send "check now") checks
/// once per `poll_interval`, not in a loop. The board here has no broker and a poll
/// interval of an hour: between its start and SIGTERM, one check.
#[tokio::test(flavor = "multi_thread")]
async fn run_without_a_broker_checks_once_per_interval() {
    let b = Board::new(&[], Options::default()).await;
    let agent = b.spawn_run();
    wait_for("the first check", Duration::from_secs(30), || {
        b.has_event("checked")
    });
    // The status the operator would look at, read while the agent runs (a busy loop would
    // be checking again meanwhile, as it did 251 times in 7 s).
    let s = b.status();
    assert_eq!(s["awaiting_reboot"], serde_json::Value::Null, "{s}");
    stop(agent);
    let checks = b
        .events()
        .iter()
        .filter(|e| e["event"] == "checked")
        .count();
    assert_eq!(checks, 1, "{:?}", b.events());
}

/// Issue 13, item 11 (the floor): a fresh board knows the version it shipped with, so
/// nothing older is installed before its first update is committed — neither by a check
/// nor by hand.
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_board_never_installs_below_its_factory_version() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    std::fs::write(b.fleet.p("factory-version"), "1.5.0\n").unwrap();
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok && out.contains("up to date"), "{out}");
    let url = b.server.url("http", "").to_string();
    let (ok, out) = b.agent(&["install", &url, "--version", "1.1.0", "--now"]);
    assert!(!ok && out.contains("rollback refused"), "{out}");
    assert_eq!(
        std::fs::read(b.fleet.p("slot-b.img")).unwrap(),
        b"factory image"
    );
    assert_eq!(b.status()["version_floor"], "1.5.0");
}

/// Issue 13, item 11 (commit order): the agent, committing a healthy trial of 1.1.0 in B, is
/// killed at `point`, before its record says committed. Its next start — with the health
/// endpoint down now, so judging the slot again would "roll back" — finishes the commit.
async fn killed_while_committing_then_finished(point: &str) {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok && out.contains("bundle 1.1.0 installed"), "{out}");
    assert_eq!(b.power_cycle(), Slot::B);
    b.healthy(true);
    let mut agent = b.spawn_run_crashing_at(&[], point);
    assert!(
        !agent.wait().unwrap().success(),
        "the agent did not crash at {point}"
    );
    let s = b.status();
    assert_eq!(s["boot"]["default"], "B", "{s}");
    assert_eq!(s["last_update"]["state"], "pending", "{s}");
    b.healthy(false);
    let agent = b.spawn_run();
    wait_for("the trial's verdict", Duration::from_secs(30), || {
        b.has_event("committed") || b.has_event("rolled_back")
    });
    stop(agent);
    assert!(b.has_event("committed"), "{:?}", b.events());
    assert!(!b.has_event("rolled_back"), "{:?}", b.events());
    let s = b.status();
    assert_eq!(s["last_update"]["state"], "committed", "{s}");
    assert_eq!(s["boot"]["default"], "B", "{s}");
    assert_eq!(s["version_floor"], "1.1.0", "{s}");
}

/// Killed right after the boot loader's commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_the_boot_commit_and_the_record_is_finished_as_a_commit() {
    killed_while_committing_then_finished("boot-committed").await;
}

/// Killed right after raising the floor (the floor stays where it is).
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_the_floor_raise_and_the_record_is_finished_as_a_commit() {
    killed_while_committing_then_finished("floor-raised").await;
}

/// Issue 13, item 11 (crash windows): killed right after a download made its progress
/// durable, the next check resumes from there, and what is armed is exactly the signed
/// image (the kept bytes pass through the hash).
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_saving_download_progress_resumes_and_arms_only_the_signed_image() {
    let b = Board::new(&[], Options::default()).await;
    let image = b.fleet.add_large("2.0.0", 10 << 20);
    let (ok, out) = b.agent_crashing_at("progress-saved", &["check", "--now"]);
    assert!(!ok, "{out}");
    let progress: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.fleet.p("state/download.json")).unwrap()).unwrap();
    let kept = progress["offset"].as_u64().unwrap();
    // Made durable every 4 MiB, at the end of the chunk that passed it.
    assert!((4 << 20..5 << 20).contains(&kept), "{progress}");
    assert_eq!(b.status()["boot"]["trial"], serde_json::Value::Null);

    let (ok, out) = b.agent(&["check", "--now"]);
    assert!(ok, "{out}");
    let reqs = b.server.requests("wardgate-2.0.0.img");
    assert_eq!(
        reqs.last().unwrap().range,
        Some(format!("bytes={kept}-")),
        "{reqs:?}"
    );
    assert!(
        std::fs::read(b.fleet.p("slot-b.img")).unwrap() == image,
        "slot B is the image"
    );
    assert_eq!(b.reboots(), 1);
}

/// Issue 13, item 11 (crash windows): the agent killed between arming a trial and recording
/// the install leaves the boot loader holding a trial nobody will judge. Its next start
/// disarms it (and says so), the board keeps booting its committed slot, and the next check
/// installs again.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_arming_a_trial_and_recording_it_is_disarmed_on_restart() {
    let b = Board::new(&["1.1.0"], Options::default()).await;
    let (ok, out) = b.agent_crashing_at("trial-armed", &["check", "--now"]);
    assert!(!ok, "{out}");
    assert_eq!(
        b.status()["boot"]["trial"]["slot"],
        "B",
        "the crash left a trial armed"
    );
    let agent = b.spawn_run();
    wait_for("the next check", Duration::from_secs(30), || {
        b.has_event("installed")
    });
    stop(agent);
    let events = b.events();
    let disarmed = events.iter().position(|e| {
        e["event"] == "error" && e["detail"].as_str().unwrap_or("").contains("disarmed")
    });
    let installed = events.iter().position(|e| e["event"] == "installed");
    assert!(disarmed.is_some() && disarmed < installed, "{events:?}");
}
