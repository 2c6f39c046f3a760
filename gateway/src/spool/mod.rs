//! The spool: durable, encrypted store-and-forward of every accepted message.
//!
//! Invariants:
//! - A message is in the spool from [`Spool::append`] until the upstream broker's PUBACK
//!   ([`Spool::remove`]), its expiry (`max_age` of its priority class) or its eviction.
//! - [`Durable`] resolves only after a `flush` that covers the record: the edge lets a
//!   QoS 1 PUBLISH reach the broker (and so be acknowledged) only then. Flushes are group
//!   commits: one flush thread takes every waiter queued while the previous flush ran, so
//!   the flush rate, not the message rate, bounds the disk work.
//! - Records are encrypted at rest (see [`record`]); the key lives in `data_dir/spool.key`
//!   (0600), is made at first start, and never leaves the process or reaches a log.
//! - When the spool (`max_bytes`) or a device's share (`device_quota`) is full, a new record
//!   may evict only records of its own or a lower priority class, routine before vital,
//!   oldest first, and never an alarm; if no room can be made the record is refused (the
//!   device gets no acknowledgement). Every eviction, expiry and refusal is counted per
//!   device and logged (`spool.evicted`, `spool.expired`, `spool.refused`).
//! - Ages (for `max_age`) are counted on the monotonic clock from receipt, never on the
//!   wall clock, so no clock step (NTP setting an RTC-less board's clock) can expire
//!   records in bulk. Records read back at open are as old as their wall-clock receipt
//!   time says if it is plausible (not before 2026, not in the future), else new.
//! - Sequence numbers never repeat, across restarts too: blocks of [`SEQ_BLOCK`] are
//!   reserved in the meta tree before use.
//! - A record is handed to the uplink ([`Spool::next_batch`]) only once a group commit has
//!   covered it, whatever its QoS: what the upstream has seen is on disk here, so a crash
//!   can never give its sequence number (with its block reservation, flushed by the same
//!   commit) to another record.
//! - A record that cannot be read back (corrupt, wrong version) is reported
//!   (`spool.corrupt_record`), moved to the `corrupt` tree for inspection, and skipped.
//! - A record the upstream refuses, or that cannot be published upstream at all, is moved
//!   to the `rejected` tree ([`Spool::reject`]): out of the drain order, so it never holds
//!   back the records behind it; counted per device and audited (`spool.rejected`). The
//!   tree keeps the newest `max_rejected` bytes for an engineer to inspect; older ones are
//!   deleted, each deletion audited (`spool.rejected_dropped`). Rejected records are not
//!   retried: the upstream's answer (not authorised, quota, topic invalid) would not change.
//! - A device's last will is stored at its CONNECT ([`Spool::hold_will`]): encrypted and
//!   counted against the quotas like any record, but held out of the drain order and
//!   expiry. Its session's end decides: released as a new record stamped with the time of
//!   the abnormal close ([`Spool::release_will`]), or deleted after a clean DISCONNECT
//!   ([`Spool::drop_will`]). Wills still held when the spool opens belong to sessions a
//!   stopped gateway ended, not failed devices: they are deleted (`spool.wills_dropped`).
//!
//! On disk (`data_dir/spool/`, sled 0.34): tree `records` (key → sealed value, see
//! [`record`]), tree `meta` (`format` = [`FORMAT_VERSION`], `seq_limit`), tree `corrupt`,
//! tree `rejected` (rejection number u64 BE ‖ key → sealed value, oldest first), tree `held`
//! (key → empty: the records of `records` that are held wills). A gateway older than the
//! `held` tree would forward a held will it finds as a record: format 1 is kept so that an
//! update can still be rolled back.
//! An in-memory index of keys, devices and sizes is rebuilt at open by reading every
//! record (which also finds corrupt ones before the uplink does).
//!
//! Tested by the unit tests below (quotas, eviction order, expiry, sequence persistence,
//! corruption) and by the system tests (kill -9 under load, plaintext search of the files).

pub mod record;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, Notify};

use crate::device::DeviceId;
pub use record::{Key, Priority, Record, RecordError};
use record::{Sealer, KEY_LEN, SECRET_LEN};

