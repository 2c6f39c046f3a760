//! One device connection, from TCP accept to close: the TLS handshake, the CONNECT and
//! the decisions on it, then the relay ([`super::relay`]) until the session ends, and what
//! its end costs the device.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, LastWill, Packet};
use rumqttc::mqttbytes::Protocol;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::broker_side::*;
use super::relay::*;
use super::sessions::SessionAsk;
use super::v5::{self};
use super::EdgeShared;
use crate::device::DeviceId;
use crate::events::{Refusal, Violation};
use crate::ingest::Message;
use crate::mqtt::{self, PUBLISH_OVERHEAD};
use crate::pki::cert;
use crate::policy::Offence;
use crate::policy::TopicFilter;
use crate::registry::Grant;
use crate::spool::{Properties, Spool};

/// Largest CONNECT accepted before the device's class is known: a will message of up to
/// this size plus client id and credentials.
pub(super) const MAX_CONNECT: usize = 64 * 1024 + PUBLISH_OVERHEAD;
/// How long a close_notify or a refusal CONNACK may take to leave.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the embedded broker may take to accept a session and answer its CONNECT.
pub(super) const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) type DeviceStream = TlsStream<TcpStream>;

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
            facts: Facts {
                shared: &shared,
                device: &device,
                peer,
                grant: &grant,
                connect: &connect,
                dialect: &dialect,
            },
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
pub(super) fn hold_will(
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
pub(super) fn end_will(spool: &Spool, key: crate::spool::Key, device: &DeviceId, clean: bool) {
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
pub(super) enum Dialect {
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
pub(super) async fn read_connect(
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
pub(super) fn admit(
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
pub(super) fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}

pub(super) fn connack(code: ConnectReturnCode) -> Vec<u8> {
    let mut out = BytesMut::new();
    // Writing a CONNACK into memory cannot fail.
    let _ = ConnAck::new(code, false).write(&mut out);
    out.to_vec()
}

/// Why the inbound half of a relay stopped a session.
pub(super) enum Stop {
    Violation(Violation),
    /// An MQTT 5 packet the edge cannot handle, and the DISCONNECT reason code for it.
    Bad(Violation, v5::Reason),
    /// Held back by its rate at every publish for this long.
    HardLimit(Duration),
}

/// Acts on why the device's side of a session ended; returns the reason to log.
pub(super) fn stopped(
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
pub(super) fn punish(shared: &EdgeShared, device: &DeviceId, offence: Offence<'_>) {
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

pub(super) fn quarantine_failed(device: &DeviceId, e: &crate::quarantine::QuarantineError) {
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
pub(super) fn inspect(packet: &Packet) -> Result<(), Violation> {
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
pub(super) async fn close<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let _ = timeout(CLOSE_TIMEOUT, s.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{PubAck, Publish, SubAck, Subscribe, SubscribeFilter};
    use rumqttc::mqttbytes::QoS;

    fn subscribe(filters: &[&str]) -> Packet {
        let mut s = Subscribe::new(filters[0], QoS::AtLeastOnce);
        s.filters = filters
            .iter()
            .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce))
            .collect();
        Packet::Subscribe(s)
    }

    #[test]
    fn inspection_passes_a_clients_packets_and_names_what_is_wrong_with_others() {
        for ok in [
            subscribe(&["ward/pump-1/cmd/#", "ward/+/alarm"]),
            Packet::Publish(Publish::new("ward/pump-1/hr", QoS::AtLeastOnce, "72")),
            Packet::PingReq,
            Packet::Disconnect,
            Packet::PubAck(PubAck::new(3)),
        ] {
            assert_eq!(inspect(&ok), Ok(()), "{ok:?}");
        }
        match inspect(&subscribe(&["ward/pump-1/#", "ward/#/hr"])) {
            Err(Violation::InvalidTopic { topic, .. }) => assert_eq!(topic, "ward/#/hr"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            inspect(&Packet::Connect(Connect::new("pump-1"))),
            Err(Violation::Protocol("second CONNECT".into()))
        );
        for server in [
            Packet::PingResp,
            Packet::SubAck(SubAck::new(1, vec![])),
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
        ] {
            assert_eq!(
                inspect(&server),
                Err(Violation::Protocol(
                    "server-to-client packet sent by a client".into()
                )),
                "{server:?}"
            );
        }
    }
}
