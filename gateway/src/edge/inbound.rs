//! The relay's inbound half: reads the device's packets, judges each (inspection, the
//! subscription filters, the rate, the Receive Maximum, policy) and appends what passes to
//! the spool, then hands it to the forwarding half in the order read.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use tokio::io::ReadHalf;
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::relay::{refuse_publish, FromInbound, Pipe};
use super::session::*;
use super::suback::*;
use super::v5::{self, PubCode};
use crate::events::Violation;
use crate::ingest::{Message, Refused};
use crate::mqtt::{self, ReadError, PUBLISH_OVERHEAD};
use crate::policy::{Admission, Offence};

/// Until the device ends, breaks a rule or is gone: `Ok` with why it ended, or the
/// [`Stop`] to act on. `tx` is owned here, so the forwarding half sees the channel close
/// once this ends.
pub(super) async fn inbound(
    p: &Pipe<'_>,
    dev_rd: &mut ReadHalf<DeviceStream>,
    buf: &mut BytesMut,
    tx: mpsc::Sender<FromInbound>,
) -> Result<String, Stop> {
    let (shared, device, dialect) = (p.facts.shared, p.facts.device, p.facts.dialect);
    let in_flight = &p.in_flight;
    let (peer, grant) = (p.facts.peer, p.facts.grant);
    let max_packet = grant.max_payload.saturating_add(PUBLISH_OVERHEAD);
    // MQTT-3.1.2-24: silent for one and a half keepalives, the device is gone.
    let silence = (p.facts.connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(p.facts.connect.keep_alive) * 1500));
    let mut aliases = v5::Aliases::new(grant.topic_alias_maximum);
    loop {
        let read = async {
            match dialect {
                Dialect::V4 => mqtt::read_packet(dev_rd, buf, max_packet)
                    .await
                    .map(|p| p.map(|p| Ok(v5::FromDevice::plain(p)))),
                Dialect::V5(_) => match mqtt::read_frame(dev_rd, buf, max_packet).await {
                    Ok(Some(_)) => Ok(Some(v5::from_device(buf, &mut aliases))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                },
            }
        };
        let read = match silence {
            Some(limit) => match timeout(limit, read).await {
                Ok(r) => r,
                Err(_) => {
                    p.keepalive_expired.store(true, Ordering::Relaxed);
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
            Packet::Publish(p) => {
                Some(p.payload.len() + p.topic.len() + properties.as_ref().map_or(0, |p| p.len()))
            }
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
        if answer.is_some() && matches!(&packet, Packet::Publish(p) if p.qos == QoS::AtMostOnce) {
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
            let first = p.throttled.fetch_add(1, Ordering::Relaxed) == 0;
            shared.events.throttled(peer, device, wait, first);
            if let Some(limit) = shared.throttle_limit {
                if over_for >= limit {
                    return Err(Stop::HardLimit(limit));
                }
            }
            tokio::time::sleep(wait).await;
        }
    }
}
