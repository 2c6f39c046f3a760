//! The relay's forwarding half: takes the inbound half's packets in order, waits for each
//! QoS 1 or 2 record to be durable, answers what the edge answers itself (PUBACK, PINGRESP,
//! refusals), attaches the broker session when a packet first needs it and writes to it,
//! and keeps that session alive.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::broker_side::*;
use super::relay::{needs_broker, Attachment, FromInbound, Pipe, ToDevice, BROKER_PING};
use super::suback::*;
use super::v5::{self, PubCode};

/// Until the device's side closes, the device disconnects, or the broker cannot be written;
/// returns why. `own` holds the acknowledgements the edge owes the broker.
pub(super) async fn forward<'a>(
    p: &Pipe<'a>,
    mut rx: mpsc::Receiver<FromInbound>,
    mut own_rx: mpsc::UnboundedReceiver<Packet>,
    to_device: mpsc::UnboundedSender<ToDevice>,
    mut broker: Option<Attachment<'a>>,
) -> String {
    let (shared, device, connect) = (p.facts.shared, p.facts.device, p.facts.connect);
    let in_flight = &p.in_flight;
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
                p.narrowed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(s.pkid, refused);
            }
        }
        if let (Packet::Unsubscribe(u), Some(_)) = (&packet, &in_flight) {
            p.unsubscribing
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
            *p.session_expiry
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
                p.was_attached.store(true, Ordering::Relaxed);
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
            p.clean.store(true, Ordering::Relaxed);
            return "device sent DISCONNECT".to_owned();
        }
    }
}
