//! `wardgate demo`: the gateway's main job on an embedded default.
//!
//! Makes a throwaway site PKI and configuration (in a temporary directory, or `--dir`),
//! starts the gateway on loopback, and runs simulated ward devices through it with real
//! MQTT over mutual TLS:
//!
//! - `pump-01` (infusion pump) and `monitor-02` (patient monitor) publish vitals and, now
//!   and then, an alarm;
//! - `nurse-station` (nurse-call display) subscribes to every alarm on the ward;
//! - `rogue-03`, a registered monitor, tries to forge an alarm in pump-01's name and is
//!   disconnected by the ACL;
//! - `visitor-laptop` holds a certificate from the site CA but is not registered, and is
//!   refused at CONNECT.
//!
//! - a hospital broker (mosquitto, TLS, its own PKI) receives what the gateway forwards,
//!   and a hospital-side consumer prints it with the gateway's sequence numbers (skipped,
//!   with a note, where mosquitto is not installed).
//!
//! What the devices send and receive is printed on stdout, with a status line every few
//! seconds read from the gateway's metrics endpoint (devices, rates in and out, spool depth,
//! uplink, ready) and, at the end, the metrics a Prometheus scraper would see
//! ([`watch`]); the gateway's own security events appear in its log on stderr. The payloads
//! are synthetic.

pub mod upstream;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio_util::sync::CancellationToken;

use crate::admin::proto::{DeviceView, Request};
use crate::app::Gateway;
use crate::config::Config;
use crate::device::DeviceId;
use crate::pki::{self, cert, PkiDir};

const SITE: &str = "demo-hospital";
/// Registered devices: (id, class).
const DEVICES: &[(&str, &str)] = &[
    ("pump-01", "infusion-pump"),
    ("monitor-02", "patient-monitor"),
    ("nurse-station", "nurse-display"),
    ("rogue-03", "patient-monitor"),
];
const UNREGISTERED: &str = "visitor-laptop";
/// How often the simulated devices publish vitals.
const VITALS_EVERY: Duration = Duration::from_millis(1500);

#[derive(Debug, Default)]
struct Tally {
    published: AtomicU64,
    delivered: AtomicU64,
    refused: AtomicU64,
    forwarded: Arc<AtomicU64>,
    audit: Arc<AtomicU64>,
}

/// How long the demo waits, after the devices stop, for the uplink to forward the rest.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

