//! One device connection, from TCP accept to close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, Publish, SubAck,
    SubscribeReasonCode,
};
use rumqttc::mqttbytes::{PacketType, Protocol, QoS};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::sessions::SessionAsk;
use super::v5::{self, Granted, PubCode};
use super::EdgeShared;
use crate::device::DeviceId;
use crate::events::{Refusal, Violation};
use crate::ingest::{Message, Refused};
use crate::mqtt::{self, ReadError, PUBLISH_OVERHEAD};
use crate::pki::cert;
use crate::policy::Offence;
use crate::policy::{Admission, TopicFilter};
use crate::registry::Grant;
use crate::spool::{Durable, Properties, Spool};

/// Largest CONNECT accepted before the device's class is known: a will message of up to
/// this size plus client id and credentials.
const MAX_CONNECT: usize = 64 * 1024 + PUBLISH_OVERHEAD;
/// How long a close_notify or a refusal CONNACK may take to leave.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the embedded broker may take to accept a session and answer its CONNECT.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

type DeviceStream = TlsStream<TcpStream>;

pub(super) async fn serve(
    shared: Arc<EdgeShared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(shared.tls().server_config.clone());
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        h = timeout(shared.config.handshake_timeout, acceptor.accept(tcp)) => h,
    };
    let mut tls = match handshake {
        Err(_) => return shared.refuse_unidentified(peer, &Refusal::HandshakeTimeout),
        Ok(Err(e)) => return shared.refuse_unidentified(peer, &Refusal::Tls(e.to_string())),
        Ok(Ok(tls)) => tls,
    };
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let device = match chain.first().map(cert::device_id) {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            let r = Refusal::BadCertificate(e.to_string());
            shared.refuse_unidentified(peer, &r);
            return close(tls).await;
        }
        None => {
            // Unreachable with a verifier that requires a certificate; refuse regardless.
            let r = Refusal::BadCertificate("no client certificate".into());
            shared.refuse_unidentified(peer, &r);
            return close(tls).await;
        }
    };

    // Registered from here on, before any decision about it: a quarantine, a removal or a
    // CRL reload from now on closes it, and `admit` below sees whatever came before.
    let close_token = shutdown.child_token();
    let _live = shared.register(device.clone(), peer, chain.clone(), close_token.clone());

    let mut buf = BytesMut::new();
    let connect = tokio::select! {
        _ = close_token.cancelled() => return close(tls).await,
        c = timeout(shared.config.connect_timeout, read_connect(&mut tls, &mut buf, &device)) => c,
    };
    let (connect, dialect) = match connect {
        Err(_) => {
            shared
                .events
                .connection_refused(peer, Some(&device), &Refusal::ConnectTimeout);
            return close(tls).await;
        }
        Ok(Err((refusal, v5))) => {
            shared
                .events
                .connection_refused(peer, Some(&device), &refusal);
            let reply = match (&refusal, v5) {
                (_, true) => Some(v5::connack_refused(&refusal).to_vec()),
                (Refusal::UnsupportedProtocol { .. }, false) => {
                    Some(connack(ConnectReturnCode::RefusedProtocolVersion))
                }
                _ => None,
            };
            if let Some(reply) = reply {
                let _ = timeout(CLOSE_TIMEOUT, tls.write_all(&reply)).await;
            }
            return close(tls).await;
        }
        Ok(Ok(c)) => c,
    };

    let grant = match admit(&shared, &device, peer, &chain, &connect) {
        Ok(g) => g,
        Err((refusal, code)) => {
            shared
                .events
                .connection_refused(peer, Some(&device), &refusal);
            let reply = match &dialect {
                Dialect::V4 => connack(code),
                Dialect::V5(_) => v5::connack_refused(&refusal).to_vec(),
            };
            let _ = timeout(CLOSE_TIMEOUT, tls.write_all(&reply)).await;
            return close(tls).await;
        }
    };

    // One connection per client id: a new one takes over (MQTT-3.1.4-2).
    shared.close_others(&device, Some(&_live));
    let asked = dialect.session(&connect);
    let opening = shared.sessions.open(&device, &grant.acl, asked.clone());
    if asked.clean_start || opening.stale {
        shared.exactly_once.clean(&device);
    }
    let mut connect = connect;
    connect.clean_session = asked.broker_clean();
    let mut broker = None;
    let present = if opening.attach {
        if opening.stale || opening.discard {
            purge_session(&shared, &device, &grant.class, opening.stale).await;
        }
        match connect_broker(&shared.broker, &connect).await {
            Ok((
                stream,
                ConnAck {
                    code: ConnectReturnCode::Success,
                    session_present,
                },
                backlog,
            )) => {
                broker = Some((stream, backlog));
                session_present
            }
            Ok((_, ConnAck { code, .. }, _)) if matches!(dialect, Dialect::V4) => {
                // The broker's own refusal, as it gave it.
                let _ = timeout(CLOSE_TIMEOUT, tls.write_all(&connack(code))).await;
                return close(tls).await;
            }
            result => {
                let e = match result {
                    Err(e) => e,
                    Ok((_, a, _)) => format!("broker refused the session: {:?}", a.code),
                };
                let refusal = Refusal::BrokerUnavailable(e);
                shared
                    .events
                    .connection_refused(peer, Some(&device), &refusal);
                let reply = match &dialect {
                    Dialect::V4 => connack(ConnectReturnCode::ServiceUnavailable),
                    Dialect::V5(_) => v5::connack_refused(&refusal).to_vec(),
                };
                let _ = timeout(CLOSE_TIMEOUT, tls.write_all(&reply)).await;
                return close(tls).await;
            }
        }
    } else {
        if opening.stale {
            shared.events.session_purged(&device, &grant.class, None);
        }
        opening.present
    };
    let max_packet = grant.max_payload.saturating_add(PUBLISH_OVERHEAD);
    let limits = v5::Limits {
        receive_maximum: grant.receive_maximum,
        topic_alias_maximum: grant.topic_alias_maximum,
    };
    let connack = match &dialect {
        Dialect::V4 => {
            let mut out = BytesMut::new();
            let _ = Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, present))
                .write(&mut out, usize::MAX);
            out
        }
        Dialect::V5(a) => v5::connack(present, max_packet, limits, a, device.as_str()),
    };

    let will = connect.last_will.as_ref().and_then(|w| {
        let props = match &dialect {
            Dialect::V5(a) => a.will.as_ref(),
            Dialect::V4 => None,
        };
        hold_will(&shared, &device, &grant, w, props)
    });
    shared.events.device_connected(peer, &device, &grant.class);
    let ended = relay(
        Relay {
            shared: &shared,
            device: &device,
            peer,
            grant: &grant,
            connect: &connect,
            dialect: &dialect,
            close: close_token,
            taken_over: _live.taken_over(),
            shutdown: &shutdown,
        },
        tls,
        buf,
        connack,
        broker,
    )
    .await;
    let failed = !ended.clean && !shutdown.is_cancelled();
    if let Some(key) = will {
        end_will(shared.ingest.spool(), key, &device, !failed);
    }
    // The broker publishes the will of a session it holds; the edge, of one it does not.
    if let (Some(w), true, false) = (&connect.last_will, failed, ended.attached) {
        publish_will_locally(&shared, &device, w).await;
    }
    // An MQTT 5 session that resumed a kept one but does not outlive its connection: the
    // broker's part ends now (the broker had it as persistent) — unless a newer connection
    // took the session over, whose broker session a purge under the same client id would
    // end. A DISCONNECT may change the interval, but not from 0 [MQTT-3.14.2-2].
    let expiry = match ended.session_expiry {
        Some(e) if asked.persistent() => e,
        _ => asked.expiry,
    };
    let purge_now = ended.attached
        && !connect.clean_session
        && expiry == Some(Duration::ZERO)
        && !_live.taken_over().load(Ordering::Relaxed);
    if purge_now {
        purge_session(&shared, &device, &grant.class, false).await;
    }
    shared
        .sessions
        .ended(&device, opening.generation, expiry, purge_now);
    shared
        .events
        .device_disconnected(peer, &device, &ended.reason);
}

