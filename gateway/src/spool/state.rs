//! The spool's index in memory: every live record's key, device, size, age and place, the
//! devices' shares, and the eviction plan. Memory work only; the disk is the writer's.

use super::*;

/// Where a record's sealed bytes are: still on their way to the writer, or in the log.
#[derive(Debug, Clone)]
pub(super) enum Place {
    Pending(Arc<[u8]>),
    At(Loc),
}

impl Place {
    pub(super) fn is_at(&self, loc: Loc) -> bool {
        matches!(self, Place::At(l) if *l == loc)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) device: DeviceId,
    pub(super) size: u64,
    /// When it was received, in ms of the monotonic clock since the spool opened
    /// (negative: before): ages are measured on it, never on the wall clock.
    pub(super) born: i64,
    /// Its own Message Expiry Interval (MQTT 5), seconds: expired at the smaller of it and
    /// its class's `max_age`.
    pub(super) expiry_secs: Option<u32>,
    /// A held last will: not forwarded, not expired.
    pub(super) held: bool,
    pub(super) place: Place,
}

/// A record refused upstream, kept for inspection.
#[derive(Debug)]
pub(super) struct SetAside {
    pub(super) key: Key,
    pub(super) device: Option<DeviceId>,
    pub(super) size: u64,
    pub(super) place: Place,
}

#[derive(Debug, Default)]
pub(super) struct DeviceShare {
    pub(super) bytes: u64,
    pub(super) keys: BTreeSet<Key>,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) index: BTreeMap<Key, Entry>,
    pub(super) devices: HashMap<DeviceId, DeviceShare>,
    pub(super) total_bytes: u64,
    /// Records and bytes waiting, by priority (indexed by [`Priority`] as `usize`).
    pub(super) by_priority: [(u64, u64); 3],
    pub(super) next_seq: u64,
    pub(super) seq_limit: u64,
    pub(super) counters: BTreeMap<DeviceId, DeviceCounters>,
    pub(super) corrupt: u64,
    /// Rejected records by rejection number, oldest first.
    pub(super) rejected: BTreeMap<u64, SetAside>,
    pub(super) rejected_bytes: u64,
    /// Number of the next rejection.
    pub(super) next_rejection: u64,
    /// The segment files, for reads.
    pub(super) files: BTreeMap<u64, Arc<File>>,
    /// Frame bytes of live frames (records and rejected records) per segment, and in all.
    pub(super) live: BTreeMap<u64, u64>,
    pub(super) live_bytes: u64,
    /// The writer's queue; `None` once closing. Sent to under this lock, so that records
    /// reach the log in sequence order.
    pub(super) ops: Option<mpsc::Sender<Op>>,
    /// Sealed bytes of records written recently and not yet removed, at most
    /// [`RECENT_BYTES`] of them: in steady state the uplink reads every record from here,
    /// so it need not wait on the disk (or leave its async worker) to forward.
    pub(super) recent: HashMap<Key, Arc<[u8]>>,
    pub(super) recent_bytes: usize,
    /// Deletions of forwarded records not yet queued: they go with the writer's next op,
    /// or after [`DELETE_LINGER`], rather than waking it once each.
    pub(super) deferred: Vec<Key>,
}

impl State {
    pub(super) fn insert(&mut self, key: Key, entry: Entry) {
        self.total_bytes += entry.size;
        let tally = &mut self.by_priority[key.priority as usize];
        tally.0 += 1;
        tally.1 += entry.size;
        if let Place::At(loc) = entry.place {
            self.add_live(loc);
        }
        let share = self.devices.entry(entry.device.clone()).or_default();
        share.bytes += entry.size;
        share.keys.insert(key);
        self.index.insert(key, entry);
    }

    pub(super) fn take(&mut self, key: Key) -> Option<Entry> {
        let entry = self.index.remove(&key)?;
        if let Some(v) = self.recent.remove(&key) {
            self.recent_bytes -= v.len();
        }
        self.total_bytes -= entry.size;
        let tally = &mut self.by_priority[key.priority as usize];
        tally.0 -= 1;
        tally.1 -= entry.size;
        if let Place::At(loc) = entry.place {
            self.sub_live(loc);
        }
        if let Some(share) = self.devices.get_mut(&entry.device) {
            share.bytes -= entry.size;
            share.keys.remove(&key);
            if share.keys.is_empty() {
                self.devices.remove(&entry.device);
            }
        }
        Some(entry)
    }

