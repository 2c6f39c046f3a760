//! MQTT 5 devices at the edge, with rumqttc's v5 codec. The embedded broker speaks 3.1.1,
//! so the edge speaks each device's version on its side and 3.1.1 on the broker's: a v5
//! packet from a device becomes the 3.1.1 packet the rest of the edge handles (and the
//! properties 3.1.1 cannot carry, [`Properties`], go with a PUBLISH into the spool), and
//! what goes to a v5 device (the broker's deliveries and acknowledgements, the edge's own
//! answers) is written in v5 with the reason codes 5 has.
//!
//! Decided here (README, "MQTT 5 devices"):
//! - topic aliases are resolved per connection before anything judges the PUBLISH, so
//!   the ACL sees the real topic every time; the edge never sends aliases itself;
//! - Subscription Identifiers and Shared Subscriptions are not available (CONNACK says
//!   so); a SUBSCRIBE with an identifier ends the session with 0xA1;
//! - subscription options beyond the QoS (No Local, Retain As Published, Retain Handling)
//!   and a delivery's properties are those of 3.1.1: the broker behind the edge has none;
//! - enhanced authentication (AUTH) is not offered: identity is the certificate.
//!
//! Pure translation, tested by the unit tests below and end to end by
//! `tests/system/mqtt5.rs`.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;

use crate::events::{Refusal, Violation};
use crate::spool::Properties;

pub(super) use v5::DisconnectReasonCode as Reason;

/// The server's limits a device's class sets (`receive_maximum`, `topic_alias_maximum`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// PUBLISHes of QoS 1 and 2 a device may have unacknowledged (the server's Receive
    /// Maximum); one more is a protocol error (0x93).
    pub receive_maximum: u16,
    /// Topic aliases a device may set on one connection (0: none).
    pub topic_alias_maximum: u16,
}
/// Bytes of a PUBLISH's fixed header at most, which MQTT 5's Maximum Packet Size counts.
const FIXED_HEADER_MAX: u32 = 5;

/// What an MQTT 5 device asked for in its CONNECT that 3.1.1 has no field for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Asked {
    /// Session Expiry Interval, seconds (0: the session ends with the connection;
    /// `u32::MAX`: it never expires).
    pub session_expiry: u32,
    /// The device's Receive Maximum: QoS 1 and 2 deliveries it takes unacknowledged.
    pub receive_maximum: u16,
    /// The largest packet the device accepts, if it said.
    pub maximum_packet_size: Option<u32>,
    /// The device sent an empty client id: the edge assigns it its device id.
    pub assigned_id: bool,
    /// Properties of the will, carried upstream with it.
    pub will: Option<Properties>,
}

