//! The uplink's in-flight window: records sent upstream and not yet acknowledged.
//!
//! At most `capacity` records are in flight. rumqttc's `publish` returning means only
//! "queued"; the packet id is learnt from its `Outgoing::Publish(pkid)` event, which comes
//! in the order the publishes were queued, so the oldest record queued without an id gets
//! the next id seen. A PUBACK names the id: its record leaves the window, and the caller
//! removes or sets it aside in the spool. Records in flight are skipped when the spool is
//! read again, so none is sent twice in one session; a new session starts an empty window
//! (what was in flight is sent again: a duplicate, never a loss). Pure; tested below.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::spool::Key;

#[derive(Debug)]
pub(super) struct Window {
    capacity: usize,
    /// Sent and not acknowledged (or refused by the upstream until the next session).
    in_flight: HashSet<Key>,
    /// Queued to rumqttc, packet id not yet known, oldest first.
    queued: VecDeque<Key>,
    by_pkid: HashMap<u16, Key>,
    /// When each record in flight was queued: its PUBACK's latency is measured from there.
    sent_at: HashMap<Key, Instant>,
}

impl Window {
    pub(super) fn new(capacity: usize) -> Window {
        Window {
            capacity,
            in_flight: HashSet::new(),
            queued: VecDeque::new(),
            by_pkid: HashMap::new(),
            sent_at: HashMap::new(),
        }
    }

    /// How many more records may be sent now.
    pub(super) fn room(&self) -> usize {
        self.capacity.saturating_sub(self.in_flight.len())
    }

    /// The records in flight, which the next read of the spool skips.
    pub(super) fn in_flight(&self) -> &HashSet<Key> {
        &self.in_flight
    }

    /// `key` was queued to the client.
    pub(super) fn sent(&mut self, key: Key) {
        self.sent_at.insert(key, Instant::now());
        self.in_flight.insert(key);
        self.queued.push_back(key);
    }

    /// The client wrote a PUBLISH with packet id `pkid`: the oldest record queued.
    pub(super) fn numbered(&mut self, pkid: u16) {
        if let Some(key) = self.queued.pop_front() {
            self.by_pkid.insert(pkid, key);
        }
    }

    /// The upstream acknowledged `pkid`: its record, which leaves the window; `None` for
    /// an id the window does not hold.
    /// With the time since the record was queued (the PUBACK's latency).
    pub(super) fn acknowledged(&mut self, pkid: u16) -> Option<(Key, Duration)> {
        let key = self.by_pkid.remove(&pkid)?;
        self.in_flight.remove(&key);
        let age = self
            .sent_at
            .remove(&key)
            .map_or(Duration::ZERO, |t| t.elapsed());
        Some((key, age))
    }

    /// How many records are in flight.
    pub(super) fn len(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Priority;

    fn key(seq: u64) -> Key {
        Key {
            priority: Priority::Routine,
            seq,
        }
    }

    #[test]
    fn ids_go_to_records_in_the_order_sent_and_acks_free_room() {
        let mut w = Window::new(3);
        w.sent(key(10));
        w.sent(key(11));
        assert_eq!(w.room(), 1);
        w.numbered(1);
        w.numbered(2);
        assert_eq!(w.acknowledged(2).map(|(k, _)| k), Some(key(11)));
        assert_eq!(w.room(), 2);
        assert!(w.in_flight().contains(&key(10)) && !w.in_flight().contains(&key(11)));
        // An id used again after its acknowledgement names the new record.
        w.sent(key(12));
        w.numbered(2);
        assert_eq!(w.acknowledged(2).map(|(k, _)| k), Some(key(12)));
        assert_eq!(w.acknowledged(1).map(|(k, _)| k), Some(key(10)));
        assert_eq!(w.room(), 3);
    }

    #[test]
    fn an_unknown_or_repeated_ack_changes_nothing() {
        let mut w = Window::new(2);
        w.sent(key(1));
        // Acknowledged before its id was seen, or an id never given: ignored.
        assert_eq!(w.acknowledged(7).map(|(k, _)| k), None);
        w.numbered(7);
        assert_eq!(w.acknowledged(7).map(|(k, _)| k), Some(key(1)));
        assert_eq!(w.acknowledged(7).map(|(k, _)| k), None);
        assert_eq!(w.room(), 2);
        // An id with nothing queued is not recorded.
        w.numbered(8);
        assert_eq!(w.acknowledged(8).map(|(k, _)| k), None);
    }

    #[test]
    fn the_window_never_offers_more_than_its_capacity() {
        let mut w = Window::new(2);
        for seq in 0..5 {
            if w.room() > 0 {
                w.sent(key(seq));
            }
        }
        assert_eq!(w.in_flight().len(), 2);
        assert_eq!(w.room(), 0);
    }

    #[test]
    fn an_acknowledgement_tells_how_long_its_record_was_in_flight() {
        let mut w = Window::new(4);
        let before = Instant::now();
        w.sent(key(1));
        w.numbered(3);
        let (k, latency) = w.acknowledged(3).unwrap();
        // Measured from the send: within the time since just before it.
        assert_eq!(k, key(1));
        assert!(latency <= before.elapsed(), "{latency:?}");
        assert_eq!(w.len(), 0);
        assert_eq!(w.acknowledged(3), None, "its send time went with it");
    }
}
