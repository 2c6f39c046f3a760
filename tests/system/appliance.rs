//! The appliance image (issue 16) booted under `qemu-system-aarch64`: `image/build` makes
//! it once per test run (the Debian root, kernel and busybox come from its cache), each
//! test boots it through `image/run-qemu` on a qcow2 overlay of its own, provisions it
//! with a medium the test writes (the site's configuration and the hospital's device CA:
//! no key), and talks to it only through QEMU's user networking: forwarded ports on
//! 127.0.0.1, and `10.0.2.100` in the guest forwarded to the test's peers on the host.
//! Commands inside the guest go through qemu-guest-agent.
//!
//! One machine at a time (the tests hold [`MACHINE`]): each has both of the 2 cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::support::clients::{options, Client};
use crate::support::upstream::Upstream;
use crate::updates::repository;

/// A boot of the image, U-Boot to `wardgate.service` ready, is about 35 s on this machine
/// alone; the deadline allows for the other system tests running beside it.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
/// The address the guest reaches the host's peers by (QEMU guestfwd).
const HOST_IN_GUEST: &str = "10.0.2.100";
/// The address a connection forwarded from the host comes from, seen in the guest.
const HOST_SEEN_BY_GUEST: &str = "10.0.2.2";
const GATEWAY_ID: &str = "gw-qemu";

static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static BUILT: OnceLock<Built> = OnceLock::new();

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image built for this run, with the fleet repository whose root it trusts.
struct Built {
    disk: PathBuf,
    info: BTreeMap<String, String>,
}

fn built() -> &'static Built {
    BUILT.get_or_init(|| {
        let dir = workspace().join("target/appliance-test");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(dir.join("fleet")).unwrap();
        repository(&dir.join("fleet"));
        let started = Instant::now();
        run(Command::new(workspace().join("image/build"))
            .arg("--trusted-root")
            .arg(dir.join("fleet/repo/metadata/1.root.json"))
            .arg("--out")
            .arg(dir.join("v1")));
        let info: BTreeMap<String, String> = std::fs::read_to_string(dir.join("v1/build-info"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        eprintln!(
            "appliance: image built in {:.0} s: disk {} MiB ({} MiB allocated), root image {} MiB",
            started.elapsed().as_secs_f64(),
            info["disk_bytes"].parse::<u64>().unwrap() >> 20,
            info["disk_allocated_bytes"].parse::<u64>().unwrap() >> 20,
            info["rootfs_bytes"].parse::<u64>().unwrap() >> 20,
        );
        Built {
            disk: PathBuf::from(&info["disk"]),
            info,
        }
    })
}

/// A free port on 127.0.0.1 for QEMU to forward.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The site a test provisions: the hospital's device CA and device certificates (made on
/// the host, as the hospital's PKI would), the upstream broker, and the medium.
struct Ward {
    dir: tempfile::TempDir,
    upstream: Upstream,
}

impl Ward {
    async fn new() -> Ward {
        let dir = tempfile::tempdir().unwrap();
        let upstream =
            Upstream::start_with_sans(&dir.path().join("upstream"), GATEWAY_ID, &[HOST_IN_GUEST])
                .await;
        let devices = dir.path().join("devices");
        run(Command::new(crate::support::WARDGATE)
            .args(["pki", "init", "--site", "st-mary", "--dir"])
            .arg(&devices));
        run(Command::new(crate::support::WARDGATE)
            .args(["pki", "issue", "pump-1", "--dir"])
            .arg(&devices)
            .arg("--out")
            .arg(dir.path().join("pump-1")));
        Ward { dir, upstream }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The provisioning medium: an ext4 file system labelled WGSETUP; updates reboot at
    /// once, a trial has 2 minutes to pass its health check.
    fn medium(&self) -> PathBuf {
        self.medium_with("[]", "2m")
    }

    /// [`Ward::medium`] with the agent's maintenance `windows` (a TOML array) and health
    /// check `deadline`.
    fn medium_with(&self, windows: &str, deadline: &str) -> PathBuf {
        let m = self.p("medium");
        std::fs::create_dir_all(m.join("upstream")).unwrap();
        std::fs::copy(self.p("devices/ca.pem"), m.join("device-ca.pem")).unwrap();
        let (ca, cert, key) = self.upstream.client_files(GATEWAY_ID);
        std::fs::copy(ca, m.join("upstream/ca.pem")).unwrap();
        std::fs::copy(cert, m.join("upstream/gateway.pem")).unwrap();
        std::fs::copy(key, m.join("upstream/gateway.key")).unwrap();
        std::fs::write(
            m.join("wardgate.toml"),
            format!(
                r#"[gateway]
id = "{GATEWAY_ID}"
site = "st-mary"
data_dir = "/var/lib/wardgate"

[edge]
listen = "0.0.0.0:8883"
ca = "device-ca.pem"
cert = "pki/server.pem"
key = "pki/server.key"

[broker]
listen = "127.0.0.1:1883"

[firewall]
device_interfaces = ["ward0"]

[uplink]
host = "{HOST_IN_GUEST}"
port = 8883
ca = "upstream/ca.pem"
cert = "upstream/gateway.pem"
key = "upstream/gateway.key"
topic_prefix = "hospital"
backoff_min = "200ms"
backoff_max = "1s"

[[device_class]]
name = "infusion-pump"
publish = ["ward/{{device}}/#"]
subscribe = ["ward/{{device}}/cmd/#"]
alarm = ["ward/{{device}}/alarm/#"]

[[device]]
id = "pump-1"
class = "infusion-pump"
address = "{HOST_SEEN_BY_GUEST}"
"#
            ),
        )
        .unwrap();
        std::fs::write(
            m.join("agent.toml"),
            format!(
                r#"[repository]
url = "http://{HOST_IN_GUEST}:8080/"
trusted_root = "/usr/share/wardgate/root.json"
poll_interval = "1h"
poll_jitter = "1s"
[appliance]
hardware = "qemu-virt"
state_dir = "/var/lib/wardgate-agent"
slot_a = "/dev/vda2"
slot_b = "/dev/vda3"
[boot]
backend = "state-file"
state_file = "/boot/firmware/wardgate-boot.txt"
[maintenance]
windows = {windows}
[health]
deadline = "{deadline}"
units = ["wardgate.service"]
nft_tables = ["inet wardgate"]
http = ["http://127.0.0.1:9464/health/working"]
commands = [["/usr/bin/wardgate", "status"]]
[report]
broker = "127.0.0.1:1883"
"#
            ),
        )
        .unwrap();
        let img = self.p("setup.img");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "WGSETUP", "-d"])
            .arg(&m)
            .arg(&img)
            .arg("8M"));
        img
    }
}

