use super::*;
use bytes::Bytes;

fn limits(max_bytes: u64, device_quota: u64) -> SpoolLimits {
    SpoolLimits {
        max_bytes,
        device_quota,
        max_age: [Duration::from_secs(3600); 3],
        max_rejected: 1 << 20,
        max_records: 1 << 30,
        commit_interval: Duration::ZERO,
    }
}

fn rec(device: &str, n: u32) -> Record {
    Record {
        device: DeviceId::parse(device).unwrap(),
        topic: format!("ward/{device}/t"),
        payload: Bytes::from(format!("{n:08}")),
        qos: 1,
        received_at_ms: now_ms(),
        properties: Default::default(),
    }
}

/// Bytes one `rec()` takes in the spool.
fn unit(dir: &Path) -> u64 {
    let s = Spool::open(
        &dir.join("probe"),
        limits(1 << 20, 1 << 20),
        Events::unaudited(),
    )
    .unwrap();
    s.append(&rec("pump-1", 0), Priority::Routine).unwrap();
    s.stats().bytes
}

/// What the uplink would be handed, once every append so far is durable.
async fn payloads(s: &Spool) -> Vec<(Priority, String)> {
    s.settle().await;
    s.next_batch(usize::MAX, &HashSet::new())
        .into_iter()
        .map(|(k, r)| (k.priority, String::from_utf8(r.payload.to_vec()).unwrap()))
        .collect()
}

mod room;

#[tokio::test]
async fn sequence_numbers_never_repeat_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = |s: &Spool| -> Vec<u64> {
        s.next_batch(usize::MAX, &HashSet::new())
            .into_iter()
            .map(|(k, _)| k.seq)
            .collect()
    };
    let first = {
        let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
        s.append(&rec("pump-1", 1), Priority::Routine)
            .unwrap()
            .wait()
            .await
            .unwrap();
        let k = s.next_batch(1, &HashSet::new())[0].0;
        s.remove(k);
        s.flush().unwrap();
        k.seq
    };
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    s.append(&rec("pump-1", 2), Priority::Routine)
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert!(seqs(&s)[0] > first);
}

#[tokio::test]
async fn records_survive_reopen_and_corrupt_ones_are_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = with_vitals(dir.path(), 5).await;
        // Flip one byte of the third record's ciphertext behind the spool's back.
        let k = Key {
            priority: Priority::Vital,
            seq: s.next_batch(5, &HashSet::new())[2].0.seq,
        };
        damage(&s, k);
    }
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    let left: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(left, ["00000000", "00000001", "00000003", "00000004"]);
    assert_eq!(s.stats().corrupt, 1);
    assert_eq!(corrupt_files(dir.path()), 1);
    drop(s);
    // Found once: a later open neither loses more nor reports it again.
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    assert_eq!(s.stats().records, 4);
    assert_eq!(s.stats().corrupt, 1);
}

/// A spool in `dir` holding `n` durable vitals of pump-1, payloads `0000000{0..n}`.
async fn with_vitals(dir: &Path, n: u32) -> Spool {
    let s = Spool::open(dir, limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    for n in 0..n {
        s.append(&rec("pump-1", n), Priority::Vital)
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    s
}

/// Flips the last byte of `key`'s sealed value on disk, behind the spool's back.
fn damage(s: &Spool, key: Key) {
    use std::os::unix::fs::FileExt;
    let (path, at, len) = s.location(key).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    let last = at + len as u64 - 1;
    f.read_exact_at(&mut b, last).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], last).unwrap();
}

fn corrupt_files(data_dir: &Path) -> usize {
    fs::read_dir(data_dir.join("spool-log/corrupt"))
        .unwrap()
        .count()
}

/// Bytes of every file under `dir` (a file compaction deletes meanwhile counts nothing).
fn disk_use(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let m = e.metadata().ok()?;
            Some(if m.is_dir() {
                disk_use(&e.path())
            } else {
                m.len()
            })
        })
        .sum()
}

fn sized(device: &str, n: u32, payload: usize) -> Record {
    Record {
        payload: Bytes::from(format!("{n:0payload$}")),
        ..rec(device, n)
    }
}