    pub(super) fn add_live(&mut self, loc: Loc) {
        *self.live.entry(loc.segment).or_default() += u64::from(loc.len);
        self.live_bytes += u64::from(loc.len);
    }

    pub(super) fn sub_live(&mut self, loc: Loc) {
        if let Some(n) = self.live.get_mut(&loc.segment) {
            *n = n.saturating_sub(u64::from(loc.len));
        }
        self.live_bytes = self.live_bytes.saturating_sub(u64::from(loc.len));
    }

    /// `key`'s record is now at `loc` (written, or copied by a compaction from `from`).
    pub(super) fn place(&mut self, key: Key, loc: Loc, from: Option<Loc>) {
        if let Some(entry) = self.index.get_mut(&key) {
            if let Place::Pending(v) = &entry.place {
                if self.recent_bytes + v.len() <= RECENT_BYTES {
                    self.recent_bytes += v.len();
                    self.recent.insert(key, v.clone());
                }
            }
            if let Some(old) = relocate(&mut entry.place, loc, from) {
                self.count_move(old, loc);
            }
        }
    }

    /// Like [`State::place`], for a rejected record.
    pub(super) fn place_rejected(&mut self, number: u64, loc: Loc, from: Option<Loc>) {
        if let Some(entry) = self.rejected.get_mut(&number) {
            if let Some(old) = relocate(&mut entry.place, loc, from) {
                self.count_move(old, loc);
            }
        }
    }

    /// Live bytes leave `old` (if the frame was on disk before) for `loc`.
    pub(super) fn count_move(&mut self, old: Option<Loc>, loc: Loc) {
        if let Some(old) = old {
            self.sub_live(old);
        }
        self.add_live(loc);
    }

    pub(super) fn send(&mut self, op: Op) {
        self.send_deferred();
        // With the writer gone, records stay pending and their waiters hear of it.
        if let Some(ops) = &self.ops {
            let _ = ops.send(op);
        }
    }

    /// Queues the deferred deletions, in the order they were made.
    pub(super) fn send_deferred(&mut self) {
        if let Some(ops) = &self.ops {
            for key in self.deferred.drain(..) {
                let _ = ops.send(Op::Delete(key));
            }
        }
    }

    /// How to read the bytes of `key`, at `place`, once the lock is let go.
    pub(super) fn source_of(&self, key: &Key, place: &Place) -> Source {
        match self.recent.get(key) {
            Some(v) => Source::Memory(v.clone()),
            None => self.source(place),
        }
    }

    /// How to read `place`'s bytes once the lock is let go.
    pub(super) fn source(&self, place: &Place) -> Source {
        match place {
            Place::Pending(v) => Source::Memory(v.clone()),
            Place::At(loc) => match self.files.get(&loc.segment) {
                Some(f) => Source::Disk(f.clone(), *loc),
                None => Source::Missing(*loc),
            },
        }
    }

    pub(super) fn counters(&mut self, device: &DeviceId) -> &mut DeviceCounters {
        self.counters.entry(device.clone()).or_default()
    }

    /// The records to evict so that a `size`-byte record of `priority` from `device` fits,
    /// or why it cannot. Pure: nothing is changed. Walks only the records it takes, so an
    /// append into a full spool costs O(victims × log n), not O(n).
    pub(super) fn plan(
        &self,
        device: &DeviceId,
        priority: Priority,
        size: u64,
        limits: &SpoolLimits,
        room: Room,
    ) -> Result<Vec<Key>, &'static str> {
        if size > limits.device_quota || size > limits.max_bytes {
            return Err("the record is larger than the spool or the device quota");
        }
        let mut victims = Vec::new();
        let mut freed_device = 0;
        let mut freed_total = 0;