/// A v5 CONNECT as the 3.1.1 CONNECT the edge and broker handle, and what else it asked.
/// An empty client id is given `device` (MQTT-3.1.3-6, announced in the CONNACK).
pub(super) fn connect(
    buf: &mut BytesMut,
    max: usize,
    device: &str,
) -> Result<(v4::Connect, Asked), Refusal> {
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    let (c, will, _login) = match v5::Packet::read(buf, Some(max)) {
        Ok(v5::Packet::Connect(c, will, login)) => (c, will, login),
        Ok(_) => {
            return Err(Refusal::NotConnect(
                "the first packet is not a CONNECT".into(),
            ))
        }
        Err(e) => return Err(Refusal::NotConnect(format!("MQTT 5: {e:?}"))),
    };
    let props = c.properties.unwrap_or(v5::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    });
    if let Some(method) = props.authentication_method {
        return Err(Refusal::AuthenticationMethod(method));
    }
    if props.receive_maximum == Some(0) || props.max_packet_size == Some(0) {
        return Err(Refusal::NotConnect(
            "MQTT 5: Receive Maximum or Maximum Packet Size of 0".into(),
        ));
    }
    let assigned_id = c.client_id.is_empty();
    let mut v4c = v4::Connect::new(if assigned_id {
        device.to_owned()
    } else {
        c.client_id
    });
    v4c.keep_alive = c.keep_alive;
    let session_expiry = props.session_expiry_interval.unwrap_or(0);
    // The broker's own session flag; `Sessions` maps a v5 session onto it.
    v4c.clean_session = c.clean_start;
    let mut will_props = None;
    if let Some(w) = will {
        let topic = String::from_utf8(w.topic.to_vec())
            .map_err(|_| Refusal::NotConnect("will topic is not UTF-8".into()))?;
        if let Some(p) = w.properties {
            if p.payload_format_indicator == Some(1) && std::str::from_utf8(&w.message).is_err() {
                return Err(Refusal::NotConnect(
                    "will payload is marked UTF-8 and is not".into(),
                ));
            }
            will_props = Some(Properties {
                content_type: p.content_type,
                utf8: p.payload_format_indicator == Some(1),
                expiry_secs: p.message_expiry_interval,
                user: p.user_properties,
            });
        }
        v4c.last_will = Some(v4::LastWill {
            topic,
            message: w.message,
            qos: qos4(w.qos),
            retain: w.retain,
        });
    }
    Ok((
        v4c,
        Asked {
            session_expiry,
            receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
            maximum_packet_size: props.max_packet_size,
            assigned_id,
            will: will_props,
        },
    ))
}

/// The CONNACK accepting a v5 device, with the server's limits as they really are.
/// `max_packet` is the largest remaining length the edge reads from this device.
pub(super) fn connack(
    present: bool,
    max_packet: usize,
    limits: Limits,
    asked: &Asked,
    device: &str,
) -> BytesMut {
    let props = v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: Some(limits.receive_maximum),
        // Absent: QoS 2 is supported.
        max_qos: None,
        retain_available: Some(1),
        max_packet_size: Some(
            u32::try_from(max_packet)
                .unwrap_or(u32::MAX)
                .saturating_add(FIXED_HEADER_MAX),
        ),
        assigned_client_identifier: asked.assigned_id.then(|| device.to_owned()),
        topic_alias_max: Some(limits.topic_alias_maximum),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    let ack = v5::ConnAck {
        session_present: present,
        code: v5::ConnectReturnCode::Success,
        properties: Some(props),
    };
    encode(&v5::Packet::ConnAck(ack))
}

/// The CONNACK refusing a v5 device, with the reason code for `refusal`.
pub(super) fn connack_refused(refusal: &Refusal) -> BytesMut {
    use v5::ConnectReturnCode as C;
    let code = match refusal {
        Refusal::UnsupportedProtocol { .. } => C::UnsupportedProtocolVersion,
        Refusal::ClientIdMismatch { .. } => C::ClientIdentifierNotValid,
        Refusal::Quarantined { .. } => C::Banned,
        Refusal::BrokerUnavailable(_) => C::ServerUnavailable,
        Refusal::TooManyConnections => C::ServerBusy,
        Refusal::AuthenticationMethod(_) => C::BadAuthenticationMethod,
        Refusal::NotConnect(_) => C::MalformedPacket,
        _ => C::NotAuthorized,
    };
    encode(&v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code,
        properties: None,
    }))
}

/// A PUBLISH's topic aliases, as one connection's device set them, up to the class's
/// Topic Alias Maximum.
#[derive(Debug)]
pub(super) struct Aliases {
    max: u16,
    set: HashMap<u16, String>,
}

impl Aliases {
    pub(super) fn new(max: u16) -> Self {
        Aliases {
            max,
            set: HashMap::new(),
        }
    }
}

/// A v5 packet from a device, as the edge handles it.
#[derive(Debug)]
pub(super) struct FromDevice {
    pub packet: v4::Packet,
    /// A PUBLISH's properties that 3.1.1 has no field for.
    pub properties: Option<Properties>,
    /// A DISCONNECT's reason code and new Session Expiry Interval, if any.
    pub disconnect: Option<(Reason, Option<u32>)>,
}

