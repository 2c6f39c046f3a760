//! The demo's hospital side: mosquitto with TLS and client certificates, and a consumer
//! that prints what reaches it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::device::DeviceId;
use crate::pki::{self, cert, PkiDir};

/// How long mosquitto may take to open its listener.
const START_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Hospital {
    pub port: u16,
    pub dir: PathBuf,
    _broker: tokio::process::Child,
}

/// Is mosquitto installed?
pub fn available() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("mosquitto").is_file()))
        .unwrap_or(false)
}

/// Makes the hospital's PKI in `dir` (CA, broker certificate, a client certificate for
/// `gateway_id` and one for the consumer) and starts mosquitto.
pub async fn start(dir: &Path, gateway_id: &str) -> anyhow::Result<Hospital> {
    start_with_acl(dir, gateway_id, None).await
}

/// [`start`], with mosquitto's `acl_file` holding `acl` (users are the certificates' CNs):
/// an upstream that refuses some topics, as a hospital's broker may.
pub async fn start_with_acl(
    dir: &Path,
    gateway_id: &str,
    acl: Option<&str>,
) -> anyhow::Result<Hospital> {
    start_with(dir, gateway_id, acl, &[]).await
}

/// [`start_with_acl`], with the broker's certificate also valid for `sans` (the address a
/// gateway in a virtual machine reaches it by).
pub async fn start_with(
    dir: &Path,
    gateway_id: &str,
    acl: Option<&str>,
    sans: &[String],
) -> anyhow::Result<Hospital> {
    let pki = PkiDir::new(dir.join("pki"));
    if !pki.ca_key().exists() {
        pki::init(&pki, "hospital", "hospital-broker", sans)?;
    }
    for id in [gateway_id, "hospital-consumer"] {
        let device = DeviceId::parse(id)?;
        if !dir.join(format!("clients/{id}.pem")).exists() {
            pki::issue(&pki, &device, &dir.join("clients"), 7)?;
        }
    }
    for _ in 0..10 {
        let port = free_port()?;
        if let Some(child) = spawn(dir, &pki, port, acl).await? {
            return Ok(Hospital {
                port,
                dir: dir.to_owned(),
                _broker: child,
            });
        }
    }
    bail!("mosquitto could not open a listener on any port tried")
}

/// A free port below the kernel's ephemeral range, so that no port the OS hands out to
/// someone else can be taken between our check and mosquitto's bind.
fn free_port() -> anyhow::Result<u16> {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    let rng = ring::rand::SystemRandom::new();
    for _ in 0..100 {
        let mut b = [0u8; 2];
        ring::rand::SecureRandom::fill(&rng, &mut b)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let port = 10_000 + u16::from_be_bytes(b) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found for mosquitto")
}

async fn spawn(
    dir: &Path,
    pki: &PkiDir,
    port: u16,
    acl: Option<&str>,
) -> anyhow::Result<Option<tokio::process::Child>> {
    // Started as root, mosquitto drops to its own user and could not read the 0600 key.
    let as_root = nix::unistd::geteuid().is_root();
    let conf = dir.join("mosquitto.conf");
    let acl_line = match acl {
        Some(acl) => {
            let path = dir.join("mosquitto.acl");
            std::fs::write(&path, acl)?;
            format!("acl_file {}\n", path.display())
        }
        None => String::new(),
    };
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\n{user}cafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n\
             persistence false\nlog_dest stderr\nlog_type error\nlog_type information\n\
             max_inflight_messages 0\nmax_queued_messages 100000\n{acl_line}",
            pki.ca_cert().display(),
            pki.server_cert().display(),
            pki.server_key().display(),
            user = if as_root { "user root\n" } else { "" },
        ),
    )?;
    let mut child = tokio::process::Command::new("mosquitto")
        .args(["-c", &conf.to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start mosquitto")?;
    let stderr = child.stderr.take().context("no stderr from mosquitto")?;
    let mut lines = BufReader::new(stderr).lines();
    let started = tokio::time::timeout(START_DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(" running") {
                return true;
            }
        }
        false
    })
    .await
    .context("mosquitto did not start in time")?;
    // Keep draining its log so mosquitto never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(started.then_some(child))
}

