//! The edge's decisions: connections refused and admitted, policy violations, throttling,
//! revoked certificates and TLS reloads.

use std::fmt;
use std::net::SocketAddr;

use super::{dev, Events};
use crate::device::DeviceId;
use crate::policy::violation::Shown;
pub use crate::policy::Violation;
use crate::policy::ViolationKind;

/// Why a connection was refused before it reached the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake failed: no, invalid, expired, revoked or foreign certificate.
    Tls(String),
    HandshakeTimeout,
    /// The certificate verified but does not name a device.
    BadCertificate(String),
    ConnectTimeout,
    /// The first packet was not a well-formed MQTT CONNECT.
    NotConnect(String),
    UnsupportedProtocol {
        name: String,
        level: u8,
    },
    ClientIdMismatch {
        client_id: String,
    },
    Unregistered,
    AddressMismatch {
        registered: std::net::IpAddr,
    },
    WillNotAllowed {
        topic: String,
    },
    Quarantined {
        reason: String,
    },
    TooManyConnections,
    BrokerUnavailable(String),
    /// An MQTT 5 CONNECT asked for enhanced authentication, which the edge does not offer
    /// (identity is the certificate).
    AuthenticationMethod(String),
}

impl Refusal {
    /// A short stable code for the reason, for log queries.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Tls(_) => "tls",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::BadCertificate(_) => "bad_certificate",
            Refusal::ConnectTimeout => "connect_timeout",
            Refusal::NotConnect(_) => "not_connect",
            Refusal::UnsupportedProtocol { .. } => "unsupported_protocol",
            Refusal::ClientIdMismatch { .. } => "client_id_mismatch",
            Refusal::Unregistered => "unregistered",
            Refusal::AddressMismatch { .. } => "address_mismatch",
            Refusal::WillNotAllowed { .. } => "will_not_allowed",
            Refusal::Quarantined { .. } => "quarantined",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::AuthenticationMethod(_) => "authentication_method",
            Refusal::BrokerUnavailable(_) => "broker_unavailable",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Refusal::HandshakeTimeout => f.write_str("TLS handshake timed out"),
            Refusal::BadCertificate(e) => write!(f, "{e}"),
            Refusal::ConnectTimeout => f.write_str("no CONNECT within the connect timeout"),
            Refusal::NotConnect(e) => write!(f, "first packet is not a valid CONNECT: {e}"),
            Refusal::UnsupportedProtocol { name, level } => {
                write!(f, "unsupported protocol {name:?} level {level}")
            }
            Refusal::ClientIdMismatch { client_id } => {
                write!(
                    f,
                    "client id {client_id:?} differs from the certificate's device id"
                )
            }
            Refusal::Unregistered => f.write_str("device is not registered"),
            Refusal::AddressMismatch { registered } => {
                write!(
                    f,
                    "device is registered at {registered}, not at this address"
                )
            }
            Refusal::WillNotAllowed { topic } => {
                write!(
                    f,
                    "last-will topic {topic:?} is outside the device's publish ACL"
                )
            }
            Refusal::Quarantined { reason } => write!(f, "device is quarantined ({reason})"),
            Refusal::TooManyConnections => f.write_str("edge connection limit reached"),
            Refusal::BrokerUnavailable(e) => write!(f, "embedded broker unavailable: {e}"),
            Refusal::AuthenticationMethod(m) => {
                write!(f, "authentication method {:?} is not offered", Shown(m))
            }
        }
    }
}

impl Events {
    pub fn connection_refused(
        &self,
        peer: SocketAddr,
        device: Option<&DeviceId>,
        reason: &Refusal,
    ) {
        self.audit(
            "edge.connect_refused",
            device,
            format!("code={} peer={peer} reason={reason}", reason.code()),
        );
        self.connection_refused_unaudited(peer, device, reason);
    }

