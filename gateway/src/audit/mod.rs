//! The audit log: an append-only, hash-chained record of every security decision.
//!
//! Each record holds its index, the time, the stable event name (the same `event` field the
//! log carries, see [`crate::events`]), the device if any, a detail text, the previous
//! record's hash and its own hash:
//!
//! ```text
//! hash = SHA-256( version (1) ‖ index (u64 BE) ‖ time_ms (u64 BE)
//!                 ‖ len ‖ event ‖ len ‖ device ‖ len ‖ detail   (len = u32 BE)
//!                 ‖ previous hash (32 bytes; zeros for the first record) )
//! ```
//!
//! Records are stored in sled (`data_dir/audit`, tree `chain`, key = index u64 BE) as JSON,
//! format version [`AUDIT_VERSION`]. [`verify`] recomputes the chain offline and names the
//! first record that does not fit: a changed byte anywhere in a record, a removed or
//! reordered record, or a rewritten tail that no longer links. Details never carry payloads
//! or key material.
//!
//! Retention: the log keeps at most `[audit] max_records` records. Past that, the oldest
//! tenth is deleted, forwarded upstream or not, and the deletion is itself a record
//! (`audit.pruned`, with the first index kept, the hash it links to — its anchor — and how
//! many of the deleted records had not been forwarded). [`verify`] starts at the first
//! record kept and accepts its link only if an `audit.pruned` record later in the chain
//! names that index and anchor, so records removed any other way are still found.
//!
//! Tested by the unit tests below (chain, tampering, deletion, pruning) and by the system
//! tests that count the audit records of every refusal path and edit a record offline.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

pub const AUDIT_VERSION: u8 = 1;
const HASH_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("audit write failed: {0}")]
    Write(#[from] sled::Error),
    #[error("audit record {index} is not valid: {reason}")]
    Broken { index: u64, reason: String },
}

impl Entry {
    /// The hash this record must carry if it follows a record hashed `prev`.
    fn expected_hash(&self, prev: &[u8]) -> [u8; HASH_LEN] {
        chain_hash(
            self.index,
            self.time_ms,
            &self.event,
            self.device.as_deref(),
            &self.detail,
            prev,
        )
    }
}

/// One audit record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub v: u8,
    pub index: u64,
    pub time_ms: u64,
    pub event: String,
    pub device: Option<String>,
    pub detail: String,
    /// Hex of the previous record's hash.
    pub prev: String,
    /// Hex of this record's hash.
    pub hash: String,
}

fn chain_hash(
    index: u64,
    time_ms: u64,
    event: &str,
    device: Option<&str>,
    detail: &str,
    prev: &[u8],
) -> [u8; HASH_LEN] {
    let mut buf = Vec::with_capacity(64 + event.len() + detail.len());
    buf.push(AUDIT_VERSION);
    buf.extend_from_slice(&index.to_be_bytes());
    buf.extend_from_slice(&time_ms.to_be_bytes());
    for field in [event, device.unwrap_or(""), detail] {
        buf.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
        buf.extend_from_slice(field.as_bytes());
    }
    buf.extend_from_slice(prev);
    let d = digest(&SHA256, &buf);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Debug)]
struct Head {
    /// The first record kept.
    first: u64,
    next: u64,
    prev: [u8; HASH_LEN],
}

/// The running gateway's audit log.
#[derive(Debug)]
pub struct AuditLog {
    db: sled::Db,
    chain: sled::Tree,
    /// Forwarding state: key [`FORWARDED`] = index of the next record to forward upstream.
    meta: sled::Tree,
    head: Mutex<Head>,
    appended: tokio::sync::Notify,
    max_records: u64,
}

const FORWARDED: &[u8] = b"forwarded";

/// A stored hash or link: 32 bytes of hex.
fn unhex(s: &str) -> Option<[u8; HASH_LEN]> {
    let mut out = [0u8; HASH_LEN];
    hex::decode_to_slice(s, &mut out).ok().map(|()| out)
}
/// The event of a pruning record.
const PRUNED: &str = "audit.pruned";

/// What an `audit.pruned` record vouches for: records before `first_kept` were deleted, and
/// the first kept links to `anchor`. Its detail is the one place this is written and read
/// (the detail is part of the hashed record, so the text form is the format).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pruned {
    first_kept: u64,
    anchor: String,
    pruned: u64,
    unforwarded: u64,
}

impl Pruned {
    fn detail(&self) -> String {
        format!(
            "first_kept={} anchor={} pruned={} unforwarded={} reason=more than max_records",
            self.first_kept, self.anchor, self.pruned, self.unforwarded
        )
    }