pub async fn run(dir: Option<PathBuf>, duration: Duration) -> anyhow::Result<()> {
    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new()
                .prefix("wardgate-demo-")
                .tempdir()?;
            tmp.path().to_owned()
        }
    };
    let hospital = if upstream::available() {
        Some(upstream::start(&dir.join("hospital"), "demo-gateway").await?)
    } else {
        println!(
            "(mosquitto is not installed: `apt-get install mosquitto` to see the hospital side)"
        );
        None
    };
    let config_path = prepare(&dir, hospital.as_ref())?;
    let tally = Arc::new(Tally::default());
    let hospital_stop = CancellationToken::new();
    let consumer = match hospital {
        Some(h) => {
            let (ready_tx, ready) = tokio::sync::oneshot::channel();
            let (stop, count) = (hospital_stop.clone(), tally.forwarded.clone());
            let audit = tally.audit.clone();
            let task = tokio::spawn(async move { h.consume(stop, count, audit, ready_tx).await });
            // The hospital side listens before the ward starts talking.
            let _ = ready.await;
            Some(task)
        }
        None => None,
    };
    let config = Config::load(&config_path)?;
    let gateway = Gateway::build(config).await?;
    let port = gateway.edge_addr().port();
    let metrics = gateway.metrics_addr();
    println!(
        "wardgate demo: site {SITE}, edge on {}",
        gateway.edge_addr()
    );
    println!("  PKI and configuration in {}", dir.display());
    if let Some(m) = metrics {
        println!("  metrics on http://{m}/metrics, health on http://{m}/health");
    }
    println!("  devices: pump-01, monitor-02 (publish vitals and alarms), nurse-station");
    println!("           (receives every alarm), rogue-03 (will misbehave), visitor-laptop");
    println!("           (not registered)");
    if consumer.is_some() {
        println!("  hospital broker (mosquitto, TLS) receives what the gateway forwards");
    }
    println!();

    let shutdown = CancellationToken::new();
    let gw_task = tokio::spawn(gateway.run(shutdown.clone()));
    let devices = CancellationToken::new();
    if let Some(m) = metrics {
        tokio::spawn(watch::status_lines(m, devices.clone()));
    }

    let tasks = vec![
        tokio::spawn(nurse_station(
            dir.clone(),
            port,
            tally.clone(),
            devices.clone(),
        )),
        tokio::spawn(sender(
            dir.clone(),
            port,
            "pump-01",
            tally.clone(),
            devices.clone(),
        )),
        tokio::spawn(sender(
            dir.clone(),
            port,
            "monitor-02",
            tally.clone(),
            devices.clone(),
        )),
        tokio::spawn(rogue(dir.clone(), port, tally.clone())),
        tokio::spawn(visitor(dir.clone(), port, tally.clone())),
    ];

    if duration.is_zero() {
        tokio::signal::ctrl_c().await?;
    } else {
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    devices.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let forwarded = match consumer {
        Some(task) => {
            // Let the uplink forward what is still in the spool; the count is polled because
            // it is the consumer's, in another task.
            let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
            while tally.forwarded.load(Ordering::Relaxed) < tally.published.load(Ordering::Relaxed)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            hospital_stop.cancel();
            task.await??;
            format!(
                ", {} reached the hospital broker (with {} audit records)",
                tally.forwarded.load(Ordering::Relaxed),
                tally.audit.load(Ordering::Relaxed)
            )
        }
        None => String::new(),
    };
    // What an engineer sees with `wardgate device list` (the same admin socket).
    println!(
        "\n$ wardgate device list --config {}",
        config_path.display()
    );
    let socket = dir.join("admin.sock");
    let answer = tokio::task::spawn_blocking(move || {
        crate::admin::client::call(&socket, &Request::DeviceList)
    })
    .await?;
    match answer {
        Ok(r) if r.ok => {
            let views: Vec<DeviceView> = serde_json::from_value(r.data.unwrap_or_default())?;
            print!("{}", crate::admin::proto::device_table(&views));
        }
        Ok(r) => println!("admin socket: {}", r.error.unwrap_or_default()),
        Err(e) => println!("admin socket: {e}"),
    }
    if let Some(m) = metrics {
        match watch::get(m, "/metrics").await {
            Ok(text) => {
                println!("\n$ curl http://{m}/metrics   # what a Prometheus scraper sees");
                for line in text.lines().filter(|l| !l.starts_with("# HELP")) {
                    println!("{line}");
                }
            }
            Err(e) => println!("metrics: {e}"),
        }
    }
    shutdown.cancel();
    let _ = gw_task.await;
    println!(
        "\nsummary: {} messages published{forwarded}, {} alarms delivered to the nurse \
         station, {} devices refused",
        tally.published.load(Ordering::Relaxed),
        tally.delivered.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Writes the PKI, device certificates and configuration into `dir`; returns the config path.
fn prepare(dir: &Path, hospital: Option<&upstream::Hospital>) -> anyhow::Result<PathBuf> {
    let pki = PkiDir::new(dir.join("pki"));
    if !pki.ca_key().exists() {
        pki::init(&pki, SITE, "demo-gateway", &[])?;
    }
    let out = dir.join("devices");
    for id in DEVICES.iter().map(|(id, _)| *id).chain([UNREGISTERED]) {
        let device = DeviceId::parse(id)?;
        if !out.join(format!("{id}.pem")).exists() {
            pki::issue(&pki, &device, &out, 7)?;
        }
    }
    let mut toml = String::from(
        r#"# Written by `wardgate demo`.
[gateway]
id = "demo-gateway"
site = "demo-hospital"
data_dir = "data"

[edge]
listen = "127.0.0.1:0"
ca = "pki/ca.pem"
cert = "pki/server.pem"
key = "pki/server.key"
crl = "pki/crl.pem"

[admin]
socket = "admin.sock"
metrics_listen = "127.0.0.1:0"

[[device_class]]
name = "infusion-pump"
publish = ["ward/{device}/#"]
subscribe = ["ward/{device}/cmd/#"]
alarm = ["ward/{device}/alarm/#"]
vital = ["ward/{device}/vitals/#"]
max_payload = "16KiB"

[[device_class]]
name = "patient-monitor"
publish = ["ward/{device}/#"]
subscribe = ["ward/{device}/cmd/#"]
alarm = ["ward/{device}/alarm/#"]
vital = ["ward/{device}/vitals/#"]

[[device_class]]
name = "nurse-display"
publish = ["ward/{device}/ack/#"]
subscribe = ["ward/+/alarm/#"]
max_payload = "4KiB"
"#,
    );
    for (id, class) in DEVICES {
        toml.push_str(&format!(
            "\n[[device]]\nid = \"{id}\"\nclass = \"{class}\"\naddress = \"127.0.0.1\"\n"
        ));
    }
    if let Some(h) = hospital {
        let (ca, cert, key) = h.client_files("demo-gateway");
        toml.push_str(&format!(
            "\n[uplink]\nhost = \"127.0.0.1\"\nport = {}\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             topic_prefix = \"hospital\"\n",
            h.port
        ));
    }
    let path = dir.join("wardgate.toml");
    std::fs::write(&path, toml).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn options(dir: &Path, id: &str, port: u16) -> anyhow::Result<MqttOptions> {
    let devices = dir.join("devices");
    let tls = cert::client_config(
        &devices.join("ca.pem"),
        &devices.join(format!("{id}.pem")),
        &devices.join(format!("{id}.key")),
    )?;
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(10));
    Ok(o)
}

/// Polls until the CONNACK (true) or a failure (false, printed).
async fn connected(id: &str, eventloop: &mut rumqttc::EventLoop) -> bool {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
            Ok(_) => {}
            Err(e) => {
                println!("{id:>14} ✗ connection refused: {}", describe(&e));
                return false;
            }
        }
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("CONNACK {code:?}"),
        ConnectionError::Io(e) => format!("closed by the gateway ({e})"),
        other => other.to_string(),
    }
}

