//! The one door into the spool.
//!
//! Every message the gateway forwards upstream comes in here, whoever produced it: a
//! device's PUBLISH and its last will (the edge), a Modbus reading (the poller), the update
//! agent's reports (`updates`) and the gateway's own audit records (`audit_stream`). One
//! step for all of them:
//!
//! 1. the **policy verdict** on a device's message ([`Ingest::verdict`]): a valid topic
//!    name without wildcards, a payload within the class's `max_payload`, the class's
//!    publish ACL, and an upstream form the uplink can forward (not too long for MQTT, not
//!    in the command space: a device must not forge commands);
//! 2. its **priority** class (the class's `alarm`/`vital` topics, else routine; the
//!    gateway's own streams are vital);
//! 3. the **spool append** (memory work only: sealing, the quota's plan, a queue; the
//!    spool's writer thread does the disk's), counted as accepted for the device;
//! 4. the **durability wait**: the returned [`Durable`] resolves once a group commit covers
//!    the record. The caller decides what waits for it: the edge's PUBACK/PUBREC, the audit
//!    forwarder's position. A Modbus reading has nobody to acknowledge and does not wait.
//!
//! What a refusal means is the producer's to act on: a device's violation is sanctioned by
//! the edge (disconnect, quarantine count), a Modbus reading's is audited by the poller; a
//! spool refusal has been counted and logged by the spool already.
//!
//! Tested by the unit tests below and, through the producers, by the system tests
//! (`edge`, `data_path`, `modbus`, `audit`, `updates`).

use bytes::Bytes;

use crate::clock::now_ms;
use crate::device::DeviceId;
use crate::events::{Events, Violation};
use crate::policy::acl;
use crate::registry::Grant;
use crate::spool::{Durable, Key, Priority, Properties, Record, Spool, SpoolError};
use crate::topics::{TopicMap, UnmappableTopic};

/// The door; cheap to clone (one per producer).
#[derive(Debug, Clone)]
pub struct Ingest {
    spool: Spool,
    topics: TopicMap,
    events: Events,
}

/// One message a device sends.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a Bytes,
    pub qos: u8,
    /// An MQTT 5 PUBLISH's properties, carried upstream with it.
    pub properties: Option<&'a Properties>,
}

/// User properties a device may not set: the uplink adds these names itself.
pub const RESERVED_PREFIX: &str = "wardgate-";

