//! SUBSCRIBEs narrowed by the ACL: the refused filters taken out before the broker sees
//! them, and put back as refusals in the broker's SUBACK. Pure; tested below.

use std::sync::PoisonError;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, SubAck, SubscribeReasonCode};
use rumqttc::mqttbytes::PacketType;

use super::v5::Granted;
use crate::policy::TopicFilter;
use crate::registry::Grant;

/// The filters of a SUBSCRIBE refused by the device's ACL: where they stood in it, and
/// what they were.
#[derive(Debug, Default)]
pub(super) struct RefusedFilters {
    pub(super) positions: Vec<usize>,
    /// Of the packet as the device sent it.
    pub(super) total: usize,
    pub(super) filters: Vec<String>,
}

/// Takes the filters `grant` does not allow out of `s` (syntax checked by [`inspect`]).
pub(super) fn refuse_filters(
    s: &mut rumqttc::mqttbytes::v4::Subscribe,
    grant: &Grant,
) -> RefusedFilters {
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
pub(super) fn granted(broker: Vec<SubscribeReasonCode>, refused: &RefusedFilters) -> Vec<Granted> {
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
pub(super) fn suback_v4(pkid: u16, granted: Vec<Granted>) -> Packet {
    let codes = granted
        .into_iter()
        .map(|g| match g {
            Granted::Qos(q) => SubscribeReasonCode::Success(q),
            _ => SubscribeReasonCode::Failure,
        })
        .collect();
    Packet::SubAck(SubAck::new(pkid, codes))
}

pub(super) type Narrowed = std::sync::Mutex<std::collections::HashMap<u16, RefusedFilters>>;

/// The broker's SUBACK for a SUBSCRIBE the edge narrowed, with 0x80 put back where the
/// refused filters stood; any other frame as it is (the 3.1.1 path, frames passed raw).
pub(super) fn widen_suback(frame: BytesMut, narrowed: &Narrowed) -> BytesMut {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceId;
    use rumqttc::mqttbytes::v4::Subscribe;
    use rumqttc::mqttbytes::QoS;

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
