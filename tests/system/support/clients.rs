//! MQTT clients for the tests: rumqttc (the client the gateway's own uplink uses),
//! mosquitto_pub/mosquitto_sub (an independent implementation), and a raw client that
//! writes whatever bytes a test needs over TLS.

use std::net::{IpAddr, SocketAddr};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet as RawPacket;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
    Publish, QoS, TlsConfiguration, Transport,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{require, Site, DEADLINE};

/// A rustls client configuration presenting `cert` and trusting `ca`.
pub fn tls_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    wardgate::pki::cert::client_config(ca, cert, key).expect("client TLS configuration")
}

pub fn device_tls(site: &Site, device: &str) -> Arc<rustls::ClientConfig> {
    tls_config(&site.ca(), &site.cert(device), &site.key(device))
}

/// rumqttc options for `client_id` connecting with `tls` to the gateway at `port`.
pub fn options(client_id: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Polls `eventloop` until the CONNACK arrives (Ok) or the connection fails (Err).
pub async fn connect(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => return Ok(()),
                _ => continue,
            }
        }
    })
    .await
    .expect("no CONNACK and no error before the deadline")
}

/// Expects the connection to be refused with CONNACK `code`.
pub async fn expect_connack_refusal(mut eventloop: EventLoop, code: ConnectReturnCode) {
    match connect(&mut eventloop).await {
        Err(ConnectionError::ConnectionRefused(c)) => assert_eq!(c, code),
        other => panic!("expected CONNACK {code:?}, got {other:?}"),
    }
}

