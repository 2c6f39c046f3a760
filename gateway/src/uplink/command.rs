//! Commands from upstream, delivered to devices through the embedded broker.

use std::sync::PoisonError;

use bytes::Bytes;
use rumqttc::{AsyncClient, QoS};
use tokio_util::sync::CancellationToken;

use super::Uplink;
use crate::device::DeviceId;
use crate::policy::acl;

/// The gateway's own session on the embedded broker. Its client id cannot collide with a
/// device's: device ids start with a letter or digit.
const LOCAL_CLIENT_ID: &str = "_wardgate-uplink";

#[derive(Debug)]
pub struct LocalDelivery {
    client: AsyncClient,
}

impl LocalDelivery {
    /// Connects to the embedded broker; the connection is kept (and re-made) by a task.
    pub fn start(
        broker: &crate::broker::EmbeddedBroker,
        shutdown: CancellationToken,
    ) -> LocalDelivery {
        LocalDelivery {
            client: crate::broker::local_session(broker, LOCAL_CLIENT_ID, shutdown),
        }
    }

    /// Delivers an upstream command to its device, if policy allows.
    pub fn deliver(&self, uplink: &Uplink, topic: &Bytes, payload: Bytes) {
        let topic = String::from_utf8_lossy(topic);
        if is_update_command(uplink, &topic) {
            // "Check now" for the update agent, which listens on the embedded broker.
            let local = crate::updates::COMMAND_TOPIC;
            match self
                .client
                .try_publish(local, QoS::AtLeastOnce, false, payload)
            {
                Ok(()) => uplink.events.command_delivered(&DeviceId::gateway(), local),
                Err(e) => {
                    tracing::error!(event = "uplink.command_failed", topic = local, error = %e, "command could not be queued to the local broker")
                }
            }
            return;
        }
        if let Some((device, register)) = modbus_write(uplink, &topic) {
            // A register write on a Modbus device: checked against its map and audited there.
            let handle = uplink.modbus.clone();
            tokio::spawn(async move {
                handle.write(&device, &register, &payload, "upstream").await;
            });
            return;
        }
        match route(uplink, &topic) {
            Ok((device, local)) => {
                match self
                    .client
                    .try_publish(local.clone(), QoS::AtLeastOnce, false, payload)
                {
                    Ok(()) => uplink.events.command_delivered(&device, &local),
                    Err(e) => tracing::error!(
                        event = "uplink.command_failed",
                        %device,
                        error = %e,
                        "command could not be queued to the local broker"
                    ),
                }
            }
            Err(reason) => uplink.events.command_refused(&topic, reason),
        }
    }
}

/// Whether `topic` is `{prefix}/{site}/{gateway}/_gateway/cmd/update`.
fn is_update_command(uplink: &Uplink, topic: &str) -> bool {
    uplink.topics.command(topic) == Ok((crate::device::GATEWAY_STREAM, "update"))
}

/// The Modbus device and register an upstream command names: `…/{device}/cmd/modbus/{name}`
/// for a device the poller knows.
fn modbus_write(uplink: &Uplink, topic: &str) -> Option<(DeviceId, String)> {
    let (device, rest) = uplink.topics.command(topic).ok()?;
    let register = rest.strip_prefix("modbus/")?;
    let device = DeviceId::parse(device).ok()?;
    uplink
        .modbus
        .has(&device)
        .then(|| (device, register.to_owned()))
}

/// The device and local topic of an upstream command topic, or why it is refused.
fn route(uplink: &Uplink, topic: &str) -> Result<(DeviceId, String), &'static str> {
    let (device, rest) = uplink.topics.command(topic)?;
    let device = DeviceId::parse(device).map_err(|_| "not a valid device id")?;
    let local = format!("ward/{device}/cmd/{rest}");
    acl::validate_topic_name(&local).map_err(|_| "invalid topic")?;
    let grant = uplink
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .grant(&device)
        .ok_or("device is not registered")?;
    if !grant.acl.may_receive(&local) {
        return Err("the device's class may not subscribe to this topic");
    }
    Ok((device, local))
}
