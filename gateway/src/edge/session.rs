//! One device connection, from TCP accept to close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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

use super::EdgeShared;
use crate::device::DeviceId;
use crate::events::{self, Refusal, Violation};
use crate::ingest::{Message, Refused};
use crate::mqtt::{self, ReadError, PUBLISH_OVERHEAD, V5_CONNACK_UNSUPPORTED};
use crate::pki::cert;
use crate::policy::{Admission, TopicFilter};
use crate::registry::Grant;
use crate::spool::{Durable, Spool};

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
        c = timeout(shared.config.connect_timeout, read_connect(&mut tls, &mut buf)) => c,
    };
    let connect = match connect {
        Err(_) => {
            events::connection_refused(peer, Some(&device), &Refusal::ConnectTimeout);
            return close(tls).await;
        }
        Ok(Err(refusal)) => {
            events::connection_refused(peer, Some(&device), &refusal);
            if let Refusal::UnsupportedProtocol { level, .. } = refusal {
                let reply: &[u8] = if level == 5 {
                    &V5_CONNACK_UNSUPPORTED
                } else {
                    &connack(ConnectReturnCode::RefusedProtocolVersion)
                };
                let _ = timeout(CLOSE_TIMEOUT, tls.write_all(reply)).await;
            }
            return close(tls).await;
        }
        Ok(Ok(c)) => c,
    };

    let grant = match admit(&shared, &device, peer, &chain, &connect) {
        Ok(g) => g,
        Err((refusal, code)) => {
            events::connection_refused(peer, Some(&device), &refusal);
            let _ = timeout(CLOSE_TIMEOUT, tls.write_all(&connack(code))).await;
            return close(tls).await;
        }
    };

    // One connection per client id: a new one takes over (MQTT-3.1.4-2).
    shared.close_others(&device, Some(&_live));
    let opening = shared
        .sessions
        .open(&device, &grant.acl, connect.clean_session);
    if connect.clean_session || opening.stale {
        shared.exactly_once.clean(&device);
    }
    let mut broker = None;
    let connack = if opening.attach {
        if opening.stale {
            purge_session(&shared.broker, &device, &grant.class).await;
        }
        match connect_broker(&shared.broker, &connect).await {
            Ok((stream, connack, backlog)) => {
                broker = Some((stream, backlog));
                connack
            }
            Err(e) => {
                let refusal = Refusal::BrokerUnavailable(e);
                events::connection_refused(peer, Some(&device), &refusal);
                let reply = connack(ConnectReturnCode::ServiceUnavailable);
                let _ = timeout(CLOSE_TIMEOUT, tls.write_all(&reply)).await;
                return close(tls).await;
            }
        }
    } else {
        if opening.stale {
            events::session_purged(&device, &grant.class, None);
        }
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, opening.present))
    };

    let will = connect
        .last_will
        .as_ref()
        .and_then(|w| hold_will(&shared, &device, &grant, w));
    events::device_connected(peer, &device, &grant.class);
    let ended = relay(
        tls,
        buf,
        connack,
        broker,
        &connect,
        &shared,
        &device,
        peer,
        &grant,
        close_token,
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
    events::device_disconnected(peer, &device, &ended.reason);
}

