//! The relay's outbound half: the device's one writer. The edge's own replies, batched into
//! one write, and the broker's frames — as they are for a 3.1.1 device (a narrowed SUBACK
//! widened again), translated for an MQTT 5 one, each QoS 1 or 2 delivery waiting for the
//! device's Receive Maximum.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, PubAck};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;

use super::broker_side::*;
use super::relay::{write_to_device, ForV5, Pipe, ToDevice};
use super::session::*;
use super::suback::*;
use super::v5;

/// Until the broker closes the session (`Ok`) or the device cannot be written.
pub(super) async fn outbound(
    p: &Pipe<'_>,
    dev_wr: &mut WriteHalf<DeviceStream>,
    mut to_device_rx: mpsc::UnboundedReceiver<ToDevice>,
    mut from_broker: Option<(OwnedReadHalf, BytesMut)>,
    own_tx: mpsc::UnboundedSender<Packet>,
) -> std::io::Result<()> {
    let dialect = p.facts.dialect;
    let in_flight = &p.in_flight;
    let mut batch = BytesMut::new();
    // A delivery waiting for the device's Receive Maximum (MQTT 5).
    let mut held: Option<BytesMut> = None;
    let permit = || async {
        match &in_flight {
            Some(f) => {
                if let Ok(p) = f.permits.acquire().await {
                    p.forget();
                    f.to_device.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => std::future::pending().await,
        }
    };
    loop {
        tokio::select! {
            item = to_device_rx.recv() => {
                let Some(mut item) = item else { return Ok(()) };
                // Every reply ready goes in one write (one TLS record).
                batch.clear();
                loop {
                    if let ToDevice::Attached(rd, backlog) = item {
                        from_broker = Some((rd, backlog));
                    } else {
                        write_to_device(dialect, item, &mut batch);
                    }
                    match to_device_rx.try_recv() {
                        Ok(next) => item = next,
                        Err(_) => break,
                    }
                }
                if !batch.is_empty() {
                    dev_wr.write_all(&batch).await?;
                }
            }
            () = permit(), if held.is_some() => {
                if let Some(frame) = held.take() {
                    dev_wr.write_all(&frame).await?;
                }
            }
            frame = broker_frame(&mut from_broker), if held.is_none() => match frame? {
                Some(frame) => match dialect {
                    Dialect::V4 => {
                        let frame = widen_suback(frame, &p.narrowed);
                        dev_wr.write_all(&frame).await?;
                    }
                    Dialect::V5(_) => match for_v5(p, frame, &own_tx) {
                        ForV5::Send(out) => dev_wr.write_all(&out).await?,
                        ForV5::Hold(out) => held = Some(out),
                        ForV5::Skip => {}
                    },
                },
                None => return Ok(()),
            },
        }
    }
}

/// A broker frame for an MQTT 5 device, in its words. A delivery larger than the device's
/// Maximum Packet Size is never sent, and acknowledged to the broker through `own_tx`.
fn for_v5(p: &Pipe<'_>, mut frame: BytesMut, own_tx: &mpsc::UnboundedSender<Packet>) -> ForV5 {
    let device = p.facts.device;
    let in_flight = &p.in_flight;
    let packet = match Packet::read(&mut frame, usize::MAX) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(event = "edge.broker_frame_unreadable", %device, error = %e, "a broker frame could not be read; not passed on");
            return ForV5::Skip;
        }
    };
    let mut out = BytesMut::new();
    match packet {
        Packet::SubAck(ack) => {
            let refused = p
                .narrowed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&ack.pkid)
                .unwrap_or_else(|| RefusedFilters {
                    total: ack.return_codes.len(),
                    ..RefusedFilters::default()
                });
            let granted = granted(ack.return_codes, &refused);
            v5::write(
                v5::ToWrite::SubAck {
                    pkid: ack.pkid,
                    granted,
                },
                &mut out,
            );
            return ForV5::Send(out);
        }
        Packet::PubComp(_) => {
            if let Some(f) = &in_flight {
                f.answered();
            }
        }
        _ => {}
    }
    let unsubscribed = match &packet {
        Packet::UnsubAck(u) => p
            .unsubscribing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&u.pkid)
            .unwrap_or(1),
        _ => 0,
    };
    let delivery = match &packet {
        Packet::Publish(p) => Some((p.qos, p.pkid, p.topic.clone())),
        _ => None,
    };
    let Some(v5_packet) = v5::from_broker(packet, unsubscribed) else {
        return ForV5::Skip;
    };
    out = v5::encode(&v5_packet);
    match delivery {
        Some((qos, pkid, topic)) if out.len() > p.device_max_packet => {
            // MQTT-3.1.2-25: never sent; acknowledged to the broker as if delivered.
            tracing::warn!(event = "edge.delivery_too_large", %device, %topic, size = out.len(), max = p.device_max_packet, "a delivery larger than the device's Maximum Packet Size was dropped");
            let ack = match qos {
                QoS::AtMostOnce => None,
                QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(pkid))),
                QoS::ExactlyOnce => Some(Packet::PubRec(rumqttc::mqttbytes::v4::PubRec::new(pkid))),
            };
            if let Some(ack) = ack {
                let _ = own_tx.send(ack);
            }
            ForV5::Skip
        }
        Some((QoS::AtLeastOnce | QoS::ExactlyOnce, ..)) => ForV5::Hold(out),
        _ => ForV5::Send(out),
    }
}
