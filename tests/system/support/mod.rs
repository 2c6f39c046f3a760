//! Test support: a site PKI and configuration made with the real `wardgate` CLI, the
//! gateway as a child process whose log the tests read, and clients: rumqttc, mosquitto's
//! command-line clients, and a raw MQTT-over-TLS client for packets well-behaved clients
//! refuse to send. Every port comes from the OS; every wait has a deadline.

pub mod clients;
pub mod modbus_sim;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::watch;

pub const WARDGATE: &str = env!("CARGO_BIN_EXE_wardgate");
/// Upper bound for any single wait in a test; generous for a loaded 2-core CI machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Fails the test, loudly, when a program the test needs is not installed.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is not installed; install it with `apt-get install {package}` \
         (scripts/test does this)"
    );
}

/// Runs `wardgate` with `args` to completion, returning its status and output.
pub fn wardgate(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(WARDGATE)
        .args(args)
        .output()
        .expect("run wardgate");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wardgate_ok(args: &[&str]) -> String {
    let (status, out, err) = wardgate(args);
    assert!(status.success(), "wardgate {args:?} failed: {err}");
    out
}

/// A device class for the generated configuration.
#[derive(Debug, Clone)]
pub struct Class {
    pub name: &'static str,
    pub publish: Vec<&'static str>,
    pub subscribe: Vec<&'static str>,
    pub max_payload: &'static str,
    /// More lines for the class (e.g. rate limits).
    pub extra: &'static str,
}

/// A site: PKI, device certificates and a gateway configuration in a temporary directory.
#[derive(Debug)]
pub struct Site {
    pub dir: tempfile::TempDir,
    pub classes: Vec<Class>,
    /// (device id, class, address)
    pub devices: Vec<(String, String, String)>,
    pub extra_edge: String,
    /// More `[admin]` keys (the metrics endpoint is on a port from the OS already).
    pub extra_admin: &'static str,
    /// Appended to the configuration (e.g. `[spool]` and `[uplink]` sections).
    pub extra: String,
}

impl Class {
    /// A class that may publish under its own `ward/{device}/` and nothing else, with
    /// `extra` settings (rates) appended.
    pub fn publishing_own(name: &'static str, extra: &'static str) -> Class {
        Class {
            name,
            publish: vec!["ward/{device}/#"],
            subscribe: vec![],
            max_payload: "1KiB",
            extra,
        }
    }
}

impl Site {
    /// A site with the ward classes used across the tests and their devices registered:
    /// `pump-1`, `pump-2` (infusion pumps) and `nurse-1` (a nurse-call display).
    pub fn ward() -> Site {
        Site::ward_of("st-mary")
    }

    /// The same ward at a site of another name (and so with another CA).
    pub fn ward_of(site_name: &str) -> Site {
        Site::ward_with_sans(site_name, &[])
    }

    /// The ward, with the server certificate also valid for `sans` (addresses the devices
    /// use to reach the gateway, e.g. in a network namespace).
    pub fn ward_with_sans(site_name: &str, sans: &[&str]) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        let mut args = vec![
            "pki",
            "init",
            "--dir",
            pki.to_str().unwrap(),
            "--site",
            site_name,
        ];
        for san in sans {
            args.extend(["--san", san]);
        }
        wardgate_ok(&args);
        let mut site = Site {
            dir,
            classes: vec![
                Class {
                    name: "infusion-pump",
                    publish: vec!["ward/{device}/#"],
                    subscribe: vec!["ward/{device}/cmd/#"],
                    max_payload: "1KiB",
                    extra: "",
                },
                Class {
                    name: "nurse-display",
                    publish: vec!["ward/{device}/ack/#"],
                    subscribe: vec!["ward/+/alarm/#"],
                    max_payload: "1KiB",
                    extra: "",
                },
            ],
            devices: Vec::new(),
            extra_edge: String::new(),
            extra_admin: "",
            extra: String::new(),
        };
        for (id, class) in [
            ("pump-1", "infusion-pump"),
            ("pump-2", "infusion-pump"),
            ("nurse-1", "nurse-display"),
        ] {
            site.register(id, class, "127.0.0.1");
        }
        site
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    /// Issues a certificate for `id` (whether or not it is registered).
    pub fn issue(&self, id: &str) {
        wardgate_ok(&[
            "pki",
            "issue",
            id,
            "--dir",
            self.pki().to_str().unwrap(),
            "--out",
            self.path("devices").to_str().unwrap(),
        ]);
    }

    /// Registers `id` in the configuration and issues its certificate.
    pub fn register(&mut self, id: &str, class: &str, address: &str) {
        self.issue(id);
        self.devices.push((id.into(), class.into(), address.into()));
    }

    pub fn revoke(&self, id: &str) {
        wardgate_ok(&["pki", "revoke", id, "--dir", self.pki().to_str().unwrap()]);
    }

    pub fn cert(&self, id: &str) -> PathBuf {
        self.path(&format!("devices/{id}.pem"))
    }

    pub fn key(&self, id: &str) -> PathBuf {
        self.path(&format!("devices/{id}.key"))
    }

    pub fn ca(&self) -> PathBuf {
        self.pki().join("ca.pem")
    }

    /// Writes the configuration file and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let mut toml = format!(
            r#"[gateway]
id = "gw-test"
site = "st-mary"
data_dir = "data"
shutdown_grace = "5s"

[edge]
listen = "127.0.0.1:0"
ca = "pki/ca.pem"
cert = "pki/server.pem"
key = "pki/server.key"
crl = "pki/crl.pem"
{}

[admin]
socket = "admin/admin.sock"
metrics_listen = "127.0.0.1:0"
{}
"#,
            self.extra_edge, self.extra_admin
        );
        for c in &self.classes {
            let list = |v: &[&str]| {
                v.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            toml.push_str(&format!(
                "\n[[device_class]]\nname = {:?}\npublish = [{}]\nsubscribe = [{}]\nmax_payload = {:?}\n\
                 alarm = [\"ward/{{device}}/alarm/#\"]\nvital = [\"ward/{{device}}/vitals/#\"]\n",
                c.name,
                list(&c.publish),
                list(&c.subscribe),
                c.max_payload
            ));
            toml.push_str(c.extra);
            toml.push('\n');
        }
        for (id, class, address) in &self.devices {
            toml.push_str(&format!(
                "\n[[device]]\nid = {id:?}\nclass = {class:?}\naddress = {address:?}\n"
            ));
        }
        toml.push_str(&self.extra);
        let path = self.path("wardgate.toml");
        std::fs::write(&path, toml).expect("write config");
        path
    }

    /// The admin socket of this site's gateway.
    pub fn admin_socket(&self) -> PathBuf {
        self.path("admin/admin.sock")
    }

    /// Runs `wardgate ARGS --socket <this site's admin socket>`.
    pub fn admin(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let socket = self.admin_socket();
        let mut all = args.to_vec();
        all.extend(["--socket", socket.to_str().unwrap()]);
        wardgate(&all)
    }

    /// Like [`Site::admin`], and the command must succeed.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let (status, out, err) = self.admin(args);
        assert!(status.success(), "wardgate {args:?} failed: {err}");
        out
    }

    /// `device show ID --json`, parsed.
    pub fn device_json(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.admin_ok(&["device", "show", id, "--json"])).unwrap()
    }

    /// Every audit record of this site's (stopped) gateway, read offline, oldest first.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let data = self.path("data");
        let out = wardgate_ok(&[
            "audit",
            "tail",
            "--data-dir",
            data.to_str().unwrap(),
            "-n",
            "1000000",
            "--json",
        ]);
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// How many audit records `event` name `device`.
    pub fn audit_count(&self, event: &str, device: &str) -> usize {
        self.audit_records()
            .iter()
            .filter(|r| r["event"] == event && r["device"] == device)
            .count()
    }

    /// Starts the gateway on this site's configuration and waits until it is ready.
    pub async fn start(&self) -> Gateway {
        Gateway::start(&self.write_config()).await
    }
}

