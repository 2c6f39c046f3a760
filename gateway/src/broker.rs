//! The embedded broker: rumqttd, plain MQTT on loopback only, behind the edge.
//!
//! rumqttd's `Broker::start` blocks and owns its runtimes, so it runs on a named thread.
//! If that thread ever returns (rumqttd could not bind, or crashed), the process exits with
//! [`crate::exit::BROKER_DIED`] and systemd restarts it: a gateway without its broker must not keep
//! accepting devices.
//!
//! Port 0 in the configuration means "pick a free loopback port": the port is reserved by
//! binding and releasing it, then confirmed by an MQTT handshake with what listens there,
//! so traffic is never relayed to something that is not a broker.
//!
//! Only the gateway's own clients and the update agent may connect: credentials are made
//! afresh at every start. The gateway's clients (the edge's device sessions, command
//! delivery, Modbus, the update relay) share one that never leaves the process
//! ([`EmbeddedBroker::login`]); the agent's is written to `[broker] agent_credentials`
//! (0600, replaced atomically) and may only open sessions whose client id starts with `_`,
//! which no device id can, so it can never take over a device's session. Any other CONNECT
//! is refused (the connection is closed without a CONNACK) and audited
//! (`broker.auth_refused`, at most one record per [`REFUSAL_AUDIT_INTERVAL`] with the count
//! of the others), whether or not `[firewall]` is configured.
//!
//! Tested end to end by every system test (all device traffic crosses it).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login as MqttLogin, Packet};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::BrokerConfig;
use crate::mqtt;

/// How long the broker may take to answer its first CONNECT.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// The probe's client id cannot collide with a device: device ids start alphanumeric.
const PROBE_CLIENT_ID: &str = "_wardgate-probe";
/// Slack over the largest payload for topic and header bytes.
const PACKET_OVERHEAD: usize = 64 * 1024 + 8;
/// The username of the gateway's own clients.
const GATEWAY_USER: &str = "_wardgate";
/// The username of the update agent.
pub const AGENT_USER: &str = "_wardgate-agent";
/// Refused CONNECTs are audited at most once in this interval, with a count of the others.
pub const REFUSAL_AUDIT_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reserve a loopback port for the broker: {0}")]
    Reserve(#[source] std::io::Error),
    #[error("cannot start the broker thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the embedded broker at {addr} did not become ready: {detail}")]
    NotReady { addr: SocketAddr, detail: String },
    #[error("cannot make the broker's credentials: {0}")]
    Random(String),
    #[error("cannot write the update agent's broker credentials to {path}")]
    AgentCredentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A username and the password made for it at this start.
#[derive(Clone)]
pub struct Login {
    username: &'static str,
    password: Arc<str>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Login({}, <redacted>)", self.username)
    }
}

impl Login {
    fn make(username: &'static str) -> Result<Login, BrokerError> {
        use ring::rand::SecureRandom;
        let mut secret = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| BrokerError::Random("no randomness".into()))?;
        let password = hex::encode(secret);
        Ok(Login {
            username,
            password: password.into(),
        })
    }

    /// The CONNECT login field for this user.
    pub fn mqtt(&self) -> MqttLogin {
        MqttLogin::new(self.username, &*self.password)
    }

    /// Whether `password` is this user's, in constant time.
    fn verifies(&self, password: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.password.as_bytes().ct_eq(password.as_bytes()).into()
    }
}

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
    /// The credentials of the gateway's own clients.
    pub login: Login,
}

/// Who may connect: the gateway's clients, and the agent with a `_` client id.
#[derive(Debug)]
struct Gatekeeper {
    gateway: Login,
    agent: Login,
    refusals: Mutex<Refusals>,
    events: crate::events::Events,
}

/// Refusals since the last audit record about them.
#[derive(Debug, Default)]
struct Refusals {
    last_audit: Option<Instant>,
    unaudited: u64,
}

impl Gatekeeper {
    fn admits(&self, client_id: &str, username: &str, password: &str) -> bool {
        let ok = if username == self.gateway.username {
            self.gateway.verifies(password)
        } else if username == self.agent.username {
            self.agent.verifies(password) && client_id.starts_with('_')
        } else {
            false
        };
        if !ok {
            self.refused(client_id, username);
        }
        ok
    }

