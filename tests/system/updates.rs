//! The update agent beside a running gateway: its reports reach the hospital's broker
//! through the gateway (spool, uplink) and the security decisions among them are audited;
//! a "check now" from upstream reaches the agent through the embedded broker.
//!
//! Real processes throughout: `wardgate run`, `wardgate-agent run`, mosquitto upstream, a
//! repository built by `wardgate-release`. The board is simulated as in the agent's own
//! tests: file-backed slots, the state-file boot backend, a reboot command that records.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;

use crate::support::upstream::{Consumer, Link, Upstream};
use crate::support::{Site, DEADLINE};

/// A binary of the workspace's other package, built by `cargo test --workspace`.
pub(crate) fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p wardgate-agent` (scripts/test builds the \
         whole workspace)",
        bin.display()
    );
    bin
}

fn release(args: &[&str]) {
    let out = Command::new(sibling_bin("wardgate-release"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wardgate-release {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An empty signed repository in `dir/repo`, keys beside it.
pub(crate) fn repository(dir: &Path) {
    let p = |s: &str| dir.join(s).display().to_string();
    for k in ["root", "targets", "snapshot", "timestamp"] {
        release(&["keygen", &p(&format!("{k}.key"))]);
    }
    release(&[
        "init",
        "--repo",
        &p("repo"),
        "--root-key",
        &p("root.key"),
        "--targets-key",
        &p("targets.key"),
        "--snapshot-key",
        &p("snapshot.key"),
        "--timestamp-key",
        &p("timestamp.key"),
    ]);
}

fn add_bundle(dir: &Path, version: &str) {
    std::fs::write(dir.join("image"), format!("rootfs {version}").repeat(500)).unwrap();
    publish(dir, &dir.join("image"), version);
}

/// Publishes `image` as `version` for qemu-virt (with an SBOM) in the repository of `dir`.
pub(crate) fn publish(dir: &Path, image: &Path, version: &str) {
    let p = |s: &str| dir.join(s).display().to_string();
    std::fs::write(dir.join("sbom.json"), "{\"spdxVersion\":\"SPDX-2.3\"}").unwrap();
    release(&[
        "add",
        "--repo",
        &p("repo"),
        "--image",
        &image.display().to_string(),
        "--version",
        version,
        "--hardware",
        "qemu-virt",
        "--sbom",
        &p("sbom.json"),
        "--key",
        &p("targets.key"),
        "--key",
        &p("snapshot.key"),
        "--key",
        &p("timestamp.key"),
    ]);
}

struct Board {
    dir: PathBuf,
    config: PathBuf,
}

impl Board {
    /// A board whose agent reports to the gateway's `broker` with the credentials the
    /// gateway wrote to `credentials`, and whose health check passes.
    fn new(dir: &Path, broker: &str, credentials: &Path) -> Board {
        Board::with_health(
            dir,
            broker,
            credentials,
            "deadline = \"5s\"\ncommands = [[\"true\"]]",
        )
    }

    /// [`Board::new`] with these `[health]` lines.
    fn with_health(dir: &Path, broker: &str, credentials: &Path, health: &str) -> Board {
        std::fs::create_dir_all(dir).unwrap();
        for s in ["slot-a.img", "slot-b.img"] {
            std::fs::write(dir.join(s), b"factory").unwrap();
        }
        std::fs::write(dir.join("boot.txt"), "default=A\n").unwrap();
        std::fs::write(dir.join("cmdline"), "wardgate.slot=A\n").unwrap();
        std::fs::write(dir.join("boot_id"), "boot-0\n").unwrap();
        let d = dir.display();
        let credentials = credentials.display();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"[repository]
url = "file://{d}/repo/"
trusted_root = "{d}/repo/metadata/1.root.json"
poll_interval = "1h"
poll_jitter = "0s"
[appliance]
hardware = "qemu-virt"
state_dir = "{d}/state"
slot_a = "{d}/slot-a.img"
slot_b = "{d}/slot-b.img"
cmdline = "{d}/cmdline"
boot_id = "{d}/boot_id"
reboot_command = ["sh", "-c", "echo reboot >> {d}/reboots"]
[boot]
backend = "state-file"
state_file = "{d}/boot.txt"
[maintenance]
windows = []
[health]
{health}
[report]
broker = "{broker}"
credentials = "{credentials}"
"#
            ),
        )
        .unwrap();
        Board {
            dir: dir.to_owned(),
            config,
        }
    }

    /// The gateway restarted with its embedded broker at `broker`.
    fn set_broker(&self, broker: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("broker = ") {
                    format!("broker = \"{broker}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        std::fs::write(&self.config, text.join("\n") + "\n").unwrap();
    }

    fn spawn(&self) -> Child {
        Command::new(sibling_bin("wardgate-agent"))
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `run`, its log written to `log`.
    fn spawn_logged(&self, log: &Path) -> Child {
        Command::new(sibling_bin("wardgate-agent"))
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }

    /// One `wardgate-agent` command by hand, beside `run`; its success and output.
    fn command(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(sibling_bin("wardgate-agent"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn reboots(&self) -> usize {
        std::fs::read_to_string(self.dir.join("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The boot script's decision at power-on (state-file format), and the command line.
    fn power_cycle(&self) -> &'static str {
        let state = std::fs::read_to_string(self.dir.join("boot.txt")).unwrap();
        let get = |k: &str| {
            state
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
        };
        let tries: u32 = get("tries").map_or(0, |t| t.parse().unwrap());
        let default = get("default").unwrap();
        let (slot, next) = match get("try") {
            Some(t) if tries > 0 => (
                t.clone(),
                format!("default={default}\ntry={t}\ntries={}\n", tries - 1),
            ),
            _ => (default.clone(), format!("default={default}\n")),
        };
        std::fs::write(self.dir.join("boot.txt"), next).unwrap();
        std::fs::write(self.dir.join("cmdline"), format!("wardgate.slot={slot}\n")).unwrap();
        let n: u32 = std::fs::read_to_string(self.dir.join("boot_id"))
            .unwrap()
            .trim()
            .trim_start_matches("boot-")
            .parse()
            .unwrap();
        std::fs::write(self.dir.join("boot_id"), format!("boot-{}\n", n + 1)).unwrap();
        if slot == "B" {
            "B"
        } else {
            "A"
        }
    }
}

fn stop(mut c: Child) {
    let _ = Command::new("kill").arg(c.id().to_string()).status();
    let _ = c.wait();
}

fn event(p: &Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload).unwrap()
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The hospital asks `gateway`'s agent to check for updates now (`now`: and reboot into one
/// at once), on `…/_gateway/cmd/update`.
pub(crate) async fn check_now(hospital: &Consumer, gateway: &str, now: bool) {
    hospital
        .client
        .publish(
            format!("hospital/st-mary/{gateway}/_gateway/cmd/update"),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            format!("{{\"now\": {now}}}"),
        )
        .await
        .unwrap();
}

/// A ward site whose uplink reaches a mosquitto upstream (through a link), and the
/// hospital's view of the gateway's update stream.
async fn site_with_updates() -> (Site, Upstream, Link, Consumer) {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    let link = Link::start(upstream.port, true).await;
    site.extra = upstream.uplink_section("gw-test", link.port, "");
    let updates = upstream
        .consumer("hospital/st-mary/gw-test/_gateway/update")
        .await;
    (site, upstream, link, updates)
}

#[tokio::test]
async fn agent_reports_reach_upstream_audited_and_check_now_comes_down() {
    let (site, _upstream, _link, mut updates) = site_with_updates().await;
    let mut gw = site.start().await;
    let ready = gw.wait_log("gateway.ready", &[]).await;
    let broker = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("broker="))
        .expect("broker address in the ready line")
        .to_owned();
    gw.wait_log("uplink.commands_subscribed", &[]).await;

    let credentials = site.path("admin/broker-agent.secret");
    let board = Board::new(&site.path("board"), &broker, &credentials);
    repository(&board.dir);
    let agent = board.spawn();
    // Nothing to install yet: the check's result reaches the hospital.
    let got = updates
        .until(|g| g.iter().any(|p| event(p)["event"] == "checked"))
        .await;
    assert!(got.iter().any(|p| event(p)["event"] == "started"));

    // The fleet manager publishes 1.1.0 and asks this gateway to check now, rebooting at once.
    add_bundle(&board.dir, "1.1.0");
    check_now(&updates, "gw-test", true).await;
    let got = updates
        .until(|g| g.iter().any(|p| event(p)["event"] == "rebooting"))
        .await;
    let installed = got
        .iter()
        .map(event)
        .find(|e| e["event"] == "installed")
        .expect("an installed report");
    assert_eq!(installed["version"], "1.1.0");
    assert_eq!(installed["slot"], "B");
    wait_until("the reboot command", || board.reboots() == 1).await;
    stop(agent);
    gw.wait_log("uplink.command_delivered", &["_gateway/cmd/update"])
        .await;

    // The trial boot: healthy, committed, reported and audited.
    assert_eq!(board.power_cycle(), "B");
    let agent = board.spawn();
    updates
        .until(|g| g.iter().any(|p| event(p)["event"] == "committed"))
        .await;
    stop(agent);
    gw.wait_log("update.committed", &[]).await;
    let audited = audit_events(&site);
    for want in ["update.installed", "update.rebooting", "update.committed"] {
        assert!(
            audited.iter().any(|e| e == want),
            "{want} not in {audited:?}"
        );
    }
    assert!(
        !audited.iter().any(|e| e == "update.checked"),
        "routine checks are reported, not audited"
    );

    // A report that is not one is refused and audited, not forwarded (sent with the
    // agent's credentials: nothing else gets onto the embedded broker).
    let login = std::fs::read_to_string(&credentials).unwrap();
    let (user, password) = login.trim_end().split_once(':').unwrap();
    let mut o = rumqttc::MqttOptions::new(
        "_not-the-agent",
        "127.0.0.1",
        broker.rsplit(':').next().unwrap().parse().unwrap(),
    );
    o.set_keep_alive(Duration::from_secs(5));
    o.set_credentials(user, password);
    let (c, mut el) = rumqttc::AsyncClient::new(o, 8);
    c.publish(
        "_gateway/update/status",
        rumqttc::QoS::AtLeastOnce,
        false,
        "not json",
    )
    .await
    .unwrap();
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    gw.wait_log("update.report_refused", &[]).await;
    let refused = audit_events(&site)
        .iter()
        .filter(|e| *e == "update.report_refused")
        .count();
    assert_eq!(refused, 1);
}

/// A trial whose gateway never comes up: its health check fails while the embedded broker
/// is down, the agent rolls back and reboots with nobody to tell. Those steps (the rollback
/// and its reason among them) are in the journal, and reach the hospital, with the times
/// they happened, once the old slot's gateway is back; a further start sends them no more.
#[tokio::test]
async fn steps_made_while_the_gateway_was_down_reach_upstream_after_the_next_boot() {
    let (site, _upstream, _link, mut updates) = site_with_updates().await;
    let gw = site.start().await;
    let credentials = site.path("admin/broker-agent.secret");
    let board = Board::with_health(
        &site.path("board"),
        &gw.broker.to_string(),
        &credentials,
        "deadline = \"1s\"\nretry = \"200ms\"\ncommands = [[\"sh\", \"-c\", \"echo gateway not ready >&2; exit 1\"]]",
    );
    repository(&board.dir);
    add_bundle(&board.dir, "1.1.0");
    let agent = board.spawn();
    updates
        .until(|g| g.iter().any(|p| event(p)["event"] == "rebooting"))
        .await;
    wait_until("the reboot command", || board.reboots() == 1).await;
    stop(agent);

    // Slot B's gateway never starts: the trial fails its health check unheard.
    gw.stop().await;
    assert_eq!(board.power_cycle(), "B");
    let agent = board.spawn();
    wait_until("the rollback's reboot", || board.reboots() == 2).await;
    stop(agent);

    // Back in slot A, its gateway up again (a new broker port, new credentials).
    let mut gw = site.start().await;
    board.set_broker(&gw.broker.to_string());
    assert_eq!(board.power_cycle(), "A");
    let agent = board.spawn();
    // The gateway's own uplink delivers at least once (its first run stopped before every
    // acknowledgement was durable), so steps are told apart by their times.
    let time = |e: &serde_json::Value| e["time"].as_str().unwrap_or_default().to_owned();
    let got = updates
        .until(|g| {
            let events: Vec<_> = g.iter().map(event).collect();
            events.iter().any(|r| {
                r["event"] == "rolled_back"
                    && events
                        .iter()
                        .any(|s| s["event"] == "started" && time(s) > time(r))
            })
        })
        .await;
    let events: Vec<serde_json::Value> = got.iter().map(event).collect();
    let rolled_back = events.iter().find(|e| e["event"] == "rolled_back").unwrap();
    assert_eq!(rolled_back["version"], "1.1.0");
    assert_eq!(rolled_back["slot"], "B");
    let reason = rolled_back["detail"].as_str().unwrap();
    assert!(
        reason.contains("health check failed") && reason.contains("gateway not ready"),
        "{reason}"
    );
    // Slot B's boot is told in the order it happened.
    let at = |n: &str| events.iter().position(|e| e["event"] == n).unwrap();
    assert!(at("health_check") < at("rolled_back"), "{events:?}");
    gw.wait_log("update.rolled_back", &[]).await;
    stop(agent);

    // Delivered once: with the gateway up, every line is acknowledged by the time the agent
    // stops, so the next start has nothing to send again.
    let journal = std::fs::metadata(board.dir.join("state/journal.jsonl"))
        .unwrap()
        .len();
    let reported = std::fs::read_to_string(board.dir.join("state/journal.reported")).unwrap();
    assert_eq!(reported.trim(), journal.to_string());
}

/// Commands by hand beside `run` (a ward engineer's `check` and `status`) report on their
/// own MQTT sessions: `run`'s session, which takes "check now" from the hospital, is never
/// taken over, and a check-now sent right after them still arrives.
#[tokio::test]
async fn commands_by_hand_leave_the_running_agents_broker_session_alone() {
    let (site, _upstream, _link, mut updates) = site_with_updates().await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.commands_subscribed", &[]).await;
    let board = Board::new(
        &site.path("board"),
        &gw.broker.to_string(),
        &site.path("admin/broker-agent.secret"),
    );
    repository(&board.dir);
    let log = site.path("agent.log");
    let agent = board.spawn_logged(&log);
    updates
        .until(|g| g.iter().any(|p| event(p)["event"] == "checked"))
        .await;
    for args in [&["check"][..], &["status"], &["check"]] {
        let (ok, out) = board.command(args);
        assert!(ok, "{args:?}: {out}");
    }
    // The hand-made check's own report arrived: it had a session of its own.
    updates
        .until(|g| g.iter().filter(|p| event(p)["event"] == "checked").count() >= 2)
        .await;
    add_bundle(&board.dir, "1.1.0");
    check_now(&updates, "gw-test", false).await;
    updates
        .until(|g| g.iter().any(|p| event(p)["event"] == "installed"))
        .await;
    stop(agent);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("update.broker_link"),
        "run lost its broker session:\n{text}"
    );
}

/// The running gateway's audit events, over its admin socket.
fn audit_events(site: &Site) -> Vec<String> {
    site.admin_ok(&["audit", "tail", "-n", "100000", "--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| r["event"].as_str().map(str::to_owned))
        .collect()
}