/// Version of the spool's on-disk layout (trees and meta keys).
pub const FORMAT_VERSION: u64 = 1;
/// Sequence numbers reserved at a time.
pub const SEQ_BLOCK: u64 = 4096;
const META_FORMAT: &[u8] = b"format";
const META_SEQ_LIMIT: &[u8] = b"seq_limit";
/// How often sled flushes on its own (acknowledged deletions, between group commits).
const BACKGROUND_FLUSH_MS: u64 = 500;

/// Limits, from the `[spool]` section.
#[derive(Debug, Clone)]
pub struct SpoolLimits {
    pub max_bytes: u64,
    pub device_quota: u64,
    /// Indexed by `Priority as usize`.
    pub max_age: [Duration; 3],
    pub cache_bytes: u64,
    /// Bytes of rejected records kept for inspection (the newest).
    pub max_rejected: u64,
    /// Records kept at most: bounds the in-memory index (about 100 bytes a record).
    pub max_records: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("spool key {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool key {0} is missing but the spool holds records; refusing to start rather than discard them")]
    KeyMissing(PathBuf),
    #[error(
        "spool format version {found} in {path}; this wardgate reads version {FORMAT_VERSION}"
    )]
    Format { path: PathBuf, found: u64 },
    #[error("spool write failed: {0}")]
    Write(#[from] sled::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("spool flush failed: {0}")]
    Flush(String),
    #[error(
        "no room in the spool for a {priority} record of {size} bytes from {device}: {reason}"
    )]
    Refused {
        device: DeviceId,
        priority: Priority,
        size: u64,
        reason: &'static str,
    },
}

/// Per-device counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    pub stored: u64,
    pub evicted: u64,
    pub expired: u64,
    pub refused: u64,
    /// Set aside: refused by the upstream, or impossible to publish there.
    pub rejected: u64,
}

#[derive(Debug, Clone, Default)]
pub struct SpoolStats {
    pub records: usize,
    pub bytes: u64,
    pub corrupt: u64,
    /// Records in the `rejected` tree now, and their bytes.
    pub rejected: u64,
    pub rejected_bytes: u64,
    pub devices: BTreeMap<DeviceId, DeviceCounters>,
}

#[derive(Debug, Clone)]
struct Entry {
    device: DeviceId,
    size: u64,
    /// When it was received, in ms of the monotonic clock since the spool opened
    /// (negative: before): ages are measured on it, never on the wall clock.
    born: i64,
    /// A held last will: not forwarded, not expired.
    held: bool,
}

#[derive(Debug, Default)]
struct DeviceShare {
    bytes: u64,
    keys: BTreeSet<Key>,
}

#[derive(Debug, Default)]
struct State {
    index: BTreeMap<Key, Entry>,
    devices: HashMap<DeviceId, DeviceShare>,
    total_bytes: u64,
    next_seq: u64,
    seq_limit: u64,
    counters: BTreeMap<DeviceId, DeviceCounters>,
    corrupt: u64,
    rejected: u64,
    rejected_bytes: u64,
    /// Number of the next rejection (key prefix in the `rejected` tree).
    next_rejection: u64,
}

impl State {
    fn insert(&mut self, key: Key, entry: Entry) {
        self.total_bytes += entry.size;
        let share = self.devices.entry(entry.device.clone()).or_default();
        share.bytes += entry.size;
        share.keys.insert(key);
        self.index.insert(key, entry);
    }

    fn take(&mut self, key: Key) -> Option<Entry> {
        let entry = self.index.remove(&key)?;
        self.total_bytes -= entry.size;
        if let Some(share) = self.devices.get_mut(&entry.device) {
            share.bytes -= entry.size;
            share.keys.remove(&key);
            if share.keys.is_empty() {
                self.devices.remove(&entry.device);
            }
        }
        Some(entry)
    }

    fn counters(&mut self, device: &DeviceId) -> &mut DeviceCounters {
        self.counters.entry(device.clone()).or_default()
    }

