//! The relay: a connected device's packets to the spool and the broker, the broker's to
//! the device, with the edge's own acknowledgements, keepalive and limits in between.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck};
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::forward::forward;
use super::inbound::inbound;
use super::outbound::outbound;
use super::session::*;
use super::sessions::SessionAsk;
use super::suback::*;
use super::v5::{self, Granted, PubCode};
use super::EdgeShared;
use crate::device::DeviceId;
use crate::events::Violation;
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
    pub(super) fn new(shared: &'a EdgeShared, wr: OwnedWriteHalf) -> Self {
        shared.attached.fetch_add(1, Ordering::Relaxed);
        Attachment {
            shared,
            wr,
            out: BytesMut::new(),
        }
    }

    pub(super) async fn write(&mut self, packet: &Packet) -> Result<(), String> {
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

/// What a session is: its device, its grant, how it connected. Shared by every part of
/// its relay.
#[derive(Clone, Copy)]
pub(super) struct Facts<'a> {
    pub(super) shared: &'a EdgeShared,
    pub(super) device: &'a DeviceId,
    pub(super) peer: SocketAddr,
    pub(super) grant: &'a Grant,
    /// As the broker gets it (its clean session flag mapped, see [`SessionAsk`]).
    pub(super) connect: &'a Connect,
    pub(super) dialect: &'a Dialect,
}

/// What a session's relay works with.
pub(super) struct Relay<'a> {
    pub(super) facts: Facts<'a>,
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
    pub(super) fn new(edge_max: u16, device_max: u16) -> Self {
        InFlight {
            from_device_max: edge_max,
            from_device: AtomicUsize::new(0),
            to_device: AtomicUsize::new(0),
            permits: tokio::sync::Semaphore::new(device_max.into()),
        }
    }

    /// One more PUBLISH from the device; false if that is past the edge's Receive Maximum.
    pub(super) fn received(&self) -> bool {
        self.from_device.fetch_add(1, Ordering::Relaxed) < usize::from(self.from_device_max)
    }

    /// A PUBLISH of the device answered (PUBACK, refusing PUBREC, or PUBCOMP).
    pub(super) fn answered(&self) {
        let _ = self
            .from_device
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The device acknowledged a delivery (PUBACK or PUBCOMP): its permit returns. An
    /// acknowledgement of nothing in flight frees nothing.
    pub(super) fn acknowledged(&self) {
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

/// What the relay's three halves ([`inbound`], [`forward`], [`outbound`]) share: the
/// session's facts, and what one half tells the others or the end of the relay.
pub(super) struct Pipe<'a> {
    pub(super) facts: Facts<'a>,
    /// MQTT 5: the Receive Maximum both ways.
    pub(super) in_flight: Option<InFlight>,
    /// The device's Maximum Packet Size (MQTT 5); unbounded for 3.1.1.
    pub(super) device_max_packet: usize,
    /// SUBSCRIBEs the broker got with some filters taken out: their SUBACKs get the
    /// refusals back where those filters were.
    pub(super) narrowed: Narrowed,
    /// MQTT 5: how many filters each UNSUBSCRIBE had (its UNSUBACK has a code for each).
    pub(super) unsubscribing: Mutex<HashMap<u16, usize>>,
    /// The broker session is attached.
    pub(super) was_attached: AtomicBool,
    /// The device ended with DISCONNECT.
    pub(super) clean: AtomicBool,
    /// The Session Expiry Interval an MQTT 5 DISCONNECT set.
    pub(super) session_expiry: Mutex<Option<u32>>,
    /// The device went silent for one and a half keepalives.
    pub(super) keepalive_expired: AtomicBool,
    /// How many times its rate held the device back.
    pub(super) throttled: AtomicU64,
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
        facts,
        close,
        taken_over,
        shutdown,
    } = r;
    let Facts {
        shared,
        device,
        peer,
        grant,
        dialect,
        ..
    } = facts;
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
    let pipe = Pipe {
        facts,
        in_flight: match dialect {
            Dialect::V5(a) => Some(InFlight::new(grant.receive_maximum, a.receive_maximum)),
            Dialect::V4 => None,
        },
        device_max_packet: match dialect {
            Dialect::V5(a) => a.maximum_packet_size.map_or(usize::MAX, |m| m as usize),
            Dialect::V4 => usize::MAX,
        },
        narrowed: Narrowed::default(),
        unsubscribing: Mutex::default(),
        was_attached,
        clean: AtomicBool::new(false),
        session_expiry: Mutex::new(None),
        keepalive_expired: AtomicBool::new(false),
        throttled: AtomicU64::new(0),
    };
    let p = &pipe;
    let (tx, rx) = tokio::sync::mpsc::channel::<FromInbound>(PIPELINE_DEPTH);
    // Acknowledgements the edge owes the broker for deliveries it could not pass on.
    let (own_tx, own_rx) = tokio::sync::mpsc::unbounded_channel::<Packet>();
    // The device's side has one writer: the broker's packets and the edge's own replies go
    // to it whole, one after the other.
    let (to_device, to_device_rx) = tokio::sync::mpsc::unbounded_channel::<ToDevice>();
    let inbound = inbound(p, &mut dev_rd, &mut buf, tx);
    let forward = forward(p, rx, own_rx, to_device, to_broker);
    let outbound = outbound(p, &mut dev_wr, to_device_rx, from_broker, own_tx);

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
                Ok(_) if p.keepalive_expired.load(Ordering::Relaxed) => Some(v5::Reason::KeepAliveTimeout),
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
            let code = if p.clean.load(Ordering::Relaxed) { None } else { unspecified };
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
    let throttled = p.throttled.load(Ordering::Relaxed);
    let reason = if throttled > 0 {
        format!("{reason} (held back by its rate {throttled} times)")
    } else {
        reason
    };
    let session_expiry = p
        .session_expiry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .map(|secs| SessionAsk::v5(false, secs).expiry);
    Ended {
        reason,
        clean: p.clean.load(Ordering::Relaxed),
        attached: p.was_attached.load(Ordering::Relaxed),
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
