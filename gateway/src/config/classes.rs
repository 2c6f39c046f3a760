//! `[[device_class]]`, `[[device]]` and `[policy]`: what each kind of device may do, which
//! devices are registered where, and when a device's violations or its rate get it
//! quarantined.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::diag::Validator;
use super::raw::{self, S};
use super::units;
use crate::device::DeviceId;
use crate::policy::FilterTemplate;

pub const DEFAULT_MAX_PAYLOAD: u64 = 64 << 10;
/// Distinct filters a device may subscribe to while the gateway runs, unless its class says
/// otherwise. The embedded broker keeps a log for each filter it has seen until it restarts
/// (see `edge::subscriptions`), so this bounds what one device can make it hold.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 16;
/// QoS 1 and 2 PUBLISHes an MQTT 5 device may have unanswered (the CONNACK's Receive
/// Maximum), unless its class says otherwise; one more ends its session with 0x93.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 64;
/// Topic aliases an MQTT 5 device may set on one connection, unless its class says
/// otherwise; each holds a topic of up to 65,535 bytes.
pub const DEFAULT_TOPIC_ALIAS_MAXIMUM: u16 = 16;
/// How much of its rate a device may send at once, as time at that rate.
pub const DEFAULT_BURST: Duration = Duration::from_secs(1);
/// The largest payload MQTT can carry in one packet (remaining length limit).
pub const MQTT_MAX_PAYLOAD: u64 = 268_435_455 - 65_539;
pub const DEFAULT_ACL_VIOLATIONS: usize = 3;
pub const DEFAULT_VIOLATION_WINDOW: Duration = Duration::from_secs(600);
/// How long a device may stay over its rate without pause before it is quarantined.
pub const DEFAULT_THROTTLE_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceClass {
    pub name: String,
    pub publish: Vec<FilterTemplate>,
    pub subscribe: Vec<FilterTemplate>,
    pub alarm: Vec<FilterTemplate>,
    pub vital: Vec<FilterTemplate>,
    pub max_payload: u64,
    /// Distinct topic filters one device may subscribe to while the gateway runs.
    pub max_subscriptions: usize,
    /// The Receive Maximum an MQTT 5 device of the class is given.
    pub receive_maximum: u16,
    /// The Topic Alias Maximum an MQTT 5 device of the class is given (0: none).
    pub topic_alias_maximum: u16,
    pub rate: crate::policy::RateLimits,
}

#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub id: DeviceId,
    pub class: String,
    pub address: IpAddr,
}

pub use crate::policy::Threshold;