/// Expects the TLS handshake to fail. With TLS 1.3 the client sends its certificate after
/// the server's Finished, so a refused certificate reaches the client as an alert on its
/// first read rather than as a handshake error.
pub async fn expect_tls_refusal(mut eventloop: EventLoop) {
    match connect(&mut eventloop).await {
        Err(ConnectionError::Tls(_)) | Err(ConnectionError::Io(_)) => {}
        Err(e @ ConnectionError::MqttState(_)) if format!("{e:?}").contains("AlertReceived") => {}
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

/// A connected rumqttc client whose eventloop runs in a task, forwarding every PUBLISH it
/// receives, and the error that ends it.
#[derive(Debug)]
pub struct Client {
    pub client: AsyncClient,
    pub publishes: mpsc::UnboundedReceiver<Publish>,
    pub ended: mpsc::UnboundedReceiver<ConnectionError>,
    acks: mpsc::UnboundedReceiver<Packet>,
}

impl Client {
    /// Connects `device` with its own certificate and client id; panics if refused.
    pub async fn connect(site: &Site, device: &str, port: u16) -> Client {
        Self::connect_with(options(device, port, device_tls(site, device))).await
    }

    pub async fn connect_with(opts: MqttOptions) -> Client {
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        connect(&mut eventloop).await.expect("connect");
        let (ptx, publishes) = mpsc::unbounded_channel();
        let (etx, ended) = mpsc::unbounded_channel();
        let (atx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = ptx.send(p);
                    }
                    Ok(Event::Incoming(p @ (Packet::SubAck(_) | Packet::PubAck(_)))) => {
                        let _ = atx.send(p);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = etx.send(e);
                        return;
                    }
                }
            }
        });
        Client {
            client,
            publishes,
            ended,
            acks,
        }
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.subscribe_qos(filter, QoS::AtLeastOnce).await
    }

    pub async fn subscribe_qos(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        match tokio::time::timeout(DEADLINE, self.acks.recv()).await {
            Ok(Some(Packet::SubAck(_))) => {}
            other => panic!("no SUBACK for {filter}: {other:?}"),
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("publish");
        match tokio::time::timeout(DEADLINE, self.acks.recv()).await {
            Ok(Some(Packet::PubAck(_))) => {}
            other => panic!("no PUBACK for {topic}: {other:?}"),
        }
    }

    /// The next SUBACK or PUBACK, or `None` if the connection ended first.
    pub async fn next_ack(&mut self) -> Option<Packet> {
        tokio::time::timeout(DEADLINE, self.acks.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message received, within the deadline.
    pub async fn next_publish(&mut self) -> Publish {
        tokio::time::timeout(DEADLINE, self.publishes.recv())
            .await
            .expect("no message before the deadline")
            .expect("connection ended")
    }

    /// Waits until the connection is closed by the other side.
    pub async fn closed(&mut self) -> ConnectionError {
        tokio::time::timeout(DEADLINE, self.ended.recv())
            .await
            .expect("connection still open at the deadline")
            .expect("eventloop task ended without an error")
    }
}

/// Connects `device` and publishes to `topic` outside its ACL; waits until the gateway has
/// closed the connection.
pub async fn forge_publish(site: &Site, device: &str, port: u16, topic: &str) {
    let mut c = Client::connect(site, device, port).await;
    c.client
        .publish(topic, QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    c.closed().await;
}

/// Runs mosquitto_pub for `device` with its certificate; returns its output.
pub fn mosquitto_pub(site: &Site, device: &str, port: u16, args: &[&str]) -> Output {
    require("mosquitto_pub", "mosquitto-clients");
    std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", device])
        .args(["--cafile", site.ca().to_str().unwrap()])
        .args(["--cert", site.cert(device).to_str().unwrap()])
        .args(["--key", site.key(device).to_str().unwrap()])
        .args(args)
        .output()
        .expect("run mosquitto_pub")
}

/// Starts mosquitto_sub for `device`, printing `topic payload` lines for `count` messages.
pub fn mosquitto_sub(
    site: &Site,
    device: &str,
    port: u16,
    filter: &str,
    count: usize,
) -> tokio::process::Child {
    mosquitto_sub_with(site, device, port, filter, count, &[])
}

/// [`mosquitto_sub`] with more arguments (e.g. `-V mqttv5`).
pub fn mosquitto_sub_with(
    site: &Site,
    device: &str,
    port: u16,
    filter: &str,
    count: usize,
    args: &[&str],
) -> tokio::process::Child {
    require("mosquitto_sub", "mosquitto-clients");
    tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", device])
        .args(["--cafile", site.ca().to_str().unwrap()])
        .args(["--cert", site.cert(device).to_str().unwrap()])
        .args(["--key", site.key(device).to_str().unwrap()])
        .args(["-t", filter, "-q", "1", "-v", "-C", &count.to_string()])
        .args(["-W", &DEADLINE.as_secs().to_string()])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mosquitto_sub")
}

/// Calls `publish` until `sub` (a mosquitto_sub with `-C`) has its messages and exits, and
/// returns what it printed. mosquitto_sub says nothing once subscribed, so the test cannot
/// wait for its SUBSCRIBE to land; it publishes again until one arrives.
pub async fn publish_until_received(
    sub: &mut tokio::process::Child,
    mut publish: impl AsyncFnMut(),
) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let status = loop {
        publish().await;
        if let Ok(status) = tokio::time::timeout(Duration::from_millis(300), sub.wait()).await {
            break status.expect("wait for mosquitto_sub");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "mosquitto_sub got nothing"
        );
    };
    let mut stdout = String::new();
    sub.stdout
        .take()
        .expect("mosquitto_sub's stdout")
        .read_to_string(&mut stdout)
        .await
        .expect("read mosquitto_sub's output");
    assert!(status.success(), "mosquitto_sub failed: {stdout}");
    stdout
}

/// A TLS connection on which the test writes raw MQTT bytes.
#[derive(Debug)]
pub struct Raw {
    pub tls: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Raw {
    /// Opens TLS to `gateway` as `device`, from `local` if given (any 127/8 address).
    pub async fn open(
        site: &Site,
        device: &str,
        gateway: SocketAddr,
        local: Option<IpAddr>,
    ) -> Raw {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(ip) = local {
            socket
                .bind(SocketAddr::new(ip, 0))
                .expect("bind local address");
        }
        let tcp = socket.connect(gateway).await.expect("tcp connect");
        let connector = TlsConnector::from(device_tls(site, device));
        let name = ServerName::IpAddress(gateway.ip().into());
        let tls = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
            .await
            .expect("handshake deadline")
            .expect("TLS handshake");
        Raw {
            tls,
            buf: BytesMut::new(),
        }
    }

    /// Opens TLS and completes an MQTT CONNECT as `device`; panics if refused.
    pub async fn connect(site: &Site, device: &str, gateway: SocketAddr) -> Raw {
        let connect = rumqttc::mqttbytes::v4::Connect::new(device);
        Raw::connect_with(site, gateway, connect).await.0
    }

    /// Opens TLS with the certificate of `connect`'s client id and sends `connect`; panics
    /// if refused. Returns the connection and CONNACK's session-present flag.
    pub async fn connect_with(
        site: &Site,
        gateway: SocketAddr,
        connect: rumqttc::mqttbytes::v4::Connect,
    ) -> (Raw, bool) {
        let device = connect.client_id.clone();
        let mut raw = Raw::open(site, &device, gateway, None).await;
        raw.send(&RawPacket::Connect(connect)).await;
        match raw.recv().await {
            Some(RawPacket::ConnAck(a)) if a.code == ConnectReturnCode::Success => {
                (raw, a.session_present)
            }
            other => panic!("CONNECT of {device} refused: {other:?}"),
        }
    }

    pub async fn send(&mut self, packet: &RawPacket) {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).expect("encode");
        self.send_bytes(&out).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The peer may already have closed; what matters is what the test reads next.
        let _ = self.tls.write_all(bytes).await;
        let _ = self.tls.flush().await;
    }

    /// The next packet, or `None` once the gateway has closed the connection.
    pub async fn recv(&mut self) -> Option<RawPacket> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if !self.buf.is_empty() {
                    match RawPacket::read(&mut self.buf, 1 << 20) {
                        Ok(p) => return Some(p),
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                        Err(e) => panic!("gateway sent a malformed packet: {e}"),
                    }
                }
                match self.tls.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("neither a packet nor a close before the deadline")
    }

    /// Reads raw bytes until the gateway closes the connection; returns them.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut all = self.buf.split().to_vec();
        let mut chunk = [0u8; 1024];
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => all.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("gateway did not close the connection before the deadline");
        all
    }

    /// Waits until the gateway closes the connection, ignoring packets on the way.
    pub async fn expect_closed(&mut self) {
        while self.recv().await.is_some() {}
    }
}
