//! The writer thread: every record, deletion and rejection reaches the log here, in
//! sequence order, with one `fdatasync` per batch that anyone waits for (group commit), and
//! the log is compacted when it outgrows its bound.

use super::*;

/// Who waits for a group commit.
#[derive(Debug)]
pub(super) enum Reply {
    /// A [`Durable`].
    Durable(oneshot::Sender<Result<(), String>>),
    /// [`Spool::flush`], from a plain thread.
    Flush(mpsc::Sender<Result<(), String>>),
}

impl Reply {
    pub(super) fn send(self, result: Result<(), String>) {
        match self {
            Reply::Durable(tx) => {
                let _ = tx.send(result);
            }
            Reply::Flush(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// Work for the writer thread, in the order it reaches the log.
#[derive(Debug)]
pub(super) enum Op {
    Record {
        key: Key,
        held: bool,
        value: Arc<[u8]>,
        durable: Option<Reply>,
    },
    Delete(Key),
    SeqLimit(u64),
    Reject {
        number: u64,
        key: Key,
        value: Arc<[u8]>,
    },
    Unreject(u64),
    Sync(Reply),
}

impl Op {
    /// Whether someone waits for this op to be durable.
    pub(super) fn wants_sync(&self) -> bool {
        matches!(
            self,
            Op::Record {
                durable: Some(_),
                ..
            } | Op::Sync(_)
        )
    }
}

pub(super) fn read_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// The writer thread: writes the ops queued while the previous batch was written, up to
/// `batch` bytes, with one `fdatasync` when anyone waits for it (group commit), then
/// compacts if the log has grown more than `slack` beyond its live records. A batch is
/// capped so that the log never outgrows its bound by more than a batch between two
/// compactions. Records are queued in sequence order under the spool's lock, so a sync
/// covers every sequence number below the highest written.
pub(super) fn write_loop(
    mut log: Log,
    rx: &mpsc::Receiver<Op>,
    shared: &Shared,
    slack: u64,
    batch: u64,
    interval: Duration,
) {
    let mut written_below = shared.durable.below.load(Ordering::Acquire);
    compact_logged(&mut log, shared, slack);
    let mut last_sync = std::time::Instant::now();
    loop {
        let first = match rx.recv_timeout(DELETE_LINGER) {
            Ok(op) => op,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                shared.state().send_deferred();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // The flush rate is capped, not the message rate: what arrives before the next
        // flush may run shares it. (Deletions and other unsynced ops need not wait.)
        if first.wants_sync() {
            let due = last_sync + interval;
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let mut placed = Vec::new();
        let mut failed = Vec::new();
        let mut rejected = Vec::new();
        let mut replies = Vec::new();
        let mut batch_below = written_below;
        let mut result = Ok(());
        let start = log.disk_bytes();
        for op in std::iter::once(first).chain(rx.try_iter()) {
            let frame = match &op {
                Op::Record {
                    key, held, value, ..
                } => Frame::Record {
                    key: *key,
                    held: *held,
                    value,
                },
                Op::Delete(key) => Frame::Delete(*key),
                Op::SeqLimit(limit) => Frame::SeqLimit(*limit),
                Op::Reject { number, key, value } => Frame::Rejected {
                    number: *number,
                    key: *key,
                    value,
                },
                Op::Unreject(number) => Frame::Unreject(*number),
                Op::Sync(_) => Frame::SeqLimit(0),
            };
            let pushed = match op {
                Op::Sync(_) => None,
                _ if result.is_err() => None,
                _ => Some(log.push(&frame)),
            };
            match (pushed, op) {
                (Some(Err(e)), _) => result = Err(e),
                (Some(Ok(loc)), Op::Record { key, durable, .. }) => {
                    placed.push((key, loc));
                    batch_below = batch_below.max(key.seq + 1);
                    replies.extend(durable);
                }
                (Some(Ok(loc)), Op::Reject { number, .. }) => rejected.push((number, loc)),
                (_, Op::Sync(reply)) => replies.push(reply),
                (None, Op::Record { key, durable, .. }) => {
                    failed.push(key);
                    replies.extend(durable);
                }
                _ => {}
            }
            if log.disk_bytes() - start >= batch {
                // The rest waits in the queue for the next batch.
                break;
            }
        }
        let sync = !replies.is_empty();
        let result = match result {
            Ok(()) => log.commit(sync),
            Err(e) => {
                log.discard();
                Err(e)
            }
        };
        {
            let mut st = shared.state();
            st.files.extend(log.take_new());
            match &result {
                Ok(()) => {
                    for (key, loc) in placed {
                        st.place(key, loc, None);
                    }
                    for (number, loc) in rejected {
                        st.place_rejected(number, loc, None);
                    }
                }
                Err(e) => {
                    // Not on disk: refused, as if there had been no room.
                    failed.extend(placed.iter().map(|(key, _)| *key));
                    for key in &failed {
                        if let Some(entry) = st.take(*key) {
                            st.counters(&entry.device).refused += 1;
                        }
                    }
                    for (number, _) in &rejected {
                        if let Some(r) = st.rejected.remove(number) {
                            st.rejected_bytes = st.rejected_bytes.saturating_sub(r.size);
                        }
                    }
                    tracing::error!(
                        event = "spool.write_failed",
                        error = %e,
                        records = failed.len(),
                        "spool write failed: the batch's records are refused"
                    );
                }
            }
        }
        if sync {
            last_sync = std::time::Instant::now();
        }
        if result.is_ok() {
            written_below = batch_below;
            if !replies.is_empty() {
                shared
                    .durable
                    .below
                    .fetch_max(written_below, Ordering::Release);
                shared.durable.wake.notify_waiters();
            }
        }
        if result.is_ok() && !replies.is_empty() {
            shared.progress.spool_committed();
        }
        let outcome = result.map_err(|e| e.to_string());
        for reply in replies {
            reply.send(outcome.clone());
        }
        compact_logged(&mut log, shared, slack);
    }
    if let Err(e) = log.commit(true) {
        tracing::error!(event = "spool.write_failed", error = %e, "final spool write failed");
    }
}

pub(super) fn compact_logged(log: &mut Log, shared: &Shared, slack: u64) {
    if let Err(e) = compact(log, shared, slack) {
        tracing::error!(event = "spool.compaction_failed", error = %e, "spool compaction failed; retried after the next write");
    }
}

/// While the log holds more than `slack` bytes beyond its live frames, writes the oldest
/// segment's live frames again at the head, makes them durable, and deletes the segment.
pub(super) fn compact(log: &mut Log, shared: &Shared, slack: u64) -> io::Result<()> {
    for _ in 0..=log.segment_count() {
        if log.disk_bytes() <= shared.state().live_bytes + slack {
            return Ok(());
        }
        let Some(oldest) = log.oldest_sealed() else {
            log.roll()?;
            continue;
        };
        let bytes = log.read_segment(oldest)?;
        let mut keep = Vec::new();
        {
            let st = shared.state();
            log::scan(&bytes, |offset, frame, len, value_at| {
                let loc = Loc {
                    segment: oldest,
                    offset,
                    len,
                    value_at,
                };
                let live = match &frame {
                    Frame::Record { key, .. } => {
                        st.index.get(key).is_some_and(|e| e.place.is_at(loc))
                    }
                    Frame::Rejected { number, .. } => {
                        st.rejected.get(number).is_some_and(|r| r.place.is_at(loc))
                    }
                    _ => false,
                };
                if live {
                    keep.push((frame, loc));
                }
            });
        }
        let mut moves = Vec::with_capacity(keep.len());
        for (frame, from) in keep {
            moves.push((log.push(&frame)?, from, frame));
        }
        log.commit(true)?;
        {
            let mut st = shared.state();
            st.files.extend(log.take_new());
            for (loc, from, frame) in moves {
                match frame {
                    Frame::Record { key, .. } => st.place(key, loc, Some(from)),
                    Frame::Rejected { number, .. } => st.place_rejected(number, loc, Some(from)),
                    _ => {}
                }
            }
        }
        log.drop_segment(oldest)?;
        let mut st = shared.state();
        st.files.remove(&oldest);
        if let Some(left) = st.live.remove(&oldest) {
            debug_assert_eq!(left, 0, "live frames left in a compacted segment");
        }
    }
    Ok(())
}