    /// The record's claim, from its detail; `None` if it is not one this wardgate wrote.
    fn parse(detail: &str) -> Option<Pruned> {
        let field = |key: &str| {
            detail
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        Some(Pruned {
            first_kept: field("first_kept")?.parse().ok()?,
            anchor: field("anchor")?.to_owned(),
            pruned: field("pruned")?.parse().ok()?,
            unforwarded: field("unforwarded")?.parse().ok()?,
        })
    }
}

fn open_store(data_dir: &Path) -> Result<(sled::Db, sled::Tree), AuditError> {
    let path = data_dir.join("audit");
    let store = |source| AuditError::Store {
        path: path.clone(),
        source,
    };
    let db = sled::Config::new()
        .path(&path)
        .cache_capacity(1 << 20)
        .flush_every_ms(Some(200))
        .open()
        .map_err(store)?;
    let chain = db.open_tree("chain").map_err(store)?;
    Ok((db, chain))
}

fn decode(key: &[u8], value: &[u8]) -> Result<Entry, AuditError> {
    let index = key
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| AuditError::Broken {
            index: u64::MAX,
            reason: "key is not a record index".into(),
        })?;
    serde_json::from_slice(value).map_err(|e| AuditError::Broken {
        index,
        reason: format!("not a readable record: {e}"),
    })
}

impl AuditLog {
    /// Opens the log and continues its chain after the last record; it keeps at most
    /// `max_records` records (at least 10).
    pub fn open(data_dir: &Path, max_records: u64) -> Result<AuditLog, AuditError> {
        let (db, chain) = open_store(data_dir)?;
        let first = match chain.first()? {
            Some((k, v)) => decode(&k, &v)?.index,
            None => 0,
        };
        let head = match chain.last()? {
            None => Head {
                first,
                next: 0,
                prev: [0; HASH_LEN],
            },
            Some((k, v)) => {
                let e = decode(&k, &v)?;
                let prev = unhex(&e.hash).ok_or(AuditError::Broken {
                    index: e.index,
                    reason: "hash is not 32 bytes of hex".into(),
                })?;
                Head {
                    first,
                    next: e.index + 1,
                    prev,
                }
            }
        };
        let meta = db.open_tree("meta")?;
        Ok(AuditLog {
            db,
            chain,
            meta,
            head: Mutex::new(head),
            appended: tokio::sync::Notify::new(),
            max_records: max_records.max(10),
        })
    }

    /// Appends a record; returns its index.
    pub fn record(
        &self,
        event: &str,
        device: Option<&str>,
        detail: &str,
    ) -> Result<u64, AuditError> {
        let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        let index = self.append(&mut head, event, device, detail)?;
        if head.next - head.first > self.max_records {
            self.prune(&mut head)?;
        }
        drop(head);
        self.appended.notify_waiters();
        Ok(index)
    }

    /// Deletes the oldest tenth of the records kept, after recording that it does so.
    fn prune(&self, head: &mut Head) -> Result<(), AuditError> {
        let first_kept = head.first + self.max_records / 10;
        let anchor = match self.chain.get((first_kept - 1).to_be_bytes())? {
            Some(v) => decode(&(first_kept - 1).to_be_bytes(), &v)?.hash,
            None => return Ok(()),
        };
        let forwarded = self
            .meta
            .get(FORWARDED)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let unforwarded = first_kept.saturating_sub(forwarded.max(head.first));
        let claim = Pruned {
            first_kept,
            anchor,
            pruned: first_kept - head.first,
            unforwarded,
        };
        self.append(head, PRUNED, None, &claim.detail())?;
        for index in head.first..first_kept {
            self.chain.remove(index.to_be_bytes())?;
        }
        head.first = first_kept;
        tracing::warn!(
            event = PRUNED,
            first_kept,
            unforwarded,
            "oldest audit records deleted: more than max_records"
        );
        Ok(())
    }

    /// Appends one record after the head.
    fn append(
        &self,
        head: &mut Head,
        event: &str,
        device: Option<&str>,
        detail: &str,
    ) -> Result<u64, AuditError> {
        let index = head.next;
        let time_ms = crate::clock::now_ms();
        let hash = chain_hash(index, time_ms, event, device, detail, &head.prev);
        let entry = Entry {
            v: AUDIT_VERSION,
            index,
            time_ms,
            event: event.to_owned(),
            device: device.map(str::to_owned),
            detail: detail.to_owned(),
            prev: hex::encode(head.prev),
            hash: hex::encode(hash),
        };
        let value = serde_json::to_vec(&entry).map_err(|e| AuditError::Broken {
            index,
            reason: e.to_string(),
        })?;
        self.chain.insert(index.to_be_bytes(), value)?;
        head.next += 1;
        head.prev = hash;
        Ok(index)
    }

