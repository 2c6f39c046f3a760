//! Commands from upstream to the ward: one router, built in `app.rs`, that takes each
//! command the uplink receives and delivers it to a device, a Modbus register or the
//! update agent.
//!
//! Where a command goes is decided by [`route`], a pure function of the topic map, the
//! registry and the Modbus devices:
//! - `{prefix}/{site}/{gateway}/_gateway/cmd/update` → the update agent's "check now", on
//!   the embedded broker's `_gateway/cmd/update` ([`crate::updates::COMMAND_TOPIC`]);
//! - `…/{device}/cmd/modbus/{register}` for a device the poller knows → a register write,
//!   checked against the device's map (and audited) by [`ModbusHandle::write`];
//! - `…/{device}/cmd/{rest}` → `ward/{device}/cmd/{rest}` on the embedded broker, if the
//!   device is registered and its class may subscribe to that topic;
//! - anything else is refused (`uplink.command_refused`).
//!
//! Every delivery and refusal is audited through [`Events`]. Tested by the unit tests
//! below (the routing) and end to end by the uplink, Modbus and update system tests.

use std::sync::PoisonError;

use bytes::Bytes;
use rumqttc::{AsyncClient, QoS};
use tokio_util::sync::CancellationToken;

use crate::device::{DeviceId, GATEWAY_STREAM};
use crate::events::Events;
use crate::modbus::ModbusHandle;
use crate::policy::acl;
use crate::registry::{Grant, SharedRegistry};
use crate::topics::TopicMap;

/// The router's session on the embedded broker. Its client id cannot collide with a
/// device's: device ids start with a letter or digit.
const LOCAL_CLIENT_ID: &str = "_wardgate-uplink";

/// Where one command goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// "Check now" for the update agent.
    Agent,
    /// A register write on a Modbus device.
    Modbus {
        device: DeviceId,
        register: String,
    },
    /// A device's command topic on the embedded broker.
    Device {
        device: DeviceId,
        local: String,
    },
    Refused(&'static str),
}

/// Where the command on upstream `topic` goes. `modbus` says whether a device is polled
/// over Modbus, `grant` what a registered device is granted.
pub fn route(
    topics: &TopicMap,
    topic: &str,
    modbus: impl Fn(&DeviceId) -> bool,
    grant: impl Fn(&DeviceId) -> Option<Grant>,
) -> Route {
    let (device, rest) = match topics.command(topic) {
        Ok(c) => c,
        Err(reason) => return Route::Refused(reason),
    };
    if device == GATEWAY_STREAM {
        return if rest == "update" {
            Route::Agent
        } else {
            Route::Refused("not a valid device id")
        };
    }
    let Ok(device) = DeviceId::parse(device) else {
        return Route::Refused("not a valid device id");
    };
    if let Some(register) = rest.strip_prefix("modbus/") {
        if modbus(&device) {
            return Route::Modbus {
                device,
                register: register.to_owned(),
            };
        }
    }
    let local = format!("ward/{device}/cmd/{rest}");
    if acl::validate_topic_name(&local).is_err() {
        return Route::Refused("invalid topic");
    }
    let Some(grant) = grant(&device) else {
        return Route::Refused("device is not registered");
    };
    if !grant.acl.may_receive(&local) {
        return Route::Refused("the device's class may not subscribe to this topic");
    }
    Route::Device { device, local }
}

/// The router: cheap to clone.
#[derive(Debug, Clone)]
pub struct Commands {
    topics: TopicMap,
    registry: SharedRegistry,
    modbus: ModbusHandle,
    events: Events,
    local: AsyncClient,
}

impl Commands {
    /// Connects the router's session to the embedded broker; the connection is kept (and
    /// re-made) by a task until `shutdown`.
    pub fn start(
        broker: &crate::broker::EmbeddedBroker,
        topics: TopicMap,
        registry: SharedRegistry,
        modbus: ModbusHandle,
        events: Events,
        shutdown: CancellationToken,
    ) -> Commands {
        Commands {
            local: crate::broker::local_session(broker, LOCAL_CLIENT_ID, shutdown),
            topics,
            registry,
            modbus,
            events,
        }
    }

