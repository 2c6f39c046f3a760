//! Topic access control.
//!
//! A device class lists topic filter *templates* such as `ward/{device}/#`. When a device
//! connects, the templates are expanded with its [`DeviceId`] into an [`Acl`]. The edge then
//! asks two questions:
//!
//! - may this device PUBLISH to topic `t`? — `t` must match one of the publish filters;
//! - may this device SUBSCRIBE to filter `f`? — every topic `f` can match must be matched by
//!   one of the subscribe filters (`f` is *covered*): granting `ward/+/alarm/#` allows a
//!   subscription to `ward/bed-3/alarm/#` but not to `ward/#`.
//!
//! Matching follows MQTT 3.1.1 §4.7, including the rule that topics beginning with `$` are
//! not matched by a filter whose first level is a wildcard. An empty list allows nothing.
//!
//! Invariant: a `{device}` placeholder stands for a whole topic level and device ids cannot
//! contain `/`, `+` or `#` (see [`DeviceId`]), so expansion can never widen a filter.
//!
//! Tested by the unit tests below (matching, covering, template validation).

use std::fmt;

use crate::device::DeviceId;

/// The placeholder that a template uses for the connecting device's id.
pub const DEVICE_PLACEHOLDER: &str = "{device}";

/// MQTT strings carry a 16-bit length.
const MAX_TOPIC_LEN: usize = 65_535;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("a topic name must not contain wildcards ('+' or '#')")]
    WildcardInTopicName,
    #[error("'#' must be the whole last level of a filter")]
    MisplacedMultiLevel,
    #[error("'+' must be a whole level of a filter")]
    MisplacedSingleLevel,
    #[error(
        "'{{device}}' must be a whole level of a filter, and no other '{{' or '}}' may appear"
    )]
    MisplacedPlaceholder,
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks a topic name as carried by a PUBLISH.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopicName);
    }
    Ok(())
}

/// A syntactically valid MQTT topic filter.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        check_common(s)?;
        let levels: Vec<&str> = s.split('/').collect();
        let last = levels.len() - 1;
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != last) {
                return Err(TopicError::MisplacedMultiLevel);
            }
            if level.contains('+') && *level != "+" {
                return Err(TopicError::MisplacedSingleLevel);
            }
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does this filter match the topic name `topic`? (`topic` must be a valid topic name.)
    pub fn matches(&self, topic: &str) -> bool {
        let mut f = self.0.split('/');
        let mut t = topic.split('/');
        let mut first = true;
        loop {
            match (f.next(), t.next()) {
                (Some("#"), t_level) => {
                    return !(first && t_level.is_some_and(|l| l.starts_with('$')));
                }
                (Some("+"), Some(t_level)) => {
                    if first && t_level.starts_with('$') {
                        return false;
                    }
                }
                (Some(f_level), Some(t_level)) => {
                    if f_level != t_level {
                        return false;
                    }
                }
                (None, None) => return true,
                _ => return false,
            }
            first = false;
        }
    }

    /// Is every topic that `requested` can match also matched by `self`?
    pub fn covers(&self, requested: &TopicFilter) -> bool {
        let mut a = self.0.split('/');
        let mut r = requested.0.split('/');
        let mut first = true;
        loop {
            match (a.next(), r.next()) {
                (Some("#"), r_level) => {
                    // `#` at the first level does not reach `$` topics.
                    return !(first && r_level.is_some_and(|l| l.starts_with('$')));
                }
                (Some(_), Some("#")) => return false,
                (Some("+"), Some(r_level)) => {
                    if first && r_level.starts_with('$') {
                        return false;
                    }
                }
                (Some(_), Some("+")) => return false,
                (Some(a_level), Some(r_level)) => {
                    if a_level != r_level {
                        return false;
                    }
                }
                // `x/#` matches `x` itself, so it covers a request that ends one level early.
                (Some(rest), None) => return rest == "#" && a.next().is_none(),
                (None, None) => return true,
                (None, Some(_)) => return false,
            }
            first = false;
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicFilter({})", self.0)
    }
}

/// A topic filter that may contain `{device}` as whole levels.
#[derive(Clone, PartialEq, Eq)]
pub struct FilterTemplate(String);

impl FilterTemplate {
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        for level in s.split('/') {
            if level != DEVICE_PLACEHOLDER && level.contains(['{', '}']) {
                return Err(TopicError::MisplacedPlaceholder);
            }
        }
        // Validate the filter syntax with the placeholder standing in for a device id.
        TopicFilter::parse(&s.replace(DEVICE_PLACEHOLDER, "d"))?;
        Ok(Self(s.to_owned()))
    }

    pub fn expand(&self, device: &DeviceId) -> TopicFilter {
        // Both parts are validated, and a device id contains no topic syntax, so the result
        // is a valid filter; only its length can grow.
        TopicFilter(self.0.replace(DEVICE_PLACEHOLDER, device.as_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for FilterTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FilterTemplate({})", self.0)
    }
}

/// One connected device's access rights, with every template expanded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    publish: Vec<TopicFilter>,
    subscribe: Vec<TopicFilter>,
}

impl Acl {
    pub fn for_device(
        device: &DeviceId,
        publish: &[FilterTemplate],
        subscribe: &[FilterTemplate],
    ) -> Self {
        Self {
            publish: publish.iter().map(|t| t.expand(device)).collect(),
            subscribe: subscribe.iter().map(|t| t.expand(device)).collect(),
        }
    }