    /// The records to evict so that a `size`-byte record of `priority` from `device` fits,
    /// or why it cannot. Pure: nothing is changed. Walks only the records it takes, so an
    /// append into a full spool costs O(victims × log n), not O(n).
    fn plan(
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

/// The keys of `keys` a record of `priority` may evict, in eviction order: routine, then
/// vital (never an alarm), none more urgent than it, oldest first within each.
fn evictable(keys: &BTreeSet<Key>, priority: Priority) -> impl Iterator<Item = Key> + '_ {
    let routine = keys.range(Key::first_of(Priority::Routine)..);
    let vital = keys.range(Key::first_of(Priority::Vital)..Key::first_of(Priority::Routine));
    routine
        .chain(vital)
        .copied()
        .filter(move |k| k.priority >= priority)
}

/// [`evictable`] over the whole index.
fn evictable_in(
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
enum Room {
    /// Any evictable record (lower or equal priority, never an alarm).
    Any,
    /// Only the same device's evictable records.
    OwnOnly,
}

/// A record waiting for a group commit: who to tell, and its sequence number.
type FlushWaiter = (oneshot::Sender<Result<(), String>>, u64);

struct Inner {
    path: PathBuf,
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    corrupt: sled::Tree,
    rejected: sled::Tree,
    held: sled::Tree,
    sealer: Sealer,
    limits: SpoolLimits,
    state: Mutex<State>,
    /// `None` once dropping: closing it stops the flush thread.
    flush_tx: Mutex<Option<mpsc::Sender<FlushWaiter>>>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    durable: Arc<Durability>,
    /// The origin of the monotonic clock records are aged on.
    opened: std::time::Instant,
}

/// What the group commits have made durable, shared with the flush thread.
#[derive(Debug, Default)]
struct Durability {
    /// Every record with a lower sequence number is on disk (or gone).
    below: AtomicU64,
    /// Woken after each commit that made records durable.
    wake: Notify,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the queue, then wait for the flush thread so that its handle on the store
        // is gone before anyone reopens it.
        self.flush_tx.get_mut().map(Option::take).ok();
        if let Ok(Some(handle)) = self.flusher.get_mut().map(Option::take) {
            let _ = handle.join();
        }
    }
}

/// A handle on the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// Resolves once the record it belongs to is on disk.
#[derive(Debug)]
pub struct Durable(oneshot::Receiver<Result<(), String>>);

impl Durable {
    pub async fn wait(self) -> Result<(), SpoolError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SpoolError::Flush(e)),
            Err(_) => Err(SpoolError::Flush("the flush thread stopped".into())),
        }
    }
}

/// A wall-clock time no record can have been received before: the year this version was
/// released (2026-01-01). A board without a real-time clock counts from 1970 (or its
/// image's build date) until NTP sets it.
const PLAUSIBLE_SINCE_MS: u64 = 1_767_225_600_000;