/// Stores the will of a CONNECT (already checked by [`admit`]) in the spool, held until
/// the session ends. A will the spool has no room for is not held: the spool has refused
/// and logged it, and the device is still served (its data matters more than its will).
fn hold_will(
    shared: &EdgeShared,
    device: &DeviceId,
    grant: &Grant,
    will: &LastWill,
    properties: Option<&Properties>,
) -> Option<crate::spool::Key> {
    let m = Message {
        topic: &will.topic,
        payload: &will.message,
        qos: will.qos as u8,
        properties,
    };
    shared.ingest.will(device, grant, m).ok()
}

/// The end of a session with a held will: a clean DISCONNECT (or the gateway stopping,
/// which is no failure of the device) deletes it; any other end releases it upstream, as
/// the embedded broker publishes it to local subscribers.
fn end_will(spool: &Spool, key: crate::spool::Key, device: &DeviceId, clean: bool) {
    if clean {
        spool.drop_will(key);
        return;
    }
    match spool.release_will(key) {
        Some(Ok(_)) => {
            tracing::info!(event = "edge.will_released", %device, "last will released upstream");
        }
        Some(Err(e)) => {
            tracing::error!(event = "edge.will_lost", %device, error = %e, "last will could not be released upstream");
        }
        // Evicted meanwhile to make room: the spool has logged it.
        None => {}
    }
}

/// The MQTT version a device speaks, and what an MQTT 5 device asked for.
#[derive(Debug, Clone)]
enum Dialect {
    V4,
    V5(v5::Asked),
}

impl Dialect {
    /// The session the CONNECT asks for, in the terms of [`sessions`](super::sessions).
    fn session(&self, connect: &Connect) -> SessionAsk {
        match self {
            Dialect::V4 => SessionAsk::v4(connect.clean_session),
            Dialect::V5(a) => SessionAsk::v5(connect.clean_session, a.session_expiry),
        }
    }
}

/// Reads the CONNECT, refusing anything but a well-formed MQTT 3.1.1 or 5 one; a refusal
/// says whether it is to be answered in MQTT 5.
async fn read_connect(
    tls: &mut DeviceStream,
    buf: &mut BytesMut,
    device: &DeviceId,
) -> Result<(Connect, Dialect), (Refusal, bool)> {
    let not_connect = |e: &dyn std::fmt::Display| (Refusal::NotConnect(e.to_string()), false);
    let header = match mqtt::read_frame(tls, buf, MAX_CONNECT).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err(not_connect(&"connection closed")),
        Err(e) => return Err(not_connect(&e)),
    };
    if let Some((name, level)) = mqtt::connect_protocol(buf, &header) {
        if name == "MQTT" && level == 5 {
            return v5::connect(buf, MAX_CONNECT, device.as_str())
                .map(|(c, asked)| (c, Dialect::V5(asked)))
                .map_err(|r| (r, true));
        }
        if name != "MQTT" || level != 4 {
            buf.clear();
            return Err((Refusal::UnsupportedProtocol { name, level }, false));
        }
    }
    match Packet::read(buf, MAX_CONNECT) {
        Ok(Packet::Connect(c)) if c.protocol == Protocol::V4 => Ok((c, Dialect::V4)),
        Ok(_) => Err(not_connect(&"the first packet is not a CONNECT")),
        Err(e) => Err(not_connect(&e)),
    }
}