/// Stores the will of a CONNECT (already checked by [`admit`]) in the spool, held until
/// the session ends. A will the spool has no room for is not held: the spool has refused
/// and logged it, and the device is still served (its data matters more than its will).
fn hold_will(
    shared: &EdgeShared,
    device: &DeviceId,
    grant: &Grant,
    will: &LastWill,
) -> Option<crate::spool::Key> {
    let m = Message {
        topic: &will.topic,
        payload: &will.message,
        qos: will.qos as u8,
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

/// Reads the CONNECT, refusing anything but a well-formed MQTT 3.1.1 one.
async fn read_connect(tls: &mut DeviceStream, buf: &mut BytesMut) -> Result<Connect, Refusal> {
    let not_connect = |e: &dyn std::fmt::Display| Refusal::NotConnect(e.to_string());
    let header = match mqtt::read_frame(tls, buf, MAX_CONNECT).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err(Refusal::NotConnect("connection closed".into())),
        Err(e) => return Err(not_connect(&e)),
    };
    if let Some((name, level)) = mqtt::connect_protocol(buf, &header) {
        if name != "MQTT" || level != 4 {
            buf.clear();
            return Err(Refusal::UnsupportedProtocol { name, level });
        }
    }
    match Packet::read(buf, MAX_CONNECT) {
        Ok(Packet::Connect(c)) if c.protocol == Protocol::V4 => Ok(c),
        Ok(_) => Err(Refusal::NotConnect(
            "the first packet is not a CONNECT".into(),
        )),
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
async fn purge_session(broker: &crate::broker::EmbeddedBroker, device: &DeviceId, class: &str) {
    let mut purge = Connect::new(device.as_str());
    purge.clean_session = true;
    let result = match connect_broker(broker, &purge).await {
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
    events::session_purged(device, class, result.as_ref().err());
}

/// Opens a session on the embedded broker: the device's CONNECT with the gateway's broker
/// credentials instead of its own (identity is the certificate) and the edge's own
/// keepalive (the edge owns the device's; see [`BROKER_KEEPALIVE`]). Returns the
/// connection, the broker's CONNACK, and whatever the broker sent after it (a resumed
/// session's queued messages, for the device).
async fn connect_broker(
    broker: &crate::broker::EmbeddedBroker,
    connect: &Connect,
) -> Result<(TcpStream, Packet, BytesMut), String> {
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
        Some(p @ Packet::ConnAck(_)) => Ok((stream, p, buf)),
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
    /// The edge's own acknowledgement of a durable QoS 1 PUBLISH.
    PubAck(u16),
    PingResp,
    /// The session was attached to the broker: its packets (and what it sent after its
    /// CONNACK) go to the device from here on.
    Attached(OwnedReadHalf, BytesMut),
    /// The edge's answer to a SUBSCRIBE whose every filter it refused.
    SubAck(SubAck),
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

/// The broker's SUBACK for a SUBSCRIBE the edge narrowed, with 0x80 put back where the
/// refused filters stood (MQTT-3.9.3-1: one return code per filter, in order); any other
/// frame as it is.
fn widen_suback(
    frame: BytesMut,
    narrowed: &std::sync::Mutex<std::collections::HashMap<u16, RefusedFilters>>,
) -> BytesMut {
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
    let mut granted = ack.return_codes.into_iter();
    let codes = (0..refused.total)
        .map(|i| {
            if refused.positions.contains(&i) {
                SubscribeReasonCode::Failure
            } else {
                granted.next().unwrap_or(SubscribeReasonCode::Failure)
            }
        })
        .collect();
    let mut out = BytesMut::new();
    let _ = Packet::SubAck(SubAck::new(ack.pkid, codes)).write(&mut out, usize::MAX);
    out
}

/// How a relay ended.
struct Ended {
    reason: String,
    /// The device ended the session with DISCONNECT: its will is not published.
    clean: bool,
    /// The session was attached: the broker publishes its will to local subscribers.
    attached: bool,
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

/// Relays between device and broker until one side ends, a violation, or `close`.
///
/// Every PUBLISH that passes [`inspect`] is appended to the spool; a QoS 1 or 2 one is
/// handled only once its record is durable (QoS 0 does not wait for its own flush). The
/// edge acknowledges QoS 1 itself, in the order received, and answers PINGREQ; the broker
/// sees a packet only if [`needs_broker`] says so, the session being attached at the first
/// such packet. Packets reach the broker in the order the device sent them.
#[allow(clippy::too_many_arguments)]
async fn relay(
    tls: DeviceStream,
    mut buf: BytesMut,
    connack: Packet,
    broker: Option<(TcpStream, BytesMut)>,
    connect: &Connect,
    shared: &EdgeShared,
    device: &DeviceId,
    peer: SocketAddr,
    grant: &Grant,
    close: CancellationToken,
) -> Ended {
    let (mut dev_rd, mut dev_wr) = tokio::io::split(tls);
    let was_attached = AtomicBool::new(broker.is_some());
    let (from_broker, to_broker) = match broker {
        Some((stream, backlog)) => {
            let (rd, wr) = stream.into_split();
            (Some((rd, backlog)), Some(Attachment::new(shared, wr)))
        }
        None => (None, None),
    };
    let mut out = BytesMut::new();
    let _ = connack.write(&mut out, MAX_CONNECT);
    if let Err(e) = dev_wr.write_all(&out).await {
        return Ended {
            reason: format!("device write failed: {e}"),
            clean: false,
            attached: was_attached.into_inner(),
        };
    }
    let clean = AtomicBool::new(false);
    // MQTT-3.1.2-24: silent for one and a half keepalives, the device is gone.
    let silence = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));

    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(Packet, Option<Durable>, RefusedFilters)>(PIPELINE_DEPTH);
    // SUBSCRIBEs the broker got with some filters taken out: their SUBACKs get 0x80 back
    // where those filters were.
    let narrowed: std::sync::Mutex<std::collections::HashMap<u16, RefusedFilters>> =
        std::sync::Mutex::default();
    let mut throttled: u64 = 0;
    let max_packet = grant.max_payload.saturating_add(PUBLISH_OVERHEAD);
    let inbound = async {
        // Owned by this future, so the forward half sees the channel close once it ends.
        let tx = tx;
        loop {
            let read = mqtt::read_packet(&mut dev_rd, &mut buf, max_packet);
            let read = match silence {
                Some(limit) => match timeout(limit, read).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Ok(format!(
                            "silent for {} (one and a half keepalives)",
                            humantime::format_duration(limit)
                        ))
                    }
                },
                None => read.await,
            };
            let packet = match read {
                Ok(Some(p)) => p,
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
            inspect(&packet).map_err(Stop::Violation)?;
            let mut packet = packet;
            let mut refused = RefusedFilters::default();
            if let Packet::Subscribe(s) = &mut packet {
                // MQTT 3.1.1 refuses a filter with SUBACK 0x80 and keeps the session: each
                // refused filter is audited and counts towards quarantine.
                refused = refuse_filters(s, grant);
                for f in &refused.filters {
                    events::subscribe_refused(peer, device, f);
                    count_towards_quarantine(shared, device);
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
                Packet::Publish(p) => Some(p.payload.len() + p.topic.len()),
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
            let durable = match &packet {
                // Stored when it first came: acknowledged again, not stored again (but
                // judged again: the answer is the same, and no packet passes unjudged).
                Packet::Publish(p) if repeat => {
                    shared
                        .ingest
                        .verdict(device, grant, &p.topic, p.payload.len())
                        .map_err(Stop::Violation)?;
                    None
                }
                // The one door into the spool: policy, priority, append (memory work only;
                // the spool's writer thread does the disk's).
                Packet::Publish(p) => {
                    let m = Message {
                        topic: &p.topic,
                        payload: &p.payload,
                        qos: p.qos as u8,
                    };
                    match shared.ingest.device(device, grant, m) {
                        Ok(d) => {
                            if p.qos == QoS::ExactlyOnce {
                                shared.exactly_once.stored(device, p.pkid);
                            }
                            Some(d)
                        }
                        Err(Refused::Policy(v)) => return Err(Stop::Violation(v)),
                        // QoS 0 has no acknowledgement to withhold; the refusal is counted
                        // and logged by the spool.
                        Err(Refused::Spool(_)) if p.qos == QoS::AtMostOnce => continue,
                        Err(Refused::Spool(e)) => {
                            return Ok(format!("not stored, so not acknowledged: {e}"))
                        }
                    }
                }
                _ => None,
            };
            let last = matches!(packet, Packet::Disconnect);
            if tx.send((packet, durable, refused)).await.is_err() {
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
                if throttled == 0 {
                    events::throttled(peer, device, wait);
                }
                throttled += 1;
                crate::counters::bump(device, |c| c.throttled += 1);
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
            let Some((packet, durable, refused)) = next else {
                return "device side closed".to_owned();
            };
            if let Packet::Subscribe(s) = &packet {
                if s.filters.is_empty() {
                    // Every filter refused: the edge answers alone.
                    let codes = vec![SubscribeReasonCode::Failure; refused.positions.len()];
                    if to_device
                        .send(ToDevice::SubAck(SubAck::new(s.pkid, codes)))
                        .is_err()
                    {
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
                if p.qos == QoS::AtLeastOnce && to_device.send(ToDevice::PubAck(p.pkid)).is_err() {
                    return "device side closed".to_owned();
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
    let outbound = async {
        let mut from_broker = from_broker;
        let mut batch = BytesMut::new();
        loop {
            tokio::select! {
                item = to_device_rx.recv() => {
                    let Some(mut item) = item else { return Ok::<(), std::io::Error>(()) };
                    // Every reply ready goes in one write (one TLS record).
                    batch.clear();
                    loop {
                        let _ = match item {
                            ToDevice::PubAck(pkid) => Packet::PubAck(PubAck::new(pkid)).write(&mut batch, usize::MAX),
                            ToDevice::PingResp => Packet::PingResp.write(&mut batch, usize::MAX),
                            ToDevice::SubAck(ack) => Packet::SubAck(ack).write(&mut batch, usize::MAX),
                            ToDevice::Attached(rd, backlog) => {
                                from_broker = Some((rd, backlog));
                                Ok(0)
                            }
                        };
                        match to_device_rx.try_recv() {
                            Ok(next) => item = next,
                            Err(_) => break,
                        }
                    }
                    if !batch.is_empty() {
                        dev_wr.write_all(&batch).await?;
                    }
                }
                frame = broker_frame(&mut from_broker) => match frame? {
                    Some(frame) => {
                        let frame = widen_suback(frame, &narrowed);
                        dev_wr.write_all(&frame).await?;
                    }
                    None => return Ok(()),
                },
            }
        }
    };

    tokio::pin!(forward);
    let reason = tokio::select! {
        _ = close.cancelled() => "closed by the gateway".to_owned(),
        r = inbound => {
            let reason = stopped(shared, device, peer, r);
            // What the device sent before and was accepted is handled first.
            let _ = timeout(CLOSE_TIMEOUT, &mut forward).await;
            reason
        }
        reason = &mut forward => reason,
        r = outbound => match r {
            Ok(()) => "broker closed the session".to_owned(),
            Err(e) => format!("relay to device failed: {e}"),
        },
    };
    let _ = timeout(CLOSE_TIMEOUT, dev_wr.shutdown()).await;
    let reason = if throttled > 0 {
        format!("{reason} (held back by its rate {throttled} times)")
    } else {
        reason
    };
    Ended {
        reason,
        clean: clean.load(Ordering::Relaxed),
        attached: was_attached.load(Ordering::Relaxed),
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
            events::rate_hard_limit(peer, device, limit);
            let reason = format!(
                "over its rate without pause for {}",
                humantime::format_duration(limit)
            );
            quarantine_device(shared, device, &reason);
            "rate hard limit".to_owned()
        }
        Err(Stop::Violation(v)) => {
            events::violation(peer, device, &v);
            if matches!(
                v,
                Violation::PublishDenied { .. } | Violation::TooManySubscriptions { .. }
            ) {
                count_towards_quarantine(shared, device);
            }
            format!("violation: {}", v.code())
        }
    }
}

/// Notes a violation towards the device's quarantine; at the threshold every session of the
/// device is closed.
fn count_towards_quarantine(shared: &EdgeShared, device: &DeviceId) {
    match shared
        .quarantine
        .note_violation(device, std::time::Instant::now())
    {
        Ok(true) => {
            shared.close_device(device);
        }
        Ok(false) => {}
        Err(e) => quarantine_failed(device, &e),
    }
}

/// Quarantines `device` and closes every session it has.
fn quarantine_device(shared: &EdgeShared, device: &DeviceId, reason: &str) {
    match shared.quarantine.quarantine(device, reason) {
        Ok(_) => {
            shared.close_device(device);
        }
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