    /// May the device publish to `topic` (an already validated topic name)?
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|f| f.matches(topic))
    }

    /// Would one of the device's granted subscriptions receive a message on `topic`?
    pub fn may_receive(&self, topic: &str) -> bool {
        self.subscribe.iter().any(|f| f.matches(topic))
    }

    /// May the device subscribe to `filter`?
    pub fn may_subscribe(&self, filter: &TopicFilter) -> bool {
        self.subscribe.iter().any(|f| f.covers(filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[test]
    fn filter_syntax() {
        for ok in [
            "a", "a/b", "#", "+", "a/+/c", "a/#", "+/+/#", "/", "a//b", "$SYS/#",
        ] {
            assert!(TopicFilter::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(TopicFilter::parse(""), Err(TopicError::Empty));
        assert_eq!(
            TopicFilter::parse("a/#/b"),
            Err(TopicError::MisplacedMultiLevel)
        );
        assert_eq!(
            TopicFilter::parse("a#"),
            Err(TopicError::MisplacedMultiLevel)
        );
        assert_eq!(
            TopicFilter::parse("a/b+"),
            Err(TopicError::MisplacedSingleLevel)
        );
        assert_eq!(
            TopicFilter::parse("a/++"),
            Err(TopicError::MisplacedSingleLevel)
        );
        assert_eq!(TopicFilter::parse("a\0b"), Err(TopicError::Nul));
        assert_eq!(
            TopicFilter::parse(&"a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn topic_names_refuse_wildcards() {
        assert!(validate_topic_name("ward/pump-1/vitals").is_ok());
        assert_eq!(
            validate_topic_name("ward/+"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(
            validate_topic_name("ward/#"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(
            validate_topic_name("wa#rd"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(f("a/b").matches("a/b"));
        assert!(!f("a/b").matches("a/b/c"));
        assert!(!f("a/b/c").matches("a/b"));
        assert!(f("a/#").matches("a"));
        assert!(f("a/#").matches("a/b/c"));
        assert!(f("a/+/c").matches("a/x/c"));
        assert!(!f("a/+/c").matches("a/x/y/c"));
        assert!(f("a/+").matches("a/"));
        assert!(f("#").matches("a/b"));
        assert!(!f("#").matches("$SYS/x"));
        assert!(!f("+/x").matches("$SYS/x"));
        assert!(f("$SYS/#").matches("$SYS/x"));
        assert!(!f("ward/pump-1/#").matches("ward/pump-10/x"));
    }

    #[test]
    fn covering() {
        let granted = f("ward/+/alarm/#");
        assert!(granted.covers(&f("ward/+/alarm/#")));
        assert!(granted.covers(&f("ward/bed-3/alarm/#")));
        assert!(granted.covers(&f("ward/bed-3/alarm/high")));
        assert!(granted.covers(&f("ward/+/alarm")));
        assert!(granted.covers(&f("ward/+/alarm/+/x")));
        assert!(!granted.covers(&f("ward/#")));
        assert!(!granted.covers(&f("ward/+/#")));
        assert!(!granted.covers(&f("ward/+/+/#")));
        assert!(!granted.covers(&f("ward/bed-3")));
        assert!(!granted.covers(&f("#")));
        assert!(f("#").covers(&f("a/+/#")));
        assert!(!f("#").covers(&f("$SYS/#")));
        assert!(!f("+/#").covers(&f("$SYS/x")));
        assert!(f("a/b").covers(&f("a/b")));
        assert!(!f("a/b").covers(&f("a/+")));
        assert!(!f("a/b").covers(&f("a/b/c")));
        assert!(!f("a/b/c").covers(&f("a/b")));
        assert!(f("a/b/#").covers(&f("a/b")));
    }

    #[test]
    fn templates() {
        let dev = DeviceId::parse("pump-7").unwrap();
        let t = FilterTemplate::parse("ward/{device}/#").unwrap();
        assert_eq!(t.expand(&dev).as_str(), "ward/pump-7/#");
        assert_eq!(
            FilterTemplate::parse("ward/x{device}/#"),
            Err(TopicError::MisplacedPlaceholder)
        );
        assert_eq!(
            FilterTemplate::parse("ward/{dev}/#"),
            Err(TopicError::MisplacedPlaceholder)
        );
        assert_eq!(
            FilterTemplate::parse("ward/#/{device}"),
            Err(TopicError::MisplacedMultiLevel)
        );
    }

    #[test]
    fn acl_per_device() {
        let dev = DeviceId::parse("pump-7").unwrap();
        let acl = Acl::for_device(
            &dev,
            &[FilterTemplate::parse("ward/{device}/#").unwrap()],
            &[FilterTemplate::parse("ward/{device}/cmd/#").unwrap()],
        );
        assert!(acl.may_publish("ward/pump-7/vitals"));
        assert!(!acl.may_publish("ward/pump-8/vitals"));
        assert!(!acl.may_publish("ward/pump-70/vitals"));
        assert!(acl.may_subscribe(&f("ward/pump-7/cmd/#")));
        assert!(!acl.may_subscribe(&f("ward/pump-7/#")));
        assert!(!acl.may_subscribe(&f("ward/+/cmd/#")));
        let nothing = Acl::default();
        assert!(!nothing.may_publish("a"));
        assert!(!nothing.may_subscribe(&f("a")));
    }
}