    /// Delivers the command on upstream `topic`, if policy allows.
    pub fn deliver(&self, topic: &[u8], payload: Bytes) {
        let topic = String::from_utf8_lossy(topic);
        let registry = &self.registry;
        let grant = |d: &DeviceId| {
            registry
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .grant(d)
        };
        match route(&self.topics, &topic, |d| self.modbus.has(d), grant) {
            Route::Agent => {
                self.publish(&DeviceId::gateway(), crate::updates::COMMAND_TOPIC, payload)
            }
            Route::Modbus { device, register } => {
                // Checked against its map and audited there.
                let handle = self.modbus.clone();
                tokio::spawn(async move {
                    handle.write(&device, &register, &payload, "upstream").await;
                });
            }
            Route::Device { device, local } => self.publish(&device, &local, payload),
            Route::Refused(reason) => self.events.command_refused(&topic, reason),
        }
    }

    fn publish(&self, device: &DeviceId, local: &str, payload: Bytes) {
        match self
            .local
            .try_publish(local, QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => self.events.command_delivered(device, local),
            Err(e) => tracing::error!(
                event = "uplink.command_failed",
                %device,
                topic = local,
                error = %e,
                "command could not be queued to the local broker"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{tests::MINIMAL, Config};
    use crate::registry::Registry;

    fn routed(topic: &str) -> Route {
        let text = MINIMAL.replace(
            "publish = [\"ward/{device}/#\"]",
            "publish = [\"ward/{device}/#\"]\nsubscribe = [\"ward/{device}/cmd/#\"]",
        );
        let config = Config::parse(&text, std::path::Path::new("/etc/wardgate/w.toml")).unwrap();
        let registry = Registry::from_config(&config);
        let topics = TopicMap::new("h", "st-mary", "gw-1");
        let plc = DeviceId::parse("plc-1").unwrap();
        route(&topics, topic, |d| *d == plc, |d| registry.grant(d))
    }

    #[test]
    fn each_command_goes_to_its_one_place_or_is_refused_with_why() {
        assert_eq!(routed("h/st-mary/gw-1/_gateway/cmd/update"), Route::Agent);
        assert_eq!(
            routed("h/st-mary/gw-1/plc-1/cmd/modbus/setpoint"),
            Route::Modbus {
                device: DeviceId::parse("plc-1").unwrap(),
                register: "setpoint".into()
            }
        );
        assert_eq!(
            routed("h/st-mary/gw-1/pump-1/cmd/rate"),
            Route::Device {
                device: DeviceId::parse("pump-1").unwrap(),
                local: "ward/pump-1/cmd/rate".into()
            }
        );
        // A device not polled over Modbus gets a `modbus/…` command as any other.
        assert_eq!(
            routed("h/st-mary/gw-1/pump-1/cmd/modbus/x"),
            Route::Device {
                device: DeviceId::parse("pump-1").unwrap(),
                local: "ward/pump-1/cmd/modbus/x".into()
            }
        );
        for (topic, why) in [
            (
                "h/st-mary/gw-1/_gateway/cmd/reboot",
                "not a valid device id",
            ),
            ("h/st-mary/gw-1/pump-9/cmd/rate", "device is not registered"),
            (
                "h/st-mary/gw-2/pump-1/cmd/rate",
                "not under this gateway's topic",
            ),
            ("h/st-mary/gw-1/pump-1/status", "not a command topic"),
            ("h/st-mary/gw-1/pump-1/cmd/a/+", "invalid topic"),
        ] {
            assert_eq!(routed(topic), Route::Refused(why), "{topic}");
        }
    }

    #[test]
    fn a_class_that_may_not_subscribe_gets_no_commands() {
        let config = Config::parse(MINIMAL, std::path::Path::new("/etc/wardgate/w.toml")).unwrap();
        let registry = Registry::from_config(&config);
        let topics = TopicMap::new("h", "st-mary", "gw-1");
        assert_eq!(
            route(
                &topics,
                "h/st-mary/gw-1/pump-1/cmd/rate",
                |_| false,
                |d| registry.grant(d)
            ),
            Route::Refused("the device's class may not subscribe to this topic")
        );
    }
}
