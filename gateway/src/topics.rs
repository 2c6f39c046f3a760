//! How device topics map to upstream topics, and back for commands.
//!
//! A record from `device` on `ward/{device}/{rest}` goes upstream on
//! `{prefix}/{site}/{gateway}/{device}/{rest}` (a topic outside `ward/{device}/` keeps its
//! whole name as `rest`). Commands come down on `{prefix}/{site}/{gateway}/{device}/cmd/…`.
//!
//! The edge and the uplink share one [`TopicMap`], so that what the edge accepts is exactly
//! what the uplink can publish: a device topic whose upstream form exceeds MQTT's topic
//! limit ([`MAX_TOPIC_LEN`]), or lands in the command space, is refused at the edge
//! ([`TopicMap::check`]); without that check, one record could be resent forever (too long)
//! or come back down as a forged command. Pure; tested below.

use crate::device::DeviceId;

/// MQTT's limit on a topic name: a two-byte length.
pub const MAX_TOPIC_LEN: usize = 65_535;
/// The topic level under a device that carries commands from upstream.
const COMMAND_LEVEL: &str = "cmd";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMap {
    /// `{prefix}/{site}/{gateway}/`
    base: String,
}

/// Why a device topic cannot go upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UnmappableTopic {
    #[error("its upstream topic would be {0} bytes, over MQTT's limit of {MAX_TOPIC_LEN}")]
    TooLong(usize),
    #[error("its upstream topic would be in the command space (…/{{device}}/cmd/…)")]
    CommandSpace,
}

impl TopicMap {
    pub fn new(prefix: &str, site: &str, gateway: &str) -> TopicMap {
        TopicMap {
            base: format!("{prefix}/{site}/{gateway}/"),
        }
    }

    /// The map of the gateway `config` describes, under its upstream topic prefix.
    pub fn of(config: &crate::config::Config) -> TopicMap {
        TopicMap::new(
            config.topic_prefix(),
            &config.gateway.site,
            &config.gateway.id,
        )
    }

    /// The part of a device topic that follows the device level upstream.
    fn rest<'a>(device: &DeviceId, topic: &'a str) -> &'a str {
        topic
            .strip_prefix("ward/")
            .and_then(|t| t.strip_prefix(device.as_str()))
            .and_then(|t| t.strip_prefix('/'))
            .unwrap_or(topic)
    }

    /// The upstream topic of `topic` published by `device`.
    pub fn upstream(&self, device: &DeviceId, topic: &str) -> String {
        format!("{}{device}/{}", self.base, Self::rest(device, topic))
    }

    /// Whether `topic` from `device` can be published upstream as it is.
    pub fn check(&self, device: &DeviceId, topic: &str) -> Result<(), UnmappableTopic> {
        let rest = Self::rest(device, topic);
        let len = self.base.len() + device.as_str().len() + 1 + rest.len();
        if len > MAX_TOPIC_LEN {
            return Err(UnmappableTopic::TooLong(len));
        }
        if rest.split('/').next() == Some(COMMAND_LEVEL) {
            return Err(UnmappableTopic::CommandSpace);
        }
        Ok(())
    }

    /// The uplink's subscription for commands to every device.
    pub fn command_filter(&self) -> String {
        format!("{}+/{COMMAND_LEVEL}/#", self.base)
    }

    /// The device level and what follows `cmd/` in an upstream command topic.
    pub fn command<'a>(&self, topic: &'a str) -> Result<(&'a str, &'a str), &'static str> {
        let rest = topic
            .strip_prefix(&self.base)
            .ok_or("not under this gateway's topic")?;
        let (device, rest) = rest.split_once('/').ok_or("no device level")?;
        let rest = rest
            .strip_prefix(COMMAND_LEVEL)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or("not a command topic")?;
        Ok((device, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> TopicMap {
        TopicMap::new("h", "st-mary", "gw1")
    }

    #[test]
    fn topics_map_under_site_gateway_and_device() {
        let d = DeviceId::parse("pump-1").unwrap();
        assert_eq!(
            map().upstream(&d, "ward/pump-1/vitals/hr"),
            "h/st-mary/gw1/pump-1/vitals/hr"
        );
        assert_eq!(
            map().upstream(&d, "ward/shared/x"),
            "h/st-mary/gw1/pump-1/ward/shared/x"
        );
        // Another device's subtree keeps its whole name.
        assert_eq!(
            map().upstream(&d, "ward/pump-10/x"),
            "h/st-mary/gw1/pump-1/ward/pump-10/x"
        );
    }

    #[test]
    fn check_measures_exactly_what_upstream_builds() {
        let d = DeviceId::parse("pump-1").unwrap();
        let fits = |extra: usize| {
            let topic = format!("ward/pump-1/alarm/{}", "x".repeat(extra));
            let len = map().upstream(&d, &topic).len();
            (len, map().check(&d, &topic))
        };
        let at_limit = MAX_TOPIC_LEN - fits(0).0;
        assert_eq!(fits(at_limit), (MAX_TOPIC_LEN, Ok(())));
        assert_eq!(
            fits(at_limit + 1),
            (
                MAX_TOPIC_LEN + 1,
                Err(UnmappableTopic::TooLong(MAX_TOPIC_LEN + 1))
            )
        );
    }

    #[test]
    fn device_topics_never_land_in_the_command_space() {
        let d = DeviceId::parse("pump-1").unwrap();
        for topic in ["ward/pump-1/cmd", "ward/pump-1/cmd/infuse", "cmd/x"] {
            assert_eq!(
                map().check(&d, topic),
                Err(UnmappableTopic::CommandSpace),
                "{topic}"
            );
        }
        for topic in ["ward/pump-1/cmdx", "ward/pump-1/status/cmd", "ward/cmd/x"] {
            assert_eq!(map().check(&d, topic), Ok(()), "{topic}");
        }
    }

    #[test]
    fn commands_are_parsed_under_this_gateway_only() {
        let m = map();
        assert_eq!(m.command_filter(), "h/st-mary/gw1/+/cmd/#");
        assert_eq!(
            m.command("h/st-mary/gw1/pump-1/cmd/rate/set"),
            Ok(("pump-1", "rate/set"))
        );
        assert!(m.command("h/st-mary/gw2/pump-1/cmd/x").is_err());
        assert!(m.command("h/st-mary/gw1/pump-1/status/x").is_err());
        assert!(m.command("h/st-mary/gw1/pump-1").is_err());
    }
}