impl FromDevice {
    /// A 3.1.1 packet, which has nothing more.
    pub(super) fn plain(packet: v4::Packet) -> Self {
        FromDevice {
            packet,
            properties: None,
            disconnect: None,
        }
    }
}

/// Why a packet from a device cannot be handled: the violation and the DISCONNECT
/// reason code it ends the session with.
pub(super) type Bad = (Violation, Reason);

/// Reads one v5 packet from the start of `buf` (which holds one whole frame).
pub(super) fn from_device(buf: &mut BytesMut, aliases: &mut Aliases) -> Result<FromDevice, Bad> {
    let packet = v5::Packet::read(buf, None).map_err(|e| {
        (
            Violation::Protocol(format!("malformed MQTT 5 packet: {e:?}")),
            Reason::MalformedPacket,
        )
    })?;
    let protocol = |what: &str, reason| (Violation::Protocol(what.to_owned()), reason);
    let plain = FromDevice::plain;
    Ok(match packet {
        v5::Packet::Publish(p) => return publish(p, aliases),
        v5::Packet::PubAck(a) => plain(v4::Packet::PubAck(v4::PubAck::new(a.pkid))),
        v5::Packet::PubRec(r) => plain(v4::Packet::PubRec(v4::PubRec::new(r.pkid))),
        v5::Packet::PubRel(r) => plain(v4::Packet::PubRel(v4::PubRel::new(r.pkid))),
        v5::Packet::PubComp(c) => plain(v4::Packet::PubComp(v4::PubComp::new(c.pkid))),
        v5::Packet::Subscribe(s) => {
            if s.properties.as_ref().is_some_and(|p| p.id.is_some()) {
                return Err(protocol(
                    "subscription identifiers are not available",
                    Reason::SubscriptionIdentifiersNotSupported,
                ));
            }
            plain(v4::Packet::Subscribe(v4::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| v4::SubscribeFilter::new(f.path, qos4(f.qos)))
                    .collect(),
            }))
        }
        v5::Packet::Unsubscribe(u) => plain(v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters,
        })),
        v5::Packet::PingReq(_) => plain(v4::Packet::PingReq),
        v5::Packet::Disconnect(d) => FromDevice {
            packet: v4::Packet::Disconnect,
            properties: None,
            disconnect: Some((
                d.reason_code,
                d.properties.and_then(|p| p.session_expiry_interval),
            )),
        },
        v5::Packet::Connect(..) => return Err(protocol("second CONNECT", Reason::ProtocolError)),
        v5::Packet::Auth(_) => {
            return Err(protocol(
                "AUTH without an authentication method",
                Reason::ProtocolError,
            ))
        }
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp(_) => {
            return Err(protocol(
                "server-to-client packet sent by a client",
                Reason::ProtocolError,
            ))
        }
    })
}

/// A v5 PUBLISH with its topic alias resolved [MQTT-3.3.2-12] and its properties apart.
fn publish(p: v5::Publish, aliases: &mut Aliases) -> Result<FromDevice, Bad> {
    let alias_error = |what: String| (Violation::Protocol(what), Reason::TopicAliasInvalid);
    let mut topic = String::from_utf8(p.topic.to_vec()).map_err(|_| {
        (
            Violation::Protocol("topic is not UTF-8".into()),
            Reason::MalformedPacket,
        )
    })?;
    let props = p.properties.unwrap_or_default();
    if let Some(alias) = props.topic_alias {
        if alias == 0 || alias > aliases.max {
            return Err(alias_error(format!(
                "topic alias {alias} outside 1..={}",
                aliases.max
            )));
        }
        if topic.is_empty() {
            topic = aliases.set.get(&alias).cloned().ok_or_else(|| {
                (
                    Violation::Protocol(format!("topic alias {alias} was never set")),
                    Reason::ProtocolError,
                )
            })?;
        } else {
            aliases.set.insert(alias, topic.clone());
        }
    }
    let properties = Properties {
        content_type: props.content_type,
        utf8: props.payload_format_indicator == Some(1),
        expiry_secs: props.message_expiry_interval,
        user: props.user_properties,
    };
    Ok(FromDevice {
        packet: v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos4(p.qos),
            retain: p.retain,
            topic,
            pkid: p.pkid,
            payload: p.payload,
        }),
        properties: Some(properties),
        disconnect: None,
    })
}

