//! The relay: a connected device's packets to the spool and the broker, the broker's to
//! the device, with the edge's own acknowledgements, keepalive and limits in between.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck};
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::broker_side::*;
use super::session::*;
use super::sessions::SessionAsk;
use super::suback::*;
use super::v5::{self, Granted, PubCode};
use super::EdgeShared;
use crate::device::DeviceId;
use crate::events::Violation;
use crate::ingest::{Message, Refused};
use crate::mqtt::{self, ReadError, PUBLISH_OVERHEAD};
use crate::policy::Admission;
use crate::policy::Offence;
use crate::registry::Grant;
use crate::spool::Durable;

/// The keepalive of a device's broker session, in seconds. The edge keeps the device's
/// own keepalive itself (any value, 0 included) and pings the broker after
/// [`BROKER_PING`] without writing to it, so the broker never ends a session the device
/// keeps alive with traffic the broker does not see.
pub(super) const BROKER_KEEPALIVE: u16 = 600;
pub(super) const BROKER_PING: Duration = Duration::from_secs(BROKER_KEEPALIVE as u64 / 2);

/// Packets read from a device and not yet handled (waiting for their records to become
/// durable). Bounds what one device can have in flight.
pub(super) const PIPELINE_DEPTH: usize = 64;

/// What goes to the device besides the broker's packets, in the order decided.
pub(super) enum ToDevice {
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
pub(super) struct FromInbound {
    pub(super) packet: Packet,
    pub(super) durable: Option<Durable>,
    pub(super) refused: RefusedFilters,
    /// An MQTT 5 PUBLISH refused with the session kept: answered with this code and
    /// passed no further.
    pub(super) answer: Option<PubCode>,
    /// An MQTT 5 DISCONNECT's reason code and Session Expiry Interval.
    pub(super) disconnect: Option<(v5::Reason, Option<u32>)>,
}

/// How a relay ended.
pub(super) struct Ended {
    pub(super) reason: String,
    /// The device ended the session with DISCONNECT: its will is not published.
    pub(super) clean: bool,
    /// The session was attached: the broker publishes its will to local subscribers.
    pub(super) attached: bool,
    /// The Session Expiry Interval an MQTT 5 DISCONNECT set, if it did.
    pub(super) session_expiry: Option<Option<Duration>>,
}

/// The writing half of a device's broker session, counted while it lives.
pub(super) struct Attachment<'a> {
    pub(super) shared: &'a EdgeShared,
    pub(super) wr: OwnedWriteHalf,
    pub(super) out: BytesMut,
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
pub(super) fn needs_broker(packet: &Packet, attached: bool, shared: &EdgeShared) -> bool {
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
pub(super) struct Relay<'a> {
    pub(super) shared: &'a EdgeShared,
    pub(super) device: &'a DeviceId,
    pub(super) peer: SocketAddr,
    pub(super) grant: &'a Grant,
    /// As the broker gets it (its clean session flag mapped, see [`SessionAsk`]).
    pub(super) connect: &'a Connect,
    pub(super) dialect: &'a Dialect,
    pub(super) close: CancellationToken,
    /// Set when `close` is cancelled because a newer connection took the session over.
    pub(super) taken_over: Arc<AtomicBool>,
    pub(super) shutdown: &'a CancellationToken,
}

/// Counts of QoS 1 and 2 PUBLISHes in flight on an MQTT 5 connection, both ways: the
/// device's not yet answered (at most its class's `receive_maximum`) and the deliveries to it
/// not yet acknowledged (at most its own Receive Maximum: delivery waits for a permit).
pub(super) struct InFlight {
    /// The edge's Receive Maximum, from the device's class.
    pub(super) from_device_max: u16,
    pub(super) from_device: AtomicUsize,
    pub(super) to_device: AtomicUsize,
    pub(super) permits: tokio::sync::Semaphore,
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
pub(super) enum ForV5 {
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
pub(super) async fn relay(
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
pub(super) fn write_to_device(dialect: &Dialect, item: ToDevice, out: &mut BytesMut) {
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
pub(super) fn refuse_publish(
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