async fn nurse_station(dir: PathBuf, port: u16, tally: Arc<Tally>, stop: CancellationToken) {
    let Ok(opts) = options(&dir, "nurse-station", port) else {
        return;
    };
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    if !connected("nurse-station", &mut eventloop).await {
        return;
    }
    let _ = client.subscribe("ward/+/alarm/#", QoS::AtLeastOnce).await;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                tally.delivered.fetch_add(1, Ordering::Relaxed);
                println!(
                    "{:>14} ⇐ {} {}",
                    "nurse-station",
                    p.topic,
                    String::from_utf8_lossy(&p.payload)
                );
            }
            Ok(_) => {}
            Err(e) => {
                println!("{:>14} ✗ {}", "nurse-station", describe(&e));
                break;
            }
        }
    }
    let _ = client.disconnect().await;
}

/// A pump or monitor: vitals every [`VITALS_EVERY`], an alarm every third round.
async fn sender(
    dir: PathBuf,
    port: u16,
    id: &'static str,
    tally: Arc<Tally>,
    stop: CancellationToken,
) {
    let Ok(opts) = options(&dir, id, port) else {
        return;
    };
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    if !connected(id, &mut eventloop).await {
        return;
    }
    let mut tick = tokio::time::interval(VITALS_EVERY);
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                round += 1;
                let (topic, payload) = if round.is_multiple_of(3) {
                    let what = if id.starts_with("pump") { "occlusion" } else { "spo2-low" };
                    (format!("ward/{id}/alarm/{what}"), format!("{{\"seq\":{round},\"priority\":\"high\"}}"))
                } else if id.starts_with("pump") {
                    (format!("ward/{id}/vitals"), format!("{{\"seq\":{round},\"rate_ml_h\":{}}}", 40 + round % 5))
                } else {
                    (format!("ward/{id}/vitals"), format!("{{\"seq\":{round},\"hr\":{},\"spo2\":97}}", 70 + round % 7))
                };
                println!("{id:>14} ⇒ {topic} {payload}");
                tally.published.fetch_add(1, Ordering::Relaxed);
                let _ = client.publish(topic, QoS::AtLeastOnce, false, payload).await;
            }
            e = eventloop.poll() => {
                if let Err(e) = e {
                    println!("{id:>14} ✗ {}", describe(&e));
                    break;
                }
            }
        }
    }
    let _ = client.disconnect().await;
}

/// A registered monitor that forges an alarm in pump-01's name.
async fn rogue(dir: PathBuf, port: u16, tally: Arc<Tally>) {
    // Scripted timing: misbehave once the ward's traffic is under way.
    tokio::time::sleep(VITALS_EVERY * 2).await;
    let Ok(opts) = options(&dir, "rogue-03", port) else {
        return;
    };
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    if !connected("rogue-03", &mut eventloop).await {
        return;
    }
    println!(
        "{:>14} ⇒ ward/pump-01/alarm/forged (not its own topic)",
        "rogue-03"
    );
    let _ = client
        .publish("ward/pump-01/alarm/forged", QoS::AtLeastOnce, false, "{}")
        .await;
    loop {
        if let Err(e) = eventloop.poll().await {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            println!(
                "{:>14} ✗ disconnected by the gateway: {}",
                "rogue-03",
                describe(&e)
            );
            return;
        }
    }
}

/// A device with a valid site certificate that is not in the registry.
async fn visitor(dir: PathBuf, port: u16, tally: Arc<Tally>) {
    // Scripted timing: arrive after the rogue, so the two refusals read apart.
    tokio::time::sleep(VITALS_EVERY * 3).await;
    let Ok(opts) = options(&dir, UNREGISTERED, port) else {
        return;
    };
    let (_client, mut eventloop) = AsyncClient::new(opts, 16);
    if !connected(UNREGISTERED, &mut eventloop).await {
        tally.refused.fetch_add(1, Ordering::Relaxed);
    }
}
