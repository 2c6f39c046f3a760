//! What a device can do wrong once connected, and how each wrong is named.
//!
//! A [`Violation`] is found by the edge (the packet's inspection), by [`crate::ingest`]
//! (the policy verdict on a PUBLISH) or by the subscription limits; its [`ViolationKind`]
//! decides how it is counted and whether it counts towards quarantine
//! ([`super::sanction`]). Strings a device controls are shown escaped and cut ([`shown`]).

use std::fmt;

/// How a violation is counted: each kind has its counter and its event name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// A publish or subscription outside the device's ACL.
    Acl,
    /// A SUBSCRIBE past the class's `max_subscriptions`.
    SubscriptionLimit,
    /// A packet over the class's `max_payload`.
    Oversized,
    /// Malformed, a wildcard in a publish, an invalid topic, past Receive Maximum.
    Protocol,
}

/// Why a connected device was disconnected by the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    PublishDenied {
        topic: String,
    },
    SubscribeDenied {
        filter: String,
    },
    WildcardPublish {
        topic: String,
    },
    InvalidTopic {
        topic: String,
        reason: String,
    },
    OversizedPacket {
        size: usize,
        max: usize,
    },
    /// A SUBSCRIBE that would take the device past its class's `max_subscriptions`.
    TooManySubscriptions {
        max: usize,
    },
    /// An MQTT 5 device with more QoS 1 and 2 PUBLISHes unacknowledged than the edge's
    /// Receive Maximum.
    ReceiveMaximum {
        max: u16,
    },
    /// A packet the protocol does not allow here, or one that cannot be parsed.
    Protocol(String),
}

impl Violation {
    pub fn kind(&self) -> ViolationKind {
        match self {
            Violation::PublishDenied { .. } | Violation::SubscribeDenied { .. } => {
                ViolationKind::Acl
            }
            Violation::OversizedPacket { .. } => ViolationKind::Oversized,
            Violation::TooManySubscriptions { .. } => ViolationKind::SubscriptionLimit,
            Violation::WildcardPublish { .. }
            | Violation::InvalidTopic { .. }
            | Violation::ReceiveMaximum { .. }
            | Violation::Protocol(_) => ViolationKind::Protocol,
        }
    }

    /// The stable event name this violation is logged under.
    pub fn event(&self) -> &'static str {
        match self.kind() {
            ViolationKind::Acl => "edge.acl_violation",
            ViolationKind::Oversized => "edge.oversized_packet",
            ViolationKind::SubscriptionLimit => "edge.subscription_limit",
            ViolationKind::Protocol => "edge.protocol_violation",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Violation::PublishDenied { .. } => "publish_denied",
            Violation::SubscribeDenied { .. } => "subscribe_denied",
            Violation::WildcardPublish { .. } => "wildcard_publish",
            Violation::InvalidTopic { .. } => "invalid_topic",
            Violation::OversizedPacket { .. } => "oversized_packet",
            Violation::TooManySubscriptions { .. } => "too_many_subscriptions",
            Violation::ReceiveMaximum { .. } => "receive_maximum_exceeded",
            Violation::Protocol(_) => "protocol",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::PublishDenied { topic } => {
                write!(f, "publish to {:?} denied by ACL", Shown(topic))
            }
            Violation::SubscribeDenied { filter } => {
                write!(f, "subscribe to {:?} denied by ACL", Shown(filter))
            }
            Violation::WildcardPublish { topic } => {
                write!(f, "publish topic {:?} contains a wildcard", Shown(topic))
            }
            Violation::InvalidTopic { topic, reason } => {
                write!(f, "topic {:?}: {reason}", Shown(topic))
            }
            Violation::OversizedPacket { size, max } => {
                write!(f, "packet of {size} bytes exceeds the limit of {max} bytes")
            }
            Violation::TooManySubscriptions { max } => {
                write!(f, "subscription beyond the limit of {max} filters")
            }
            Violation::ReceiveMaximum { max } => write!(
                f,
                "more than the Receive Maximum of {max} QoS 1 and 2 PUBLISHes unacknowledged"
            ),
            Violation::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

/// A string a peer controls as logs and audit records show it: a device may send topics of
/// up to 64 KiB, which would swamp both; past [`SHOWN_TOPIC`] bytes only the start and the
/// length show.
pub(crate) struct Shown<'a>(pub(crate) &'a str);

/// A string a peer controls as logs and audit records show it: quoted, escaped, and cut
/// after [`SHOWN_TOPIC`] bytes.
pub fn shown(s: &str) -> String {
    format!("{:?}", Shown(s))
}

/// Bytes of a topic that logs and audit records show.
const SHOWN_TOPIC: usize = 200;

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= SHOWN_TOPIC {
            return write!(f, "{:?}", self.0);
        }
        let mut end = SHOWN_TOPIC;
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{:?}… ({} bytes)", &self.0[..end], self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_peer_string_is_cut_and_escaped() {
        let long = "a\"".repeat(300);
        let s = shown(&long);
        assert!(s.starts_with("\"a\\\"a"), "{s}");
        assert!(s.ends_with("(600 bytes)"), "{s}");
        assert!(s.len() < SHOWN_TOPIC + 120, "{}", s.len());
    }

    #[test]
    fn each_violation_has_one_kind_and_its_event_follows_from_it() {
        let acl = Violation::SubscribeDenied { filter: "x".into() };
        assert_eq!(acl.kind(), ViolationKind::Acl);
        assert_eq!(acl.event(), "edge.acl_violation");
        let limit = Violation::TooManySubscriptions { max: 16 };
        assert_eq!(limit.event(), "edge.subscription_limit");
        let big = Violation::OversizedPacket { size: 2, max: 1 };
        assert_eq!(big.event(), "edge.oversized_packet");
        let bad = Violation::Protocol("second CONNECT".into());
        assert_eq!(bad.event(), "edge.protocol_violation");
    }
}