/// `wardgate run` as a child process, with its log captured line by line.
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
    pub edge: SocketAddr,
    /// The embedded broker, on loopback.
    pub broker: SocketAddr,
    /// `/metrics` and `/health`, if served.
    pub metrics: Option<SocketAddr>,
}

impl Gateway {
    pub async fn start(config: &Path) -> Gateway {
        Gateway::start_with_env(config, &[]).await
    }

    pub async fn start_with_env(config: &Path, env: &[(&str, &Path)]) -> Gateway {
        let mut cmd = tokio::process::Command::new(WARDGATE);
        cmd.envs(env.iter().copied());
        Gateway::spawn(cmd, config).await
    }

    /// Starts the gateway inside the network namespace `netns` (`ip netns exec`, which
    /// execs it: the child's pid is the gateway's).
    pub async fn start_in_netns(config: &Path, netns: &str) -> Gateway {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", netns, WARDGATE]);
        Gateway::spawn(cmd, config).await
    }

    async fn spawn(mut cmd: tokio::process::Command, config: &Path) -> Gateway {
        let mut child = cmd
            .args(["run", "--config", config.to_str().unwrap()])
            .kill_on_drop(true)
            .env("RUST_LOG", "info,rumqttd=off,rustls=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wardgate");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, count) = watch::channel(0usize);
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut rd = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = rd.next_line().await {
                let n = {
                    let mut l = sink.lock().unwrap();
                    l.push(line);
                    l.len()
                };
                let _ = tx.send(n);
            }
        });
        let mut gw = Gateway {
            child,
            lines,
            count,
            edge: "0.0.0.0:0".parse().unwrap(),
            broker: "0.0.0.0:0".parse().unwrap(),
            metrics: None,
        };
        let ready = gw.wait_log("gateway.ready", &[]).await;
        let edge = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("edge="))
            .expect("edge address in the ready line");
        gw.edge = edge.parse().expect("edge address");
        let broker = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("broker="))
            .expect("broker address in the ready line");
        gw.broker = broker.parse().expect("broker address");
        gw.metrics = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("metrics="))
            .and_then(|m| m.parse().ok());
        gw
    }

    /// The gateway's resident memory now, in KiB (`VmRSS`), for tests to print.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("gateway running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    pub fn port(&self) -> u16 {
        self.edge.port()
    }

    /// The log so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Log lines with `event="NAME"` that contain every one of `parts`.
    pub fn events(&self, name: &str, parts: &[&str]) -> Vec<String> {
        let tag = format!("event=\"{name}\"");
        self.log()
            .into_iter()
            .filter(|l| l.contains(&tag) && parts.iter().all(|p| l.contains(p)))
            .collect()
    }

    /// Waits for a log line with `event="NAME"` containing every one of `parts`.
    pub async fn wait_log(&mut self, name: &str, parts: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.events(name, parts).into_iter().next() {
                return l;
            }
            let changed = tokio::time::timeout_at(deadline, self.count.changed()).await;
            match changed {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    // The log ended or the deadline passed: one last look, then fail.
                    if let Some(l) = self.events(name, parts).into_iter().next() {
                        return l;
                    }
                    panic!(
                        "no {name} event with {parts:?} in the gateway log:\n{}",
                        self.log().join("\n")
                    );
                }
            }
        }
    }

    /// Waits until the log holds at least `n` events `name` with `parts`.
    pub async fn wait_count(&mut self, name: &str, parts: &[&str], n: usize) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.events(name, parts).len() < n {
            if tokio::time::timeout_at(deadline, self.count.changed())
                .await
                .is_err()
            {
                panic!("fewer than {n} {name} events:\n{}", self.log().join("\n"));
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("gateway still running");
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Kills the process with SIGKILL (no chance to flush or close anything) and waits.
    pub async fn kill9(mut self) {
        self.signal("KILL");
        let _ = tokio::time::timeout(DEADLINE, self.child.wait()).await;
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn stop(mut self) -> ExitStatus {
        self.signal("TERM");
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("gateway did not stop after SIGTERM")
            .expect("wait for gateway")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log().join("\n"));
        }
    }
}