        let share = self.devices.get(device);
        let device_bytes = share.map_or(0, |s| s.bytes);
        if device_bytes + size > limits.device_quota {
            for k in share.into_iter().flat_map(|s| evictable(&s.keys, priority)) {
                if device_bytes - freed_device + size <= limits.device_quota {
                    break;
                }
                let s = self.index.get(&k).map_or(0, |e| e.size);
                freed_device += s;
                freed_total += s;
                victims.push(k);
            }
            if device_bytes - freed_device + size > limits.device_quota {
                return Err("the device's quota is full of records as urgent as this one");
            }
        }
        // Over the spool's bytes, or its record count (which bounds the index's memory).
        let over = |freed: u64, evicted: usize| {
            self.total_bytes - freed + size > limits.max_bytes
                || self.index.len() + 1 - evicted > limits.max_records
        };
        if over(freed_total, victims.len()) {
            // The device's victims are its oldest evictable records: the device's further
            // ones come after them in the same order.
            let taken = victims.len();
            let candidates: Box<dyn Iterator<Item = Key> + '_> = match room {
                Room::Any => Box::new(evictable_in(&self.index, priority)),
                Room::OwnOnly => Box::new(
                    share
                        .into_iter()
                        .flat_map(move |s| evictable(&s.keys, priority))
                        .skip(taken),
                ),
            };
            let already: HashSet<Key> = victims.iter().copied().collect();
            for k in candidates {
                if !over(freed_total, victims.len()) {
                    break;
                }
                if already.contains(&k) {
                    continue;
                }
                freed_total += self.index.get(&k).map_or(0, |e| e.size);
                victims.push(k);
            }
            if over(freed_total, victims.len()) {
                return Err("the spool is full of records as urgent as this one");
            }
        }
        Ok(victims)
    }
}

/// Moves `place` to `loc` if it is still where the writer found it: pending (a first write,
/// `from` = `None`) or at `from` (a compaction's copy). Returns where it was (`None`: only in
/// memory), or nothing if the record moved on meanwhile.
pub(super) fn relocate(place: &mut Place, loc: Loc, from: Option<Loc>) -> Option<Option<Loc>> {
    let was = match (&*place, from) {
        (Place::Pending(_), None) => None,
        (Place::At(old), Some(from)) if *old == from => Some(from),
        _ => return None,
    };
    *place = Place::At(loc);
    Some(was)
}

/// Where to read a record's sealed bytes.
pub(super) enum Source {
    Memory(Arc<[u8]>),
    Disk(Arc<File>, Loc),
    /// Its segment is gone (cannot happen while the index is right; reported if it does).
    Missing(Loc),
}

impl Source {
    pub(super) fn read(self) -> io::Result<Vec<u8>> {
        match self {
            Source::Memory(v) => Ok(v.to_vec()),
            Source::Disk(file, loc) => {
                let (at, len) = loc.value();
                let mut buf = vec![0; len];
                file.read_exact_at(&mut buf, at)?;
                Ok(buf)
            }
            Source::Missing(loc) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("segment {:016x} is gone", loc.segment),
            )),
        }
    }
}

/// The keys of `keys` a record of `priority` may evict, in eviction order: routine, then
/// vital (never an alarm), none more urgent than it, oldest first within each.
pub(super) fn evictable(
    keys: &BTreeSet<Key>,
    priority: Priority,
) -> impl Iterator<Item = Key> + '_ {
    let routine = keys.range(Key::first_of(Priority::Routine)..);
    let vital = keys.range(Key::first_of(Priority::Vital)..Key::first_of(Priority::Routine));
    routine
        .chain(vital)
        .copied()
        .filter(move |k| k.priority >= priority)
}

/// [`evictable`] over the whole index.
pub(super) fn evictable_in(
    index: &BTreeMap<Key, Entry>,
    priority: Priority,
) -> impl Iterator<Item = Key> + '_ {
    let routine = index.range(Key::first_of(Priority::Routine)..);
    let vital = index.range(Key::first_of(Priority::Vital)..Key::first_of(Priority::Routine));
    routine
        .chain(vital)
        .map(|(k, _)| *k)
        .filter(move |k| k.priority >= priority)
}

