//! Opening the spool: its key, moving a format-1 (sled) spool into the log, replaying the
//! log into the index, and setting damaged bytes aside.

use super::*;

/// A wall-clock time no record can have been received before: the year this version was
/// released (2026-01-01). A board without a real-time clock counts from 1970 (or its
/// image's build date) until NTP sets it.
pub(super) const PLAUSIBLE_SINCE_MS: u64 = 1_767_225_600_000;

/// The age of a record read back at open, from its wall-clock receipt time: its wall age
/// if both times are plausible, else 0 — received before the clock was set, or the clock
/// now behind it — so that no clock step can expire a record in bulk. From then on the
/// record ages on the monotonic clock.
pub(super) fn age_at_open(received_at_ms: u64, wall_now: u64) -> i64 {
    if received_at_ms < PLAUSIBLE_SINCE_MS || wall_now < received_at_ms {
        return 0;
    }
    i64::try_from(wall_now - received_at_ms).unwrap_or(i64::MAX)
}

pub(super) fn load_or_make_secret(
    path: &Path,
    store_has_data: bool,
) -> Result<[u8; SECRET_LEN], SpoolError> {
    let key_err = |source| SpoolError::KeyFile {
        path: path.to_owned(),
        source,
    };
    match fs::read(path) {
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
                return Err(key_err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("expected {SECRET_LEN} bytes, found {}", bytes.len()),
                )))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
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

/// Makes a private directory (0700) if it is not there.
pub(super) fn private_dir(path: &Path) -> Result<(), SpoolError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_error(path))
}

/// Keeps damaged bytes for an engineer as `corrupt/{name}`; false if they were kept
/// before (found again by a later open).
pub(super) fn keep_corrupt(dir: &Path, name: &str, bytes: &[u8]) -> bool {
    use std::io::Write;
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(name));
    match made {
        Ok(mut f) => {
            if let Err(e) = f.write_all(bytes) {
                tracing::error!(event = "spool.write_failed", error = %e, "cannot keep damaged spool bytes");
            }
            true
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            tracing::error!(event = "spool.write_failed", error = %e, "cannot keep damaged spool bytes");
            true
        }
    }
}

/// What replaying the log found.
#[derive(Default)]
pub(super) struct Replayed {
    pub(super) records: BTreeMap<Key, (Loc, bool)>,
    pub(super) rejected: BTreeMap<u64, (Key, Loc)>,
    pub(super) seq_limit: u64,
    pub(super) max_seq: Option<u64>,
    pub(super) files: BTreeMap<u64, Arc<File>>,
    /// Bytes of each segment (after cutting off a torn write).
    pub(super) lens: BTreeMap<u64, u64>,
    pub(super) corrupt: u64,
}

/// Reads every segment in order.
pub(super) fn replay(
    dir: &Path,
    corrupt_dir: &Path,
    events: &Events,
) -> Result<Replayed, SpoolError> {
    let mut r = Replayed::default();
    let found = log::segments(dir).map_err(io_error(dir))?;
    let newest = found.keys().last().copied();
    for (&n, path) in &found {
        let err = io_error(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error(path))?;
        let bytes = fs::read(path).map_err(io_error(path))?;
        let damage = log::scan(&bytes, |offset, frame, len, value_at| {
            let loc = Loc {
                segment: n,
                offset,
                len,
                value_at,
            };
            match frame {
                Frame::Record { key, held, .. } => {
                    r.max_seq = r.max_seq.max(Some(key.seq));
                    r.records.insert(key, (loc, held));
                }
                Frame::Delete(key) => {
                    r.records.remove(&key);
                }
                Frame::SeqLimit(limit) => r.seq_limit = r.seq_limit.max(limit),
                Frame::Rejected { number, key, .. } => {
                    r.max_seq = r.max_seq.max(Some(key.seq));
                    r.rejected.insert(number, (key, loc));
                }
                Frame::Unreject(number) => {
                    r.rejected.remove(&number);
                }
            }
        });
        let mut len = bytes.len() as u64;
        let torn = damage.tail.clone().filter(|_| Some(n) == newest);
        for range in damage
            .skipped
            .iter()
            .chain(&damage.tail)
            .filter(|t| Some(*t) != torn.as_ref())
        {
            if keep_corrupt(
                corrupt_dir,
                &format!("{n:016x}-{:x}.bin", range.start),
                &bytes[range.clone()],
            ) {
                r.corrupt += 1;
                events.spool_corrupt_record(
                    &format!("segment {n:016x} bytes {}..{}", range.start, range.end),
                    "frames that do not check (length or CRC)",
                );
            }
        }
        if let Some(tail) = damage.tail {
            if torn.is_some() {
                tracing::info!(
                    event = "spool.torn_write_dropped",
                    segment = n,
                    bytes = tail.len(),
                    "the end of a write a stop cut short (never acknowledged) cut off"
                );
            }
            file.set_len(tail.start as u64).map_err(io_error(path))?;
            file.sync_all().map_err(err)?;
            len = tail.start as u64;
        }
        r.files.insert(n, Arc::new(file));
        r.lens.insert(n, len);
    }
    Ok(r)
}