impl Hospital {
    pub fn client_files(&self, id: &str) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.dir.join("pki/ca.pem"),
            self.dir.join(format!("clients/{id}.pem")),
            self.dir.join(format!("clients/{id}.key")),
        )
    }

    /// Subscribes to everything and prints it until `stop`, counting device messages into
    /// `count` and the gateway's audit records into `audit`; `subscribed` fires once the
    /// subscription is in place.
    pub async fn consume(
        &self,
        stop: CancellationToken,
        count: Arc<AtomicU64>,
        audit: Arc<AtomicU64>,
        subscribed: tokio::sync::oneshot::Sender<()>,
    ) -> anyhow::Result<()> {
        self.receive(stop, count, Some(audit), subscribed, true)
            .await
    }

    /// [`Hospital::consume`] without printing, counting device messages only (for the
    /// benchmark).
    pub async fn consume_quietly(
        &self,
        stop: CancellationToken,
        count: Arc<AtomicU64>,
        subscribed: tokio::sync::oneshot::Sender<()>,
    ) -> anyhow::Result<()> {
        self.receive(stop, count, None, subscribed, false).await
    }

    async fn receive(
        &self,
        stop: CancellationToken,
        count: Arc<AtomicU64>,
        audit: Option<Arc<AtomicU64>>,
        subscribed: tokio::sync::oneshot::Sender<()>,
        print: bool,
    ) -> anyhow::Result<()> {
        let mut subscribed = Some(subscribed);
        // The hash of the last audit record received, to show that the next one links to it.
        let mut last_hash: Option<String> = None;
        let (ca, cert, key) = self.client_files("hospital-consumer");
        let tls = cert::client_config(&ca, &cert, &key)?;
        let mut o = MqttOptions::new("hospital-consumer", "127.0.0.1", self.port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut eventloop) = AsyncClient::new(o, 16);
        client.subscribe("hospital/#", QoS::AtLeastOnce).await?;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic.ends_with(b"/_gateway/audit") {
                        if let Some(a) = &audit {
                            a.fetch_add(1, Ordering::Relaxed);
                        }
                        if print {
                            print_audit(&p.payload, &mut last_hash);
                        }
                        continue;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    if !print {
                        continue;
                    }
                    let prop = |name: &str| {
                        p.properties
                            .as_ref()
                            .and_then(|pr| pr.user_properties.iter().find(|(k, _)| k == name))
                            .map_or("-", |(_, v)| v.as_str())
                            .to_owned()
                    };
                    println!(
                        "{:>14} ⇐ {} {} [seq {}, {}]",
                        "hospital",
                        String::from_utf8_lossy(&p.topic),
                        String::from_utf8_lossy(&p.payload),
                        prop("wardgate-seq"),
                        prop("wardgate-priority"),
                    );
                }
                Ok(_) => {}
                Err(e) => bail!("hospital consumer: {e}"),
            }
        }
    }
}

/// One line for an audit record that reached the hospital, and whether it links to the
/// previous one received.
fn print_audit(payload: &[u8], last_hash: &mut Option<String>) {
    let Ok(e) = serde_json::from_slice::<crate::audit::Entry>(payload) else {
        println!("{:>14} ⇐ unreadable audit record", "hospital");
        return;
    };
    let link = match last_hash.as_deref() {
        Some(h) if h == e.prev => "links to the previous one",
        Some(_) => "does not link to the previous one received",
        None => "first one received",
    };
    println!(
        "{:>14} ⇐ audit #{} {} {} ({link})",
        "hospital",
        e.index,
        e.event,
        e.device.as_deref().unwrap_or("-"),
    );
    *last_hash = Some(e.hash);
}