/// Where room for a new record may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// Any evictable record (lower or equal priority, never an alarm).
    Any,
    /// Only the same device's evictable records.
    OwnOnly,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reference for [`State::plan`], written from the rules in the module docs rather
    /// than from the code: the records a new one may evict are its own priority's or less
    /// urgent ones, never alarms, routine before vital, oldest first; a device over its
    /// quota gives up its own first, then the spool (or, for the gateway's own stream, only
    /// its own records) gives room until bytes and count fit.
    #[derive(Default)]
    struct Reference {
        records: Vec<(Key, DeviceId, u64)>,
    }

    impl Reference {
        fn order(&self, p: Priority, own: Option<&DeviceId>) -> Vec<Key> {
            let mut c: Vec<Key> = self
                .records
                .iter()
                .filter(|(k, d, _)| {
                    k.priority != Priority::Alarm && k.priority >= p && own.is_none_or(|o| o == d)
                })
                .map(|(k, _, _)| *k)
                .collect();
            c.sort_by_key(|k| (std::cmp::Reverse(k.priority), k.seq));
            c
        }

        fn size(&self, k: &Key) -> u64 {
            self.records.iter().find(|r| r.0 == *k).map_or(0, |r| r.2)
        }

        fn plan(
            &self,
            d: &DeviceId,
            p: Priority,
            size: u64,
            l: &SpoolLimits,
            room: Room,
        ) -> Option<Vec<Key>> {
            if size > l.device_quota || size > l.max_bytes {
                return None;
            }
            let mut victims = Vec::new();
            let mut dev: u64 = self.records.iter().filter(|r| &r.1 == d).map(|r| r.2).sum();
            let mut total: u64 = self.records.iter().map(|r| r.2).sum();
            for k in self.order(p, Some(d)) {
                if dev + size <= l.device_quota {
                    break;
                }
                dev -= self.size(&k);
                total -= self.size(&k);
                victims.push(k);
            }
            if dev + size > l.device_quota {
                return None;
            }
            let over = |total: u64, n: usize| {
                total + size > l.max_bytes || self.records.len() + 1 - n > l.max_records
            };
            let own = (room == Room::OwnOnly).then_some(d);
            for k in self.order(p, own) {
                if !over(total, victims.len()) {
                    break;
                }
                if victims.contains(&k) {
                    continue;
                }
                total -= self.size(&k);
                victims.push(k);
            }
            (!over(total, victims.len())).then_some(victims)
        }
    }

    /// A small deterministic generator (no dependency for a test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn plan_agrees_with_a_reference_over_random_workloads() {
        let devices: Vec<DeviceId> = ["pump-1", "pump-2", "monitor-1"]
            .iter()
            .map(|d| DeviceId::parse(d).unwrap())
            .chain([DeviceId::gateway()])
            .collect();
        let mut decisions = [0usize; 2];
        for seed in 0..60 {
            let mut rng = Lcg(seed);
            let limits = SpoolLimits {
                max_bytes: 400 + rng.next(800),
                device_quota: 150 + rng.next(400),
                max_age: [Duration::from_secs(60); 3],
                max_rejected: 0,
                max_records: 5 + rng.next(20) as usize,
                commit_interval: Duration::ZERO,
            };
            let mut st = State::default();
            let mut reference = Reference::default();
            for seq in 0..300u64 {
                if rng.next(5) == 0 && !reference.records.is_empty() {
                    // The upstream acknowledged one.
                    let i = rng.next(reference.records.len() as u64) as usize;
                    let (k, _, _) = reference.records.remove(i);
                    st.take(k);
                    continue;
                }
                let device = &devices[rng.next(devices.len() as u64) as usize];
                let priority = Priority::ALL[rng.next(3) as usize];
                let size = 10 + rng.next(120);
                let room = if device.is_gateway() {
                    Room::OwnOnly
                } else {
                    Room::Any
                };
                let got = st.plan(device, priority, size, &limits, room).ok();
                let want = reference.plan(device, priority, size, &limits, room);
                assert_eq!(
                    got, want,
                    "seed {seed} step {seq}: {device} {priority} {size}"
                );
                let Some(victims) = got else {
                    decisions[1] += 1;
                    continue;
                };
                decisions[0] += 1;
                for v in &victims {
                    st.take(*v);
                    reference.records.retain(|r| r.0 != *v);
                }
                let key = Key { priority, seq };
                st.insert(
                    key,
                    Entry {
                        device: device.clone(),
                        size,
                        born: 0,
                        expiry_secs: None,
                        held: false,
                        place: Place::Pending(Arc::from(&[][..])),
                    },
                );
                reference.records.push((key, device.clone(), size));
                assert!(st.total_bytes <= limits.max_bytes);
                assert!(st.index.len() <= limits.max_records);
            }
        }
        // The workloads reach both outcomes often.
        assert!(decisions[0] > 1000 && decisions[1] > 100, "{decisions:?}");
    }
}