/// What a SUBACK says of one filter, as the edge decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Granted {
    Qos(QoS),
    /// Refused by the device's ACL (0x80 in 3.1.1, 0x87 in 5).
    Refused,
    /// A `$share/` filter: refused as shared subscriptions are not available (0x9E).
    Shared,
    /// The broker refused it (0x80 in both).
    Failed,
}

/// A packet the edge writes to a device, in either version's words.
#[derive(Debug)]
pub(super) enum ToWrite {
    /// The edge's acknowledgement of a PUBLISH; `code` 0 is success.
    PubAck {
        pkid: u16,
        code: PubCode,
    },
    /// The edge's refusal of a QoS 2 PUBLISH (MQTT 5 only).
    PubRec {
        pkid: u16,
        code: PubCode,
    },
    SubAck {
        pkid: u16,
        granted: Vec<Granted>,
    },
    PingResp,
    Disconnect(Reason),
}

/// The outcome of a device's PUBLISH, as a PUBACK or PUBREC says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PubCode {
    Success,
    /// 0x87: outside the device's ACL.
    NotAuthorized,
    /// 0x97: the spool has no room.
    QuotaExceeded,
    /// 0x99: marked UTF-8 and not.
    PayloadFormatInvalid,
}

/// Encodes `w` for a v5 device.
pub(super) fn write(w: ToWrite, out: &mut BytesMut) {
    let packet = match w {
        ToWrite::PubAck { pkid, code } => v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: match code {
                PubCode::Success => v5::PubAckReason::Success,
                PubCode::NotAuthorized => v5::PubAckReason::NotAuthorized,
                PubCode::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                PubCode::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
            },
            properties: None,
        }),
        ToWrite::PubRec { pkid, code } => v5::Packet::PubRec(v5::PubRec {
            pkid,
            reason: match code {
                PubCode::Success => v5::PubRecReason::Success,
                PubCode::NotAuthorized => v5::PubRecReason::NotAuthorized,
                PubCode::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
                PubCode::PayloadFormatInvalid => v5::PubRecReason::PayloadFormatInvalid,
            },
            properties: None,
        }),
        ToWrite::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: granted
                .into_iter()
                .map(|g| match g {
                    Granted::Qos(q) => v5::SubscribeReasonCode::Success(qos5(q)),
                    Granted::Refused => v5::SubscribeReasonCode::NotAuthorized,
                    Granted::Shared => v5::SubscribeReasonCode::SharedSubscriptionsNotSupported,
                    Granted::Failed => v5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }),
        ToWrite::PingResp => v5::Packet::PingResp(v5::PingResp),
        ToWrite::Disconnect(reason) => {
            // By hand: rumqttc 0.25 writes a reason code without properties as remaining
            // length 1 followed by a stray property length byte. Reason code and an empty
            // property list, remaining length 2, is what every client reads.
            out.extend_from_slice(&[0xE0, 0x02, reason as u8, 0x00]);
            return;
        }
    };
    encode_into(&packet, out);
}

