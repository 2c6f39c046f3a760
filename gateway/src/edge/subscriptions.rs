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
//! Pure bookkeeping under one lock; tested by the unit tests below and, against the real
//! broker, by `tests/system/data_path.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use crate::device::DeviceId;

#[derive(Debug, Default)]
pub(super) struct Subscriptions(Mutex<HashMap<DeviceId, HashSet<String>>>);

impl Subscriptions {
    /// Counts `filters` for `device`, all or none: `Err(max)` if it would then have
    /// subscribed to more than `max` distinct filters.
    pub(super) fn subscribe<'a>(
        &self,
        device: &DeviceId,
        filters: impl IntoIterator<Item = &'a str>,
        max: usize,
    ) -> Result<(), usize> {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = all.entry(device.clone()).or_default();
        let new: HashSet<&str> = filters.into_iter().filter(|f| !seen.contains(*f)).collect();
        if seen.len() + new.len() > max {
            return Err(max);
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
}
