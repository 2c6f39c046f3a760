//! The topic filters each device has subscribed to on the embedded broker.
//!
//! rumqttd keeps a log for every distinct filter it has been asked for (about 9 KiB each
//! when nothing matches, measured; up to `[broker] segment_size × segment_count` when
//! publishes match) and frees none of them until the gateway restarts, whether the device
//! unsubscribes, disconnects or cleans its session. So the edge
//! counts the distinct filters each device has subscribed to since start and refuses a
//! SUBSCRIBE that would take it past its class's `max_subscriptions` before the broker sees
//! it. Subscribing again to a filter already counted costs nothing; an UNSUBSCRIBE frees no
//! room. A device has one broker session (its client id is its certificate's name), so the
//! limit holds per session and per device at once.
//!
//! The same record answers whether any local subscriber may want a device's PUBLISH
//! ([`Subscriptions::wanted`]): the edge acknowledges every QoS 1 PUBLISH itself once its
//! record is durable, and only a message some filter matches (or a retained one) visits the
//! broker at all. The filters are those subscribed since start — a superset of the live
//! ones, persistent sessions of absent devices included — so no wanted message is missed;
//! the gateway's own clients subscribe only to `_gateway/…`, which no device may publish.
//!
//! Pure bookkeeping under one lock; tested by the unit tests below and, against the real
//! broker, by `tests/system/data_path.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError, RwLock};

use crate::device::DeviceId;
use crate::policy::acl::TopicFilter;

#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    per_device: Mutex<HashMap<DeviceId, HashSet<String>>>,
    index: RwLock<FilterIndex>,
}

/// Every distinct filter subscribed since start, by its first two levels when both are
/// names (`ward/pump-1/cmd/#`), else in a short list checked whole (`ward/+/alarm/#`).
#[derive(Debug, Default)]
struct FilterIndex {
    known: HashSet<String>,
    by_prefix: HashMap<String, HashMap<String, Vec<TopicFilter>>>,
    wild: Vec<TopicFilter>,
}

impl FilterIndex {
    fn add(&mut self, filter: &str) {
        if !self.known.insert(filter.to_owned()) {
            return;
        }
        // Filters reach here after the edge's ACL check, so they parse.
        let Ok(parsed) = TopicFilter::parse(filter) else {
            return;
        };
        let mut levels = filter.split('/');
        match (levels.next(), levels.next()) {
            (Some(a), Some(b)) if !is_wild(a) && !is_wild(b) => self
                .by_prefix
                .entry(a.to_owned())
                .or_default()
                .entry(b.to_owned())
                .or_default()
                .push(parsed),
            _ => self.wild.push(parsed),
        }
    }

    fn wanted(&self, topic: &str) -> bool {
        let mut levels = topic.split('/');
        if let (Some(a), Some(b)) = (levels.next(), levels.next()) {
            // Borrowed lookups: nothing is allocated per message.
            if let Some(filters) = self.by_prefix.get(a).and_then(|m| m.get(b)) {
                if filters.iter().any(|f| f.matches(topic)) {
                    return true;
                }
            }
        }
        self.wild.iter().any(|f| f.matches(topic))
    }
}

fn is_wild(level: &str) -> bool {
    level == "+" || level == "#"
}

impl Subscriptions {
    /// Whether some filter subscribed since start matches `topic`.
    pub(super) fn wanted(&self, topic: &str) -> bool {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .wanted(topic)
    }

    /// Counts `filters` for `device`, all or none: `Err(max)` if it would then have
    /// subscribed to more than `max` distinct filters.
    pub(super) fn subscribe<'a>(
        &self,
        device: &DeviceId,
        filters: impl IntoIterator<Item = &'a str>,
        max: usize,
    ) -> Result<(), usize> {
        let mut all = self
            .per_device
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let seen = all.entry(device.clone()).or_default();
        let new: HashSet<&str> = filters.into_iter().filter(|f| !seen.contains(*f)).collect();
        if seen.len() + new.len() > max {
            return Err(max);
        }
        // Indexed before the broker sees the SUBSCRIBE, so before its SUBACK.
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        for f in &new {
            index.add(f);
        }
        seen.extend(new.into_iter().map(str::to_owned));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscribe_past_the_cap_is_refused_whole_and_repeats_are_free() {
        let s = Subscriptions::default();
        let d = DeviceId::parse("display-1").unwrap();
        let e = DeviceId::parse("display-2").unwrap();
        assert_eq!(s.subscribe(&d, ["a", "b", "a"], 3), Ok(()));
        assert_eq!(s.subscribe(&d, ["a", "b"], 3), Ok(()), "already counted");
        assert_eq!(s.subscribe(&d, ["c", "d"], 3), Err(3));
        assert_eq!(
            s.subscribe(&d, ["c"], 3),
            Ok(()),
            "nothing of a refusal is kept"
        );
        assert_eq!(s.subscribe(&d, ["e"], 3), Err(3));
        assert_eq!(s.subscribe(&e, ["c", "d", "e"], 3), Ok(()), "per device");
    }

    #[test]
    fn a_topic_is_wanted_when_any_filter_subscribed_since_start_matches() {
        let s = Subscriptions::default();
        let pump = DeviceId::parse("pump-1").unwrap();
        let display = DeviceId::parse("display-1").unwrap();
        assert!(!s.wanted("ward/pump-1/vitals/hr"), "nothing subscribed");
        s.subscribe(&pump, ["ward/pump-1/cmd/#"], 16).unwrap();
        assert!(s.wanted("ward/pump-1/cmd/rate"));
        assert!(!s.wanted("ward/pump-2/cmd/rate"));
        assert!(!s.wanted("ward/pump-1/vitals/hr"));
        s.subscribe(&display, ["ward/+/alarm/#", "$SYS/#"], 16)
            .unwrap();
        assert!(s.wanted("ward/pump-9/alarm/occlusion"));
        assert!(!s.wanted("ward/pump-9/vitals/hr"));
        s.subscribe(&display, ["#"], 16).unwrap();
        assert!(s.wanted("anything/at/all"));
    }
}
