//! The edge: the only listener devices reach.
//!
//! It terminates TLS itself (rustls, client certificate required), binds each connection to
//! the device named by the certificate's CN, checks the MQTT CONNECT against the registry,
//! and serves the session, inspecting every packet the device sends: PUBLISH must fit the
//! device's ACL (judged by [`crate::ingest`]) and hold no wildcards, packets must fit the
//! class's size limit; anything else closes the connection and is logged as a security
//! event ([`crate::events`]). A SUBSCRIBE filter outside the ACL is answered 0x80 in its
//! place in the SUBACK (the broker sees only the allowed ones), audited, and counted
//! towards quarantine; the session goes on. The edge itself answers CONNECT, PINGREQ and durable QoS 1
//! PUBLISH and keeps the device's keepalive; the embedded broker on loopback sees a device
//! only from its first packet that needs it (see [`sessions`]). Packets are decoded and
//! re-encoded, never passed through raw, so the broker sees exactly what was checked.
//!
//! Invariants:
//! - every handshake runs in its own task under a timeout, so a stalled client never
//!   delays another;
//! - the TLS material can be reloaded at any time ([`EdgeHandle::reload_tls`]); connections
//!   that no longer verify (newly revoked, expired) are closed at once.
//!
//! Tested by the system tests in `tests/system/edge.rs` against real clients.

mod broker_side;
mod exactly_once;
mod forward;
mod inbound;
mod outbound;
mod relay;
mod session;
mod sessions;
mod suback;
mod subscriptions;
pub mod tls;
mod unidentified;
mod v5;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::EdgeConfig;
use crate::device::DeviceId;
use crate::events::{Events, Refusal};
use crate::ingest::Ingest;
use crate::quarantine::Quarantine;
use crate::registry::SharedRegistry;
use tls::{TlsError, TlsMaterial};

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// A live device connection, as the reload path sees it.
#[derive(Debug)]
struct LiveConn {
    device: DeviceId,
    peer: SocketAddr,
    chain: Vec<CertificateDer<'static>>,
    close: CancellationToken,
    /// Set before `close` when a newer connection of the device takes its session over.
    taken_over: Arc<std::sync::atomic::AtomicBool>,
}

/// State shared by the accept loop, the sessions and the reload path.
#[derive(Debug)]
struct EdgeShared {
    config: EdgeConfig,
    tls: RwLock<Arc<TlsMaterial>>,
    registry: SharedRegistry,
    broker: crate::broker::EmbeddedBroker,
    /// The door into the spool: a PUBLISH (or will) against policy, or one the uplink
    /// could not forward, is refused there.
    ingest: Ingest,
    quarantine: Arc<Quarantine>,
    events: Events,
    /// A device throttled without pause for this long is quarantined.
    throttle_limit: Option<std::time::Duration>,
    rates: crate::policy::DeviceRates,
    subscriptions: subscriptions::Subscriptions,
    /// Refusals of peers without a device certificate, summarised per source.
    unidentified: unidentified::Unidentified,
    /// QoS 2 packet identifiers awaiting PUBREL, per device.
    exactly_once: exactly_once::ExactlyOnce,
    /// Each device's session: its rights, whether it persists, whether the broker holds
    /// part of it.
    sessions: sessions::Sessions,
    /// Device connections attached to the embedded broker now.
    attached: AtomicUsize,
    live: Mutex<HashMap<u64, LiveConn>>,
    next_id: AtomicU64,
}

impl EdgeShared {
    fn tls(&self) -> Arc<TlsMaterial> {
        self.tls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveConn>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses a peer that showed no device's certificate: logged every time, audited in
    /// full once per source and interval, summarised after (see [`unidentified`]).
    fn refuse_unidentified(&self, peer: SocketAddr, reason: &Refusal) {
        if self.unidentified.refused(peer.ip()) {
            self.events.connection_refused(peer, None, reason);
        } else {
            self.events.connection_refused_unaudited(peer, None, reason);
        }
    }

    /// Closes every live connection of `device`; returns how many.
    fn close_device(&self, device: &DeviceId) -> usize {
        self.close_others(device, None)
    }

    /// Closes every live connection of `device` but `keep`; returns how many.
    fn close_others(&self, device: &DeviceId, keep: Option<&LiveGuard>) -> usize {
        let live = self.live();
        let mut n = 0;
        for (id, conn) in live.iter().filter(|(_, c)| &c.device == device) {
            if keep.is_some_and(|k| k.id == *id) {
                continue;
            }
            if keep.is_some() {
                conn.taken_over.store(true, Ordering::Relaxed);
            }
            conn.close.cancel();
            n += 1;
        }
        n
    }

    /// Registers a live connection; it is removed when the guard drops.
    fn register(
        self: &Arc<Self>,
        device: DeviceId,
        peer: SocketAddr,
        chain: Vec<CertificateDer<'static>>,
        close: CancellationToken,
    ) -> LiveGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let taken_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.live().insert(
            id,
            LiveConn {
                device,
                peer,
                chain,
                close,
                taken_over: taken_over.clone(),
            },
        );
        LiveGuard {
            shared: self.clone(),
            id,
            taken_over,
        }
    }
}