/// The broker's 3.1.1 packet for a v5 device. `unsubscribed` is how many filters the
/// UNSUBSCRIBE an UNSUBACK answers had (one reason code each); a SUBACK has been widened
/// already and comes as `ToWrite::SubAck`.
pub(super) fn from_broker(packet: v4::Packet, unsubscribed: usize) -> Option<v5::Packet> {
    Some(match packet {
        v4::Packet::Publish(p) => v5::Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos5(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic.into_bytes()),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubRec(r) => v5::Packet::PubRec(v5::PubRec::new(r.pkid, None)),
        v4::Packet::PubRel(r) => v5::Packet::PubRel(v5::PubRel::new(r.pkid, None)),
        v4::Packet::PubComp(c) => v5::Packet::PubComp(v5::PubComp::new(c.pkid, None)),
        v4::Packet::UnsubAck(u) => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: u.pkid,
            reasons: vec![v5::UnsubAckReason::Success; unsubscribed.max(1)],
            properties: None,
        }),
        v4::Packet::PingResp => v5::Packet::PingResp(v5::PingResp),
        _ => return None,
    })
}

/// Encodes a v5 packet the edge built (cannot fail into memory).
pub(super) fn encode(packet: &v5::Packet) -> BytesMut {
    let mut out = BytesMut::new();
    encode_into(packet, &mut out);
    out
}

fn encode_into(packet: &v5::Packet, out: &mut BytesMut) {
    if let Err(e) = packet.write(out, None) {
        tracing::error!(event = "edge.encode_failed", error = ?e, "cannot encode an MQTT 5 packet");
    }
}

/// The DISCONNECT reason code for a violation found by the edge's checks.
pub(super) fn reason_for(v: &Violation) -> Reason {
    match v {
        Violation::PublishDenied { .. } | Violation::SubscribeDenied { .. } => {
            Reason::NotAuthorized
        }
        Violation::WildcardPublish { .. } => Reason::TopicNameInvalid,
        Violation::InvalidTopic { .. } => Reason::TopicFilterInvalid,
        Violation::OversizedPacket { .. } => Reason::PacketTooLarge,
        Violation::TooManySubscriptions { .. } => Reason::QuotaExceeded,
        Violation::ReceiveMaximum { .. } => Reason::ReceiveMaximumExceeded,
        Violation::Protocol(_) => Reason::ProtocolError,
    }
}

