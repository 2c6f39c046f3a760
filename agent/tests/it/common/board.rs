//! A simulated board for `wardgate-agent` as a process: file-backed slots, the state-file
//! boot backend, a kernel command line file naming the booted slot, and a reboot command
//! that only records that it ran (the test then power-cycles the board with the boot
//! script's logic, [`power_on`]). Updates come over HTTP from a local server, which also
//! serves the health endpoint (`repo/health`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::server::Server;
use super::{Fleet, SIGNERS};
use wardgate_agent::slots::{power_on, BootControl, BootState, Slot, StateFile};

pub const AGENT: &str = env!("CARGO_BIN_EXE_wardgate-agent");

pub struct Board {
    pub fleet: Fleet,
    pub server: Server,
    pub config: PathBuf,
}

#[derive(Default)]
pub struct Options {
    pub windows: Vec<String>,
    pub health_deadline: &'static str,
    /// Extra `[health]` lines.
    pub health: String,
    /// No HTTP check (for an agent in a network namespace of its own).
    pub no_http: bool,
    /// The targets role's threshold (1 when 0).
    pub targets_threshold: u64,
    /// Extra `[repository]` lines.
    pub repository: String,
    /// The board's hardware id ("qemu-virt" when empty).
    pub hardware: &'static str,
}

impl Board {
    pub async fn new(versions: &[&str], o: Options) -> Board {
        let fleet = Fleet::new(o.targets_threshold.max(1));
        let signers: &[&str] = if o.targets_threshold > 1 {
            &["targets", "targets2", "snapshot", "timestamp"]
        } else {
            &SIGNERS
        };
        for v in versions {
            let (ok, out) = fleet.add(v, signers, &[]);
            assert!(ok, "{out}");
        }
        let server = Server::start(fleet.p("repo"), None).await;
        for s in ["slot-a.img", "slot-b.img"] {
            std::fs::write(fleet.p(s), b"factory image").unwrap();
        }
        StateFile {
            path: fleet.p("boot-state.txt"),
        }
        .write(BootState {
            default: Slot::A,
            trial: None,
        })
        .unwrap();
        std::fs::write(fleet.p("cmdline"), "console=ttyAMA0 wardgate.slot=A\n").unwrap();
        std::fs::write(fleet.p("boot_id"), "boot-0\n").unwrap();
        let windows: Vec<String> = o.windows.iter().map(|w| format!("{w:?}")).collect();
        let config = fleet.p("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[repository]
url = "{url}"
trusted_root = "{root}"
poll_interval = "1h"
poll_jitter = "0s"
low_speed_window = "2s"
{repository}

[appliance]
hardware = "{hardware}"
state_dir = "{dir}/state"
slot_a = "{dir}/slot-a.img"
slot_b = "{dir}/slot-b.img"
cmdline = "{dir}/cmdline"
boot_id = "{dir}/boot_id"
reboot_command = ["sh", "-c", "echo reboot >> {dir}/reboots"]
clock_synchronized = "{dir}/timesync-synchronized"
version_file = "{dir}/factory-version"

[boot]
backend = "state-file"
state_file = "{dir}/boot-state.txt"

[maintenance]
windows = [{windows}]

[health]
deadline = "{deadline}"
retry = "200ms"
{http}
{extra}
"#,
                url = server.url("http", ""),
                repository = o.repository,
                hardware = if o.hardware.is_empty() {
                    "qemu-virt"
                } else {
                    o.hardware
                },
                root = fleet.s("repo/metadata/1.root.json"),
                dir = fleet.dir.path().display(),
                windows = windows.join(", "),
                deadline = if o.health_deadline.is_empty() {
                    "3s"
                } else {
                    o.health_deadline
                },
                http = if o.no_http {
                    String::new()
                } else {
                    format!("http = [\"{}\"]", server.url("http", "health"))
                },
                extra = o.health,
            ),
        )
        .unwrap();
        Board {
            fleet,
            server,
            config,
        }
    }

    pub fn healthy(&self, yes: bool) {
        let p = self.fleet.p("repo/health");
        if yes {
            std::fs::write(p, "ok").unwrap();
        } else {
            let _ = std::fs::remove_file(p);
        }
    }

    pub fn agent(&self, args: &[&str]) -> (bool, String) {
        self.agent_crashing_at("", args)
    }

    /// The agent with `args`, aborting at crash point `at` (see `slots::crash_point`; ""
    /// for none), as a power cut there would stop it.
    pub fn agent_crashing_at(&self, at: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(AGENT)
            .env("WARDGATE_AGENT_CRASH_AT", at)
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

    pub fn spawn_run(&self) -> Child {
        self.spawn_run_with(&[])
    }

    /// `run`, behind `prefix` (e.g. `unshare --net`).
    pub fn spawn_run_with(&self, prefix: &[&str]) -> Child {
        self.spawn_run_crashing_at(prefix, "")
    }

    /// `run` behind `prefix`, aborting at crash point `at` ("" for none).
    pub fn spawn_run_crashing_at(&self, prefix: &[&str], at: &str) -> Child {
        let mut argv: Vec<String> = prefix.iter().map(ToString::to_string).collect();
        argv.extend([
            AGENT.to_owned(),
            "--config".to_owned(),
            self.config.display().to_string(),
            "run".to_owned(),
        ]);
        Command::new(&argv[0])
            .args(&argv[1..])
            .env("WARDGATE_AGENT_CRASH_AT", at)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.fleet.p("agent.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap()
    }

    pub fn reboots(&self) -> usize {
        std::fs::read_to_string(self.fleet.p("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    pub fn status(&self) -> serde_json::Value {
        let (ok, out) = self.agent(&["status", "--json"]);
        assert!(ok, "{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.fleet.p("state/journal.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn has_event(&self, name: &str) -> bool {
        self.events().iter().any(|e| e["event"] == name)
    }

    /// The board powers on: the boot script's choice, and the slot on the command line.
    pub fn power_cycle(&self) -> Slot {
        let boot = StateFile {
            path: self.fleet.p("boot-state.txt"),
        };
        // As the boot script: with neither copy of the state readable, slot A, and the
        // state left as it is.
        let slot = match boot.state() {
            Ok(state) => {
                let (slot, after) = power_on(state);
                boot.write(after).unwrap();
                slot
            }
            Err(_) => Slot::A,
        };
        let n = std::fs::read_to_string(self.fleet.p("boot_id")).unwrap();
        let n: u32 = n.trim().trim_start_matches("boot-").parse().unwrap();
        std::fs::write(self.fleet.p("boot_id"), format!("boot-{}\n", n + 1)).unwrap();
        std::fs::write(
            self.fleet.p("cmdline"),
            format!("console=ttyAMA0 wardgate.slot={slot}\n"),
        )
        .unwrap();
        slot
    }

    pub fn image(&self, version: &str) -> Vec<u8> {
        std::fs::read(super::find(
            &self.fleet.p("repo/targets"),
            &format!("wardgate-{version}.img"),
        ))
        .unwrap()
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("the agent did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
