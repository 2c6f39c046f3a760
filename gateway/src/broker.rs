//! The embedded broker: rumqttd, plain MQTT on loopback only, behind the edge.
//!
//! rumqttd's `Broker::start` blocks and owns its runtimes, so it runs on a named thread.
//! If that thread ever returns (rumqttd could not bind, or crashed), the process exits with
//! [`BROKER_DIED_EXIT`] and systemd restarts it: a gateway without its broker must not keep
//! accepting devices.
//!
//! Port 0 in the configuration means "pick a free loopback port": the port is reserved by
//! binding and releasing it, then confirmed by an MQTT handshake with what listens there,
//! so traffic is never relayed to something that is not a broker.
//!
//! Tested end to end by every system test (all device traffic crosses it).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::BrokerConfig;
use crate::mqtt;

/// Exit status when the embedded broker stops (EX_SOFTWARE).
pub const BROKER_DIED_EXIT: i32 = 70;
/// How long the broker may take to answer its first CONNECT.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// The probe's client id cannot collide with a device: device ids start alphanumeric.
const PROBE_CLIENT_ID: &str = "_wardgate-probe";
/// Slack over the largest payload for topic and header bytes.
const PACKET_OVERHEAD: usize = 64 * 1024 + 8;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reserve a loopback port for the broker: {0}")]
    Reserve(#[source] std::io::Error),
    #[error("cannot start the broker thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the embedded broker at {addr} did not become ready: {detail}")]
    NotReady { addr: SocketAddr, detail: String },
}

/// A running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

/// Starts rumqttd and waits until it answers an MQTT CONNECT.
pub async fn start(cfg: &BrokerConfig, max_payload: u64) -> Result<EmbeddedBroker, BrokerError> {
    let mut addr = cfg.listen;
    if addr.port() == 0 {
        let l = TcpListener::bind(addr).map_err(BrokerError::Reserve)?;
        addr = l.local_addr().map_err(BrokerError::Reserve)?;
    }
    let max_payload = usize::try_from(max_payload).unwrap_or(usize::MAX);
    let config = rumqttd_config(cfg, addr, max_payload.saturating_add(PACKET_OVERHEAD));
    std::thread::Builder::new()
        .name("wardgate-broker".into())
        .spawn(move || {
            let result = rumqttd::Broker::new(config).start();
            tracing::error!(
                event = "broker.exited",
                result = ?result,
                "embedded broker stopped; exiting so that the service manager restarts wardgate"
            );
            std::process::exit(BROKER_DIED_EXIT);
        })
        .map_err(BrokerError::Thread)?;
    wait_ready(addr).await?;
    tracing::info!(event = "broker.ready", %addr, "embedded broker ready on loopback");
    Ok(EmbeddedBroker { addr })
}

fn rumqttd_config(cfg: &BrokerConfig, listen: SocketAddr, max_packet: usize) -> Config {
    let segment_size = usize::try_from(cfg.segment_size).unwrap_or(usize::MAX);
    let server = ServerSettings {
        name: "wardgate-broker".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: max_packet,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: segment_size.max(max_packet),
            max_segment_count: cfg.segment_count,
            ..RouterConfig::default()
        },
        v4: Some([("edge".to_owned(), server)].into_iter().collect()),
        ..Config::default()
    }
}

/// Retries an MQTT handshake with the broker until it succeeds or the deadline passes.
async fn wait_ready(addr: SocketAddr) -> Result<(), BrokerError> {
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    let mut pause = Duration::from_millis(5);
    loop {
        let last = match probe(addr).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(BrokerError::NotReady { addr, detail: last });
        }
        // rumqttd binds on its own thread and gives no signal; poll with a growing pause.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

async fn probe(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    Connect::new(PROBE_CLIENT_ID)
        .write(&mut out)
        .map_err(|e| e.to_string())?;
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let answer = tokio::time::timeout(
        Duration::from_secs(2),
        mqtt::read_packet(&mut s, &mut buf, 1024),
    )
    .await
    .map_err(|_| "no CONNACK".to_owned())?
    .map_err(|e| e.to_string())?;
    match answer {
        Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
            out.clear();
            let _ = Packet::Disconnect.write(&mut out, 16);
            let _ = s.write_all(&out).await;
            Ok(())
        }
        Some(other) => Err(format!("unexpected answer {other:?}")),
        None => Err("closed before CONNACK".into()),
    }
}

/// A session of the gateway's own on the embedded broker (to deliver commands, publish
/// polled values), kept and re-made by a task until `shutdown`. `client_id` must start
/// with `_`, which no device id can.
pub fn local_session(
    broker: SocketAddr,
    client_id: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> rumqttc::AsyncClient {
    session(broker, client_id, None, shutdown).0
}

/// Like [`local_session`], subscribed (again after every reconnect) to `filter` at QoS 1;
/// what arrives comes out of the receiver.
pub fn local_subscriber(
    broker: SocketAddr,
    client_id: &str,
    filter: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::sync::mpsc::Receiver<rumqttc::Publish> {
    session(broker, client_id, Some(filter.to_owned()), shutdown).1
}

fn session(
    broker: SocketAddr,
    client_id: &str,
    filter: Option<String>,
    shutdown: tokio_util::sync::CancellationToken,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::Receiver<rumqttc::Publish>,
) {
    use rumqttc::{Event, Packet};
    let mut o = rumqttc::MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 256);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let id = client_id.to_owned();
    let sub = client.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = eventloop.poll() => match r {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(f) = &filter {
                            if let Err(e) = sub.try_subscribe(f.as_str(), rumqttc::QoS::AtLeastOnce) {
                                tracing::error!(event = "broker.local_subscribe_failed", client = id, error = %e);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if filter.is_some() => {
                        // The receiver is gone only at shutdown.
                        let _ = tx.send(p).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(event = "broker.local_link_failed", client = id, error = %e, "local broker link lost; retrying");
                        // rumqttc reconnects on the next poll; pause so a dead broker is not spun on.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    });
    (client, rx)
}