    /// Checks the whole chain as the running gateway holds it.
    pub fn verify(&self) -> Result<u64, AuditError> {
        // Up to the head as it is now; records appended meanwhile are left for next time,
        // and appends do not wait for the check.
        let end = self
            .head
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next;
        verify_chain(&self.chain, Some(end))
    }

    /// The last `n` records, oldest first.
    pub fn tail(&self, n: usize) -> Result<Vec<Entry>, AuditError> {
        tail_chain(&self.chain, n)
    }

    /// Resolves after the next record is appended (enable it before looking).
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.appended.notified()
    }

    /// Up to `max` records not yet forwarded upstream, oldest first, each durable: the log
    /// is flushed first (blocking disk work), so no index the upstream sees can be lost
    /// locally and given to another record after a crash.
    pub fn durable_unforwarded(&self, max: usize) -> Result<Vec<Entry>, AuditError> {
        self.db.flush()?;
        let from = self
            .meta
            .get(FORWARDED)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let mut out = Vec::new();
        for item in self.chain.range(from.to_be_bytes()..).take(max) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Marks every record before `next` as forwarded.
    pub fn set_forwarded(&self, next: u64) -> Result<(), AuditError> {
        self.meta.insert(FORWARDED, &next.to_be_bytes())?;
        Ok(())
    }

    pub fn flush(&self) -> Result<(), AuditError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Checks the whole chain in `data_dir` offline. Returns the number of records.
pub fn verify(data_dir: &Path) -> Result<u64, AuditError> {
    let (_db, chain) = open_store(data_dir)?;
    verify_chain(&chain, None)
}

/// The last `n` records in `data_dir`, oldest first (offline).
pub fn tail(data_dir: &Path, n: usize) -> Result<Vec<Entry>, AuditError> {
    let (_db, chain) = open_store(data_dir)?;
    tail_chain(&chain, n)
}

/// Checks the chain from its first record kept, up to (not including) index `end` if
/// given. Returns the number of records checked.
fn verify_chain(chain: &sled::Tree, end: Option<u64>) -> Result<u64, AuditError> {
    let mut prev = [0u8; HASH_LEN];
    let mut expected = 0u64;
    // Records before the first kept were pruned: its link is the anchor a pruning record
    // must vouch for.
    let mut unvouched: Option<(u64, String)> = None;
    if let Some((k, v)) = chain.first()? {
        let first = decode(&k, &v)?;
        if first.index > 0 {
            expected = first.index;
            prev = unhex(&first.prev).ok_or(AuditError::Broken {
                index: first.index,
                reason: "link is not 32 bytes of hex".into(),
            })?;
            unvouched = Some((first.index, first.prev));
        }
    }
    let start = expected;
    let records = match end {
        Some(end) => chain.range(..end.to_be_bytes()),
        None => chain.range::<&[u8], _>(..),
    };
    for item in records {
        let (k, v) = item?;
        let e = decode(&k, &v)?;
        let broken = |reason: &str| AuditError::Broken {
            index: expected,
            reason: reason.to_owned(),
        };
        if e.index != expected || k.as_ref() != expected.to_be_bytes() {
            return Err(broken("missing or out of order (the chain skips here)"));
        }
        if e.v != AUDIT_VERSION {
            return Err(broken("unknown record version"));
        }
        if e.prev != hex::encode(prev) {
            return Err(broken("does not link to the previous record"));
        }
        let hash = e.expected_hash(&prev);
        if e.hash != hex::encode(hash) {
            return Err(broken("contents do not match its hash (edited)"));
        }
        if e.event == PRUNED {
            if let (Some((index, anchor)), Some(claim)) = (&unvouched, Pruned::parse(&e.detail)) {
                if claim.first_kept == *index && claim.anchor == *anchor {
                    unvouched = None;
                }
            }
        }
        prev = hash;
        expected += 1;
    }
    if let Some((index, _)) = unvouched {
        return Err(AuditError::Broken {
            index,
            reason: "records before it are gone without an audit.pruned record".into(),
        });
    }
    Ok(expected - start)
}

fn tail_chain(chain: &sled::Tree, n: usize) -> Result<Vec<Entry>, AuditError> {
    let mut out = Vec::new();
    for item in chain.iter().rev().take(n) {
        let (k, v) = item?;
        out.push(decode(&k, &v)?);
    }
    out.reverse();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled lets go of its file lock a moment after the last handle drops (its flusher
    /// thread ends then): each step of a test reopens the store, so it waits for the lock,
    /// within a deadline, as a restarted gateway's second open would.
    fn when_free<T>(f: impl Fn() -> Result<T, AuditError>) -> Result<T, AuditError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match f() {
                Err(AuditError::Store { source, .. })
                    if source.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                r => return r,
            }
        }
    }

    fn verify_free(dir: &Path) -> Result<u64, AuditError> {
        when_free(|| verify(dir))
    }

    fn filled(dir: &Path, n: u64) {
        let log = when_free(|| AuditLog::open(dir, 1_000_000)).unwrap();
        for i in 0..n {
            log.record(
                "edge.connect_refused",
                Some("pump-1"),
                &format!("reason {i}"),
            )
            .unwrap();
        }
        log.flush().unwrap();
    }

    #[test]
    fn chain_verifies_and_continues_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path(), 3);
        filled(dir.path(), 2);
        assert_eq!(verify_free(dir.path()).unwrap(), 5);
        let t = when_free(|| tail(dir.path(), 2)).unwrap();
        assert_eq!(t.iter().map(|e| e.index).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(t[1].detail, "reason 1");
    }

    fn edit(dir: &Path, index: u64, f: impl FnOnce(&mut Vec<u8>)) {
        let (db, chain) = when_free(|| open_store(dir)).unwrap();
        let mut v = chain.get(index.to_be_bytes()).unwrap().unwrap().to_vec();
        f(&mut v);
        chain.insert(index.to_be_bytes(), v).unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn one_changed_byte_names_its_record() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path(), 6);
        edit(dir.path(), 3, |v| {
            let at = v.windows(8).position(|w| w == b"reason 3").unwrap();
            v[at + 7] = b'9';
        });
        match verify_free(dir.path()) {
            Err(AuditError::Broken { index: 3, reason }) => assert!(reason.contains("edited")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_removed_record_breaks_the_chain_there() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path(), 4);
        {
            let (db, chain) = when_free(|| open_store(dir.path())).unwrap();
            chain.remove(2u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(
            verify_free(dir.path()),
            Err(AuditError::Broken { index: 2, .. })
        ));
    }

    #[test]
    fn a_rehashed_record_no_longer_links() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path(), 3);
        // Rewrite record 1 consistently (new detail, new hash): record 2 no longer links.
        edit(dir.path(), 1, |v| {
            let mut e: Entry = serde_json::from_slice(v).unwrap();
            e.detail = "nothing happened".into();
            let prev = unhex(&e.prev).unwrap();
            e.hash = hex::encode(e.expected_hash(&prev));
            *v = serde_json::to_vec(&e).unwrap();
        });
        match verify_free(dir.path()) {
            Err(AuditError::Broken { index: 2, reason }) => assert!(reason.contains("link")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pruned_records_claim_reads_back_as_written() {
        let claim = Pruned {
            first_kept: 1200,
            anchor: "ab".repeat(32),
            pruned: 100,
            unforwarded: 3,
        };
        assert_eq!(Pruned::parse(&claim.detail()), Some(claim));
        assert_eq!(
            Pruned::parse("first_kept=12 reason=more than max_records"),
            None
        );
    }

    #[test]
    fn a_pruned_log_stays_bounded_and_verifies_but_a_deletion_without_a_record_does_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = AuditLog::open(dir.path(), 100).unwrap();
            for i in 0..250 {
                log.record("edge.connect_refused", None, &format!("reason {i}"))
                    .unwrap();
            }
            log.flush().unwrap();
        }
        let (db, chain) = when_free(|| open_store(dir.path())).unwrap();
        assert!(chain.len() <= 101, "{} records kept", chain.len());
        let pruned = chain
            .iter()
            .filter_map(|i| i.ok())
            .filter(|(k, v)| decode(k, v).unwrap().event == PRUNED)
            .count();
        assert!(pruned >= 1);
        drop((db, chain));
        let kept = verify_free(dir.path()).unwrap();
        assert!(kept <= 101, "{kept}");
        // Continues across a reopen.
        filled(dir.path(), 3);
        verify_free(dir.path()).unwrap();
        // The oldest kept record removed by hand: no pruning record vouches for the gap.
        let first = {
            let (db, chain) = when_free(|| open_store(dir.path())).unwrap();
            let (k, _) = chain.first().unwrap().unwrap();
            chain.remove(&k).unwrap();
            db.flush().unwrap();
            u64::from_be_bytes(k.as_ref().try_into().unwrap())
        };
        match verify_free(dir.path()) {
            Err(AuditError::Broken { index, reason }) => {
                assert_eq!(index, first + 1);
                assert!(reason.contains("audit.pruned"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