/// A console line without its colours (systemd's status lines carry ANSI escapes).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out.trim_end().to_owned()
}

/// A running guest: its console, and the ports the host reaches it by.
struct Machine {
    qemu: tokio::process::Child,
    console: Arc<Mutex<Vec<String>>>,
    lines: mpsc::UnboundedReceiver<String>,
    qga: PathBuf,
    /// The QEMU monitor (QMP), for power cuts.
    qmp: PathBuf,
    started: Instant,
    /// 127.0.0.1:edge on the host is the guest's edge listener.
    edge: u16,
    _dir: tempfile::TempDir,
}

impl Machine {
    /// Powers on a fresh copy of the built image with `medium` attached, the guest's
    /// 10.0.2.100:8883 forwarded to the upstream broker.
    async fn boot(medium: &Path, upstream_port: u16) -> Machine {
        Machine::boot_with(medium, upstream_port, None).await
    }

    /// [`Machine::boot`], the guest's 10.0.2.100:8080 forwarded to `repository_port`.
    async fn boot_with(medium: &Path, upstream_port: u16, repository_port: Option<u16>) -> Machine {
        let b = built();
        let dir = tempfile::tempdir().unwrap();
        let edge = free_port();
        let qga = dir.path().join("qga.sock");
        let qmp = dir.path().join("qmp.sock");
        let mut qemu = tokio::process::Command::new(workspace().join("image/run-qemu"))
            .arg("--disk")
            .arg(&b.disk)
            .arg("--overlay")
            .arg(dir.path().join("disk.qcow2"))
            .arg("--setup")
            .arg(medium)
            .arg("--qga")
            .arg(&qga)
            .arg("--qmp")
            .arg(&qmp)
            .args(["--forward", &format!("{edge}:8883")])
            .args(["--guest-forward", &format!("8883:{upstream_port}")])
            .args(
                repository_port
                    .map(|p| vec!["--guest-forward".to_owned(), format!("8080:{p}")])
                    .unwrap_or_default(),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start image/run-qemu");
        let out = qemu.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let keep = console.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(out).split(b'\n');
            while let Ok(Some(line)) = r.next_segment().await {
                let line = plain(&String::from_utf8_lossy(&line));
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Machine {
            qemu,
            console,
            lines,
            qga,
            qmp,
            started: Instant::now(),
            edge,
            _dir: dir,
        }
    }

    /// Waits for a console line containing `marker`; returns it.
    async fn expect(&mut self, marker: &str) -> String {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(marker) {
                    return Some(line);
                }
            }
            None
        };
        match tokio::time::timeout(BOOT_DEADLINE, wait).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("QEMU exited before {marker:?}:\n{}", self.log()),
            Err(_) => panic!("no {marker:?} on the console in time:\n{}", self.log()),
        }
    }

    /// The lines from a console line containing `from` up to one containing `to`.
    async fn expect_block(&mut self, from: &str, to: &str) -> Vec<String> {
        self.expect(from).await;
        let mut block = Vec::new();
        loop {
            let line = self.expect("").await;
            let end = line.contains(to);
            block.push(line);
            if end {
                return block;
            }
        }
    }

    /// The server CA the first boot printed on the console, written to the ward's
    /// `server-ca.pem` (devices pin it).
    async fn server_ca(&mut self, ward: &Ward) {
        let ca: Vec<String> = self
            .expect_block(
                "wardgate-firstboot: server CA certificate follows",
                "END CERTIFICATE",
            )
            .await
            .iter()
            // Other services' lines may come between.
            .filter_map(|l| {
                l.find("wardgate-firstboot: ")
                    .map(|at| l[at + 20..].to_owned())
            })
            .collect();
        std::fs::write(ward.p("server-ca.pem"), ca.join("\n") + "\n").unwrap();
    }

    /// Waits for systemd to report `unit` started (for a notify service: ready); if it
    /// reports a failure first, panics with the unit's journal from the guest.
    async fn started(&mut self, unit: &str) {
        let short = &unit[..unit.len().min(10)];
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(&format!("Started {unit}")) {
                    return Ok(());
                }
                if line.contains("[FAILED]") && line.contains(short) {
                    return Err(line);
                }
            }
            Err("QEMU exited".to_owned())
        };
        let failed = match tokio::time::timeout(BOOT_DEADLINE, wait).await {
            Ok(Ok(())) => return,
            Ok(Err(line)) => line,
            Err(_) => format!("no \"Started {unit}\" in time"),
        };
        let (_, journal) = self
            .exec("/usr/bin/journalctl", &["-b", "--no-pager", "-u", unit])
            .await;
        panic!("{failed}\n--- journal of {unit} ---\n{journal}");
    }

    fn log(&self) -> String {
        self.console.lock().unwrap().join("\n")
    }

    /// Runs `path args` in the guest through qemu-guest-agent; returns its exit code and
    /// standard output.
    async fn exec(&self, path: &str, args: &[&str]) -> (i64, String) {
        self.guest_exec(path, args, true).await
    }

    /// Starts `path args` in the guest without waiting for it to end.
    async fn spawn(&self, path: &str, args: &[&str]) {
        self.guest_exec(path, args, false).await;
    }

    async fn guest_exec(&self, path: &str, args: &[&str], wait: bool) -> (i64, String) {
        let stream = tokio::time::timeout(crate::support::DEADLINE, async {
            loop {
                if let Ok(s) = UnixStream::connect(&self.qga).await {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("no qemu-guest-agent socket");
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd).lines();
        let mut call = async |cmd: serde_json::Value| -> serde_json::Value {
            wr.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
            loop {
                let line = tokio::time::timeout(crate::support::DEADLINE, rd.next_line())
                    .await
                    .expect("qemu-guest-agent did not answer")
                    .unwrap()
                    .expect("qemu-guest-agent closed");
                let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
                if let Some(e) = v.get("error") {
                    panic!("qemu-guest-agent: {e}");
                }
                if v.get("return").is_some() {
                    return v["return"].clone();
                }
            }
        };
        let id = u64::from(std::process::id());
        assert_eq!(
            call(serde_json::json!({"execute": "guest-sync", "arguments": {"id": id}})).await,
            id
        );
        let pid = call(serde_json::json!({"execute": "guest-exec", "arguments": {
            "path": path, "arg": args, "capture-output": true}}))
        .await["pid"]
            .clone();
        if !wait {
            return (0, String::new());
        }
        let deadline = Instant::now() + crate::support::DEADLINE;
        loop {
            let s = call(serde_json::json!({"execute": "guest-exec-status",
                "arguments": {"pid": pid}}))
            .await;
            if s["exited"] == true {
                let out = s["out-data"].as_str().map_or_else(Vec::new, |d| {
                    base64::engine::general_purpose::STANDARD.decode(d).unwrap()
                });
                return (
                    s["exitcode"].as_i64().unwrap_or(-1),
                    String::from_utf8_lossy(&out).into_owned(),
                );
            }
            assert!(Instant::now() < deadline, "{path} {args:?} still running");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A clean reboot (`systemctl reboot`) started through qemu-guest-agent, not waited
    /// for: the guest agent itself goes down with the guest.
    async fn reboot(&self) {
        self.spawn("/usr/bin/systemctl", &["reboot"]).await;
    }

    async fn exec_ok(&self, path: &str, args: &[&str]) -> String {
        let (code, out) = self.exec(path, args).await;
        assert_eq!(code, 0, "{path} {args:?} in the guest: {out}");
        out
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.qemu.start_kill();
        if std::thread::panicking() {
            eprintln!("--- guest console ---\n{}", self.log());
        }
    }
}

/// The provisioned image boots to `wardgate.service` ready; a device on the host connects
/// through the forwarded port with the hospital's certificate, pinning the server CA the
/// appliance made at first boot and printed; its message reaches the upstream broker on the
/// host, and a command from upstream comes back down to it. No password works on the
/// image and no key was in it.
#[tokio::test]
async fn a_provisioned_image_boots_and_carries_a_devices_messages_both_ways() {
    let _one = MACHINE.lock().await;
    let b = built();
    let ward = Ward::new().await;
    let mut m = Machine::boot(&ward.medium(), ward.upstream.port).await;
    m.expect("wardgate-firstboot: keys made on this appliance for site st-mary")
        .await;
    m.server_ca(&ward).await;
    m.started("wardgate.service").await;
    let boot_s = m.started.elapsed().as_secs_f64();

    // The firewall in the guest's kernel is the table `wardgate firewall render` makes from
    // the same configuration, loaded by nft into a namespace of the test's own on the host
    // (both listed without counters; no device has connected yet).
    let live = m
        .exec_ok(
            "/usr/sbin/nft",
            &["-s", "list", "table", "inet", "wardgate"],
        )
        .await;
    let (status, rendered, err) = crate::support::wardgate(&[
        "firewall",
        "render",
        "--config",
        ward.p("medium/wardgate.toml").to_str().unwrap(),
    ]);
    assert!(status.success(), "{err}");
    assert_eq!(live, crate::firewall::listed_by_nft(&rendered, "appliance"));

    let mut consumer = ward.upstream.consumer("hospital/#").await;
    let mut pump = pump(&ward, &m).await;
    pump.subscribe("ward/pump-1/cmd/#").await;
    pump.publish("ward/pump-1/vitals/rate", b"12.5").await;
    let got = consumer.next().await;
    assert_eq!(
        &got.topic[..],
        b"hospital/st-mary/gw-qemu/pump-1/vitals/rate"
    );
    assert_eq!(&got.payload[..], b"12.5");
    consumer
        .client
        .publish(
            "hospital/st-mary/gw-qemu/pump-1/cmd/rate",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "5.0",
        )
        .await
        .unwrap();
    let cmd = pump.next_publish().await;
    assert_eq!(cmd.topic, "ward/pump-1/cmd/rate");
    assert_eq!(&cmd.payload[..], b"5.0");

    // Nothing secret came with the image: the root account has no password, the keys are
    // the appliance's own.
    let shadow = m.exec_ok("/usr/bin/cat", &["/etc/shadow"]).await;
    let root = shadow.lines().find(|l| l.starts_with("root:")).unwrap();
    assert!(root.starts_with("root:!"), "{root}");
    let pid = m
        .exec_ok(
            "/usr/bin/systemctl",
            &["show", "-p", "MainPID", "--value", "wardgate.service"],
        )
        .await;
    let status = m
        .exec_ok("/usr/bin/cat", &[&format!("/proc/{}/status", pid.trim())])
        .await;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .to_owned();
    eprintln!(
        "appliance: disk image {} MiB, root image {} MiB, boot to wardgate ready {boot_s:.1} s, \
         gateway {rss}",
        b.info["disk_bytes"].parse::<u64>().unwrap() >> 20,
        b.info["rootfs_bytes"].parse::<u64>().unwrap() >> 20,
    );
}

/// An update on the real image: `wardgate-release` publishes version 0.1.1's slot image
/// (built by `image/build --version 0.1.1`) in the fleet repository whose root the image
/// trusts, served over HTTP from the host; the agent in the guest installs it into slot B,
/// reboots, the boot script tries B once, the health check commits it, and the appliance
/// runs 0.1.1 from B.
#[tokio::test]
async fn an_update_is_installed_tried_and_committed_on_the_image() {
    let _one = MACHINE.lock().await;
    let b = built();
    let fleet = b.disk.parent().unwrap().parent().unwrap().join("fleet");
    let v2 = fleet.parent().unwrap().join("v2");
    let started = Instant::now();
    run(Command::new(workspace().join("image/build"))
        .arg("--trusted-root")
        .arg(fleet.join("repo/metadata/1.root.json"))
        .args(["--version", "0.1.1", "--out"])
        .arg(&v2));
    crate::updates::publish(&fleet, &v2.join("rootfs-0.1.1.ext4"), "0.1.1");
    eprintln!(
        "appliance: update 0.1.1 built and published in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let (_server, http) = serve(&fleet.join("repo"));

    let ward = Ward::new().await;
    let mut m = Machine::boot_with(&ward.medium(), ward.upstream.port, Some(http)).await;
    m.started("wardgate.service").await;
    let first = Instant::now();
    m.expect("wardgate: booting slot B").await;
    let installed = first.elapsed().as_secs_f64();
    m.started("wardgate.service").await;
    let deadline = Instant::now() + BOOT_DEADLINE;
    loop {
        let state = m
            .exec_ok("/usr/bin/cat", &["/boot/firmware/wardgate-boot.txt"])
            .await;
        if state.trim() == "default=B" {
            break;
        }
        assert!(Instant::now() < deadline, "slot B never committed: {state}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        m.exec_ok("/usr/bin/cat", &["/etc/wardgate/version"])
            .await
            .trim(),
        "0.1.1"
    );
    assert!(m
        .exec_ok("/usr/bin/cat", &["/proc/cmdline"])
        .await
        .contains("wardgate.slot=B"));
    eprintln!(
        "appliance: update downloaded, written and rebooted into in {installed:.0} s, committed {:.0} s after the first ready",
        first.elapsed().as_secs_f64()
    );
}

/// A copy of the fleet repository (same keys, same root as the image trusts) for a test
/// that publishes versions of its own, so the other tests' "newest" stays theirs.
fn fleet_copy(name: &str) -> PathBuf {
    let b = built();
    let fleet = b.disk.parent().unwrap().parent().unwrap().join("fleet");
    let copy = fleet.with_file_name(name);
    let _ = std::fs::remove_dir_all(&copy);
    run(Command::new("cp").arg("-a").arg(&fleet).arg(&copy));
    copy
}

/// `python3 -m http.server` serving `dir` on a port of 127.0.0.1.
fn serve(dir: &Path) -> (tokio::process::Child, u16) {
    let port = free_port();
    let child = tokio::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
            "--directory",
        ])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 -m http.server");
    (child, port)
}

/// The built slot image with `debugfs` commands applied (on a sparse copy): how the broken
/// updates are made.
fn altered_rootfs(out: &Path, version: &str, commands: &str) -> PathBuf {
    let b = built();
    let image = out.join(format!("rootfs-{version}.ext4"));
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&b.info["rootfs"])
        .arg(&image));
    let version_file = out.join(format!("version-{version}"));
    std::fs::write(&version_file, format!("{version}\n")).unwrap();
    let script = out.join(format!("debugfs-{version}"));
    std::fs::write(
        &script,
        format!(
            "rm /etc/wardgate/version\nwrite {} /etc/wardgate/version\n{commands}",
            version_file.display()
        ),
    )
    .unwrap();
    let out = run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(&image));
    assert!(
        !out.contains("not found") && !out.contains("rror"),
        "debugfs: {out}"
    );
    image
}

/// The agent's steps as the hospital sees them, on `…/_gateway/update`.
struct Fleet {
    updates: crate::support::upstream::Consumer,
}

impl Fleet {
    /// Waits for the step `event` of `version` (any version for `None`); earlier steps are
    /// passed over.
    async fn step(&mut self, event: &str, version: Option<&str>) -> serde_json::Value {
        loop {
            let p = self.updates.next_within(BOOT_DEADLINE).await;
            let e: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            if e["event"] == event && version.is_none_or(|v| e["version"] == v) {
                return e;
            }
        }
    }

    /// "Check now" from the hospital (`now`: also reboot at once), sent again until the
    /// agent's step `event` (of `version`, if given) says it arrived: a command published
    /// before the appliance's uplink subscribed is not kept for it.
    async fn check_now(&mut self, now: bool, event: &str, version: Option<&str>) {
        loop {
            crate::updates::check_now(&self.updates, GATEWAY_ID, now).await;
            if tokio::time::timeout(Duration::from_secs(30), self.step(event, version))
                .await
                .is_ok()
            {
                return;
            }
        }
    }
}

/// A maintenance window that is not now: six hours on, an hour long (the guest's clock is
/// the host's, UTC).
fn a_window_not_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start = ((now / 60) % 1440 + 360) % 1380;
    let hm = |m: u64| format!("{:02}:{:02}", m / 60, m % 60);
    format!("[\"{}-{}\"]", hm(start), hm(start + 60))
}