/// Moves a format-1 spool (sled's trees in `data_dir/spool/`) into a new log at `dir`,
/// whole or not at all: built beside it, renamed into place, and only then is the old
/// store deleted.
pub(super) fn migrate_sled(data_dir: &Path, dir: &Path) -> Result<(), SpoolError> {
    let old = data_dir.join(SLED_DIR);
    if !old.exists() {
        return Ok(());
    }
    if dir.exists() {
        // Moved before a stop cut the deletion of the old store short.
        fs::remove_dir_all(&old).map_err(io_error(&old))?;
        return log::sync_dir(data_dir).map_err(io_error(data_dir));
    }
    let tmp = data_dir.join("spool-log.moving");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_error(&tmp))?;
    }
    private_dir(&tmp.join("corrupt"))?;
    let sled_err = |source| SpoolError::Migrate {
        path: old.clone(),
        source,
    };
    let db = sled::Config::new().path(&old).open().map_err(sled_err)?;
    let tree = |name: &str| db.open_tree(name).map_err(sled_err);
    let (records, held, rejected, meta, corrupt) = (
        tree("records")?,
        tree("held")?,
        tree("rejected")?,
        tree("meta")?,
        tree("corrupt")?,
    );
    let seq_limit = meta
        .get(b"seq_limit")
        .map_err(sled_err)?
        .map_or(0, |v| read_u64(&v));
    let mut log =
        Log::start(&tmp, 8 << 20, BTreeMap::new(), 0, seq_limit).map_err(io_error(&tmp))?;
    let mut moved = 0u64;
    let mut push = |log: &mut Log, frame: Frame| -> Result<(), SpoolError> {
        log.push(&frame).map_err(io_error(&tmp))?;
        moved += 1;
        if moved.is_multiple_of(1024) {
            log.commit(false).map_err(io_error(&tmp))?;
        }
        Ok(())
    };
    for item in records.iter() {
        let (k, v) = item.map_err(sled_err)?;
        match Key::from_bytes(&k) {
            Some(key) => {
                let held = held.contains_key(&k).map_err(sled_err)?;
                push(
                    &mut log,
                    Frame::Record {
                        key,
                        held,
                        value: &v,
                    },
                )?;
            }
            None => {
                keep_corrupt(
                    &tmp.join("corrupt"),
                    &format!("sled-key-{}.bin", hex::encode(&k)),
                    &v,
                );
            }
        }
    }
    for item in rejected.iter() {
        let (k, v) = item.map_err(sled_err)?;
        if let (Some(number), Some(key)) = (
            k.get(..8).map(read_u64),
            k.get(8..).and_then(Key::from_bytes),
        ) {
            push(
                &mut log,
                Frame::Rejected {
                    number,
                    key,
                    value: &v,
                },
            )?;
        }
    }
    for (i, item) in corrupt.iter().enumerate() {
        let (_, v) = item.map_err(sled_err)?;
        keep_corrupt(&tmp.join("corrupt"), &format!("sled-{i}.bin"), &v);
    }
    log.commit(true).map_err(io_error(&tmp))?;
    drop(log);
    drop(db);
    crate::fsutil::write_private(&tmp.join("format"), log::FORMAT.as_bytes())
        .map_err(io_error(&tmp))?;
    fs::rename(&tmp, dir).map_err(io_error(dir))?;
    log::sync_dir(data_dir).map_err(io_error(data_dir))?;
    fs::remove_dir_all(&old).map_err(io_error(&old))?;
    log::sync_dir(data_dir).map_err(io_error(data_dir))?;
    tracing::info!(
        event = "spool.format_moved",
        from = 1,
        to = FORMAT_VERSION,
        frames = moved,
        "the spool's records moved from sled into the segment log"
    );
    Ok(())
}

