//! The two ward brokers under test, each started fresh for every measurement as a process of
//! its own (so that its CPU and memory can be read from /proc):
//!
//! - `wardgate run` with the devices registered, its uplink to the upstream;
//! - mosquitto as the ward broker the way a careful integrator would set it up: TLS with
//!   client certificates (identity as user name), an ACL that lets each device write only
//!   `ward/<its id>/…`, `persistence true`, and a QoS 1 bridge to the same upstream, topics
//!   mapped as wardgate maps them (`ward/X` → `hospital/<site>/<gateway>/X`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::load::Identity;

pub const SITE: &str = "bench-site";
pub const GATEWAY: &str = "bench-gw";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Wardgate,
    Mosquitto,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Wardgate => "wardgate",
            Kind::Mosquitto => "mosquitto bridge",
        }
    }
}

/// Everything both targets are set up from.
#[derive(Debug)]
pub struct Ward {
    /// The ward's PKI (`pki::init`): CA, server certificate and key.
    pub pki: PathBuf,
    pub devices: usize,
    /// The port the targets reach the upstream on (the upstream's, or the outage
    /// scenario's link to it), and the gateway's identity there.
    pub upstream: u16,
    pub uplink: Identity,
}

/// A running target.
#[derive(Debug)]
pub struct Running {
    pub port: u16,
    pub pid: u32,
    child: Child,
    kind: Kind,
    dir: PathBuf,
}

impl Running {
    /// Kills it with SIGKILL (nothing flushed, nothing closed) and starts it again on its
    /// data and port, as a power cut and a service restart would.
    pub async fn crash_and_restart(mut self) -> anyhow::Result<Running> {
        self.child.start_kill()?;
        self.child.wait().await?;
        spawn(self.kind, &self.dir, self.port).await
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Whether it is still running (a crash during a measurement voids it).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A port the OS says is free on loopback now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(port: u16, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited before it listened: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Starts `kind` in the empty directory `dir`.
pub async fn start(kind: Kind, ward: &Ward, dir: &Path) -> anyhow::Result<Running> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    match kind {
        Kind::Wardgate => {
            std::fs::write(dir.join(WARDGATE_CONFIG), wardgate_config(ward, dir, port))?
        }
        Kind::Mosquitto => std::fs::write(
            dir.join(MOSQUITTO_CONFIG),
            mosquitto_config(ward, dir, port)?,
        )?,
    }
    spawn(kind, dir, port).await
}

const WARDGATE_CONFIG: &str = "wardgate.toml";
const MOSQUITTO_CONFIG: &str = "mosquitto.conf";

/// Runs `kind` with the configuration `start` wrote in `dir`, listening on `port`.
async fn spawn(kind: Kind, dir: &Path, port: u16) -> anyhow::Result<Running> {
    let mut child = match kind {
        Kind::Wardgate => {
            let config = dir.join(WARDGATE_CONFIG);
            let exe = std::env::current_exe()?
                .parent()
                .context("bench binary has no directory")?
                .join("wardgate");
            Command::new(&exe)
                .args(["run", "--config"])
                .arg(&config)
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| {
                    format!(
                        "cannot run {} (build it: cargo build --release -p wardgate)",
                        exe.display()
                    )
                })?
        }
        Kind::Mosquitto => {
            let config = dir.join(MOSQUITTO_CONFIG);
            Command::new("mosquitto")
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot run mosquitto (apt install mosquitto)")?
        }
    };
    wait_listening(port, &mut child, kind.name()).await?;
    let pid = child.id().context("no pid")?;
    Ok(Running {
        port,
        pid,
        child,
        kind,
        dir: dir.to_owned(),
    })
}

fn wardgate_config(ward: &Ward, dir: &Path, port: u16) -> String {
    let pki = ward.pki.display();
    let up = &ward.uplink;
    let mut toml = format!(
        "[gateway]\nid = \"{GATEWAY}\"\nsite = \"{SITE}\"\ndata_dir = \"{data}\"\n\
         [edge]\nlisten = \"127.0.0.1:{port}\"\nca = \"{pki}/ca.pem\"\ncert = \"{pki}/server.pem\"\n\
         key = \"{pki}/server.key\"\nmax_connections = 4096\n\
         [broker]\nmax_connections = 4096\nagent_credentials = \"{creds}\"\n\
         [admin]\nsocket = \"{admin}\"\n\
         [spool]\nmax_bytes = \"1GiB\"\ndevice_quota = \"1GiB\"\n\
         [uplink]\nhost = \"127.0.0.1\"\nport = {upstream}\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
         topic_prefix = \"hospital\"\n\
         [[device_class]]\nname = \"monitor\"\npublish = [\"ward/{{device}}/#\"]\n\
         vital = [\"ward/{{device}}/vitals/#\"]\n",
        data = dir.join("data").display(),
        creds = dir.join("broker-agent.secret").display(),
        admin = dir.join("admin.sock").display(),
        upstream = ward.upstream,
        ca = up.ca,
        cert = up.cert,
        key = up.key,
    );
    for i in 0..ward.devices {
        toml.push_str(&format!(
            "[[device]]\nid = \"dev-{i}\"\nclass = \"monitor\"\naddress = \"127.0.0.1\"\n"
        ));
    }
    toml
}

fn mosquitto_config(ward: &Ward, dir: &Path, port: u16) -> anyhow::Result<String> {
    let acl = dir.join("mosquitto.acl");
    std::fs::write(
        &acl,
        "pattern write ward/%u/#\npattern read ward/%u/cmd/#\n",
    )?;
    // Started as root, mosquitto drops to its own user and could not read the 0600 keys.
    let as_root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    let pki = ward.pki.display();
    let up = &ward.uplink;
    Ok(format!(
        "{user}per_listener_settings false\nallow_anonymous false\n\
         listener {port} 127.0.0.1\ncafile {pki}/ca.pem\ncertfile {pki}/server.pem\n\
         keyfile {pki}/server.key\nrequire_certificate true\nuse_identity_as_username true\n\
         acl_file {acl}\n\
         persistence true\npersistence_location {data}/\n\
         max_queued_messages 1000000\nmax_inflight_messages 0\n\
         log_dest none\n\
         connection hospital\naddress 127.0.0.1:{upstream}\n\
         bridge_cafile {ca}\nbridge_certfile {cert}\nbridge_keyfile {key}\n\
         remote_clientid {GATEWAY}-bridge\ncleansession false\n\
         topic # out 1 ward/ hospital/{SITE}/{GATEWAY}/\n",
        user = if as_root { "user root\n" } else { "" },
        acl = acl.display(),
        data = dir.display(),
        upstream = ward.upstream,
        ca = up.ca.display(),
        cert = up.cert.display(),
        key = up.key.display(),
    ))
}

/// CPU time (user + system) of `pid`, in seconds, and its resident memory in KiB.
pub fn usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name and state.
    let ticks: f64 = fields
        .get(11..13)
        .context("short stat")?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Ok((ticks / 100.0, rss))
}