struct LiveGuard {
    shared: Arc<EdgeShared>,
    id: u64,
    taken_over: Arc<std::sync::atomic::AtomicBool>,
}

impl LiveGuard {
    /// Set when a newer connection of the device took this one's session over.
    fn taken_over(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.taken_over.clone()
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.shared.live().remove(&self.id);
    }
}

/// A bound edge listener, not yet accepting.
#[derive(Debug)]
pub struct Edge {
    listener: TcpListener,
    shared: Arc<EdgeShared>,
}

/// A handle for operations on a running edge.
#[derive(Debug, Clone)]
pub struct EdgeHandle {
    shared: Arc<EdgeShared>,
}

impl Edge {
    /// Loads the TLS material and binds the listener.
    #[allow(clippy::too_many_arguments)]
    pub async fn bind(
        config: EdgeConfig,
        ingest: Ingest,
        registry: SharedRegistry,
        broker: crate::broker::EmbeddedBroker,
        quarantine: Arc<Quarantine>,
        throttle_limit: Option<std::time::Duration>,
        events: Events,
    ) -> Result<Edge, EdgeError> {
        let tls = tls::load(&config)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EdgeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Edge {
            listener,
            shared: Arc::new(EdgeShared {
                config,
                tls: RwLock::new(Arc::new(tls)),
                registry,
                broker,
                ingest,
                quarantine,
                events,
                throttle_limit,
                rates: crate::policy::DeviceRates::default(),
                subscriptions: subscriptions::Subscriptions::default(),
                sessions: sessions::Sessions::default(),
                attached: AtomicUsize::new(0),
                exactly_once: exactly_once::ExactlyOnce::default(),
                unidentified: unidentified::Unidentified::default(),
                live: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn handle(&self) -> EdgeHandle {
        EdgeHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts connections until `shutdown` is cancelled. Sessions run on `tracker` and
    /// end when `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let limit = Arc::new(Semaphore::new(self.shared.config.max_connections));
        tracker.spawn(summarise_refusals(self.shared.clone(), shutdown.clone()));
        let progress = self.shared.events.progress().clone();
        progress.edge_accepting(true);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or similar: keep serving the connections we have,
                    // and pause so that a persistent error does not spin this loop.
                    tracing::warn!(event = "edge.accept_failed", error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                self.shared
                    .refuse_unidentified(peer, &Refusal::TooManyConnections);
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                session::serve(shared, tcp, peer, shutdown).await;
                drop(permit);
            });
        }
        progress.edge_accepting(false);
    }
}

/// Every `[edge] refusal_summary`, audits what the interval left unaudited.
async fn summarise_refusals(shared: Arc<EdgeShared>, shutdown: CancellationToken) {
    let every = shared.config.refusal_summary;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        for (source, count) in shared.unidentified.end_interval() {
            shared.events.refusals_summarised(source, count, every);
        }
        if stop {
            return;
        }
    }
}

impl EdgeHandle {
    /// Closes every live connection of `device`; returns how many.
    pub fn close_device(&self, device: &DeviceId) -> usize {
        self.shared.close_device(device)
    }

    /// How many device connections are attached to the embedded broker now (the others
    /// need no broker session: see [`sessions`]).
    pub fn broker_sessions(&self) -> usize {
        self.shared.attached.load(Ordering::Relaxed)
    }

    /// The live device connections: device and peer address.
    pub fn connected(&self) -> Vec<(DeviceId, SocketAddr)> {
        let mut v: Vec<_> = self
            .shared
            .live()
            .values()
            .map(|c| (c.device.clone(), c.peer))
            .collect();
        v.sort();
        v
    }

    /// Reloads CA, CRL and server certificate from their files. On failure the previous
    /// material stays in force. Live connections whose certificate chain no longer
    /// verifies are closed. Returns how many were closed.
    pub fn reload_tls(&self) -> Result<usize, TlsError> {
        let material = match tls::load(&self.shared.config) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                self.shared.events.tls_reload_failed(&e);
                return Err(e);
            }
        };
        let previous = std::mem::replace(
            &mut *self
                .shared
                .tls
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            material.clone(),
        );
        let pki_dir = self
            .shared
            .config
            .ca
            .parent()
            .unwrap_or(std::path::Path::new("."));
        for serial in material.revoked.difference(&previous.revoked) {
            let device = crate::pki::device_of_serial(pki_dir, serial);
            self.shared
                .events
                .certificate_revoked(serial, device.as_deref());
        }
        let now = UnixTime::now();
        let mut closed = 0;
        for conn in self.shared.live().values() {
            let Some((end_entity, intermediates)) = conn.chain.split_first() else {
                continue;
            };
            if let Err(e) = material
                .verifier
                .verify_client_cert(end_entity, intermediates, now)
            {
                self.shared
                    .events
                    .live_connection_revoked(conn.peer, &conn.device, &e.to_string());
                conn.close.cancel();
                closed += 1;
            }
        }
        self.shared.events.tls_reloaded(material.crl_count, closed);
        Ok(closed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}
