//! The device's session on the embedded broker: opening it under the gateway's
//! credentials, purging a stale one, reading its frames, and a will published locally.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, LastWill, Packet, Publish};
use rumqttc::mqttbytes::{PacketType, QoS};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::relay::*;
use super::session::*;
use super::EdgeShared;
use crate::device::DeviceId;
use crate::mqtt::{self, ReadError};

/// Ends the persistent broker session of `device`, opened under rights it no longer has
/// (it was removed and added again with another class): its subscriptions and queued
/// messages go, so resuming it cannot deliver what the device may no longer read. Done
/// by a clean-session CONNECT and DISCONNECT under its client id, before the device's own
/// CONNECT; if the broker cannot be reached, that CONNECT fails the same way.
/// `stale` says the purge is for that reason (audited); otherwise the device's session asked
/// for it (MQTT 5's Clean Start or Session Expiry Interval), which is only logged.
pub(super) async fn purge_session(
    shared: &EdgeShared,
    device: &DeviceId,
    class: &str,
    stale: bool,
) {
    let mut purge = Connect::new(device.as_str());
    purge.clean_session = true;
    let result = match connect_broker(&shared.broker, &purge).await {
        Ok((mut stream, _, _)) => {
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
    if stale {
        shared
            .events
            .session_purged(device, class, result.as_ref().err());
    } else if let Err(e) = result {
        tracing::warn!(event = "edge.session_not_purged", %device, error = %e, "the broker's part of an ended session could not be purged");
    }
}

/// Opens a session on the embedded broker: the device's CONNECT with the gateway's broker
/// credentials instead of its own (identity is the certificate) and the edge's own
/// keepalive (the edge owns the device's; see [`BROKER_KEEPALIVE`]). Returns the
/// connection, the broker's CONNACK, and whatever the broker sent after it (a resumed
/// session's queued messages, for the device).
pub(super) async fn connect_broker(
    broker: &crate::broker::EmbeddedBroker,
    connect: &Connect,
) -> Result<(TcpStream, ConnAck, BytesMut), String> {
    let mut stream = timeout(BROKER_TIMEOUT, TcpStream::connect(broker.addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut c = connect.clone();
    c.login = Some(broker.login.mqtt());
    c.keep_alive = BROKER_KEEPALIVE;
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
        Some(Packet::ConnAck(a)) => Ok((stream, a, buf)),
        Some(other) => Err(format!("broker answered CONNECT with {other:?}")),
        None => Err("broker closed the connection".into()),
    }
}

/// The next frame the broker sends for the device, `None` once it closes; never, while
/// the session is not attached. The broker's PUBACKs (for copies of messages the edge has
/// acknowledged already) and PINGRESPs (answers to the edge's pings) stay here.
pub(super) async fn broker_frame(
    from: &mut Option<(OwnedReadHalf, BytesMut)>,
) -> std::io::Result<Option<BytesMut>> {
    let Some((rd, buf)) = from.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        let header = match mqtt::read_frame(rd, buf, usize::MAX).await {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(ReadError::Io(e)) => return Err(e),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
        let frame = buf.split_to(header.frame_length());
        if !matches!(
            header.packet_type(),
            Ok(PacketType::PubAck | PacketType::PingResp)
        ) {
            return Ok(Some(frame));
        }
    }
}

/// Publishes the will of a session the broker does not hold to the local subscribers
/// that want it (or retains it), as the broker does for the sessions it holds; at QoS 1
/// at most (its upstream copy keeps the will's own QoS). One short broker connection of
/// the gateway's own, under a client id no device can have.
pub(super) async fn publish_will_locally(shared: &EdgeShared, device: &DeviceId, will: &LastWill) {
    if !will.retain && !shared.subscriptions.wanted(&will.topic) {
        return;
    }
    let result = async {
        let mut connect = Connect::new(format!("_will-{device}"));
        connect.clean_session = true;
        let (mut stream, _, _) = connect_broker(&shared.broker, &connect).await?;
        let qos = if will.qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let mut publish = Publish::from_bytes(&will.topic, qos, will.message.clone());
        publish.retain = will.retain;
        publish.pkid = u16::from(qos != QoS::AtMostOnce);
        let mut out = BytesMut::new();
        Packet::Publish(publish)
            .write(&mut out, usize::MAX)
            .map_err(|e| e.to_string())?;
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        if qos == QoS::AtLeastOnce {
            let mut buf = BytesMut::new();
            timeout(BROKER_TIMEOUT, async {
                loop {
                    match mqtt::read_packet(&mut stream, &mut buf, MAX_CONNECT).await {
                        Ok(Some(Packet::PubAck(_))) => return Ok(()),
                        Ok(Some(_)) => {}
                        Ok(None) => return Err("broker closed the connection".to_owned()),
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
            .await
            .map_err(|_| "no PUBACK from the broker".to_owned())??;
        }
        out.clear();
        let _ = Packet::Disconnect.write(&mut out, 16);
        stream.write_all(&out).await.map_err(|e| e.to_string())
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(event = "edge.will_not_delivered_locally", %device, error, "last will not delivered to local subscribers");
    }
}