fn qos4(q: QoS5) -> QoS {
    match q {
        QoS5::AtMostOnce => QoS::AtMostOnce,
        QoS5::AtLeastOnce => QoS::AtLeastOnce,
        QoS5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos5(q: QoS) -> QoS5 {
    match q {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v5_publish(topic: &str, alias: Option<u16>) -> BytesMut {
        let mut p = v5::Publish::new(topic, QoS5::AtLeastOnce, "x", None);
        p.pkid = 1;
        p.properties = Some(v5::PublishProperties {
            topic_alias: alias,
            content_type: Some("application/json".into()),
            user_properties: vec![("unit".into(), "mmHg".into())],
            message_expiry_interval: Some(30),
            ..Default::default()
        });
        encode(&v5::Packet::Publish(p))
    }

    fn topic_of(f: &FromDevice) -> &str {
        match &f.packet {
            v4::Packet::Publish(p) => &p.topic,
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_topic_alias_resolves_to_the_topic_it_was_set_with() {
        let mut aliases = Aliases::new(16);
        let set =
            from_device(&mut v5_publish("ward/pump-1/vitals", Some(3)), &mut aliases).unwrap();
        assert_eq!(topic_of(&set), "ward/pump-1/vitals");
        let props = set.properties.unwrap();
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(props.user, [("unit".to_owned(), "mmHg".to_owned())]);
        assert_eq!(props.expiry_secs, Some(30));
        let used = from_device(&mut v5_publish("", Some(3)), &mut aliases).unwrap();
        assert_eq!(
            topic_of(&used),
            "ward/pump-1/vitals",
            "the ACL sees the real topic"
        );
        // Set again to another topic: the new one from then on.
        from_device(&mut v5_publish("ward/pump-1/alarm", Some(3)), &mut aliases).unwrap();
        let used = from_device(&mut v5_publish("", Some(3)), &mut aliases).unwrap();
        assert_eq!(topic_of(&used), "ward/pump-1/alarm");
    }

    #[test]
    fn a_bad_topic_alias_ends_the_session_with_its_reason_code() {
        let mut aliases = Aliases::new(16);
        let (_, r) = from_device(&mut v5_publish("", Some(2)), &mut aliases).unwrap_err();
        assert_eq!(r, Reason::ProtocolError, "never set");
        let (_, r) = from_device(&mut v5_publish("t", Some(0)), &mut aliases).unwrap_err();
        assert_eq!(r, Reason::TopicAliasInvalid);
        let (_, r) = from_device(&mut v5_publish("t", Some(17)), &mut aliases).unwrap_err();
        assert_eq!(r, Reason::TopicAliasInvalid);
    }

    #[test]
    fn a_subscription_identifier_is_refused() {
        let mut s = v5::Subscribe::new(
            v5::Filter::new("ward/#", QoS5::AtLeastOnce),
            Some(v5::SubscribeProperties {
                id: Some(4),
                user_properties: Vec::new(),
            }),
        );
        s.pkid = 1;
        let (_, r) = from_device(
            &mut encode(&v5::Packet::Subscribe(s)),
            &mut Aliases::new(16),
        )
        .unwrap_err();
        assert_eq!(r, Reason::SubscriptionIdentifiersNotSupported);
    }

    #[test]
    fn the_edges_answers_carry_the_reason_codes() {
        let mut out = BytesMut::new();
        write(
            ToWrite::PubAck {
                pkid: 9,
                code: PubCode::NotAuthorized,
            },
            &mut out,
        );
        write(
            ToWrite::SubAck {
                pkid: 10,
                granted: vec![
                    Granted::Refused,
                    Granted::Qos(QoS::AtLeastOnce),
                    Granted::Shared,
                ],
            },
            &mut out,
        );
        match v5::Packet::read(&mut out, None).unwrap() {
            v5::Packet::PubAck(a) => assert_eq!(a.reason, v5::PubAckReason::NotAuthorized),
            p => panic!("{p:?}"),
        }
        match v5::Packet::read(&mut out, None).unwrap() {
            v5::Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                [
                    v5::SubscribeReasonCode::NotAuthorized,
                    v5::SubscribeReasonCode::Success(QoS5::AtLeastOnce),
                    v5::SubscribeReasonCode::SharedSubscriptionsNotSupported
                ]
            ),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_disconnect_reads_back_with_its_reason_code() {
        let mut out = BytesMut::new();
        write(ToWrite::Disconnect(Reason::TopicAliasInvalid), &mut out);
        match v5::Packet::read(&mut out, None).unwrap() {
            v5::Packet::Disconnect(d) => assert_eq!(d.reason_code, Reason::TopicAliasInvalid),
            p => panic!("{p:?}"),
        }
        assert!(out.is_empty(), "nothing left over: {out:?}");
    }

    #[test]
    fn the_connack_states_the_limits() {
        let asked = Asked {
            session_expiry: 0,
            receive_maximum: 10,
            maximum_packet_size: None,
            assigned_id: true,
            will: None,
        };
        let limits = Limits {
            receive_maximum: 20,
            topic_alias_maximum: 3,
        };
        let mut out = connack(false, 1000, limits, &asked, "pump-1");
        match v5::Packet::read(&mut out, None).unwrap() {
            v5::Packet::ConnAck(a) => {
                let p = a.properties.unwrap();
                assert_eq!(p.receive_max, Some(20));
                assert_eq!(p.max_packet_size, Some(1005));
                assert_eq!(p.topic_alias_max, Some(3));
                assert_eq!(p.assigned_client_identifier.as_deref(), Some("pump-1"));
                assert_eq!(p.shared_subscription_available, Some(0));
                assert_eq!(p.max_qos, None, "QoS 2 available");
            }
            p => panic!("{p:?}"),
        }
    }
}