#[tokio::test]
async fn disk_use_stays_within_max_bytes_plus_the_stated_slack_over_many_turnovers() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(16 << 20, 16 << 20);
    let unit = {
        let s = Spool::open(&dir.path().join("probe"), l.clone(), Events::unaudited()).unwrap();
        s.append(&sized("pump-1", 0, 200), Priority::Routine)
            .unwrap();
        s.stats().bytes
    };
    let per_turnover = (l.max_bytes / unit) as u32;
    let bound = l.max_bytes
        + l.max_rejected
        + l.slack()
        + 2 * l.segment_bytes()
        + u64::from(per_turnover) * log::RECORD_OVERHEAD;
    let s = Spool::open(&dir.path().join("s"), l.clone(), Events::unaudited()).unwrap();
    let mut highest = 0;
    let mut n = 0;
    // Four turnovers of a full spool, every append past the first evicting the oldest;
    // one record in three acknowledged (removed) as the uplink would.
    for _ in 0..4 {
        let mut last = None;
        for _ in 0..per_turnover {
            let key_seq = s.next_seq();
            last = Some(
                s.append(&sized("pump-1", n, 200), Priority::Routine)
                    .unwrap(),
            );
            if n % 500 == 0 {
                // While the writer works too: the bound holds at every moment.
                highest = highest.max(disk_use(&dir.path().join("s")));
            }
            if n % 3 == 0 && key_seq > 10 {
                s.remove(Key {
                    priority: Priority::Routine,
                    seq: key_seq - 10,
                });
            }
            n += 1;
        }
        last.unwrap().wait().await.unwrap();
        highest = highest.max(disk_use(&dir.path().join("s")));
    }
    let records = s.stats().records;
    drop(s);
    println!(
        "spool disk use: at most {highest} bytes for max_bytes {} ({:.2}x), bound {bound} ({:.2}x)",
        l.max_bytes,
        highest as f64 / l.max_bytes as f64,
        bound as f64 / l.max_bytes as f64
    );
    assert!(highest <= bound, "{highest} > {bound}");
    // Compaction lost nothing: every record still there reads back.
    let s = Spool::open(&dir.path().join("s"), l, Events::unaudited()).unwrap();
    assert_eq!(s.stats().records, records);
    assert_eq!(s.stats().corrupt, 0);
    assert_eq!(payloads(&s).await.len(), records);
}

#[tokio::test]
async fn a_write_a_stop_cut_short_is_dropped_and_everything_durable_kept() {
    let dir = tempfile::tempdir().unwrap();
    drop(with_vitals(dir.path(), 3).await);
    // Half a frame at the end of the newest segment, as a power cut mid-write leaves it.
    let segs = log::segments(&dir.path().join("spool-log")).unwrap();
    let newest = segs.values().last().unwrap();
    let mut f = OpenOptions::new().append(true).open(newest).unwrap();
    io::Write::write_all(&mut f, b"WG\x00\x00\x01\x00half").unwrap();
    drop(f);
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    let left: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(left, ["00000000", "00000001", "00000002"]);
    assert_eq!(s.stats().corrupt, 0, "a torn write is not damage");
    s.append(&rec("pump-1", 3), Priority::Vital)
        .unwrap()
        .wait()
        .await
        .unwrap();
    drop(s);
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    assert_eq!(payloads(&s).await.len(), 4);
}

#[tokio::test]
async fn a_second_process_cannot_open_an_open_spool() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    // Another open file description, as another process would have.
    let e = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap_err();
    assert!(matches!(e, SpoolError::Busy { .. }), "{e}");
    drop(s);
    Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
}

#[tokio::test]
async fn a_format_1_spool_is_moved_into_the_log_whole() {
    let dir = tempfile::tempdir().unwrap();
    let secret = Sealer::generate_secret().unwrap();
    crate::fsutil::write_private(&dir.path().join("spool.key"), &secret).unwrap();
    let sealer = Sealer::new(&secret);
    {
        // What wardgate with the sled spool left: records, a held will, a rejected record.
        let db = sled::open(dir.path().join("spool")).unwrap();
        let (records, held, rejected, meta) = (
            db.open_tree("records").unwrap(),
            db.open_tree("held").unwrap(),
            db.open_tree("rejected").unwrap(),
            db.open_tree("meta").unwrap(),
        );
        meta.insert(b"format", &1u64.to_be_bytes()).unwrap();
        meta.insert(b"seq_limit", &8192u64.to_be_bytes()).unwrap();
        for n in 0..3u32 {
            let key = Key {
                priority: Priority::Vital,
                seq: 5000 + u64::from(n),
            };
            records
                .insert(key.to_bytes(), sealer.seal(key, &rec("pump-1", n)).unwrap())
                .unwrap();
        }
        let will = Key {
            priority: Priority::Alarm,
            seq: 5003,
        };
        records
            .insert(
                will.to_bytes(),
                sealer.seal(will, &rec("pump-2", 9)).unwrap(),
            )
            .unwrap();
        held.insert(will.to_bytes(), &[]).unwrap();
        let refused = Key {
            priority: Priority::Vital,
            seq: 4000,
        };
        let mut slot = 0u64.to_be_bytes().to_vec();
        slot.extend_from_slice(&refused.to_bytes());
        rejected
            .insert(slot, sealer.seal(refused, &rec("pump-1", 7)).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    assert!(
        !dir.path().join("spool").exists(),
        "the sled store is deleted once moved"
    );
    let left: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        left,
        ["00000000", "00000001", "00000002"],
        "the held will is dropped, as at any open"
    );
    assert_eq!(s.stats().rejected, 1);
    assert!(
        s.next_seq() >= 8192,
        "sequence numbers go on above the old reservation"
    );
}

#[tokio::test]
async fn a_missing_key_with_records_present_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
        s.append(&rec("pump-1", 1), Priority::Routine)
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    fs::remove_file(dir.path().join("spool.key")).unwrap();
    let e = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap_err();
    assert!(matches!(e, SpoolError::KeyMissing(_)), "{e}");
}

