//! A real upstream: mosquitto with TLS and client certificates, its own PKI (made with
//! `wardgate pki`), a TCP link between gateway and broker that a test can cut and restore,
//! and an MQTT 5 consumer that sees the user properties the gateway adds.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use wardgate::demo::upstream::Hospital;

use super::{require, DEADLINE};

/// The hospital's broker: mosquitto on loopback with TLS, requiring client certificates,
/// as the demo starts it (`wardgate::demo::upstream`).
#[derive(Debug)]
pub struct Upstream {
    pub port: u16,
    hospital: Hospital,
}

impl Upstream {
    /// Makes the upstream PKI in `dir` and starts mosquitto.
    pub async fn start(dir: &Path, gateway_id: &str) -> Upstream {
        require("mosquitto", "mosquitto");
        let hospital = wardgate::demo::upstream::start(dir, gateway_id)
            .await
            .unwrap();
        Upstream {
            port: hospital.port,
            hospital,
        }
    }

    /// Like [`Upstream::start`], with mosquitto enforcing `acl` (see `acl_file` in
    /// mosquitto.conf(5); users are the clients' certificate CNs).
    pub async fn start_with_acl(dir: &Path, gateway_id: &str, acl: &str) -> Upstream {
        require("mosquitto", "mosquitto");
        let hospital = wardgate::demo::upstream::start_with_acl(dir, gateway_id, Some(acl))
            .await
            .unwrap();
        Upstream {
            port: hospital.port,
            hospital,
        }
    }

    /// Like [`Upstream::start`], its certificate also valid for `sans`.
    pub async fn start_with_sans(dir: &Path, gateway_id: &str, sans: &[&str]) -> Upstream {
        require("mosquitto", "mosquitto");
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let hospital = wardgate::demo::upstream::start_with(dir, gateway_id, None, &sans)
            .await
            .unwrap();
        Upstream {
            port: hospital.port,
            hospital,
        }
    }

    /// The CA, certificate and key a client `id` of this broker presents.
    pub fn client_files(
        &self,
        id: &str,
    ) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        self.hospital.client_files(id)
    }

    /// The `[uplink]` section for a gateway reaching this broker at `port` (the link's).
    pub fn uplink_section(&self, gateway_id: &str, port: u16, extra: &str) -> String {
        let (ca, cert, key) = self.hospital.client_files(gateway_id);
        format!(
            "\n[uplink]\nhost = \"127.0.0.1\"\nport = {port}\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             topic_prefix = \"hospital\"\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n{extra}\n",
            ca, cert, key,
        )
    }

    /// Connects the consumer, subscribed to `filter`, and returns what it receives. The
    /// gateway's own audit stream (`…/_gateway/audit`) is left out unless `filter` names it.
    pub async fn consumer(&self, filter: &str) -> Consumer {
        self.consumer_of(filter, filter.contains("_gateway")).await
    }

    /// Like [`Upstream::consumer`], keeping the gateway's audit stream too.
    pub async fn consumer_with_audit(&self, filter: &str) -> Consumer {
        self.consumer_of(filter, true).await
    }

    async fn consumer_of(&self, filter: &str, audit: bool) -> Consumer {
        let (ca, cert, key) = self.hospital.client_files("hospital-consumer");
        let tls = wardgate::pki::cert::client_config(&ca, &cert, &key).unwrap();
        // Its own client id: two consumers on one broker must not take each other over.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = format!("hospital-consumer-{}", N.fetch_add(1, Ordering::SeqCst));
        let mut o = MqttOptions::new(id, "127.0.0.1", self.port);
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
                        let is_audit = p.topic.windows(10).any(|w| w == b"/_gateway/");
                        if audit || !is_audit {
                            let _ = tx.send(p);
                        }
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

    /// The next message, waiting up to `deadline` (longer than [`DEADLINE`], for a peer
    /// that reboots between messages).
    pub async fn next_within(&mut self, deadline: Duration) -> Publish {
        tokio::time::timeout(deadline, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing reached the upstream within {deadline:?}"))
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
/// open connections are closed and new ones refused. Stands for the hospital network. It
/// can also stall: connections stay open and what the gateway sends still arrives, but
/// nothing comes back (a broker that stopped answering).
#[derive(Debug, Clone)]
pub struct Link {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<watch::Sender<u64>>,
    stalled: Arc<watch::Sender<bool>>,
}

impl Link {
    pub async fn start(target: u16, up: bool) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = watch::channel(0u64);
        let (stalled, _) = watch::channel(false);
        let link = Link {
            port,
            up: Arc::new(AtomicBool::new(up)),
            cut: Arc::new(cut),
            stalled: Arc::new(stalled),
        };
        let l = link.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !l.up.load(Ordering::SeqCst) {
                    continue; // dropped: the gateway sees its connection closed
                }
                let mut cut = l.cut.subscribe();
                let stalled = l.stalled.subscribe();
                let target: SocketAddr = ([127, 0, 0, 1], target).into();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut in_rd, mut in_wr) = inbound.into_split();
                    let (mut out_rd, mut out_wr) = outbound.into_split();
                    let up = tokio::io::copy(&mut in_rd, &mut out_wr);
                    // Back to the gateway, unless stalled: then held until the stall ends.
                    let down = async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut stalled = stalled;
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = out_rd.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            let _ = stalled.wait_for(|s| !*s).await;
                            in_wr.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        link
    }

    /// Stalls the link (nothing the broker sends reaches the gateway) or ends the stall.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}
