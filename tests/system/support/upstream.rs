//! A real upstream: mosquitto with TLS and client certificates, its own PKI (made with
//! `wardgate pki`), a TCP link between gateway and broker that a test can cut and restore,
//! and an MQTT 5 consumer that sees the user properties the gateway adds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::{require, wardgate_ok, DEADLINE};

/// The hospital's broker: mosquitto on loopback with TLS, requiring client certificates.
#[derive(Debug)]
pub struct Upstream {
    pub dir: PathBuf,
    pub port: u16,
    child: tokio::process::Child,
}

impl Upstream {
    /// Makes the upstream PKI in `dir` (CA, server certificate; client certificates for the
    /// gateway `gateway_id` and for the test's `consumer`) and starts mosquitto.
    pub async fn start(dir: &Path, gateway_id: &str) -> Upstream {
        require("mosquitto", "mosquitto");
        let pki = dir.join("pki");
        if !pki.join("ca.pem").exists() {
            wardgate_ok(&[
                "pki",
                "init",
                "--dir",
                pki.to_str().unwrap(),
                "--site",
                "hospital",
            ]);
            for id in [gateway_id, "consumer"] {
                wardgate_ok(&[
                    "pki",
                    "issue",
                    id,
                    "--dir",
                    pki.to_str().unwrap(),
                    "--out",
                    dir.join("clients").to_str().unwrap(),
                ]);
            }
        }
        // mosquitto cannot take port 0. A port handed out by the OS and released could be
        // handed to another test before mosquitto binds it, so pick one below the kernel's
        // ephemeral range instead, and try another if mosquitto finds it taken.
        for _ in 0..10 {
            let port = free_port_below_ephemeral();
            if let Some(child) = spawn_mosquitto(dir, &pki, port).await {
                return Upstream {
                    dir: dir.to_owned(),
                    port,
                    child,
                };
            }
        }
        panic!("mosquitto could not open a listener on any port tried");
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.pem")
    }

    pub fn client_cert(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("clients/{id}.pem")),
            self.dir.join(format!("clients/{id}.key")),
        )
    }

    /// The `[uplink]` section for a gateway reaching this broker at `port` (the link's).
    pub fn uplink_section(&self, gateway_id: &str, port: u16, extra: &str) -> String {
        let (cert, key) = self.client_cert(gateway_id);
        format!(
            "\n[uplink]\nhost = \"127.0.0.1\"\nport = {port}\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             topic_prefix = \"hospital\"\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n{extra}\n",
            self.ca(),
            cert,
            key,
        )
    }

    /// Connects the consumer, subscribed to `filter`, and returns what it receives.
    pub async fn consumer(&self, filter: &str) -> Consumer {
        let (cert, key) = self.client_cert("consumer");
        let tls = wardgate::pki::cert::client_config(&self.ca(), &cert, &key).unwrap();
        let mut o = MqttOptions::new("consumer", "127.0.0.1", self.port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("upstream consumer failed: {e}"),
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed.wait_for(|s| *s))
            .await
            .expect("no SUBACK for the consumer")
            .unwrap();
        Consumer { client, rx }
    }
}

/// A port below the ephemeral range that is free now.
fn free_port_below_ephemeral() -> u16 {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    loop {
        let mut b = [0u8; 2];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
        let port = 10_000 + u16::from_be_bytes(b) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Starts mosquitto on `port`; `None` if it could not listen there.
async fn spawn_mosquitto(dir: &Path, pki: &Path, port: u16) -> Option<tokio::process::Child> {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            // `user root`: started as root, mosquitto would drop to its own user and lose
            // access to the 0600 key.
            "listener {port} 127.0.0.1\nprotocol mqtt\nuser root\ncafile {ca}\ncertfile {cert}\n\
             keyfile {key}\nrequire_certificate true\nuse_identity_as_username true\n\
             allow_anonymous false\npersistence false\nlog_dest stderr\nlog_type error\n\
             log_type warning\nlog_type notice\nlog_type information\n\
             max_inflight_messages 0\nmax_queued_messages 100000\n",
            ca = pki.join("ca.pem").display(),
            cert = pki.join("server.pem").display(),
            key = pki.join("server.key").display(),
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new("mosquitto")
        .args(["-c", conf.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mosquitto");
    let stderr = child.stderr.take().unwrap();
    // "running" comes after every listener is open; the stream ends if mosquitto exits.
    let (tx, mut rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(" running") {
                let _ = tx.send(true);
            }
            if line.contains("Error") {
                eprintln!("mosquitto: {line}");
            }
        }
    });
    let started = match tokio::time::timeout(DEADLINE, rx.wait_for(|up| *up)).await {
        Ok(Ok(_)) => true,
        Ok(Err(_)) => false, // exited: the port was taken
        Err(_) => panic!("mosquitto neither started nor failed before the deadline"),
    };
    started.then_some(child)
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// What the upstream consumer received.
#[derive(Debug)]
pub struct Consumer {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
}

impl Consumer {
    pub async fn next(&mut self) -> Publish {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("nothing reached the upstream before the deadline")
            .expect("consumer ended")
    }

    /// Receives until `done` says the collection is complete, or panics at the deadline.
    pub async fn until(&mut self, mut done: impl FnMut(&[Publish]) -> bool) -> Vec<Publish> {
        let mut got = Vec::new();
        while !done(&got) {
            got.push(self.next().await);
        }
        got
    }
}

/// A user property of a received message.
pub fn property<'a>(p: &'a Publish, name: &str) -> Option<&'a str> {
    p.properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A TCP link from the gateway to the upstream broker that the test can cut: while down,
/// open connections are closed and new ones refused. Stands for the hospital network.
#[derive(Debug, Clone)]
pub struct Link {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<watch::Sender<u64>>,
}

impl Link {
    pub async fn start(target: u16, up: bool) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = watch::channel(0u64);
        let link = Link {
            port,
            up: Arc::new(AtomicBool::new(up)),
            cut: Arc::new(cut),
        };
        let l = link.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !l.up.load(Ordering::SeqCst) {
                    continue; // dropped: the gateway sees its connection closed
                }
                let mut cut = l.cut.subscribe();
                let target: SocketAddr = ([127, 0, 0, 1], target).into();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        link
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}