#[tokio::test]
async fn group_commit_serves_many_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), limits(1 << 30, 1 << 30), Events::unaudited()).unwrap();
    let waits: Vec<Durable> = (0..500)
        .map(|n| s.append(&rec("pump-1", n), Priority::Routine).unwrap())
        .collect();
    for w in waits {
        w.wait().await.unwrap();
    }
    assert_eq!(s.stats().records, 500);
}

#[test]
fn a_key_file_a_crash_left_empty_is_replaced_while_the_spool_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    // What a crash between create and write left behind with an older wardgate.
    fs::write(dir.path().join("spool.key"), b"").unwrap();
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    s.append(&rec("pump-1", 1), Priority::Routine).unwrap();
    s.flush().unwrap();
    drop(s);
    let key = fs::read(dir.path().join("spool.key")).unwrap();
    assert_eq!(key.len(), SECRET_LEN);
    // With records in the store, a key that is not whole is an error, never replaced.
    fs::write(dir.path().join("spool.key"), &key[..5]).unwrap();
    let e = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap_err();
    assert!(e.to_string().contains("expected 32 bytes, found 5"), "{e}");
    fs::write(dir.path().join("spool.key"), &key).unwrap();
    assert_eq!(
        Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited())
            .unwrap()
            .stats()
            .records,
        1
    );
}

#[tokio::test]
async fn a_paced_batch_takes_backlog_records_only_within_its_budget_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    for n in 0..4 {
        s.append(&rec("pump-1", n), Priority::Routine).unwrap();
    }
    let backlog_below = s.next_seq();
    s.append(&rec("pump-1", 10), Priority::Alarm).unwrap();
    s.append(&rec("pump-1", 11), Priority::Routine).unwrap();
    s.settle().await;
    let payloads = |b: Vec<(Key, Record)>| -> Vec<String> {
        b.into_iter()
            .map(|(_, r)| String::from_utf8(r.payload.to_vec()).unwrap())
            .collect()
    };
    // The live alarm drains first, unpaced; two backlog records fit the budget; the live
    // routine record waits behind the backlog of its class.
    let Batch {
        records: batch,
        paced,
        ..
    } = s.next_batch_paced(10, &HashSet::new(), backlog_below, 2, Reads::Disk);
    assert!(paced);
    assert_eq!(payloads(batch), ["00000010", "00000000", "00000001"]);
    let Batch {
        records: batch,
        paced,
        ..
    } = s.next_batch_paced(10, &HashSet::new(), backlog_below, 10, Reads::Disk);
    assert!(!paced);
    assert_eq!(payloads(batch).len(), 6);
}

#[tokio::test]
async fn a_clock_step_never_expires_what_was_received() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(1 << 20, 1 << 20); // max_age one hour for every class
    let day = 86_400_000;
    {
        let s = Spool::open(dir.path(), l.clone(), Events::unaudited()).unwrap();
        // Received while the board's clock still said 1970 (no RTC, NTP not yet synced);
        // then NTP stepped it forward 56 years.
        let mut before_ntp = rec("pump-1", 1);
        before_ntp.received_at_ms = 0;
        s.append(&before_ntp, Priority::Routine).unwrap();
        // Received while the clock ran ten days ahead; then it was stepped back.
        let mut ahead = rec("pump-1", 2);
        ahead.received_at_ms += 10 * day;
        s.append(&ahead, Priority::Routine).unwrap();
        assert_eq!(s.expire(), 0, "ages are counted on the monotonic clock");
        s.flush().unwrap();
    }
    // Read back after a restart: a receipt time the wall clock cannot vouch for counts as
    // now, never as long ago.
    let s = Spool::open(dir.path(), l, Events::unaudited()).unwrap();
    assert_eq!(s.expire(), 0);
    assert_eq!(payloads(&s).await.len(), 2);
}

