//! One device connection, from TCP accept to close.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{Protocol, QoS};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::EdgeShared;
use crate::device::DeviceId;
use crate::events::{self, Refusal, Violation};
use crate::mqtt::{self, ReadError, PUBLISH_OVERHEAD, V5_CONNACK_UNSUPPORTED};
use crate::pki::cert;
use crate::policy::{acl, Admission, TopicFilter};
use crate::registry::Grant;
use crate::spool::{now_ms, Durable, Record, Spool};
use crate::uplink::{TopicMap, UnmappableTopic};

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

    let stale = shared
        .sessions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(device.clone(), grant.acl.clone())
        .is_some_and(|acl| acl != grant.acl);
    if stale && !connect.clean_session {
        purge_session(&shared.broker, &device, &grant.class).await;
    }
    let broker = match connect_broker(&shared.broker, &connect).await {
        Ok(b) => b,
        Err(e) => {
            let refusal = Refusal::BrokerUnavailable(e);
            events::connection_refused(peer, Some(&device), &refusal);
            let reply = connack(ConnectReturnCode::ServiceUnavailable);
            let _ = timeout(CLOSE_TIMEOUT, tls.write_all(&reply)).await;
            return close(tls).await;
        }
    };

    let will = connect
        .last_will
        .as_ref()
        .and_then(|w| hold_will(&shared.spool, &device, &grant, w));
    if connect.clean_session {
        shared.exactly_once.clean(&device);
    }
    events::device_connected(peer, &device, &grant.class);
    let (reason, clean) = relay(
        tls,
        buf,
        broker,
        &shared,
        &device,
        peer,
        &grant,
        close_token,
    )
    .await;
    if let Some(key) = will {
        end_will(
            &shared.spool,
            key,
            &device,
            clean || shutdown.is_cancelled(),
        );
    }
    events::device_disconnected(peer, &device, &reason);
}

/// Stores the will of a CONNECT (already checked by [`admit`]) in the spool, held until
/// the session ends. A will the spool has no room for is not held: the spool has refused
/// and logged it, and the device is still served (its data matters more than its will).
fn hold_will(
    spool: &Spool,
    device: &DeviceId,
    grant: &Grant,
    will: &rumqttc::mqttbytes::v4::LastWill,
) -> Option<crate::spool::Key> {
    let record = received(device, &will.topic, &will.message, will.qos);
    spool.hold_will(&record, grant.priority(&will.topic)).ok()
}