    /// A refusal logged and counted but not audited: one of a source's repeated refusals, to
    /// be summarised ([`refusals_summarised`]).
    pub fn connection_refused_unaudited(
        &self,
        peer: SocketAddr,
        device: Option<&DeviceId>,
        reason: &Refusal,
    ) {
        if let Some(d) = device {
            self.count(d, |c| c.refused += 1);
        }
        self.metrics()
            .connections_refused
            .get_or_create(&[("reason", reason.code())])
            .inc();
        tracing::warn!(
            event = "edge.connect_refused",
            %peer,
            device = dev(device),
            code = reason.code(),
            reason = %reason,
            "connection refused"
        );
    }

    /// Refusals of `source` (`None`: of sources beyond those followed one by one) in the last
    /// `interval` that were not audited in full.
    pub fn refusals_summarised(
        &self,
        source: Option<std::net::IpAddr>,
        count: u64,
        interval: std::time::Duration,
    ) {
        let peer = source.map_or_else(|| "other".to_owned(), |s| s.to_string());
        let interval = humantime::format_duration(interval);
        self.audit(
            "edge.connect_refused_repeated",
            None,
            format!("peer={peer} count={count} interval={interval}"),
        );
        tracing::warn!(
            event = "edge.connect_refused_repeated",
            %peer,
            count,
            %interval,
            "more connections refused before a device certificate was shown"
        );
    }

    pub fn device_connected(&self, peer: SocketAddr, device: &DeviceId, class: &str) {
        self.audit(
            "edge.connected",
            Some(device),
            format!("peer={peer} class={class}"),
        );
        tracing::info!(event = "edge.connected", %peer, %device, class, "device connected");
    }

    pub fn violation(&self, peer: SocketAddr, device: &DeviceId, v: &Violation) {
        self.report_violation(peer, device, v, None);
    }

    /// A SUBSCRIBE filter outside the device's ACL, refused with SUBACK 0x80 (3.1.1) or
    /// 0x87 (5), named by `answer`; the session goes on. Counted and audited as an ACL
    /// violation.
    pub fn subscribe_refused(
        &self,
        peer: SocketAddr,
        device: &DeviceId,
        filter: &str,
        answer: &str,
    ) {
        let v = Violation::SubscribeDenied {
            filter: filter.to_owned(),
        };
        self.report_violation(peer, device, &v, Some(answer));
    }

    /// An MQTT 5 PUBLISH refused with a reason code (`answer`, e.g. `puback_0x87`) and the
    /// session kept. Counted and audited as the violation it is.
    pub fn publish_refused(
        &self,
        peer: SocketAddr,
        device: &DeviceId,
        v: &Violation,
        answer: &str,
    ) {
        self.report_violation(peer, device, v, Some(answer));
    }

    /// Counts, audits and logs a violation; `answer` is what the device got instead of being
    /// disconnected.
    fn report_violation(
        &self,
        peer: SocketAddr,
        device: &DeviceId,
        v: &Violation,
        answer: Option<&str>,
    ) {
        self.count_violation(device, v);
        if matches!(
            v,
            Violation::PublishDenied { .. }
                | Violation::WildcardPublish { .. }
                | Violation::InvalidTopic { .. }
                | Violation::OversizedPacket { .. }
        ) {
            // A message refused, whether the session ends (3.1.1) or is kept (MQTT 5).
            self.metrics()
                .messages_refused
                .get_or_create(&[("reason", v.code())])
                .inc();
        }
        let answered = answer.map(|a| format!(" answer={a}")).unwrap_or_default();
        self.audit(
            v.event(),
            Some(device),
            format!("code={} peer={peer} reason={v}{answered}", v.code()),
        );
        let outcome = answer.map_or("device disconnected", |_| "refused, session kept");
        tracing::warn!(
            event = v.event(),
            %peer,
            %device,
            code = v.code(),
            reason = %v,
            answer,
            "{outcome} for a policy violation"
        );
    }