impl Spool {
    /// Opens (or creates) the spool in `data_dir`.
    pub fn open(data_dir: &Path, limits: SpoolLimits, events: Events) -> Result<Spool, SpoolError> {
        let path = data_dir.join(LOG_DIR);
        migrate_sled(data_dir, &path)?;
        private_dir(&path)?;
        let lock_path = path.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Busy { path }),
            Err(fs::TryLockError::Error(e)) => return Err(io_error(&lock_path)(e)),
        }
        let format_path = path.join("format");
        match fs::read_to_string(&format_path) {
            Ok(found) if found == log::FORMAT => {}
            Ok(found) => {
                return Err(SpoolError::Format {
                    path: format_path,
                    found,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                crate::fsutil::write_private(&format_path, log::FORMAT.as_bytes())
                    .map_err(io_error(&format_path))?;
            }
            Err(e) => return Err(io_error(&format_path)(e)),
        }
        let corrupt_dir = path.join("corrupt");
        private_dir(&corrupt_dir)?;
        let kept_corrupt = fs::read_dir(&corrupt_dir)
            .map_err(io_error(&corrupt_dir))?
            .count() as u64;

        let replayed = replay(&path, &corrupt_dir, &events)?;
        let has_data = !replayed.records.is_empty() || !replayed.rejected.is_empty();
        let secret = load_or_make_secret(&data_dir.join("spool.key"), has_data)?;
        let sealer = Sealer::new(&secret);

        let mut state = State {
            corrupt: kept_corrupt + replayed.corrupt,
            files: replayed.files.clone(),
            ..State::default()
        };
        let mut deletes = Vec::new();
        let mut wills_dropped = 0;
        let wall_now = now_ms();
        for (&key, &(loc, held)) in &replayed.records {
            let value = state
                .source(&Place::At(loc))
                .read()
                .map_err(io_error(&path))?;
            match sealer.open(key, &value) {
                Ok(_) if held => {
                    deletes.push(key);
                    wills_dropped += 1;
                }
                Ok(rec) => state.insert(
                    key,
                    Entry {
                        device: rec.device,
                        size: (value.len() + KEY_LEN) as u64,
                        born: -age_at_open(rec.received_at_ms, wall_now),
                        expiry_secs: rec.properties.expiry_secs,
                        held: false,
                        place: Place::At(loc),
                    },
                ),
                Err(e) => {
                    let name = format!("{:016x}-{:x}.bin", loc.segment, loc.offset);
                    keep_corrupt(&corrupt_dir, &name, &value);
                    events.spool_corrupt_record(&format!("{key:?}"), &e.to_string());
                    state.corrupt += 1;
                    deletes.push(key);
                }
            }
        }
        if wills_dropped > 0 {
            tracing::info!(
                event = "spool.wills_dropped",
                count = wills_dropped,
                "last wills of sessions the previous run ended deleted, not forwarded"
            );
        }
        for (&number, &(key, loc)) in &replayed.rejected {
            let value = state
                .source(&Place::At(loc))
                .read()
                .map_err(io_error(&path))?;
            let size = (value.len() + 8 + KEY_LEN) as u64;
            state.rejected_bytes += size;
            state.add_live(loc);
            state.rejected.insert(
                number,
                SetAside {
                    key,
                    device: sealer.open(key, &value).ok().map(|r| r.device),
                    size,
                    place: Place::At(loc),
                },
            );
        }
        state.next_rejection = replayed.rejected.keys().last().map_or(0, |n| n + 1);
        state.next_seq = replayed
            .seq_limit
            .max(replayed.max_seq.map_or(0, |s| s + 1));
        state.seq_limit = state.next_seq + SEQ_BLOCK;

        let head = replayed.lens.keys().last().map_or(0, |n| n + 1);
        let mut log = Log::start(
            &path,
            limits.segment_bytes(),
            replayed.lens,
            head,
            state.seq_limit,
        )
        .map_err(io_error(&path))?;
        for key in deletes {
            log.push(&Frame::Delete(key)).map_err(io_error(&path))?;
        }
        log.commit(true).map_err(io_error(&path))?;
        state.files.extend(log.take_new());

        let (ops, rx) = mpsc::channel();
        state.ops = Some(ops);
        let records = state.index.len();
        let bytes = state.total_bytes;
        let corrupt = state.corrupt;
        let shared = Arc::new(Shared {
            // Everything read back at open is on disk.
            durable: Durability {
                below: AtomicU64::new(state.next_seq),
                wake: Notify::new(),
            },
            state: Mutex::new(state),
            corrupt_dir,
            progress: events.progress().clone(),
        });
        let writer = {
            let shared = shared.clone();
            let (slack, batch) = (limits.slack(), limits.segment_bytes());
            let interval = limits.commit_interval;
            std::thread::Builder::new()
                .name("wardgate-spool-write".into())
                .spawn(move || write_loop(log, &rx, &shared, slack, batch, interval))
                .map_err(io_error(&path))?
        };
        tracing::info!(
            event = "spool.opened",
            path = %path.display(),
            records,
            bytes,
            corrupt,
            "spool opened"
        );
        Ok(Spool {
            inner: Arc::new(Inner {
                path,
                shared,
                sealer,
                limits,
                events,
                writer: Mutex::new(Some(writer)),
                opened: std::time::Instant::now(),
                _lock: lock,
            }),
        })
    }
}