/// The record of a message `device` sent now.
fn received(device: &DeviceId, topic: &str, payload: &bytes::Bytes, qos: QoS) -> Record {
    Record {
        device: device.clone(),
        topic: topic.to_owned(),
        payload: payload.clone(),
        qos: qos as u8,
        received_at_ms: now_ms(),
    }
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
        let allowed = acl::validate_topic_name(&will.topic).is_ok()
            && grant.acl.may_publish(&will.topic)
            && upstream_form(device, &will.topic, &shared.topics).is_ok()
            && will.message.len() <= grant.max_payload;
        if !allowed {
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
        Ok((mut stream, _)) => {
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

/// Opens the device's session on the embedded broker: the device's CONNECT with the
/// gateway's broker credentials instead of its own (identity is the certificate), and the
/// broker's CONNACK back.
async fn connect_broker(
    broker: &crate::broker::EmbeddedBroker,
    connect: &Connect,
) -> Result<(TcpStream, Packet), String> {
    let mut stream = timeout(BROKER_TIMEOUT, TcpStream::connect(broker.addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut c = connect.clone();
    c.login = Some(broker.login.mqtt());
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
        Some(p @ Packet::ConnAck(_)) if buf.is_empty() => Ok((stream, p)),
        Some(Packet::ConnAck(_)) => Err("broker sent data after its CONNACK".into()),
        Some(other) => Err(format!("broker answered CONNECT with {other:?}")),
        None => Err("broker closed the connection".into()),
    }
}

/// Packets read from a device and not yet written to the broker (waiting for their
/// records to become durable). Bounds what one device can have in flight.
const PIPELINE_DEPTH: usize = 64;

/// Relays between device and broker until one side ends, a violation, or `close`.
/// Returns the reason the session ended, and whether it ended cleanly (the device's
/// DISCONNECT reached the broker).
///
/// Every PUBLISH that passes [`inspect`] is appended to the spool. It is written to the
/// broker — which acknowledges it to the device — only after its record is durable if it
/// is QoS 1 or 2; QoS 0 does not wait for its own flush. Packets reach the broker in the
/// order the device sent them.
#[allow(clippy::too_many_arguments)]
async fn relay(
    tls: DeviceStream,
    mut buf: BytesMut,
    broker: (TcpStream, Packet),
    shared: &EdgeShared,
    device: &DeviceId,
    peer: SocketAddr,
    grant: &Grant,
    close: CancellationToken,
) -> (String, bool) {
    let (broker, connack) = broker;
    let (mut dev_rd, mut dev_wr) = tokio::io::split(tls);
    let (mut br_rd, mut br_wr) = broker.into_split();

    let mut out = BytesMut::new();
    let _ = connack.write(&mut out, MAX_CONNECT);
    if let Err(e) = dev_wr.write_all(&out).await {
        return (format!("device write failed: {e}"), false);
    }
    let clean = std::sync::atomic::AtomicBool::new(false);

    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Packet, Option<Durable>)>(PIPELINE_DEPTH);
    let mut throttled: u64 = 0;
    let max_packet = grant.max_payload.saturating_add(PUBLISH_OVERHEAD);
    let inbound = async {
        // Owned by this future, so the forward half sees the channel close once it ends.
        let tx = tx;
        loop {
            let packet = match mqtt::read_packet(&mut dev_rd, &mut buf, max_packet).await {
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
            inspect(&packet, device, grant, &shared.topics).map_err(Stop::Violation)?;
            if let Packet::Subscribe(s) = &packet {
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
                // Stored when it first came: acknowledged again, not stored again.
                Packet::Publish(_) if repeat => None,
                // Memory work only (sealing, the quota's plan, a queue): the spool's writer
                // thread does the disk's.
                Packet::Publish(p) => match spool_publish(&shared.spool, device, grant, p) {
                    Ok(d) => {
                        crate::counters::bump(device, |c| c.accepted += 1);
                        if p.qos == QoS::ExactlyOnce {
                            shared.exactly_once.stored(device, p.pkid);
                        }
                        Some(d)
                    }
                    // QoS 0 has no acknowledgement to withhold; the refusal is counted and
                    // logged by the spool.
                    Err(_) if p.qos == QoS::AtMostOnce => continue,
                    Err(e) => return Ok(format!("not stored, so not acknowledged: {e}")),
                },
                _ => None,
            };
            let last = matches!(packet, Packet::Disconnect);
            if tx.send((packet, durable)).await.is_err() {
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
    // The device's side has one writer: the broker's packets and the edge's own PUBACKs go
    // to it whole, one after the other.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<u16>();
    let forward = async {
        let mut out = BytesMut::new();
        while let Some((packet, durable)) = rx.recv().await {
            if let (Packet::Publish(p), Some(durable)) = (&packet, durable) {
                if p.qos != QoS::AtMostOnce {
                    if let Err(e) = durable.wait().await {
                        return format!("record not durable, so not acknowledged: {e}");
                    }
                }
            }
            if let Packet::Publish(p) = &packet {
                // QoS 0 and 1 reach the broker only for a local subscriber (or to be
                // retained); QoS 1 is acknowledged here, in the order received, once
                // durable. QoS 2 goes through the broker's handshake as before.
                let local = p.retain || shared.subscriptions.wanted(&p.topic);
                if p.qos != QoS::ExactlyOnce && !local {
                    if p.qos == QoS::AtLeastOnce && ack_tx.send(p.pkid).is_err() {
                        return "device side closed".to_owned();
                    }
                    continue;
                }
            }
            out.clear();
            if let Err(e) = packet.write(&mut out, usize::MAX) {
                return format!("cannot encode for the broker: {e}");
            }
            if let Err(e) = br_wr.write_all(&out).await {
                return format!("broker write failed: {e}");
            }
            if let Packet::Publish(p) = &packet {
                if p.qos == QoS::AtLeastOnce && ack_tx.send(p.pkid).is_err() {
                    return "device side closed".to_owned();
                }
            }
            if matches!(packet, Packet::Disconnect) {
                // Let the broker see the clean DISCONNECT before the socket closes.
                let _ = br_wr.shutdown().await;
                clean.store(true, std::sync::atomic::Ordering::Relaxed);
                return "device sent DISCONNECT".to_owned();
            }
        }
        "device side closed".to_owned()
    };
    let outbound = async {
        let mut buf = BytesMut::new();
        let mut ack = BytesMut::new();
        loop {
            tokio::select! {
                pkid = ack_rx.recv() => {
                    let Some(mut pkid) = pkid else { return Ok(()) };
                    // Every acknowledgement ready goes in one write (one TLS record).
                    ack.clear();
                    loop {
                        let _ = Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(pkid))
                            .write(&mut ack, usize::MAX);
                        match ack_rx.try_recv() {
                            Ok(next) => pkid = next,
                            Err(_) => break,
                        }
                    }
                    dev_wr.write_all(&ack).await?;
                }
                frame = mqtt::read_frame(&mut br_rd, &mut buf, usize::MAX) => {
                    let header = match frame {
                        Ok(Some(h)) => h,
                        Ok(None) => return Ok(()),
                        Err(ReadError::Io(e)) => return Err(e),
                        Err(e) => return Err(std::io::Error::other(e.to_string())),
                    };
                    let frame = buf.split_to(header.frame_length());
                    // The broker acknowledges the copies the edge gave it of messages the
                    // edge has acknowledged already.
                    if !matches!(header.packet_type(), Ok(rumqttc::mqttbytes::PacketType::PubAck)) {
                        dev_wr.write_all(&frame).await?;
                    }
                }
            }
        }
    };

    tokio::pin!(forward);
    let reason = tokio::select! {
        _ = close.cancelled() => "closed by the gateway".to_owned(),
        r = inbound => {
            let reason = stopped(shared, device, peer, r);
            // What the device sent before and was accepted reaches the broker first.
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
    (reason, clean.load(std::sync::atomic::Ordering::Relaxed))
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
                Violation::PublishDenied { .. }
                    | Violation::SubscribeDenied { .. }
                    | Violation::TooManySubscriptions { .. }
            ) {
                match shared
                    .quarantine
                    .note_violation(device, std::time::Instant::now())
                {
                    // Any other session of the device goes too.
                    Ok(true) => {
                        shared.close_device(device);
                    }
                    Ok(false) => {}
                    Err(e) => quarantine_failed(device, &e),
                }
            }
            format!("violation: {}", v.code())
        }
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

/// Appends a device's PUBLISH to the spool.
fn spool_publish(
    spool: &Spool,
    device: &DeviceId,
    grant: &Grant,
    p: &rumqttc::mqttbytes::v4::Publish,
) -> Result<Durable, crate::spool::SpoolError> {
    let record = received(device, &p.topic, &p.payload, p.qos);
    spool.append(&record, grant.priority(&p.topic))
}

/// The policy check of one packet from a device.
fn inspect(
    packet: &Packet,
    device: &DeviceId,
    grant: &Grant,
    topics: &TopicMap,
) -> Result<(), Violation> {
    match packet {
        Packet::Publish(p) => {
            if let Err(e) = acl::validate_topic_name(&p.topic) {
                return Err(match e {
                    acl::TopicError::WildcardInTopicName => Violation::WildcardPublish {
                        topic: p.topic.clone(),
                    },
                    e => Violation::InvalidTopic {
                        topic: p.topic.clone(),
                        reason: e.to_string(),
                    },
                });
            }
            if p.payload.len() > grant.max_payload {
                return Err(Violation::OversizedPacket {
                    size: p.payload.len(),
                    max: grant.max_payload,
                });
            }
            if !grant.acl.may_publish(&p.topic) {
                return Err(Violation::PublishDenied {
                    topic: p.topic.clone(),
                });
            }
            upstream_form(device, &p.topic, topics)
        }
        Packet::Subscribe(s) => {
            for f in &s.filters {
                let filter = TopicFilter::parse(&f.path).map_err(|e| Violation::InvalidTopic {
                    topic: f.path.clone(),
                    reason: e.to_string(),
                })?;
                if !grant.acl.may_subscribe(&filter) {
                    return Err(Violation::SubscribeDenied {
                        filter: f.path.clone(),
                    });
                }
            }
            Ok(())
        }
        Packet::Unsubscribe(_)
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

/// Refuses a topic the uplink could not forward as it is: one whose upstream form would be
/// too long (it would be set aside there, after being acknowledged here), or would land in
/// the command space (a device forging commands to itself or others: an ACL violation).
fn upstream_form(device: &DeviceId, topic: &str, topics: &TopicMap) -> Result<(), Violation> {
    match topics.check(device, topic) {
        Ok(()) => Ok(()),
        Err(UnmappableTopic::CommandSpace) => Err(Violation::PublishDenied {
            topic: topic.to_owned(),
        }),
        Err(e) => Err(Violation::InvalidTopic {
            topic: topic.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Ends a TLS connection politely, within a bound.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let _ = timeout(CLOSE_TIMEOUT, s.shutdown()).await;
}