/// Four broken updates on the real image, one after the other, each published by the
/// fleet, installed into slot B by the agent and rebooted into: a zero-filled root image and
/// one without a kernel (U-Boot cannot load a kernel from slot B and boots A), one whose
/// gateway cannot start (B boots, its health check fails, the agent reboots into A; nobody
/// hears it in B, the outbox tells the hospital from A), and a good image whose trial is
/// lost to a garbled state file (both copies: U-Boot boots A and writes nothing; the agent
/// rewrites the state from its record). Each time the appliance runs slot A again, its
/// gateway ready, and the hospital has the rollback and its reason.
#[tokio::test]
async fn broken_updates_fall_back_to_slot_a_and_the_fleet_is_told_why() {
    let _one = MACHINE.lock().await;
    let fleet_dir = fleet_copy("fleet-broken");
    let out = fleet_dir.with_file_name("broken");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let blank = out.join("blank-0.2.0.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let no_kernel = altered_rootfs(&out, "0.3.0", "rm /boot/Image\n");
    let failing = out.join("wardgate-that-cannot-start");
    std::fs::write(
        &failing,
        "#!/bin/sh\necho \"wardgate 0.4.0: this build cannot start\" >&2\nexit 1\n",
    )
    .unwrap();
    let no_gateway = altered_rootfs(
        &out,
        "0.4.0",
        &format!(
            "rm /usr/bin/wardgate\nwrite {} /usr/bin/wardgate\nsif /usr/bin/wardgate mode 0100755\n",
            failing.display()
        ),
    );
    let good = altered_rootfs(&out, "0.5.0", "");
    crate::updates::publish(&fleet_dir, &blank, "0.2.0");
    let (_server, http) = serve(&fleet_dir.join("repo"));

    let ward = Ward::new().await;
    let mut fleet = Fleet {
        updates: ward
            .upstream
            .consumer(&format!("hospital/st-mary/{GATEWAY_ID}/_gateway/update"))
            .await,
    };
    let medium = ward.medium_with(&a_window_not_now(), "60s");
    let mut m = Machine::boot_with(&medium, ward.upstream.port, Some(http)).await;
    m.started("wardgate.service").await;
    let state = "/boot/firmware/wardgate-boot.txt";
    let back_on_a = async |m: &mut Machine| {
        m.started("wardgate.service").await;
        assert!(m
            .exec_ok("/usr/bin/cat", &["/proc/cmdline"])
            .await
            .contains("wardgate.slot=A"));
    };

    // 1. A zero-filled root image. The first check installs it; the reboot waits for the
    // window, so the hospital says "now".
    fleet.step("reboot_waiting", Some("0.2.0")).await;
    fleet.check_now(true, "rebooting", None).await;
    m.expect("wardgate: booting slot B").await;
    m.expect("wardgate: slot B did not boot").await;
    back_on_a(&mut m).await;
    let r = fleet.step("rolled_back", Some("0.2.0")).await;
    let why = r["detail"].as_str().unwrap();
    assert!(
        why.contains("slot B did not come up") && why.contains("zeros"),
        "{why}"
    );
    eprintln!("appliance: 0.2.0 (zeros) rolled back: {why}");

    // 2. An image without a kernel.
    crate::updates::publish(&fleet_dir, &no_kernel, "0.3.0");
    fleet.check_now(true, "downloading", Some("0.3.0")).await;
    m.expect("wardgate: booting slot B").await;
    m.expect("wardgate: slot B did not boot").await;
    back_on_a(&mut m).await;
    let r = fleet.step("rolled_back", Some("0.3.0")).await;
    let why = r["detail"].as_str().unwrap();
    assert!(why.contains("no kernel"), "{why}");
    eprintln!("appliance: 0.3.0 (no kernel) rolled back: {why}");

    // 3. A gateway that cannot start: slot B boots, fails its health check, and the agent
    // reboots into A. Its gateway down, B tells nobody; A's agent sends B's steps on.
    crate::updates::publish(&fleet_dir, &no_gateway, "0.4.0");
    fleet.check_now(true, "downloading", Some("0.4.0")).await;
    m.expect("wardgate: booting slot B").await;
    let on_b = Instant::now();
    m.expect("wardgate: booting slot A").await;
    let judged = on_b.elapsed().as_secs_f64();
    back_on_a(&mut m).await;
    let r = fleet.step("rolled_back", Some("0.4.0")).await;
    let why = r["detail"].as_str().unwrap();
    assert!(
        why.contains("health check failed") && why.contains("wardgate.service"),
        "{why}"
    );
    eprintln!(
        "appliance: 0.4.0 (gateway cannot start) rolled back after {judged:.0} s on B: {why}"
    );

    // 4. A good image whose trial is lost: both copies of the state file garbled after the
    // trial was armed.
    crate::updates::publish(&fleet_dir, &good, "0.5.0");
    fleet
        .check_now(false, "reboot_waiting", Some("0.5.0"))
        .await;
    let armed = m.exec_ok("/usr/bin/cat", &[state]).await;
    assert!(armed.contains("try=B"), "{armed}");
    m.exec_ok(
        "/bin/sh",
        &[
            "-c",
            "printf 'default=\\377\\n' > /boot/firmware/wardgate-boot.txt && \
             printf 'tr' > /boot/firmware/wardgate-boot.bak && sync",
        ],
    )
    .await;
    fleet.check_now(true, "rebooting", None).await;
    m.expect("wardgate: no readable state; booting slot A")
        .await;
    back_on_a(&mut m).await;
    let repaired = fleet.step("boot_state_repaired", None).await;
    let r = fleet.step("rolled_back", Some("0.5.0")).await;
    let why = r["detail"].as_str().unwrap();
    assert!(why.contains("could not read its state"), "{why}");
    eprintln!(
        "appliance: 0.5.0 (state file garbled) rolled back: {why}; {}",
        repaired["detail"]
    );
    for f in [state, "/boot/firmware/wardgate-boot.bak"] {
        assert_eq!(m.exec_ok("/usr/bin/cat", &[f]).await, "default=A\n", "{f}");
    }
    assert_eq!(
        m.exec_ok("/usr/bin/cat", &["/etc/wardgate/version"])
            .await
            .trim(),
        "0.1.0"
    );
}

/// Sends one QMP command to the machine's monitor (after the capabilities handshake).
async fn qmp(socket: &Path, command: &str) {
    let stream = UnixStream::connect(socket).await.expect("QMP socket");
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd).lines();
    let mut answer = async || loop {
        let line = tokio::time::timeout(crate::support::DEADLINE, rd.next_line())
            .await
            .expect("QMP did not answer")
            .unwrap()
            .expect("QMP closed");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("error").is_some() {
            panic!("QMP: {v}");
        }
        if v.get("return").is_some() || v.get("QMP").is_some() {
            return;
        }
    };
    answer().await; // the greeting
    for c in ["qmp_capabilities", command] {
        wr.write_all(format!("{{\"execute\": \"{c}\"}}\n").as_bytes())
            .await
            .unwrap();
        answer().await;
    }
}