/// Why a device's message did not go in.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Against the device's policy: the producer sanctions it.
    #[error("{0}")]
    Policy(Violation),
    /// No room in the spool (or it failed): counted and logged by the spool.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl Ingest {
    pub fn new(spool: Spool, topics: TopicMap, events: Events) -> Self {
        Ingest {
            spool,
            topics,
            events,
        }
    }

    /// The spool behind the door (wills held at CONNECT are released or dropped on it).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The policy verdict on a message `device` would publish under `grant`: its priority
    /// class, or the violation.
    pub fn verdict(
        &self,
        device: &DeviceId,
        grant: &Grant,
        topic: &str,
        payload_len: usize,
    ) -> Result<Priority, Violation> {
        if let Err(e) = acl::validate_topic_name(topic) {
            return Err(match e {
                acl::TopicError::WildcardInTopicName => Violation::WildcardPublish {
                    topic: topic.to_owned(),
                },
                e => Violation::InvalidTopic {
                    topic: topic.to_owned(),
                    reason: e.to_string(),
                },
            });
        }
        if payload_len > grant.max_payload {
            return Err(Violation::OversizedPacket {
                size: payload_len,
                max: grant.max_payload,
            });
        }
        if !grant.acl.may_publish(topic) {
            return Err(Violation::PublishDenied {
                topic: topic.to_owned(),
            });
        }
        match self.topics.check(device, topic) {
            Ok(()) => Ok(grant.priority(topic)),
            // A device forging commands to itself or others: an ACL violation.
            Err(UnmappableTopic::CommandSpace) => Err(Violation::PublishDenied {
                topic: topic.to_owned(),
            }),
            // Too long upstream: it would be set aside there, after being acknowledged here.
            Err(e) => Err(Violation::InvalidTopic {
                topic: topic.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// A device's message, received now: verdict, priority, append. Counted as accepted.
    pub fn device(
        &self,
        device: &DeviceId,
        grant: &Grant,
        m: Message<'_>,
    ) -> Result<Durable, Refused> {
        let priority = self
            .verdict(device, grant, m.topic, m.payload.len())
            .map_err(Refused::Policy)?;
        reserved(m).map_err(Refused::Policy)?;
        let durable = self.spool.append(&received(device, m), priority)?;
        self.events.message_accepted(device);
        Ok(durable)
    }

    /// A device's last will, from its CONNECT: verdict, priority, held in the spool until
    /// its session ends (released upstream on an abnormal close, see [`Spool::hold_will`]).
    pub fn will(&self, device: &DeviceId, grant: &Grant, m: Message<'_>) -> Result<Key, Refused> {
        let priority = self
            .verdict(device, grant, m.topic, m.payload.len())
            .map_err(Refused::Policy)?;
        reserved(m).map_err(Refused::Policy)?;
        Ok(self.spool.hold_will(&received(device, m), priority)?)
    }

    /// A record of the gateway's own stream (audit, update reports) on `topic`: QoS 1,
    /// vital, room made only from the stream's own records ([`Spool::append_own`]), so it
    /// never displaces device data.
    pub fn own(
        &self,
        topic: &str,
        payload: Bytes,
        received_at_ms: u64,
    ) -> Result<Durable, SpoolError> {
        let record = Record {
            device: DeviceId::gateway(),
            topic: topic.to_owned(),
            payload,
            qos: 1,
            received_at_ms,
            properties: Default::default(),
        };
        self.spool.append_own(&record, Priority::Vital)
    }
}

/// A device's user property under the uplink's own names would be taken upstream for the
/// gateway's (its sequence number, receive time, priority): refused.
fn reserved(m: Message<'_>) -> Result<(), Violation> {
    let Some(p) = m.properties else { return Ok(()) };
    match p.user.iter().find(|(k, _)| k.starts_with(RESERVED_PREFIX)) {
        Some((k, _)) => Err(Violation::Protocol(format!(
            "user property {k:?} uses the gateway's reserved prefix {RESERVED_PREFIX:?}"
        ))),
        None => Ok(()),
    }
}

/// The record of a message `device` sent now.
fn received(device: &DeviceId, m: Message<'_>) -> Record {
    Record {
        device: device.clone(),
        topic: m.topic.to_owned(),
        payload: m.payload.clone(),
        qos: m.qos,
        received_at_ms: now_ms(),
        properties: m.properties.cloned().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::registry::Registry;

    fn setup(dir: &std::path::Path) -> (Ingest, Grant, DeviceId) {
        let text = crate::config::tests::MINIMAL.replace(
            "publish = [\"ward/{device}/#\"]",
            "publish = [\"ward/{device}/#\"]\nalarm = [\"ward/{device}/alarm/#\"]\nmax_payload = \"64B\"",
        );
        let config = Config::parse(&text, std::path::Path::new("/etc/wardgate/x.toml")).unwrap();
        let device = DeviceId::parse("pump-1").unwrap();
        let grant = Registry::from_config(&config).grant(&device).unwrap();
        let spool = Spool::open(dir, config.spool.clone(), Events::unaudited()).unwrap();
        (
            Ingest::new(spool, TopicMap::of(&config), Events::unaudited()),
            grant,
            device,
        )
    }

    fn msg<'a>(topic: &'a str, payload: &'a Bytes) -> Message<'a> {
        Message {
            topic,
            payload,
            qos: 1,
            properties: None,
        }
    }

    #[tokio::test]
    async fn a_message_within_policy_is_stored_with_its_priority_and_becomes_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, grant, device) = setup(dir.path());
        let body = Bytes::from_static(b"occlusion");
        ingest
            .device(&device, &grant, msg("ward/pump-1/alarm/occlusion", &body))
            .unwrap()
            .wait()
            .await
            .unwrap();
        let batch = ingest.spool().next_batch(8, &Default::default());
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].0.priority, Priority::Alarm);
        assert_eq!(batch[0].1.payload, body);
        assert_eq!(
            ingest.verdict(&device, &grant, "ward/pump-1/rate", 8),
            Ok(Priority::Routine)
        );
    }

    #[tokio::test]
    async fn every_violation_is_refused_before_the_spool_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, grant, device) = setup(dir.path());
        let long_level = "a".repeat(crate::uplink::MAX_TOPIC_LEN);
        let too_long = format!("ward/pump-1/{long_level}");
        let cases: [(&str, usize, &str); 5] = [
            ("ward/pump-2/rate", 1, "publish_denied"),
            ("ward/pump-1/+", 1, "wildcard"),
            ("ward/pump-1/rate", 65, "oversized"),
            // Upstream, a device's `cmd/…` would be a command: forging one is denied.
            ("ward/pump-1/cmd/bolus", 1, "publish_denied"),
            (too_long.as_str(), 1, "invalid_topic"),
        ];
        for (topic, size, code) in cases {
            let payload = Bytes::from(vec![b'x'; size]);
            match ingest.device(&device, &grant, msg(topic, &payload)) {
                Err(Refused::Policy(v)) => assert!(v.code().contains(code), "{topic}: {v:?}"),
                Err(e) => panic!("{topic}: refused by the spool, not the policy: {e}"),
                Ok(_) => panic!("{topic}: accepted"),
            }
            assert!(
                ingest.will(&device, &grant, msg(topic, &payload)).is_err(),
                "{topic}: as a will"
            );
        }
        assert_eq!(ingest.spool().stats().records, 0);
    }

    #[tokio::test]
    async fn the_gateways_own_records_are_vital_and_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, _, _) = setup(dir.path());
        ingest
            .own("audit", Bytes::from_static(b"{}"), 7)
            .unwrap()
            .wait()
            .await
            .unwrap();
        let batch = ingest.spool().next_batch(8, &Default::default());
        assert_eq!(batch[0].0.priority, Priority::Vital);
        assert_eq!(batch[0].1.device, DeviceId::gateway());
        assert_eq!(batch[0].1.received_at_ms, 7);
    }
}
