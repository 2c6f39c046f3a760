//! QoS 2 from devices, received exactly once.
//!
//! Until a device sends PUBREL for a QoS 2 packet identifier, any PUBLISH with that
//! identifier is the same message again (MQTT 3.1.1 §4.3.3): typically resent with DUP
//! after a reconnect to a persistent session. It is acknowledged (the broker answers
//! PUBREC) but not stored again, so it never reaches the hospital twice. The identifiers
//! awaiting PUBREL are kept per device, across its connections, as the broker keeps its
//! session: a clean session starts with none. A bitmap of the 65,536 identifiers bounds
//! what a device can make the edge hold to 8 KiB.
//!
//! Pure bookkeeping under one lock; tested by the unit tests below and, end to end, by
//! `tests/system/data_path.rs`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::device::DeviceId;

const WORDS: usize = (u16::MAX as usize + 1) / 64;

#[derive(Debug, Default)]
pub(super) struct ExactlyOnce(Mutex<HashMap<DeviceId, Box<[u64; WORDS]>>>);

impl ExactlyOnce {
    fn all(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Box<[u64; WORDS]>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection of `device` opened a clean session: nothing awaits PUBREL.
    pub(super) fn clean(&self, device: &DeviceId) {
        self.all().remove(device);
    }

    /// Whether a QoS 2 PUBLISH `pkid` from `device` repeats one that awaits its PUBREL.
    pub(super) fn pending(&self, device: &DeviceId, pkid: u16) -> bool {
        self.all()
            .get(device)
            .is_some_and(|bits| bits[usize::from(pkid) / 64] & (1 << (pkid % 64)) != 0)
    }

    /// A QoS 2 PUBLISH `pkid` from `device` is stored: repeats are not, until PUBREL.
    pub(super) fn stored(&self, device: &DeviceId, pkid: u16) {
        let mut all = self.all();
        let bits = all
            .entry(device.clone())
            .or_insert_with(|| Box::new([0; WORDS]));
        bits[usize::from(pkid) / 64] |= 1 << (pkid % 64);
    }

    /// PUBREL `pkid` from `device`: the identifier is free again.
    pub(super) fn released(&self, device: &DeviceId, pkid: u16) {
        if let Some(bits) = self.all().get_mut(device) {
            bits[usize::from(pkid) / 64] &= !(1 << (pkid % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_before_pubrel_is_not_new_after_it_is() {
        let q = ExactlyOnce::default();
        let d = DeviceId::parse("pump-1").unwrap();
        let e = DeviceId::parse("pump-2").unwrap();
        assert!(!q.pending(&d, 65535));
        q.stored(&d, 65535);
        assert!(q.pending(&d, 65535), "resent before PUBREL");
        assert!(
            !q.pending(&e, 65535),
            "another device's identifiers are its own"
        );
        q.released(&d, 65535);
        assert!(!q.pending(&d, 65535), "a new message after PUBREL");
        q.stored(&d, 0);
        q.clean(&d);
        assert!(!q.pending(&d, 0), "a clean session forgets");
    }
}