/// The age of a record read back at open, from its wall-clock receipt time: its wall age
/// if both times are plausible, else 0 — received before the clock was set, or the clock
/// now behind it — so that no clock step can expire a record in bulk. From then on the
/// record ages on the monotonic clock.
fn age_at_open(received_at_ms: u64, wall_now: u64) -> i64 {
    if received_at_ms < PLAUSIBLE_SINCE_MS || wall_now < received_at_ms {
        return 0;
    }
    i64::try_from(wall_now - received_at_ms).unwrap_or(i64::MAX)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn load_or_make_secret(path: &Path, store_has_data: bool) -> Result<[u8; SECRET_LEN], SpoolError> {
    let key_err = |source| SpoolError::KeyFile {
        path: path.to_owned(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => match <[u8; SECRET_LEN]>::try_from(bytes.as_slice()) {
            Ok(secret) => return Ok(secret),
            // Nothing is sealed under a key that is not whole (a crash while an older
            // wardgate wrote it): with an empty store it is replaced, else kept for an
            // engineer rather than discarding the records.
            Err(_) if !store_has_data => {
                tracing::warn!(
                    event = "spool.key_replaced",
                    path = %path.display(),
                    found = bytes.len(),
                    "spool key file not whole and the spool empty: a new key is made"
                );
            }
            Err(_) => {
                return Err(key_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("expected {SECRET_LEN} bytes, found {}", bytes.len()),
                )))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if store_has_data {
                return Err(SpoolError::KeyMissing(path.to_owned()));
            }
        }
        Err(e) => return Err(key_err(e)),
    }
    // Written whole or not at all: a crash can never leave an empty or partial key.
    let secret = Sealer::generate_secret()?;
    crate::fsutil::write_private(path, &secret).map_err(key_err)?;
    Ok(secret)
}

impl Spool {
    /// Opens (or creates) the spool in `data_dir`.
    pub fn open(data_dir: &Path, limits: SpoolLimits) -> Result<Spool, SpoolError> {
        let path = data_dir.join("spool");
        let store_err = |source| SpoolError::Store {
            path: path.clone(),
            source,
        };
        let existed = path.exists();
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(limits.cache_bytes)
            .flush_every_ms(Some(BACKGROUND_FLUSH_MS))
            .open()
            .map_err(store_err)?;
        let records = db.open_tree("records").map_err(store_err)?;
        let meta = db.open_tree("meta").map_err(store_err)?;
        let corrupt = db.open_tree("corrupt").map_err(store_err)?;
        let rejected = db.open_tree("rejected").map_err(store_err)?;
        let held = db.open_tree("held").map_err(store_err)?;
        let secret =
            load_or_make_secret(&data_dir.join("spool.key"), existed && !records.is_empty())?;
        let sealer = Sealer::new(&secret);

        match meta.get(META_FORMAT).map_err(store_err)? {
            Some(v) => {
                let found = read_u64(&v);
                if found != FORMAT_VERSION {
                    return Err(SpoolError::Format { path, found });
                }
            }
            None => {
                meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())
                    .map_err(store_err)?;
            }
        }

        let mut state = State::default();
        let mut max_seq = None;
        let wall_now = now_ms();
        for item in records.iter() {
            let (k, v) = item.map_err(store_err)?;
            let key = Key::from_bytes(&k);
            if let Some(key) = key {
                max_seq = max_seq.max(Some(key.seq));
            }
            match key.map(|key| (key, sealer.open(key, &v))) {
                Some((key, Ok(rec))) => state.insert(
                    key,
                    Entry {
                        device: rec.device,
                        size: (v.len() + KEY_LEN) as u64,
                        born: -age_at_open(rec.received_at_ms, wall_now),
                        held: false,
                    },
                ),
                Some((key, Err(e))) => {
                    quarantine(
                        &records,
                        &corrupt,
                        &k,
                        &v,
                        &format!("{key:?}"),
                        &e.to_string(),
                    )?;
                    state.corrupt += 1;
                }
                None => {
                    quarantine(&records, &corrupt, &k, &v, "unreadable key", "bad key")?;
                    state.corrupt += 1;
                }
            }
        }
        let mut wills_dropped = 0;
        for item in held.iter() {
            let (k, _) = item.map_err(store_err)?;
            if let Some(key) = Key::from_bytes(&k) {
                if state.take(key).is_some() {
                    records.remove(&k).map_err(store_err)?;
                    wills_dropped += 1;
                }
            }
        }
        held.clear().map_err(store_err)?;
        if wills_dropped > 0 {
            tracing::info!(
                event = "spool.wills_dropped",
                count = wills_dropped,
                "last wills of sessions the previous run ended deleted, not forwarded"
            );
        }
        for item in rejected.iter() {
            let (k, v) = item.map_err(store_err)?;
            state.rejected += 1;
            state.rejected_bytes += (k.len() + v.len()) as u64;
            state.next_rejection = state.next_rejection.max(read_u64(&k[..8.min(k.len())]) + 1);
        }
        let stored_limit = meta
            .get(META_SEQ_LIMIT)
            .map_err(store_err)?
            .map_or(0, |v| read_u64(&v));
        state.next_seq = stored_limit.max(max_seq.map_or(0, |s| s + 1));
        state.seq_limit = state.next_seq + SEQ_BLOCK;
        meta.insert(META_SEQ_LIMIT, &state.seq_limit.to_be_bytes())
            .map_err(store_err)?;
        db.flush().map_err(store_err)?;

        let (flush_tx, flush_rx) = mpsc::channel::<FlushWaiter>();
        let flusher = db.clone();
        // Everything read back at open is on disk.
        let durable = Arc::new(Durability {
            below: AtomicU64::new(state.next_seq),
            wake: Notify::new(),
        });
        let progress = durable.clone();
        let flusher = std::thread::Builder::new()
            .name("wardgate-spool-flush".into())
            .spawn(move || group_commit(flusher, flush_rx, &progress))
            .map_err(|source| SpoolError::KeyFile {
                path: path.clone(),
                source,
            })?;

        tracing::info!(
            event = "spool.opened",
            path = %path.display(),
            records = state.index.len(),
            bytes = state.total_bytes,
            corrupt = state.corrupt,
            "spool opened"
        );
        Ok(Spool {
            inner: Arc::new(Inner {
                path,
                db,
                records,
                meta,
                corrupt,
                rejected,
                held,
                sealer,
                limits,
                state: Mutex::new(state),
                flush_tx: Mutex::new(Some(flush_tx)),
                flusher: Mutex::new(Some(flusher)),
                durable,
                opened: std::time::Instant::now(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `record`. Returns a [`Durable`] that resolves once it is on disk, or a
    /// refusal when no room can be made for it.
    pub fn append(&self, record: &Record, priority: Priority) -> Result<Durable, SpoolError> {
        self.append_in(record, priority, Room::Any, false)
            .map(|(_, d)| d)
    }

    /// Like [`Spool::append`], but room is made only by evicting the same device's records:
    /// for the gateway's own stream, which must never displace device data.
    pub fn append_own(&self, record: &Record, priority: Priority) -> Result<Durable, SpoolError> {
        self.append_in(record, priority, Room::OwnOnly, false)
            .map(|(_, d)| d)
    }

    /// Stores a device's last will at its CONNECT, held: counted against the quotas (room
    /// is made as for any record), but neither forwarded nor expired until
    /// [`Spool::release_will`]. Returns its key, for the session's end.
    pub fn hold_will(&self, record: &Record, priority: Priority) -> Result<Key, SpoolError> {
        self.append_in(record, priority, Room::Any, true)
            .map(|(k, _)| k)
    }

    /// Releases a held will after its session ended abnormally: it becomes a record like
    /// any other, stamped with the time of release, and is forwarded once durable. `None`
    /// if it is no longer held (evicted to make room, or already released).
    pub fn release_will(&self, key: Key) -> Option<Result<Durable, SpoolError>> {
        let mut record = match self.take_will(key)? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        record.received_at_ms = now_ms();
        Some(
            self.append_in(&record, key.priority, Room::Any, false)
                .map(|(_, d)| d),
        )
    }

    /// Deletes a held will: its session ended with a DISCONNECT.
    pub fn drop_will(&self, key: Key) {
        let _ = self.take_will(key);
    }

    /// Takes a held will out of the store; `None` if it is not there.
    fn take_will(&self, key: Key) -> Option<Result<Record, SpoolError>> {
        let inner = &self.inner;
        let mut st = self.state();
        if !st.index.get(&key).is_some_and(|e| e.held) {
            return None;
        }
        let value = match inner.records.get(key.to_bytes()) {
            Ok(Some(v)) => v,
            Ok(None) => return None,
            Err(e) => return Some(Err(e.into())),
        };
        st.take(key);
        let removed = inner
            .records
            .remove(key.to_bytes())
            .and_then(|_| inner.held.remove(key.to_bytes()));
        if let Err(e) = removed {
            return Some(Err(e.into()));
        }
        drop(st);
        Some(inner.sealer.open(key, &value).map_err(SpoolError::from))
    }

    fn append_in(
        &self,
        record: &Record,
        priority: Priority,
        room: Room,
        held: bool,
    ) -> Result<(Key, Durable), SpoolError> {
        let inner = &self.inner;
        let mut st = self.state();
        let seq = st.next_seq;
        if seq >= st.seq_limit {
            st.seq_limit = seq + SEQ_BLOCK;
            inner
                .meta
                .insert(META_SEQ_LIMIT, &st.seq_limit.to_be_bytes())?;
        }
        let key = Key { priority, seq };
        let value = inner.sealer.seal(key, record)?;
        let size = (value.len() + KEY_LEN) as u64;
        let victims = match st.plan(&record.device, priority, size, &inner.limits, room) {
            Ok(v) => v,
            Err(reason) => {
                st.counters(&record.device).refused += 1;
                let refused = st.counters(&record.device).refused;
                crate::audit::record(
                    "spool.refused",
                    Some(record.device.as_str()),
                    &format!("priority={priority} size={size} reason={reason}"),
                );
                tracing::warn!(
                    event = "spool.refused",
                    device = %record.device,
                    priority = %priority,
                    size,
                    refused,
                    reason,
                    "record refused: no room in the spool"
                );
                return Err(SpoolError::Refused {
                    device: record.device.clone(),
                    priority,
                    size,
                    reason,
                });
            }
        };
        for victim in victims {
            if let Some(entry) = st.take(victim) {
                inner.records.remove(victim.to_bytes())?;
                if entry.held {
                    inner.held.remove(victim.to_bytes())?;
                }
                let c = st.counters(&entry.device);
                c.evicted += 1;
                let evicted = c.evicted;
                crate::audit::record(
                    "spool.evicted",
                    Some(entry.device.as_str()),
                    &format!(
                        "priority={} seq={} for_device={}",
                        victim.priority, victim.seq, record.device
                    ),
                );
                tracing::warn!(
                    event = "spool.evicted",
                    device = %entry.device,
                    priority = %victim.priority,
                    seq = victim.seq,
                    for_device = %record.device,
                    evicted,
                    "record evicted to make room"
                );
            }
        }
        if held {
            // Marked first: a crash in between leaves a mark without a record, harmless.
            inner.held.insert(key.to_bytes(), &[])?;
        }
        inner.records.insert(key.to_bytes(), value)?;
        st.insert(
            key,
            Entry {
                device: record.device.clone(),
                size,
                born: self.mono_ms(),
                held,
            },
        );
        if !held {
            st.counters(&record.device).stored += 1;
        }
        st.next_seq += 1;
        drop(st);
        let (tx, rx) = oneshot::channel();
        // If the flush thread is gone, `tx` is dropped and the Durable reports the failure.
        if let Some(queue) = inner
            .flush_tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = queue.send((tx, seq));
        }
        Ok((key, Durable(rx)))
    }

    /// Up to `max` durable records in drain order (alarms first, oldest first), skipping
    /// `skip`.
    /// Records past their class's `max_age` are expired instead of returned; unreadable
    /// ones are reported and moved aside.
    pub fn next_batch(&self, max: usize, skip: &HashSet<Key>) -> Vec<(Key, Record)> {
        self.next_batch_paced(max, skip, 0, 0).0
    }

    /// Like [`Spool::next_batch`], with at most `budget` records older than `backlog_below`
    /// (sequence numbers below it: the backlog an outage left). The batch stops at the first
    /// backlog record beyond the budget, so the drain order is kept; the flag says whether
    /// it stopped there.
    pub fn next_batch_paced(
        &self,
        max: usize,
        skip: &HashSet<Key>,
        backlog_below: u64,
        mut budget: usize,
    ) -> (Vec<(Key, Record)>, bool) {
        let now = self.mono_ms();
        let mut out = Vec::new();
        let mut stale = Vec::new();
        let mut paced = false;
        let durable = self.inner.durable.below.load(Ordering::Acquire);
        let keys: Vec<(Key, i64)> = {
            let st = self.state();
            let mut keys = Vec::new();
            let ready = st
                .index
                .iter()
                .filter(|(k, e)| k.seq < durable && !e.held && !skip.contains(k));
            for (k, e) in ready {
                if keys.len() == max {
                    break;
                }
                if k.seq < backlog_below {
                    if budget == 0 {
                        paced = true;
                        break;
                    }
                    budget -= 1;
                }
                keys.push((*k, e.born));
            }
            keys
        };
        for (key, born) in keys {
            if self.too_old(key.priority, born, now) {
                stale.push(key);
                continue;
            }
            let value = match self.inner.records.get(key.to_bytes()) {
                Ok(Some(v)) => v,
                // Evicted or acknowledged in the meantime.
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(event = "spool.read_failed", error = %e, "spool read failed");
                    break;
                }
            };
            match self.inner.sealer.open(key, &value) {
                Ok(rec) => out.push((key, rec)),
                Err(e) => self.set_aside(key, &value, &e),
            }
        }
        if !stale.is_empty() {
            self.expire_keys(&stale);
        }
        (out, paced)
    }

    /// The sequence number the next record will get: every record stored so far is below.
    pub fn next_seq(&self) -> u64 {
        self.state().next_seq
    }

    /// The monotonic clock, in ms since the spool opened.
    fn mono_ms(&self) -> i64 {
        i64::try_from(self.inner.opened.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Whether a record received at `born` is past its class's `max_age` at `now` (both
    /// on [`Spool::mono_ms`]'s clock).
    fn too_old(&self, priority: Priority, born: i64, now: i64) -> bool {
        let max = self.inner.limits.max_age[priority as usize];
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
            .filter(|(k, e)| !e.held && self.too_old(k.priority, e.born, now))
            .map(|(k, _)| *k)
            .collect();
        self.expire_keys(&stale)
    }

    fn expire_keys(&self, keys: &[Key]) -> usize {
        let mut st = self.state();
        let mut per_device: BTreeMap<(DeviceId, Priority), u64> = BTreeMap::new();
        for key in keys {
            if let Some(entry) = st.take(*key) {
                let _ = self.inner.records.remove(key.to_bytes());
                st.counters(&entry.device).expired += 1;
                *per_device.entry((entry.device, key.priority)).or_default() += 1;
            }
        }
        let mut n = 0;
        for ((device, priority), count) in per_device {
            n += count as usize;
            let expired = st.counters(&device).expired;
            crate::audit::record(
                "spool.expired",
                Some(device.as_str()),
                &format!("priority={priority} count={count}"),
            );
            tracing::warn!(
                event = "spool.expired",
                %device,
                priority = %priority,
                count,
                expired,
                "records expired unsent (older than max_age)"
            );
        }
        n
    }

    fn set_aside(&self, key: Key, value: &[u8], error: &RecordError) {
        let removed = self.state().take(key).is_some();
        if removed {
            let what = format!("{key:?}");
            if quarantine(
                &self.inner.records,
                &self.inner.corrupt,
                &key.to_bytes(),
                value,
                &what,
                &error.to_string(),
            )
            .is_ok()
            {
                self.state().corrupt += 1;
            }
        }
    }

    /// Sets a record aside that cannot be delivered upstream (`reason` says why): it leaves
    /// the drain order at once, and is kept in the `rejected` tree within `max_rejected`.
    pub fn reject(&self, key: Key, reason: &str) {
        let inner = &self.inner;
        let mut st = self.state();
        let value = match inner.records.get(key.to_bytes()) {
            Ok(Some(v)) => v,
            // Acknowledged, expired or evicted meanwhile.
            Ok(None) => return,
            Err(e) => {
                tracing::error!(event = "spool.read_failed", error = %e, "spool read failed");
                return;
            }
        };
        let Some(entry) = st.take(key) else { return };
        let mut slot = st.next_rejection.to_be_bytes().to_vec();
        slot.extend_from_slice(&key.to_bytes());
        st.next_rejection += 1;
        // Kept first, then taken out of the drain order: a crash in between forwards it
        // once more, it never loses it.
        let moved = inner
            .rejected
            .insert(&slot, value.clone())
            .and_then(|_| inner.records.remove(key.to_bytes()));
        if let Err(e) = moved {
            tracing::error!(event = "spool.write_failed", error = %e, "cannot set a rejected record aside");
        }
        st.rejected += 1;
        st.rejected_bytes += (slot.len() + value.len()) as u64;
        st.counters(&entry.device).rejected += 1;
        let rejected = st.counters(&entry.device).rejected;
        crate::audit::record(
            "spool.rejected",
            Some(entry.device.as_str()),
            &format!("priority={} seq={} reason={reason}", key.priority, key.seq),
        );
        tracing::warn!(
            event = "spool.rejected",
            device = %entry.device,
            priority = %key.priority,
            seq = key.seq,
            reason,
            rejected,
            "record set aside: it cannot be delivered upstream"
        );
        while st.rejected_bytes > inner.limits.max_rejected {
            let Ok(Some((k, v))) = inner.rejected.pop_min() else {
                break;
            };
            st.rejected -= 1;
            st.rejected_bytes = st.rejected_bytes.saturating_sub((k.len() + v.len()) as u64);
            let old = Key::from_bytes(&k[8.min(k.len())..]);
            let device = old
                .and_then(|old| inner.sealer.open(old, &v).ok())
                .map(|r| r.device);
            crate::audit::record(
                "spool.rejected_dropped",
                device.as_ref().map(DeviceId::as_str),
                &format!("record={old:?} reason=more than max_rejected bytes set aside"),
            );
            tracing::warn!(
                event = "spool.rejected_dropped",
                device = device.as_ref().map_or("-", DeviceId::as_str),
                record = ?old,
                "oldest rejected record deleted: more than max_rejected bytes set aside"
            );
        }
    }

    /// Removes a record the upstream has acknowledged. Durability of the removal is not
    /// awaited: after a crash the record is sent again (a duplicate, never a loss).
    pub fn remove(&self, key: Key) {
        if self.state().take(key).is_some() {
            if let Err(e) = self.inner.records.remove(key.to_bytes()) {
                tracing::error!(event = "spool.remove_failed", error = %e, "spool remove failed");
            }
        }
    }

    /// A future that resolves when records have become durable (and so can be forwarded)
    /// after it was enabled (call `enable` on it before looking at the spool, so that none
    /// is missed).
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.durable.wake.notified()
    }

    pub fn stats(&self) -> SpoolStats {
        let st = self.state();
        SpoolStats {
            records: st.index.len(),
            bytes: st.total_bytes,
            corrupt: st.corrupt,
            rejected: st.rejected,
            rejected_bytes: st.rejected_bytes,
            devices: st.counters.clone(),
        }
    }

    /// Waits until every record appended so far is durable (and so in `next_batch`).
    #[cfg(test)]
    async fn settle(&self) {
        loop {
            let committed = self.inner.durable.wake.notified();
            tokio::pin!(committed);
            committed.as_mut().enable();
            if self.inner.durable.below.load(Ordering::Acquire) >= self.state().next_seq {
                return;
            }
            committed.await;
        }
    }

    /// Flushes everything now (used at shutdown).
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.inner.db.flush()?;
        Ok(())
    }
}

fn read_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Moves an unreadable record to the `corrupt` tree and reports it.
fn quarantine(
    records: &sled::Tree,
    corrupt: &sled::Tree,
    key: &[u8],
    value: &[u8],
    what: &str,
    error: &str,
) -> Result<(), SpoolError> {
    corrupt.insert(key, value)?;
    records.remove(key)?;
    crate::audit::record(
        "spool.corrupt_record",
        None,
        &format!("record={what} error={error}"),
    );
    tracing::error!(
        event = "spool.corrupt_record",
        record = what,
        error,
        "unreadable spool record set aside; the rest is forwarded"
    );
    Ok(())
}

/// The flush thread: one `flush` for every waiter queued while the previous one ran.
/// Records are inserted in sequence order under the spool's lock before their waiter is
/// queued, so a flush covers every sequence number up to the highest in its batch.
fn group_commit(db: sled::Db, rx: mpsc::Receiver<FlushWaiter>, durable: &Durability) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        if result.is_ok() {
            let highest = batch.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
            durable.below.fetch_max(highest + 1, Ordering::Release);
            durable.wake.notify_waiters();
        }
        for (waiter, _) in batch {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests;