/// The ward's pump, connected to the appliance from the host, pinning its server CA.
async fn pump(ward: &Ward, m: &Machine) -> Client {
    let tls = wardgate::pki::cert::client_config(
        &ward.p("server-ca.pem"),
        &ward.p("pump-1/pump-1.pem"),
        &ward.p("pump-1/pump-1.key"),
    )
    .unwrap();
    Client::connect_with(options("pump-1", m.edge, tls)).await
}

/// With the uplink cut, `n` alarms from the pump, each acknowledged (PUBACK: in the
/// appliance's spool); returns their payloads.
async fn acknowledged_alarms(ward: &Ward, m: &Machine, round: &str, n: usize) -> Vec<String> {
    let mut pump = pump(ward, m).await;
    let mut sent = Vec::new();
    for i in 0..n {
        let payload = format!("{round}-{i}");
        pump.publish("ward/pump-1/alarm/occlusion", payload.as_bytes())
            .await;
        sent.push(payload);
    }
    sent
}

/// Power cuts on the real image (QMP `system_reset`: the guest loses its memory at once, as
/// at a cut; the disk keeps what reached it): in the middle of writing slot B, right after
/// the trial of B was armed, right after its commit, and during the first boot of a new
/// slot. Before the cuts mid-write, after arming and during a first boot, the uplink is
/// down and the pump's alarms are acknowledged into the spool. After each cut the
/// appliance boots a good slot, the committed slot and version are what they were, and
/// every acknowledged alarm reaches the hospital once the link is back.
#[tokio::test]
async fn power_cuts_leave_a_good_slot_and_lose_nothing_acknowledged() {
    let _one = MACHINE.lock().await;
    let fleet_dir = fleet_copy("fleet-power");
    let out = fleet_dir.with_file_name("power");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let v6 = altered_rootfs(&out, "0.6.0", "");
    let v7 = altered_rootfs(&out, "0.7.0", "");
    crate::updates::publish(&fleet_dir, &v6, "0.6.0");
    let (_server, http) = serve(&fleet_dir.join("repo"));

    let ward = Ward::new().await;
    let link = crate::support::upstream::Link::start(ward.upstream.port, true).await;
    let mut fleet = Fleet {
        updates: ward
            .upstream
            .consumer(&format!("hospital/st-mary/{GATEWAY_ID}/_gateway/update"))
            .await,
    };
    let mut alarms = ward
        .upstream
        .consumer(&format!("hospital/st-mary/{GATEWAY_ID}/pump-1/alarm/#"))
        .await;
    let medium = ward.medium_with(&a_window_not_now(), "2m");
    let mut m = Machine::boot_with(&medium, link.port, Some(http)).await;
    m.server_ca(&ward).await;
    m.started("wardgate.service").await;
    let state = "/boot/firmware/wardgate-boot.txt";
    let cat = async |m: &Machine, path: &str| m.exec_ok("/usr/bin/cat", &[path]).await;
    // Every alarm acknowledged before a cut reaches the hospital after it.
    let mut delivered = async |want: &[String]| {
        let got = alarms
            .until(|g| {
                want.iter()
                    .all(|w| g.iter().any(|p| p.payload.as_ref() == w.as_bytes()))
            })
            .await;
        got.len()
    };

    // 1. A cut while slot B is being written. The first check starts downloading 0.6.0
    // (272 MiB, some 20 s here); the cut comes once 16 MiB are durably in the slot.
    fleet.step("downloading", Some("0.6.0")).await;
    link.set_up(false);
    let sent = acknowledged_alarms(&ward, &m, "mid-write", 10).await;
    let deadline = Instant::now() + BOOT_DEADLINE;
    let (offset, length) = loop {
        let (_, progress) = m
            .exec("/usr/bin/cat", &["/var/lib/wardgate-agent/download.json"])
            .await;
        let p: serde_json::Value = serde_json::from_str(&progress).unwrap_or_default();
        if let Some(o) = p["offset"].as_u64().filter(|o| *o >= 16 << 20) {
            break (o, p["length"].as_u64().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "the download never reached 16 MiB: {progress}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(offset < length, "the download finished before the cut");
    qmp(&m.qmp, "system_reset").await;
    m.expect("wardgate: state unchanged").await;
    m.expect("wardgate: booting slot A").await;
    m.started("wardgate.service").await;
    assert_eq!(cat(&m, state).await, "default=A\n");
    link.set_up(true);
    let n = delivered(&sent).await;
    eprintln!(
        "appliance: cut with {} MiB of slot B written: slot A booted, {} acknowledged alarms \
         delivered ({n} messages)",
        offset >> 20,
        sent.len()
    );
    // The next check finishes the install (the trial is not armed before the image is whole
    // and verified); its reboot waits for the window.
    fleet.step("reboot_waiting", Some("0.6.0")).await;

    // 2. A cut right after the trial was armed (and recorded): the next boot is the trial.
    link.set_up(false);
    assert!(cat(&m, state).await.contains("try=B"));
    let sent = acknowledged_alarms(&ward, &m, "armed", 10).await;
    qmp(&m.qmp, "system_reset").await;
    m.expect("wardgate: booting slot B").await;
    m.started("wardgate.service").await;
    link.set_up(true);
    fleet.step("committed", Some("0.6.0")).await;
    // And a cut right after the commit: it holds.
    qmp(&m.qmp, "system_reset").await;
    m.expect("wardgate: state unchanged").await;
    m.expect("wardgate: booting slot B").await;
    m.started("wardgate.service").await;
    assert_eq!(cat(&m, state).await, "default=B\n");
    assert_eq!(cat(&m, "/etc/wardgate/version").await.trim(), "0.6.0");
    let n = delivered(&sent).await;
    eprintln!(
        "appliance: cut right after arming: slot B tried and committed; cut right after the \
         commit: B booted; {} acknowledged alarms delivered ({n} messages)",
        sent.len()
    );

    // 3. A cut during the first boot of a new slot: 0.7.0 goes to slot A (B is committed
    // now); the cut comes as A's kernel starts its init. Its try was used before the kernel, so
    // the next boot is B, still committed, with 0.6.0.
    crate::updates::publish(&fleet_dir, &v7, "0.7.0");
    fleet
        .check_now(false, "reboot_waiting", Some("0.7.0"))
        .await;
    link.set_up(false);
    let sent = acknowledged_alarms(&ward, &m, "first-boot", 10).await;
    // A reboot by hand (the link is down: no command reaches it), the trial armed.
    m.reboot().await;
    m.expect("wardgate: booting slot A").await;
    m.expect("Run /init as init process").await;
    qmp(&m.qmp, "system_reset").await;
    m.expect("wardgate: booting slot B").await;
    m.started("wardgate.service").await;
    link.set_up(true);
    let r = fleet.step("rolled_back", Some("0.7.0")).await;
    assert_eq!(cat(&m, state).await, "default=B\n");
    assert_eq!(cat(&m, "/etc/wardgate/version").await.trim(), "0.6.0");
    let status: serde_json::Value = serde_json::from_str(
        &m.exec_ok("/usr/bin/wardgate-agent", &["status", "--json"])
            .await,
    )
    .unwrap();
    assert_eq!(status["version_floor"], "0.6.0", "{status}");
    let n = delivered(&sent).await;
    eprintln!(
        "appliance: cut during slot A's first boot: slot B booted, 0.7.0 rolled back ({}), \
         {} acknowledged alarms delivered ({n} messages)",
        r["detail"],
        sent.len()
    );
}