    /// Counts a violation in the device's counters, by kind.
    pub fn count_violation(&self, device: &DeviceId, v: &Violation) {
        self.metrics().violation(device.as_str(), v.code());
        self.count(device, |c| match v.kind() {
            ViolationKind::Acl => c.acl_violations += 1,
            ViolationKind::SubscriptionLimit => c.subscription_limit += 1,
            ViolationKind::Oversized | ViolationKind::Protocol => c.protocol_violations += 1,
        });
    }

    /// A device's persistent broker session, opened under rights it no longer has, was ended
    /// before it could resume it.
    pub fn session_purged(&self, device: &DeviceId, class: &str, error: Option<&String>) {
        let outcome = error.map_or_else(|| "ok".to_owned(), |e| format!("failed: {e}"));
        self.audit(
            "edge.session_purged",
            Some(device),
            format!("class={class} outcome={outcome}"),
        );
        tracing::warn!(
            event = "edge.session_purged",
            %device,
            class,
            outcome,
            "persistent session from before the device's class changed ended"
        );
    }

    /// A device's PUBLISH (or will) was accepted into the spool.
    pub fn message_accepted(&self, device: &DeviceId) {
        self.metrics().accepted(device.as_str());
        self.count(device, |c| c.accepted += 1);
    }

    /// A device held back by its rate (a wait before its next packet): counted every time,
    /// logged the first time in a connection.
    pub fn throttled(
        &self,
        peer: SocketAddr,
        device: &DeviceId,
        wait: std::time::Duration,
        first: bool,
    ) {
        self.count(device, |c| c.throttled += 1);
        self.metrics().throttled(device.as_str());
        if !first {
            return;
        }
        tracing::info!(
            event = "edge.throttled",
            %peer,
            %device,
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            "device over its rate: reading slowed (nothing dropped)"
        );
    }

    /// A device held back by its rate without pause for the hard limit.
    pub fn rate_hard_limit(&self, peer: SocketAddr, device: &DeviceId, limit: std::time::Duration) {
        let limit = humantime::format_duration(limit);
        self.metrics()
            .policy_events
            .get_or_create(&[("kind", "rate_hard_limit")])
            .inc();
        self.audit(
            "edge.rate_hard_limit",
            Some(device),
            format!("peer={peer} over its rate without pause for {limit}"),
        );
        tracing::warn!(
            event = "edge.rate_hard_limit",
            %peer,
            %device,
            limit = %limit,
            "device stayed over its rate past the hard limit"
        );
    }

    pub fn device_disconnected(&self, peer: SocketAddr, device: &DeviceId, reason: &str) {
        tracing::info!(event = "edge.disconnected", %peer, %device, reason, "device disconnected");
    }

    pub fn live_connection_revoked(&self, peer: SocketAddr, device: &DeviceId, reason: &str) {
        self.audit(
            "edge.connection_revoked",
            Some(device),
            format!("peer={peer} reason={reason}"),
        );
        tracing::warn!(
            event = "edge.connection_revoked",
            %peer,
            %device,
            reason,
            "live connection closed: its certificate no longer verifies"
        );
    }

    /// A reload brought a CRL that revokes `serial` (of `device`, if the PKI index names it).
    pub fn certificate_revoked(&self, serial: &str, device: Option<&str>) {
        self.audit_str("device.revoked", device, &format!("serial={serial}"));
        tracing::warn!(
            event = "device.revoked",
            serial,
            device = device.unwrap_or("-"),
            "certificate revoked by the new CRL"
        );
    }

    pub fn tls_reloaded(&self, crls: usize, closed: usize) {
        self.audit(
            "edge.tls_reloaded",
            None,
            format!("crls={crls} closed={closed}"),
        );
        tracing::info!(
            event = "edge.tls_reloaded",
            crls,
            closed,
            "TLS material and CRL reloaded"
        );
    }

    pub fn tls_reload_failed(&self, error: &dyn std::error::Error) {
        self.audit("edge.tls_reload_failed", None, format!("error={error}"));
        tracing::error!(
            event = "edge.tls_reload_failed",
            error = %error,
            "TLS reload failed; the previous certificates and CRL stay in force"
        );
    }
}