/// The verdict on a CONNECT from `device` at `peer`, under the registry, quarantine and
/// TLS material in force now (a CRL reloaded since the handshake included).
fn admit(
    shared: &EdgeShared,
    device: &DeviceId,
    peer: SocketAddr,
    chain: &[CertificateDer<'static>],
    connect: &Connect,
) -> Result<Grant, (Refusal, ConnectReturnCode)> {
    if let Some((end_entity, intermediates)) = chain.split_first() {
        let now = rustls_pki_types::UnixTime::now();
        if let Err(e) = shared
            .tls()
            .verifier
            .verify_client_cert(end_entity, intermediates, now)
        {
            return Err((
                Refusal::Tls(format!("certificate no longer verifies: {e}")),
                ConnectReturnCode::NotAuthorized,
            ));
        }
    }
    if connect.client_id != device.as_str() {
        return Err((
            Refusal::ClientIdMismatch {
                client_id: connect.client_id.clone(),
            },
            ConnectReturnCode::BadClientId,
        ));
    }
    let grant = shared
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .grant(device)
        .ok_or((Refusal::Unregistered, ConnectReturnCode::NotAuthorized))?;
    if let Some(reason) = shared.quarantine.reason(device) {
        return Err((
            Refusal::Quarantined { reason },
            ConnectReturnCode::NotAuthorized,
        ));
    }
    if canonical(peer.ip()) != canonical(grant.address) {
        return Err((
            Refusal::AddressMismatch {
                registered: grant.address,
            },
            ConnectReturnCode::NotAuthorized,
        ));
    }
    if let Some(will) = &connect.last_will {
        let verdict = shared
            .ingest
            .verdict(device, &grant, &will.topic, will.message.len());
        if verdict.is_err() {
            return Err((
                Refusal::WillNotAllowed {
                    topic: will.topic.clone(),
                },
                ConnectReturnCode::NotAuthorized,
            ));
        }
    }
    Ok(grant)
}

/// IPv4-mapped IPv6 addresses (from a dual-stack listener) compare as IPv4.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}

fn connack(code: ConnectReturnCode) -> Vec<u8> {
    let mut out = BytesMut::new();
    // Writing a CONNACK into memory cannot fail.
    let _ = ConnAck::new(code, false).write(&mut out);
    out.to_vec()
}

/// Ends the persistent broker session of `device`, opened under rights it no longer has
/// (it was removed and added again with another class): its subscriptions and queued
/// messages go, so resuming it cannot deliver what the device may no longer read. Done
/// by a clean-session CONNECT and DISCONNECT under its client id, before the device's own
/// CONNECT; if the broker cannot be reached, that CONNECT fails the same way.
/// `stale` says the purge is for that reason (audited); otherwise the device's session asked
/// for it (MQTT 5's Clean Start or Session Expiry Interval), which is only logged.
async fn purge_session(shared: &EdgeShared, device: &DeviceId, class: &str, stale: bool) {
    let mut purge = Connect::new(device.as_str());
    purge.clean_session = true;
    let result = match connect_broker(&shared.broker, &purge).await {
        Ok((mut stream, _, _)) => {
            let mut out = BytesMut::new();
            let _ = Packet::Disconnect.write(&mut out, 16);
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
            // Until the broker has ended the purging session (it closes the socket), the
            // device's own CONNECT under the same client id could be taken for a duplicate
            // and its session ended with the purge's (seen once under load).
            let mut sink = [0u8; 64];
            let _ = timeout(BROKER_TIMEOUT, async {
                while matches!(tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            Ok(())
        }
        Err(e) => Err(e),
    };
    if stale {
        shared
            .events
            .session_purged(device, class, result.as_ref().err());
    } else if let Err(e) = result {
        tracing::warn!(event = "edge.session_not_purged", %device, error = %e, "the broker's part of an ended session could not be purged");
    }
}

/// Opens a session on the embedded broker: the device's CONNECT with the gateway's broker
/// credentials instead of its own (identity is the certificate) and the edge's own
/// keepalive (the edge owns the device's; see [`BROKER_KEEPALIVE`]). Returns the
/// connection, the broker's CONNACK, and whatever the broker sent after it (a resumed
/// session's queued messages, for the device).
async fn connect_broker(
    broker: &crate::broker::EmbeddedBroker,
    connect: &Connect,
) -> Result<(TcpStream, ConnAck, BytesMut), String> {
    let mut stream = timeout(BROKER_TIMEOUT, TcpStream::connect(broker.addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut c = connect.clone();
    c.login = Some(broker.login.mqtt());
    c.keep_alive = BROKER_KEEPALIVE;
    let mut out = BytesMut::new();
    c.write(&mut out).map_err(|e| e.to_string())?;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let connack = timeout(
        BROKER_TIMEOUT,
        mqtt::read_packet(&mut stream, &mut buf, MAX_CONNECT),
    )
    .await
    .map_err(|_| "no CONNACK from the broker".to_owned())?
    .map_err(|e| e.to_string())?;
    match connack {
        Some(Packet::ConnAck(a)) => Ok((stream, a, buf)),
        Some(other) => Err(format!("broker answered CONNECT with {other:?}")),
        None => Err("broker closed the connection".into()),
    }
}

/// The keepalive of a device's broker session, in seconds. The edge keeps the device's
/// own keepalive itself (any value, 0 included) and pings the broker after
/// [`BROKER_PING`] without writing to it, so the broker never ends a session the device
/// keeps alive with traffic the broker does not see.
const BROKER_KEEPALIVE: u16 = 600;
const BROKER_PING: Duration = Duration::from_secs(BROKER_KEEPALIVE as u64 / 2);

/// Packets read from a device and not yet handled (waiting for their records to become
/// durable). Bounds what one device can have in flight.
const PIPELINE_DEPTH: usize = 64;

/// What goes to the device besides the broker's packets, in the order decided.
enum ToDevice {
    /// The edge's acknowledgement of a QoS 1 PUBLISH: durable, or (MQTT 5) refused with
    /// the code.
    PubAck(u16, PubCode),
    /// The edge's refusal of a QoS 2 PUBLISH (MQTT 5).
    PubRec(u16, PubCode),
    PingResp,
    /// The session was attached to the broker: its packets (and what it sent after its
    /// CONNACK) go to the device from here on.
    Attached(OwnedReadHalf, BytesMut),
    /// The edge's answer to a SUBSCRIBE whose every filter it refused.
    SubAck(u16, Vec<Granted>),
}

/// A packet from the device on its way to [`relay`]'s forwarding half.
struct FromInbound {
    packet: Packet,
    durable: Option<Durable>,
    refused: RefusedFilters,
    /// An MQTT 5 PUBLISH refused with the session kept: answered with this code and
    /// passed no further.
    answer: Option<PubCode>,
    /// An MQTT 5 DISCONNECT's reason code and Session Expiry Interval.
    disconnect: Option<(v5::Reason, Option<u32>)>,
}

/// The filters of a SUBSCRIBE refused by the device's ACL: where they stood in it, and
/// what they were.
#[derive(Debug, Default)]
struct RefusedFilters {
    positions: Vec<usize>,
    /// Of the packet as the device sent it.
    total: usize,
    filters: Vec<String>,
}

/// Takes the filters `grant` does not allow out of `s` (syntax checked by [`inspect`]).
fn refuse_filters(s: &mut rumqttc::mqttbytes::v4::Subscribe, grant: &Grant) -> RefusedFilters {
    let mut refused = RefusedFilters {
        total: s.filters.len(),
        ..RefusedFilters::default()
    };
    let mut i = 0;
    s.filters.retain(|f| {
        let allowed = TopicFilter::parse(&f.path).is_ok_and(|t| grant.acl.may_subscribe(&t));
        if !allowed {
            refused.positions.push(i);
            refused.filters.push(f.path.clone());
        }
        i += 1;
        allowed
    });
    refused
}

/// What a SUBACK says of each filter of a SUBSCRIBE as the device sent it: the broker's
/// codes for the filters it got, in order, and the edge's refusals where the others stood
/// (MQTT-3.9.3-1: one return code per filter, in order).
fn granted(broker: Vec<SubscribeReasonCode>, refused: &RefusedFilters) -> Vec<Granted> {
    let mut broker = broker.into_iter();
    let total = refused.total.max(refused.positions.len());
    (0..total)
        .map(|i| match refused.positions.iter().position(|&p| p == i) {
            Some(j)
                if refused
                    .filters
                    .get(j)
                    .is_some_and(|f| f.starts_with("$share/")) =>
            {
                Granted::Shared
            }
            Some(_) => Granted::Refused,
            None => match broker.next() {
                Some(SubscribeReasonCode::Success(q)) => Granted::Qos(q),
                Some(SubscribeReasonCode::Failure) | None => Granted::Failed,
            },
        })
        .collect()
}

/// A 3.1.1 SUBACK saying `granted`: every refusal is 0x80 there.
fn suback_v4(pkid: u16, granted: Vec<Granted>) -> Packet {
    let codes = granted
        .into_iter()
        .map(|g| match g {
            Granted::Qos(q) => SubscribeReasonCode::Success(q),
            _ => SubscribeReasonCode::Failure,
        })
        .collect();
    Packet::SubAck(SubAck::new(pkid, codes))
}

type Narrowed = std::sync::Mutex<std::collections::HashMap<u16, RefusedFilters>>;

/// The broker's SUBACK for a SUBSCRIBE the edge narrowed, with 0x80 put back where the
/// refused filters stood; any other frame as it is (the 3.1.1 path, frames passed raw).
fn widen_suback(frame: BytesMut, narrowed: &Narrowed) -> BytesMut {
    // Every delivery to the device passes here: only a SUBACK takes the lock.
    if frame.first().map(|b| b >> 4) != Some(PacketType::SubAck as u8) {
        return frame;
    }
    let mut map = narrowed.lock().unwrap_or_else(PoisonError::into_inner);
    if map.is_empty() {
        return frame;
    }
    let mut copy = frame.clone();
    let Ok(Packet::SubAck(ack)) = Packet::read(&mut copy, usize::MAX) else {
        return frame;
    };
    let Some(refused) = map.remove(&ack.pkid) else {
        return frame;
    };
    let mut out = BytesMut::new();
    let _ = suback_v4(ack.pkid, granted(ack.return_codes, &refused)).write(&mut out, usize::MAX);
    out
}

/// How a relay ended.
struct Ended {
    reason: String,
    /// The device ended the session with DISCONNECT: its will is not published.
    clean: bool,
    /// The session was attached: the broker publishes its will to local subscribers.
    attached: bool,
    /// The Session Expiry Interval an MQTT 5 DISCONNECT set, if it did.
    session_expiry: Option<Option<Duration>>,
}

/// The writing half of a device's broker session, counted while it lives.
struct Attachment<'a> {
    shared: &'a EdgeShared,
    wr: OwnedWriteHalf,
    out: BytesMut,
}

impl<'a> Attachment<'a> {
    fn new(shared: &'a EdgeShared, wr: OwnedWriteHalf) -> Self {
        shared.attached.fetch_add(1, Ordering::Relaxed);
        Attachment {
            shared,
            wr,
            out: BytesMut::new(),
        }
    }

    async fn write(&mut self, packet: &Packet) -> Result<(), String> {
        self.out.clear();
        packet
            .write(&mut self.out, usize::MAX)
            .map_err(|e| format!("cannot encode for the broker: {e}"))?;
        self.wr
            .write_all(&self.out)
            .await
            .map_err(|e| format!("broker write failed: {e}"))
    }
}

impl Drop for Attachment<'_> {
    fn drop(&mut self) {
        self.shared.attached.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `packet` from a device needs its broker session, attached or not (`attached`).
fn needs_broker(packet: &Packet, attached: bool, shared: &EdgeShared) -> bool {
    match packet {
        // QoS 0 and 1 only for a local subscriber or to be retained; QoS 2 goes through
        // the broker's handshake.
        Packet::Publish(p) => {
            p.qos == QoS::ExactlyOnce || p.retain || shared.subscriptions.wanted(&p.topic)
        }
        Packet::Subscribe(_) | Packet::Unsubscribe(_) | Packet::PubRel(_) => true,
        // Acknowledgements of the broker's deliveries, and the end of its session.
        Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::Disconnect => attached,
        _ => false,
    }
}

/// What a session's relay works with.
struct Relay<'a> {
    shared: &'a EdgeShared,
    device: &'a DeviceId,
    peer: SocketAddr,
    grant: &'a Grant,
    /// As the broker gets it (its clean session flag mapped, see [`SessionAsk`]).
    connect: &'a Connect,
    dialect: &'a Dialect,
    close: CancellationToken,
    /// Set when `close` is cancelled because a newer connection took the session over.
    taken_over: Arc<AtomicBool>,
    shutdown: &'a CancellationToken,
}

/// Counts of QoS 1 and 2 PUBLISHes in flight on an MQTT 5 connection, both ways: the
/// device's not yet answered (at most its class's `receive_maximum`) and the deliveries to it
/// not yet acknowledged (at most its own Receive Maximum: delivery waits for a permit).
struct InFlight {
    /// The edge's Receive Maximum, from the device's class.
    from_device_max: u16,
    from_device: AtomicUsize,
    to_device: AtomicUsize,
    permits: tokio::sync::Semaphore,
}

impl InFlight {
    /// `edge_max` is the edge's Receive Maximum, `device_max` the device's own.
    fn new(edge_max: u16, device_max: u16) -> Self {
        InFlight {
            from_device_max: edge_max,
            from_device: AtomicUsize::new(0),
            to_device: AtomicUsize::new(0),
            permits: tokio::sync::Semaphore::new(device_max.into()),
        }
    }

    /// One more PUBLISH from the device; false if that is past the edge's Receive Maximum.
    fn received(&self) -> bool {
        self.from_device.fetch_add(1, Ordering::Relaxed) < usize::from(self.from_device_max)
    }

    /// A PUBLISH of the device answered (PUBACK, refusing PUBREC, or PUBCOMP).
    fn answered(&self) {
        let _ = self
            .from_device
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The device acknowledged a delivery (PUBACK or PUBCOMP): its permit returns. An
    /// acknowledgement of nothing in flight frees nothing.
    fn acknowledged(&self) {
        if self
            .to_device
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            self.permits.add_permits(1);
        }
    }
}

/// A broker frame as a v5 device gets it.
enum ForV5 {
    Send(BytesMut),
    /// A QoS 1 or 2 delivery: sent once the device's Receive Maximum allows.
    Hold(BytesMut),
    Skip,
}

/// Relays between device and broker until one side ends, a violation, or `close`.
///
/// Every PUBLISH that passes [`inspect`] is appended to the spool; a QoS 1 or 2 one is
/// handled only once its record is durable (QoS 0 does not wait for its own flush). The
/// edge acknowledges QoS 1 itself, in the order received, and answers PINGREQ; the broker
/// sees a packet only if [`needs_broker`] says so, the session being attached at the first
/// such packet. Packets reach the broker in the order the device sent them. An MQTT 5
/// device's packets are translated on the way in and out ([`v5`]); a 3.1.1 device gets the
/// broker's frames as they are.
async fn relay(
    r: Relay<'_>,
    tls: DeviceStream,
    mut buf: BytesMut,
    connack: BytesMut,
    broker: Option<(TcpStream, BytesMut)>,
) -> Ended {
    let Relay {
        shared,
        device,
        peer,
        grant,
        connect,
        dialect,
        close,
        taken_over,
        shutdown,
    } = r;
    let (mut dev_rd, mut dev_wr) = tokio::io::split(tls);
    let was_attached = AtomicBool::new(broker.is_some());
    let (from_broker, to_broker) = match broker {
        Some((stream, backlog)) => {
            let (rd, wr) = stream.into_split();
            (Some((rd, backlog)), Some(Attachment::new(shared, wr)))
        }
        None => (None, None),
    };
    if let Err(e) = dev_wr.write_all(&connack).await {
        return Ended {
            reason: format!("device write failed: {e}"),
            clean: false,
            attached: was_attached.into_inner(),
            session_expiry: None,
        };
    }
    let clean = AtomicBool::new(false);
    let session_expiry = std::sync::Mutex::new(None);
    let keepalive_expired = AtomicBool::new(false);
    // MQTT-3.1.2-24: silent for one and a half keepalives, the device is gone.
    let silence = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let in_flight = match dialect {
        Dialect::V5(a) => Some(InFlight::new(grant.receive_maximum, a.receive_maximum)),
        Dialect::V4 => None,
    };
    let device_max_packet = match dialect {
        Dialect::V5(a) => a.maximum_packet_size.map_or(usize::MAX, |m| m as usize),
        Dialect::V4 => usize::MAX,
    };

    let (tx, mut rx) = tokio::sync::mpsc::channel::<FromInbound>(PIPELINE_DEPTH);
    // SUBSCRIBEs the broker got with some filters taken out: their SUBACKs get the
    // refusals back where those filters were.
    let narrowed = Narrowed::default();
    // MQTT 5: how many filters each UNSUBSCRIBE had (its UNSUBACK has a code for each).
    let unsubscribing = std::sync::Mutex::new(std::collections::HashMap::<u16, usize>::new());
    // Acknowledgements the edge owes the broker for deliveries it could not pass on.
    let (own_tx, mut own_rx) = tokio::sync::mpsc::unbounded_channel::<Packet>();
    let mut throttled: u64 = 0;
    let max_packet = grant.max_payload.saturating_add(PUBLISH_OVERHEAD);
    let inbound = async {
        // Owned by this future, so the forward half sees the channel close once it ends.
        let tx = tx;
        let mut aliases = v5::Aliases::new(grant.topic_alias_maximum);
        loop {
            let read = async {
                match dialect {
                    Dialect::V4 => mqtt::read_packet(&mut dev_rd, &mut buf, max_packet)
                        .await
                        .map(|p| p.map(|p| Ok(v5::FromDevice::plain(p)))),
                    Dialect::V5(_) => {
                        match mqtt::read_frame(&mut dev_rd, &mut buf, max_packet).await {
                            Ok(Some(_)) => Ok(Some(v5::from_device(&mut buf, &mut aliases))),
                            Ok(None) => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                }
            };
            let read = match silence {
                Some(limit) => match timeout(limit, read).await {
                    Ok(r) => r,
                    Err(_) => {
                        keepalive_expired.store(true, Ordering::Relaxed);
                        return Ok(format!(
                            "silent for {} (one and a half keepalives)",
                            humantime::format_duration(limit)
                        ));
                    }
                },
                None => read.await,
            };
            let from = match read {
                Ok(Some(Ok(p))) => p,
                Ok(Some(Err((v, reason)))) => return Err(Stop::Bad(v, reason)),
                Ok(None) => return Ok("device closed the connection".to_owned()),
                Err(ReadError::Io(e)) => return Ok(format!("device read failed: {e}")),
                Err(ReadError::Truncated) => return Ok("device closed mid-packet".to_owned()),
                Err(ReadError::TooLarge { size, max }) => {
                    return Err(Stop::Violation(Violation::OversizedPacket { size, max }))
                }
                Err(ReadError::Malformed(e)) => {
                    return Err(Stop::Violation(Violation::Protocol(e.to_string())))
                }
            };
            let v5::FromDevice {
                mut packet,
                properties,
                disconnect,
            } = from;
            inspect(&packet).map_err(Stop::Violation)?;
            if let (Some(f), Packet::PubAck(_) | Packet::PubComp(_)) = (&in_flight, &packet) {
                f.acknowledged();
            }
            let mut refused = RefusedFilters::default();
            if let Packet::Subscribe(s) = &mut packet {
                // A refused filter gets SUBACK 0x80 (3.1.1) or 0x87 (5) and the session is
                // kept: each is audited and counts towards quarantine.
                refused = refuse_filters(s, grant);
                let answer = match dialect {
                    Dialect::V4 => "suback_0x80",
                    Dialect::V5(_) => "suback_0x87",
                };
                for f in &refused.filters {
                    shared.events.subscribe_refused(peer, device, f, answer);
                    let v = Violation::SubscribeDenied { filter: f.clone() };
                    punish(shared, device, Offence::Violation(&v));
                }
                shared
                    .subscriptions
                    .subscribe(
                        device,
                        s.filters.iter().map(|f| f.path.as_str()),
                        grant.max_subscriptions,
                    )
                    .map_err(|max| Stop::Violation(Violation::TooManySubscriptions { max }))?;
            }
            // Over its rate, the device waits before its next packet is read (backpressure).
            // Each PUBLISH, SUBSCRIBE and UNSUBSCRIBE is one message of its topics' size.
            let cost = match &packet {
                Packet::Publish(p) => Some(
                    p.payload.len() + p.topic.len() + properties.as_ref().map_or(0, |p| p.len()),
                ),
                Packet::Subscribe(s) => Some(s.filters.iter().map(|f| f.path.len()).sum()),
                Packet::Unsubscribe(u) => Some(u.topics.iter().map(String::len).sum()),
                _ => None,
            };
            let admission = cost.map(|size| {
                shared
                    .rates
                    .admit(device, &grant.rate, size, std::time::Instant::now())
            });
            let repeat = match &packet {
                Packet::Publish(p) if p.qos == QoS::ExactlyOnce => {
                    shared.exactly_once.pending(device, p.pkid)
                }
                Packet::PubRel(r) => {
                    shared.exactly_once.released(device, r.pkid);
                    false
                }
                _ => false,
            };
            if let (Some(f), Packet::Publish(p)) = (&in_flight, &packet) {
                if p.qos != QoS::AtMostOnce && !f.received() {
                    return Err(Stop::Violation(Violation::ReceiveMaximum {
                        max: f.from_device_max,
                    }));
                }
            }
            let mut answer = None;
            let durable = match &packet {
                Packet::Publish(p)
                    if properties.as_ref().is_some_and(|m| m.utf8)
                        && std::str::from_utf8(&p.payload).is_err() =>
                {
                    tracing::warn!(event = "edge.payload_format_invalid", %device, topic = %p.topic, "payload marked UTF-8 is not; refused with 0x99");
                    answer = Some(PubCode::PayloadFormatInvalid);
                    None
                }
                // Stored when it first came: acknowledged again, not stored again (but
                // judged again: the answer is the same, and no packet passes unjudged).
                Packet::Publish(p) if repeat => {
                    if let Err(v) = shared
                        .ingest
                        .verdict(device, grant, &p.topic, p.payload.len())
                    {
                        answer = Some(refuse_publish(shared, peer, device, dialect, v)?);
                    }
                    None
                }
                // The one door into the spool: policy, priority, append (memory work only;
                // the spool's writer thread does the disk's).
                Packet::Publish(p) => {
                    let m = Message {
                        topic: &p.topic,
                        payload: &p.payload,
                        qos: p.qos as u8,
                        properties: properties.as_ref(),
                    };
                    match shared.ingest.device(device, grant, m) {
                        Ok(d) => {
                            if p.qos == QoS::ExactlyOnce {
                                shared.exactly_once.stored(device, p.pkid);
                            }
                            Some(d)
                        }
                        Err(Refused::Policy(v)) => {
                            answer = Some(refuse_publish(shared, peer, device, dialect, v)?);
                            None
                        }
                        // QoS 0 has no acknowledgement to withhold; the refusal is counted
                        // and logged by the spool.
                        Err(Refused::Spool(_)) if p.qos == QoS::AtMostOnce => continue,
                        // MQTT 5 has a code for it: 0x97, the session kept.
                        Err(Refused::Spool(_)) if in_flight.is_some() => {
                            answer = Some(PubCode::QuotaExceeded);
                            None
                        }
                        Err(Refused::Spool(e)) => {
                            return Ok(format!("not stored, so not acknowledged: {e}"))
                        }
                    }
                }
                _ => None,
            };
            if answer.is_some() && matches!(&packet, Packet::Publish(p) if p.qos == QoS::AtMostOnce)
            {
                // Nothing to answer a QoS 0 PUBLISH with: it is dropped.
                continue;
            }
            let last = matches!(packet, Packet::Disconnect);
            let item = FromInbound {
                packet,
                durable,
                refused,
                answer,
                disconnect,
            };
            if tx.send(item).await.is_err() {
                return Ok("broker side closed".to_owned());
            }
            if last {
                return Ok("device sent DISCONNECT".to_owned());
            }
            if let Some(Admission {
                wait,
                over_for: Some(over_for),
            }) = admission
            {
                shared.events.throttled(peer, device, wait, throttled == 0);
                throttled += 1;
                if let Some(limit) = shared.throttle_limit {
                    if over_for >= limit {
                        return Err(Stop::HardLimit(limit));
                    }
                }
                tokio::time::sleep(wait).await;
            }
        }
    };
    // The device's side has one writer: the broker's packets and the edge's own replies go
    // to it whole, one after the other.
    let (to_device, mut to_device_rx) = tokio::sync::mpsc::unbounded_channel::<ToDevice>();
    let forward = async {
        let mut broker = to_broker;
        let mut ping_at = Instant::now() + BROKER_PING;
        loop {
            let next = tokio::select! {
                next = rx.recv() => next,
                Some(own) = own_rx.recv(), if broker.is_some() => {
                    if let Some(b) = broker.as_mut() {
                        if let Err(e) = b.write(&own).await {
                            return e;
                        }
                    }
                    continue;
                }
                () = tokio::time::sleep_until(ping_at), if broker.is_some() => {
                    ping_at = Instant::now() + BROKER_PING;
                    if let Some(b) = broker.as_mut() {
                        if let Err(e) = b.write(&Packet::PingReq).await {
                            return e;
                        }
                    }
                    continue;
                }
            };
            let Some(FromInbound {
                packet,
                durable,
                refused,
                answer,
                disconnect,
            }) = next
            else {
                return "device side closed".to_owned();
            };
            if let (Packet::Publish(p), Some(code)) = (&packet, answer) {
                // Refused with the session kept (MQTT 5): answered here, in order.
                let reply = if p.qos == QoS::ExactlyOnce {
                    ToDevice::PubRec(p.pkid, code)
                } else {
                    ToDevice::PubAck(p.pkid, code)
                };
                if let Some(f) = &in_flight {
                    f.answered();
                }
                if to_device.send(reply).is_err() {
                    return "device side closed".to_owned();
                }
                continue;
            }
            if let Packet::Subscribe(s) = &packet {
                if s.filters.is_empty() {
                    // Every filter refused: the edge answers alone.
                    let reply = ToDevice::SubAck(s.pkid, granted(Vec::new(), &refused));
                    if to_device.send(reply).is_err() {
                        return "device side closed".to_owned();
                    }
                    continue;
                }
                if !refused.positions.is_empty() {
                    narrowed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(s.pkid, refused);
                }
            }
            if let (Packet::Unsubscribe(u), Some(_)) = (&packet, &in_flight) {
                unsubscribing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(u.pkid, u.topics.len());
            }
            if let (Packet::Publish(p), Some(durable)) = (&packet, durable) {
                if p.qos != QoS::AtMostOnce {
                    if let Err(e) = durable.wait().await {
                        return format!("record not durable, so not acknowledged: {e}");
                    }
                }
            }
            if matches!(packet, Packet::PingReq) && to_device.send(ToDevice::PingResp).is_err() {
                return "device side closed".to_owned();
            }
            if let Some((reason, expiry)) = disconnect {
                *session_expiry
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = expiry;
                if reason == v5::Reason::DisconnectWithWillMessage {
                    // The will is published: the broker sees the session fail, not end.
                    if let Some(b) = broker.as_mut() {
                        let _ = b.wr.shutdown().await;
                    }
                    return "device sent DISCONNECT with its will (0x04)".to_owned();
                }
            }
            if needs_broker(&packet, broker.is_some(), shared) {
                if broker.is_none() {
                    let (stream, _connack, backlog) =
                        match connect_broker(&shared.broker, connect).await {
                            Ok(b) => b,
                            Err(e) => return format!("embedded broker unavailable: {e}"),
                        };
                    let (rd, wr) = stream.into_split();
                    shared.sessions.attached(device, connect.clean_session);
                    was_attached.store(true, Ordering::Relaxed);
                    if to_device.send(ToDevice::Attached(rd, backlog)).is_err() {
                        return "device side closed".to_owned();
                    }
                    broker = Some(Attachment::new(shared, wr));
                }
                if let Some(b) = broker.as_mut() {
                    if let Err(e) = b.write(&packet).await {
                        return e;
                    }
                    ping_at = Instant::now() + BROKER_PING;
                }
            }
            if let Packet::Publish(p) = &packet {
                if p.qos == QoS::AtLeastOnce {
                    if let Some(f) = &in_flight {
                        f.answered();
                    }
                    if to_device
                        .send(ToDevice::PubAck(p.pkid, PubCode::Success))
                        .is_err()
                    {
                        return "device side closed".to_owned();
                    }
                }
            }
            if matches!(packet, Packet::Disconnect) {
                if let Some(b) = broker.as_mut() {
                    // Let the broker see the clean DISCONNECT before the socket closes.
                    let _ = b.wr.shutdown().await;
                }
                clean.store(true, Ordering::Relaxed);
                return "device sent DISCONNECT".to_owned();
            }
        }
    };
    // A broker frame for an MQTT 5 device, in its words.
    let for_v5 = |frame: BytesMut| -> ForV5 {
        let mut frame = frame;
        let packet = match Packet::read(&mut frame, usize::MAX) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(event = "edge.broker_frame_unreadable", %device, error = %e, "a broker frame could not be read; not passed on");
                return ForV5::Skip;
            }
        };
        let mut out = BytesMut::new();
        match packet {
            Packet::SubAck(ack) => {
                let refused = narrowed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&ack.pkid)
                    .unwrap_or_else(|| RefusedFilters {
                        total: ack.return_codes.len(),
                        ..RefusedFilters::default()
                    });
                let granted = granted(ack.return_codes, &refused);
                v5::write(
                    v5::ToWrite::SubAck {
                        pkid: ack.pkid,
                        granted,
                    },
                    &mut out,
                );
                return ForV5::Send(out);
            }
            Packet::PubComp(_) => {
                if let Some(f) = &in_flight {
                    f.answered();
                }
            }
            _ => {}
        }
        let unsubscribed = match &packet {
            Packet::UnsubAck(u) => unsubscribing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&u.pkid)
                .unwrap_or(1),
            _ => 0,
        };
        let delivery = match &packet {
            Packet::Publish(p) => Some((p.qos, p.pkid, p.topic.clone())),
            _ => None,
        };
        let Some(v5_packet) = v5::from_broker(packet, unsubscribed) else {
            return ForV5::Skip;
        };
        out = v5::encode(&v5_packet);
        match delivery {
            Some((qos, pkid, topic)) if out.len() > device_max_packet => {
                // MQTT-3.1.2-25: never sent; acknowledged to the broker as if delivered.
                tracing::warn!(event = "edge.delivery_too_large", %device, %topic, size = out.len(), max = device_max_packet, "a delivery larger than the device's Maximum Packet Size was dropped");
                let ack = match qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(pkid))),
                    QoS::ExactlyOnce => {
                        Some(Packet::PubRec(rumqttc::mqttbytes::v4::PubRec::new(pkid)))
                    }
                };
                if let Some(ack) = ack {
                    let _ = own_tx.send(ack);
                }
                ForV5::Skip
            }
            Some((QoS::AtLeastOnce | QoS::ExactlyOnce, ..)) => ForV5::Hold(out),
            _ => ForV5::Send(out),
        }
    };
    let outbound = async {
        let mut from_broker = from_broker;
        let mut batch = BytesMut::new();
        // A delivery waiting for the device's Receive Maximum (MQTT 5).
        let mut held: Option<BytesMut> = None;
        let permit = || async {
            match &in_flight {
                Some(f) => {
                    if let Ok(p) = f.permits.acquire().await {
                        p.forget();
                        f.to_device.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => std::future::pending().await,
            }
        };
        loop {
            tokio::select! {
                item = to_device_rx.recv() => {
                    let Some(mut item) = item else { return Ok::<(), std::io::Error>(()) };
                    // Every reply ready goes in one write (one TLS record).
                    batch.clear();
                    loop {
                        if let ToDevice::Attached(rd, backlog) = item {
                            from_broker = Some((rd, backlog));
                        } else {
                            write_to_device(dialect, item, &mut batch);
                        }
                        match to_device_rx.try_recv() {
                            Ok(next) => item = next,
                            Err(_) => break,
                        }
                    }
                    if !batch.is_empty() {
                        dev_wr.write_all(&batch).await?;
                    }
                }
                () = permit(), if held.is_some() => {
                    if let Some(frame) = held.take() {
                        dev_wr.write_all(&frame).await?;
                    }
                }
                frame = broker_frame(&mut from_broker), if held.is_none() => match frame? {
                    Some(frame) => match dialect {
                        Dialect::V4 => {
                            let frame = widen_suback(frame, &narrowed);
                            dev_wr.write_all(&frame).await?;
                        }
                        Dialect::V5(_) => match for_v5(frame) {
                            ForV5::Send(out) => dev_wr.write_all(&out).await?,
                            ForV5::Hold(out) => held = Some(out),
                            ForV5::Skip => {}
                        },
                    },
                    None => return Ok(()),
                },
            }
        }
    };

    tokio::pin!(forward);
    let unspecified = Some(v5::Reason::UnspecifiedError);
    let (reason, goodbye) = tokio::select! {
        _ = close.cancelled() => {
            let code = if shutdown.is_cancelled() {
                v5::Reason::ServerShuttingDown
            } else if taken_over.load(Ordering::Relaxed) {
                v5::Reason::SessionTakenOver
            } else {
                // Quarantined, removed, revoked: the gateway's decision.
                v5::Reason::AdministrativeAction
            };
            ("closed by the gateway".to_owned(), Some(code))
        }
        r = inbound => {
            let code = match &r {
                Ok(_) if keepalive_expired.load(Ordering::Relaxed) => Some(v5::Reason::KeepAliveTimeout),
                Ok(_) => None,
                Err(Stop::Violation(v)) => Some(v5::reason_for(v)),
                Err(Stop::Bad(_, code)) => Some(*code),
                Err(Stop::HardLimit(_)) => Some(v5::Reason::MessageRateTooHigh),
            };
            let reason = stopped(shared, device, peer, r);
            // What the device sent before and was accepted is handled first.
            let _ = timeout(CLOSE_TIMEOUT, &mut forward).await;
            (reason, code)
        }
        reason = &mut forward => {
            let code = if clean.load(Ordering::Relaxed) { None } else { unspecified };
            (reason, code)
        }
        r = outbound => match r {
            Ok(()) => ("broker closed the session".to_owned(), unspecified),
            Err(e) => (format!("relay to device failed: {e}"), None),
        },
    };
    if let (Dialect::V5(_), Some(code)) = (dialect, goodbye) {
        let mut out = BytesMut::new();
        v5::write(v5::ToWrite::Disconnect(code), &mut out);
        let _ = timeout(CLOSE_TIMEOUT, dev_wr.write_all(&out)).await;
    }
    let _ = timeout(CLOSE_TIMEOUT, dev_wr.shutdown()).await;
    let reason = if throttled > 0 {
        format!("{reason} (held back by its rate {throttled} times)")
    } else {
        reason
    };
    let session_expiry = session_expiry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .map(|secs| SessionAsk::v5(false, secs).expiry);
    Ended {
        reason,
        clean: clean.load(Ordering::Relaxed),
        attached: was_attached.load(Ordering::Relaxed),
        session_expiry,
    }
}

/// Encodes the edge's own packet for the device, in its version.
fn write_to_device(dialect: &Dialect, item: ToDevice, out: &mut BytesMut) {
    let w = match item {
        ToDevice::PubAck(pkid, code) => v5::ToWrite::PubAck { pkid, code },
        ToDevice::PubRec(pkid, code) => v5::ToWrite::PubRec { pkid, code },
        ToDevice::PingResp => v5::ToWrite::PingResp,
        ToDevice::SubAck(pkid, granted) => v5::ToWrite::SubAck { pkid, granted },
        ToDevice::Attached(..) => return,
    };
    if let Dialect::V5(_) = dialect {
        return v5::write(w, out);
    }
    let packet = match w {
        v5::ToWrite::PubAck { pkid, .. } => Packet::PubAck(PubAck::new(pkid)),
        v5::ToWrite::SubAck { pkid, granted } => suback_v4(pkid, granted),
        v5::ToWrite::PingResp => Packet::PingResp,
        // 3.1.1 refuses a PUBLISH by ending the session, never with a PUBREC.
        v5::ToWrite::PubRec { .. } | v5::ToWrite::Disconnect(_) => return,
    };
    let _ = packet.write(out, usize::MAX);
}

/// The answer to a PUBLISH refused by policy: an MQTT 5 device outside its ACL gets
/// 0x87 and keeps its session (audited, counted towards quarantine); anything else ends
/// the session.
fn refuse_publish(
    shared: &EdgeShared,
    peer: SocketAddr,
    device: &DeviceId,
    dialect: &Dialect,
    v: Violation,
) -> Result<PubCode, Stop> {
    match (dialect, &v) {
        (Dialect::V5(_), Violation::PublishDenied { .. }) => {
            shared
                .events
                .publish_refused(peer, device, &v, "puback_0x87");
            punish(shared, device, Offence::Violation(&v));
            Ok(PubCode::NotAuthorized)
        }
        _ => Err(Stop::Violation(v)),
    }
}

/// The next frame the broker sends for the device, `None` once it closes; never, while
/// the session is not attached. The broker's PUBACKs (for copies of messages the edge has
/// acknowledged already) and PINGRESPs (answers to the edge's pings) stay here.
async fn broker_frame(
    from: &mut Option<(OwnedReadHalf, BytesMut)>,
) -> std::io::Result<Option<BytesMut>> {
    let Some((rd, buf)) = from.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        let header = match mqtt::read_frame(rd, buf, usize::MAX).await {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(ReadError::Io(e)) => return Err(e),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
        let frame = buf.split_to(header.frame_length());
        if !matches!(
            header.packet_type(),
            Ok(PacketType::PubAck | PacketType::PingResp)
        ) {
            return Ok(Some(frame));
        }
    }
}

/// Publishes the will of a session the broker does not hold to the local subscribers
/// that want it (or retains it), as the broker does for the sessions it holds; at QoS 1
/// at most (its upstream copy keeps the will's own QoS). One short broker connection of
/// the gateway's own, under a client id no device can have.
async fn publish_will_locally(shared: &EdgeShared, device: &DeviceId, will: &LastWill) {
    if !will.retain && !shared.subscriptions.wanted(&will.topic) {
        return;
    }
    let result = async {
        let mut connect = Connect::new(format!("_will-{device}"));
        connect.clean_session = true;
        let (mut stream, _, _) = connect_broker(&shared.broker, &connect).await?;
        let qos = if will.qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let mut publish = Publish::from_bytes(&will.topic, qos, will.message.clone());
        publish.retain = will.retain;
        publish.pkid = u16::from(qos != QoS::AtMostOnce);
        let mut out = BytesMut::new();
        Packet::Publish(publish)
            .write(&mut out, usize::MAX)
            .map_err(|e| e.to_string())?;
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        if qos == QoS::AtLeastOnce {
            let mut buf = BytesMut::new();
            timeout(BROKER_TIMEOUT, async {
                loop {
                    match mqtt::read_packet(&mut stream, &mut buf, MAX_CONNECT).await {
                        Ok(Some(Packet::PubAck(_))) => return Ok(()),
                        Ok(Some(_)) => {}
                        Ok(None) => return Err("broker closed the connection".to_owned()),
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
            .await
            .map_err(|_| "no PUBACK from the broker".to_owned())??;
        }
        out.clear();
        let _ = Packet::Disconnect.write(&mut out, 16);
        stream.write_all(&out).await.map_err(|e| e.to_string())
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(event = "edge.will_not_delivered_locally", %device, error, "last will not delivered to local subscribers");
    }
}

/// Why the inbound half of a relay stopped a session.
enum Stop {
    Violation(Violation),
    /// An MQTT 5 packet the edge cannot handle, and the DISCONNECT reason code for it.
    Bad(Violation, v5::Reason),
    /// Held back by its rate at every publish for this long.
    HardLimit(Duration),
}

/// Acts on why the device's side of a session ended; returns the reason to log.
fn stopped(
    shared: &EdgeShared,
    device: &DeviceId,
    peer: SocketAddr,
    r: Result<String, Stop>,
) -> String {
    match r {
        Ok(reason) => reason,
        Err(Stop::HardLimit(limit)) => {
            shared.events.rate_hard_limit(peer, device, limit);
            punish(shared, device, Offence::RateHardLimit(limit));
            "rate hard limit".to_owned()
        }
        Err(Stop::Violation(v) | Stop::Bad(v, _)) => {
            shared.events.violation(peer, device, &v);
            punish(shared, device, Offence::Violation(&v));
            format!("violation: {}", v.code())
        }
    }
}

/// Carries out what `offence` costs `device` ([`crate::policy::sanction`]); a quarantined
/// device's every session is closed.
fn punish(shared: &EdgeShared, device: &DeviceId, offence: Offence<'_>) {
    match shared
        .quarantine
        .punish(device, offence, std::time::Instant::now())
    {
        Ok(s) if s.quarantine.is_some() => {
            shared.close_device(device);
        }
        Ok(_) => {}
        Err(e) => quarantine_failed(device, &e),
    }
}

fn quarantine_failed(device: &DeviceId, e: &crate::quarantine::QuarantineError) {
    tracing::error!(
        event = "quarantine.write_failed",
        %device,
        error = %e,
        "could not persist a quarantine"
    );
}

/// The protocol check of one packet from a device. A PUBLISH's policy is the
/// [`Ingest`](crate::ingest::Ingest)'s, which judges every message before it is stored; a
/// SUBSCRIBE's filters outside the ACL are refused one by one ([`refuse_filters`]).
fn inspect(packet: &Packet) -> Result<(), Violation> {
    match packet {
        Packet::Subscribe(s) => {
            for f in &s.filters {
                TopicFilter::parse(&f.path).map_err(|e| Violation::InvalidTopic {
                    topic: f.path.clone(),
                    reason: e.to_string(),
                })?;
            }
            Ok(())
        }
        Packet::Publish(_)
        | Packet::Unsubscribe(_)
        | Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::PingReq
        | Packet::Disconnect => Ok(()),
        Packet::Connect(_) => Err(Violation::Protocol("second CONNECT".into())),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => Err(
            Violation::Protocol("server-to-client packet sent by a client".into()),
        ),
    }
}

/// Ends a TLS connection politely, within a bound.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let _ = timeout(CLOSE_TIMEOUT, s.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::Subscribe;

    fn refused_at(positions: &[usize], total: usize) -> RefusedFilters {
        RefusedFilters {
            positions: positions.to_vec(),
            total,
            filters: Vec::new(),
        }
    }

    fn suback_frame(pkid: u16, codes: Vec<SubscribeReasonCode>) -> BytesMut {
        let mut b = BytesMut::new();
        Packet::SubAck(SubAck::new(pkid, codes))
            .write(&mut b, usize::MAX)
            .unwrap();
        b
    }

    #[test]
    fn a_narrowed_subscribes_suback_gets_0x80_back_in_the_refused_places() {
        let narrowed = std::sync::Mutex::new(std::collections::HashMap::from([(
            7,
            refused_at(&[0, 2], 4),
        )]));
        let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        let zero = SubscribeReasonCode::Success(QoS::AtMostOnce);
        let mut out = widen_suback(suback_frame(7, vec![ok, zero]), &narrowed);
        match Packet::read(&mut out, usize::MAX).unwrap() {
            Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                [
                    SubscribeReasonCode::Failure,
                    ok,
                    SubscribeReasonCode::Failure,
                    zero
                ]
            ),
            p => panic!("{p:?}"),
        }
        // Used once: the next SUBACK under that packet id passes as it is.
        let again = suback_frame(7, vec![ok]);
        assert_eq!(widen_suback(again.clone(), &narrowed), again);
    }

    #[test]
    fn other_frames_pass_untouched() {
        let narrowed =
            std::sync::Mutex::new(std::collections::HashMap::from([(7, refused_at(&[0], 2))]));
        let other = suback_frame(8, vec![SubscribeReasonCode::Failure]);
        assert_eq!(widen_suback(other.clone(), &narrowed), other);
        let mut ping = BytesMut::new();
        Packet::PingResp.write(&mut ping, usize::MAX).unwrap();
        assert_eq!(widen_suback(ping.clone(), &narrowed), ping);
    }

    #[test]
    fn filters_outside_the_acl_are_taken_out_with_their_places() {
        let text = crate::config::tests::MINIMAL.replace(
            "publish = [\"ward/{device}/#\"]",
            "publish = [\"ward/{device}/#\"]\nsubscribe = [\"ward/+/alarm/#\"]",
        );
        let config =
            crate::config::Config::parse(&text, std::path::Path::new("/etc/w.toml")).unwrap();
        let grant = crate::registry::Registry::from_config(&config)
            .grant(&DeviceId::parse("pump-1").unwrap())
            .unwrap();
        let mut s = Subscribe::new("ward/#", QoS::AtLeastOnce);
        s.add("ward/bed-1/alarm/#".into(), QoS::AtLeastOnce);
        s.add("hospital/#".into(), QoS::AtMostOnce);
        let refused = refuse_filters(&mut s, &grant);
        assert_eq!(refused.positions, [0, 2]);
        assert_eq!(refused.total, 3);
        assert_eq!(refused.filters, ["ward/#", "hospital/#"]);
        let kept: Vec<&str> = s.filters.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(kept, ["ward/bed-1/alarm/#"]);
    }
}