impl Validator<'_> {
    pub(super) fn classes(
        &mut self,
        raw: &[S<raw::RawDeviceClass>],
    ) -> BTreeMap<String, DeviceClass> {
        let mut classes = BTreeMap::new();
        for c in raw {
            let span = c.span();
            let c = c.get_ref();
            let name = self.required(&c.name, &span, "name");
            let Some(name_field) = name else { continue };
            let Some(name) = self.name(name_field, "device class name") else {
                continue;
            };
            let publish = self.acl_templates(&c.publish);
            let subscribe = self.acl_templates(&c.subscribe);
            let alarm = self.templates(&c.alarm);
            let vital = self.templates(&c.vital);
            let max_payload = self.size(c.max_payload.as_ref(), DEFAULT_MAX_PAYLOAD);
            if let Some(s) = &c.max_payload {
                if max_payload == 0 || max_payload > MQTT_MAX_PAYLOAD {
                    self.error(
                        s.span(),
                        format!("max_payload must be between 1 byte and {MQTT_MAX_PAYLOAD} bytes"),
                    );
                }
            }
            let max_subscriptions = self.count(
                c.max_subscriptions.as_ref(),
                DEFAULT_MAX_SUBSCRIPTIONS,
                "max_subscriptions",
            );
            let receive_maximum = self.u16_in(
                c.receive_maximum.as_ref(),
                DEFAULT_RECEIVE_MAXIMUM,
                1,
                "receive_maximum",
            );
            let topic_alias_maximum = self.u16_in(
                c.topic_alias_maximum.as_ref(),
                DEFAULT_TOPIC_ALIAS_MAXIMUM,
                0,
                "topic_alias_maximum",
            );
            let messages_per_sec = c
                .messages_per_sec
                .as_ref()
                .map(|m| self.count(Some(m), 1, "messages_per_sec"));
            let bytes_per_sec = c.bytes_per_sec.as_ref().map(|b| {
                let n = self.size(Some(b), 1);
                if n == 0 {
                    self.error(b.span(), "bytes_per_sec must be at least 1 byte");
                }
                n
            });
            #[allow(clippy::cast_precision_loss)]
            let rate = crate::policy::RateLimits {
                messages_per_sec: messages_per_sec.map(|m| m as f64),
                bytes_per_sec: bytes_per_sec.map(|b| b as f64),
                burst: self.duration(c.burst.as_ref(), DEFAULT_BURST),
            };
            let class = DeviceClass {
                rate,
                name: name.clone(),
                publish,
                subscribe,
                alarm,
                vital,
                max_payload,
                max_subscriptions,
                receive_maximum,
                topic_alias_maximum,
            };
            if classes.insert(name.clone(), class).is_some() {
                self.error(
                    name_field.span(),
                    format!("device class {name:?} is defined twice"),
                );
            }
        }
        classes
    }

    pub(super) fn devices(
        &mut self,
        raw: &[S<raw::RawDevice>],
        classes: &BTreeMap<String, DeviceClass>,
    ) -> BTreeMap<DeviceId, DeviceEntry> {
        let mut devices: BTreeMap<DeviceId, DeviceEntry> = BTreeMap::new();
        for d in raw {
            let span = d.span();
            let d = d.get_ref();
            let id_field = self.required(&d.id, &span, "id");
            let class = self.required(&d.class, &span, "class");
            let address = self.required(&d.address, &span, "address");
            let id = id_field.and_then(|f| {
                let r = DeviceId::parse(f.get_ref()).map_err(|e| e.to_string());
                self.check(f.span(), r)
            });
            if let Some(class) = class {
                if !classes.contains_key(class.get_ref()) {
                    self.error(
                        class.span(),
                        format!("unknown device class {:?}", class.get_ref()),
                    );
                }
            }
            let address = address.and_then(|a| {
                let r = a
                    .get_ref()
                    .parse::<IpAddr>()
                    .map_err(|_| format!("device address {:?} is not an IP address", a.get_ref()));
                self.check(a.span(), r)
            });
            let (Some(id_field), Some(id), Some(class), Some(address)) =
                (id_field, id, class, address)
            else {
                continue;
            };
            let entry = DeviceEntry {
                id: id.clone(),
                class: class.get_ref().clone(),
                address,
            };
            if devices.insert(id.clone(), entry).is_some() {
                self.error(id_field.span(), format!("device {id} is registered twice"));
            }
        }
        devices
    }

    /// `[policy]`: the quarantine threshold, and the throttle hard limit (`None`: off).
    pub(super) fn policy(&mut self, p: &raw::RawPolicy) -> (Threshold, Option<Duration>) {
        let quarantine = Threshold {
            violations: self.count(
                p.acl_violations.as_ref(),
                DEFAULT_ACL_VIOLATIONS,
                "acl_violations",
            ),
            window: self.duration(p.violation_window.as_ref(), DEFAULT_VIOLATION_WINDOW),
        };
        // "0s" turns the hard limit off; any other value must parse as a duration.
        let throttle_limit = match &p.throttle_limit {
            None => Some(DEFAULT_THROTTLE_LIMIT),
            Some(s) => {
                let r = units::parse_duration(s.get_ref()).map(|d| (!d.is_zero()).then_some(d));
                self.check(s.span(), r)
                    .unwrap_or(Some(DEFAULT_THROTTLE_LIMIT))
            }
        };
        (quarantine, throttle_limit)
    }

    pub(super) fn templates(&mut self, list: &[S<String>]) -> Vec<FilterTemplate> {
        list.iter()
            .filter_map(|t| {
                let r = FilterTemplate::parse(t.get_ref())
                    .map_err(|e| format!("topic filter {:?}: {e}", t.get_ref()));
                self.check(t.span(), r)
            })
            .collect()
    }

    /// Templates that grant access: as [`Self::templates`], and none may reach the
    /// gateway's own topic space (`_gateway/…`, where the update agent reports and takes
    /// "check now, reboot now" commands) — so the first level must be a name (or
    /// `{device}`): not empty (`/#`), not a wildcard, and not beginning with `_`.
    pub(super) fn acl_templates(&mut self, list: &[S<String>]) -> Vec<FilterTemplate> {
        for t in list {
            let first = t.get_ref().split('/').next().unwrap_or_default();
            if first.is_empty() || first == "+" || first == "#" || first.starts_with('_') {
                let r: Result<(), String> = Err(format!(
                    "topic filter {:?}: its first level must be a name (not empty, not a \
                     wildcard, not starting with '_'): the `_gateway/` topics are the \
                     gateway's own",
                    t.get_ref()
                ));
                self.check(t.span(), r);
            }
        }
        self.templates(list)
    }
}