#[tokio::test]
async fn max_records_bounds_the_index_like_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = limits(1 << 20, 1 << 20);
    l.max_records = 3;
    let s = Spool::open(dir.path(), l, Events::unaudited()).unwrap();
    for n in 0..3 {
        s.append(&rec("pump-1", n), Priority::Routine).unwrap();
    }
    s.append(&rec("pump-2", 3), Priority::Alarm).unwrap();
    assert_eq!(s.stats().records, 3, "the oldest routine record made room");
    s.append(&rec("pump-2", 4), Priority::Alarm).unwrap();
    s.append(&rec("pump-2", 5), Priority::Alarm).unwrap();
    assert!(
        s.append(&rec("pump-2", 6), Priority::Alarm).is_err(),
        "full of alarms: refused, never evicted"
    );
    let order: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(order, ["00000003", "00000004", "00000005"]);
}

/// Issue 14: in steady state the uplink forwards from memory (recently written records are
/// kept, bounded), so it need not leave its async worker; a record only the disk has (here:
/// read back at open) stops a memory-only batch, and the disk pass returns it in order.
#[tokio::test]
async fn recent_records_are_read_from_memory_older_ones_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
        s.append(&rec("pump-1", 1), Priority::Routine).unwrap();
        s.settle().await;
    }
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    s.append(&rec("pump-1", 2), Priority::Alarm).unwrap();
    s.settle().await;
    let b = s.next_batch_paced(10, &HashSet::new(), 0, 0, Reads::Memory);
    assert!(
        b.on_disk,
        "the record from before the reopen is only on disk"
    );
    assert_eq!(b.records.len(), 1);
    assert_eq!(
        &b.records[0].1.payload[..],
        b"00000002",
        "written, and still in memory"
    );
    let skip: HashSet<Key> = b.records.iter().map(|(k, _)| *k).collect();
    let b = s.next_batch_paced(10, &skip, 0, 0, Reads::Memory);
    assert!(b.on_disk && b.records.is_empty());
    let b = s.next_batch_paced(10, &skip, 0, 0, Reads::Disk);
    assert!(!b.on_disk);
    assert_eq!(&b.records[0].1.payload[..], b"00000001");
    // Removed records leave the memory they took.
    for (k, _) in s.next_batch(10, &HashSet::new()) {
        s.remove(k);
    }
    assert_eq!(s.state().recent_bytes, 0);
    assert!(s.state().recent.is_empty());
}

/// Issue 14: the deletion of a forwarded record waits for the writer's next write rather
/// than waking it alone, but with nothing else to write it still reaches the log within
/// `DELETE_LINGER`: the record does not come back at the next open.
#[tokio::test]
async fn a_forwarded_records_deletion_reaches_the_log_without_other_writes() {
    fn log_bytes(dir: &Path) -> u64 {
        fs::read_dir(dir.join(LOG_DIR))
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    s.append(&rec("pump-1", 1), Priority::Routine).unwrap();
    s.settle().await;
    let before = log_bytes(dir.path());
    let (key, _) = s.next_batch(1, &HashSet::new()).remove(0);
    s.remove(key);
    let deadline = std::time::Instant::now() + DELETE_LINGER * 10;
    // The writer gives no signal for a lingering delete: poll the files, with a deadline.
    while log_bytes(dir.path()) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no delete frame written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    assert_eq!(s.stats().records, 0);
}

/// Issue 14: two flushes are at least `commit_interval` apart, so when records come one at
/// a time a fast disk is not synced once each; what arrives meanwhile shares the flush.
#[tokio::test]
async fn flushes_are_at_least_commit_interval_apart() {
    let dir = tempfile::tempdir().unwrap();
    let interval = Duration::from_millis(200);
    let s = Spool::open(
        dir.path(),
        SpoolLimits {
            commit_interval: interval,
            ..limits(1 << 20, 1 << 20)
        },
        Events::unaudited(),
    )
    .unwrap();
    s.append(&rec("pump-1", 0), Priority::Routine)
        .unwrap()
        .wait()
        .await
        .unwrap();
    let flushed = std::time::Instant::now();
    let waits: Vec<Durable> = (1..=5)
        .map(|n| s.append(&rec("pump-1", n), Priority::Routine).unwrap())
        .collect();
    for d in waits {
        d.wait().await.unwrap();
    }
    // Only a broken cap can make this shorter; a slow machine only makes it longer.
    assert!(
        flushed.elapsed() >= interval * 3 / 4,
        "flushed again after {:?}",
        flushed.elapsed()
    );
    assert_eq!(payloads(&s).await.len(), 6);
}
