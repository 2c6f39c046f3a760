//! Records that leave the spool undelivered: expired (past their class's `max_age` or their
//! own expiry), or set aside because they cannot be read back or the upstream refused them.

use super::*;

impl Spool {
    /// The monotonic clock, in ms since the spool opened.
    pub(super) fn mono_ms(&self) -> i64 {
        i64::try_from(self.inner.opened.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Whether a record received at `born` is past its class's `max_age`, or its own
    /// Message Expiry Interval if that is shorter, at `now` (both on [`Spool::mono_ms`]'s
    /// clock).
    pub(super) fn too_old(
        &self,
        priority: Priority,
        born: i64,
        expiry_secs: Option<u32>,
        now: i64,
    ) -> bool {
        let class = self.inner.limits.max_age[priority as usize];
        let max = expiry_secs.map_or(class, |e| class.min(Duration::from_secs(e.into())));
        let age = u64::try_from(now.saturating_sub(born)).unwrap_or(0);
        Duration::from_millis(age) > max
    }

    /// Expires every record older than its class's `max_age`; returns how many.
    pub fn expire(&self) -> usize {
        let now = self.mono_ms();
        let stale: Vec<Key> = self
            .state()
            .index
            .iter()
            .filter(|(k, e)| !e.held && self.too_old(k.priority, e.born, e.expiry_secs, now))
            .map(|(k, _)| *k)
            .collect();
        self.expire_keys(&stale)
    }

    pub(super) fn expire_keys(&self, keys: &[Key]) -> usize {
        let mut st = self.state();
        let mut per_device: BTreeMap<(DeviceId, Priority), u64> = BTreeMap::new();
        for key in keys {
            if let Some(entry) = st.take(*key) {
                st.send(Op::Delete(*key));
                st.counters(&entry.device).expired += 1;
                *per_device.entry((entry.device, key.priority)).or_default() += 1;
            }
        }
        let mut n = 0;
        for ((device, priority), count) in per_device {
            n += count as usize;
            let expired = st.counters(&device).expired;
            self.inner
                .events
                .spool_expired(&device, priority, count, expired);
        }
        n
    }

    /// Moves a record that cannot be read back to `corrupt/` and reports it.
    pub(super) fn set_aside(&self, key: Key, value: &[u8], error: &RecordError) {
        let mut st = self.state();
        let Some(entry) = st.take(key) else { return };
        st.send(Op::Delete(key));
        let name = match entry.place {
            Place::At(loc) => format!("{:016x}-{:x}.bin", loc.segment, loc.offset),
            Place::Pending(_) => format!("pending-{}.bin", key.seq),
        };
        keep_corrupt(&self.inner.shared.corrupt_dir, &name, value);
        st.corrupt += 1;
        drop(st);
        self.inner
            .events
            .spool_corrupt_record(&format!("{key:?}"), &error.to_string());
    }

    /// Sets a record aside that cannot be delivered upstream (`reason` says why): it leaves
    /// the drain order at once, and is kept within `max_rejected` bytes.
    pub fn reject(&self, key: Key, reason: &str) {
        let inner = &self.inner;
        let Some(source) = ({
            let st = self.state();
            st.index.get(&key).map(|e| st.source_of(&key, &e.place))
        }) else {
            // Acknowledged, expired or evicted meanwhile.
            return;
        };
        let value: Arc<[u8]> = match source.read() {
            Ok(v) => v.into(),
            Err(e) => {
                tracing::error!(event = "spool.read_failed", error = %e, "spool read failed");
                return;
            }
        };
        let mut st = self.state();
        let Some(entry) = st.take(key) else { return };
        let number = st.next_rejection;
        st.next_rejection += 1;
        // Kept first, then taken out of the drain order, in the log's order too: a stop in
        // between forwards it once more, it never loses it.
        st.send(Op::Reject {
            number,
            key,
            value: value.clone(),
        });
        st.send(Op::Delete(key));
        let size = (value.len() + 8 + KEY_LEN) as u64;
        st.rejected.insert(
            number,
            SetAside {
                key,
                device: Some(entry.device.clone()),
                size,
                place: Place::Pending(value),
            },
        );
        st.rejected_bytes += size;
        st.counters(&entry.device).rejected += 1;
        let rejected = st.counters(&entry.device).rejected;
        inner
            .events
            .spool_rejected(&entry.device, (key.priority, key.seq), reason, rejected);
        while st.rejected_bytes > inner.limits.max_rejected {
            let Some((number, old)) = st.rejected.pop_first() else {
                break;
            };
            if let Place::At(loc) = old.place {
                st.sub_live(loc);
            }
            st.rejected_bytes = st.rejected_bytes.saturating_sub(old.size);
            st.send(Op::Unreject(number));
            inner
                .events
                .spool_rejected_dropped(old.device.as_ref(), &old.key);
        }
    }
}