    fn refused(&self, client_id: &str, username: &str) {
        let mut r = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let due = r
            .last_audit
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_AUDIT_INTERVAL);
        let others = if due {
            r.last_audit = Some(now);
            Some(std::mem::take(&mut r.unaudited))
        } else {
            r.unaudited += 1;
            None
        };
        drop(r);
        self.events.broker_auth_refused(client_id, username, others);
    }
}

/// Writes the agent's credentials (`username:password`) to `path`, replacing any
/// previous ones atomically, readable by the owner only.
fn write_agent_credentials(path: &Path, login: &Login) -> Result<(), BrokerError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| BrokerError::AgentCredentials {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(err)?;
        }
    }
    let line = format!("{}:{}\n", login.username, login.password);
    crate::fsutil::write_private(path, line.as_bytes()).map_err(err)
}

/// Starts rumqttd and waits until it answers an MQTT CONNECT.
pub async fn start(
    cfg: &BrokerConfig,
    max_payload: u64,
    events: crate::events::Events,
) -> Result<EmbeddedBroker, BrokerError> {
    let mut addr = cfg.listen;
    if addr.port() == 0 {
        let l = TcpListener::bind(addr).map_err(BrokerError::Reserve)?;
        addr = l.local_addr().map_err(BrokerError::Reserve)?;
    }
    let gatekeeper = Arc::new(Gatekeeper {
        gateway: Login::make(GATEWAY_USER)?,
        agent: Login::make(AGENT_USER)?,
        refusals: Mutex::default(),
        events,
    });
    write_agent_credentials(&cfg.agent_credentials, &gatekeeper.agent)?;
    let login = gatekeeper.gateway.clone();
    let max_payload = usize::try_from(max_payload).unwrap_or(usize::MAX);
    let mut config = rumqttd_config(cfg, addr, max_payload.saturating_add(PACKET_OVERHEAD));
    for server in config.v4.iter_mut().flat_map(|s| s.values_mut()) {
        let gatekeeper = gatekeeper.clone();
        server.set_auth_handler(
            move |client_id: String, username: String, password: String| {
                std::future::ready(gatekeeper.admits(&client_id, &username, &password))
            },
        );
    }
    std::thread::Builder::new()
        .name("wardgate-broker".into())
        .spawn(move || {
            let result = rumqttd::Broker::new(config).start();
            tracing::error!(
                event = "broker.exited",
                result = ?result,
                "embedded broker stopped; exiting so that the service manager restarts wardgate"
            );
            std::process::exit(i32::from(crate::exit::BROKER_DIED));
        })
        .map_err(BrokerError::Thread)?;
    wait_ready(addr, &login).await?;
    tracing::info!(event = "broker.ready", %addr, "embedded broker ready on loopback");
    Ok(EmbeddedBroker { addr, login })
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
async fn wait_ready(addr: SocketAddr, login: &Login) -> Result<(), BrokerError> {
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    let mut pause = Duration::from_millis(5);
    loop {
        let last = match probe(addr, login).await {
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

async fn probe(addr: SocketAddr, login: &Login) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(PROBE_CLIENT_ID);
    connect.login = Some(login.mqtt());
    connect.write(&mut out).map_err(|e| e.to_string())?;
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
    broker: &EmbeddedBroker,
    client_id: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> rumqttc::AsyncClient {
    session(broker, client_id, None, shutdown).0
}

/// Like [`local_session`], subscribed (again after every reconnect) to `filter` at QoS 1;
/// what arrives comes out of the receiver.
pub fn local_subscriber(
    broker: &EmbeddedBroker,
    client_id: &str,
    filter: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::sync::mpsc::Receiver<rumqttc::Publish> {
    session(broker, client_id, Some(filter.to_owned()), shutdown).1
}

fn session(
    broker: &EmbeddedBroker,
    client_id: &str,
    filter: Option<String>,
    shutdown: tokio_util::sync::CancellationToken,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::Receiver<rumqttc::Publish>,
) {
    use rumqttc::{Event, Packet};
    let addr = broker.addr;
    let mut o = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_credentials(broker.login.username, &*broker.login.password);
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
