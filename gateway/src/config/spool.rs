//! `[spool]`: how much the spool holds, per device and in all, how long each priority's
//! records may wait, and how often it syncs.

use std::time::Duration;

use super::diag::Validator;
use super::raw;
use super::units;

pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 << 20;
pub const DEFAULT_SPOOL_DEVICE_QUOTA: u64 = 32 << 20;
pub const DEFAULT_MAX_AGE_ALARM: Duration = Duration::from_secs(30 * 86_400);
pub const DEFAULT_MAX_AGE_VITAL: Duration = Duration::from_secs(7 * 86_400);
pub const DEFAULT_MAX_AGE_ROUTINE: Duration = Duration::from_secs(86_400);
/// Bytes of records refused upstream that the spool keeps for inspection.
pub const DEFAULT_SPOOL_MAX_REJECTED: u64 = 16 << 20;
/// Records the spool keeps at most: its in-memory index costs about 80-120 bytes a record
/// (measured by the throughput bench), so about 60 MB at this bound.
pub const DEFAULT_SPOOL_MAX_RECORDS: usize = 500_000;
/// The shortest time between two of the spool's fdatasyncs; records arriving meanwhile
/// share the next one. See `[spool] commit_interval` in the example configuration.
pub const DEFAULT_SPOOL_COMMIT_INTERVAL: Duration = Duration::from_millis(2);
/// Above this, acknowledgements would wait too long for their flush.
pub const MAX_COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Limits, from the `[spool]` section.
#[derive(Debug, Clone)]
pub struct SpoolLimits {
    pub max_bytes: u64,
    pub device_quota: u64,
    /// Indexed by `Priority as usize`.
    pub max_age: [Duration; 3],
    /// Bytes of rejected records kept for inspection (the newest).
    pub max_rejected: u64,
    /// Records kept at most: bounds the in-memory index (about 150 bytes a record).
    pub max_records: usize,
    /// The shortest time between two fdatasyncs: a record arriving sooner waits for the
    /// rest of it, with whatever else arrives meanwhile (one flush for all).
    pub commit_interval: Duration,
}

impl SpoolLimits {
    /// Bytes of one segment file: small enough that compaction works in small steps.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 32).clamp(256 << 10, 8 << 20)
    }

    /// Bytes on disk beyond the live records' before the oldest segment is compacted.
    pub fn slack(&self) -> u64 {
        (self.max_bytes / 4).max(4 * self.segment_bytes())
    }
}

impl Validator<'_> {
    pub(super) fn spool(&mut self, s: &raw::RawSpool) -> SpoolLimits {
        let max_bytes = self.size(s.max_bytes.as_ref(), DEFAULT_SPOOL_MAX_BYTES);
        let device_quota = self.size(s.device_quota.as_ref(), DEFAULT_SPOOL_DEVICE_QUOTA);
        // sled's cache, before the spool became a log: still read, so that a file naming
        // it loads, and checked, but it sizes nothing now.
        let _ = self.size(s.cache.as_ref(), 0);
        let max_rejected = self.size(s.max_rejected.as_ref(), DEFAULT_SPOOL_MAX_REJECTED);
        let max_records = self.count(
            s.max_records.as_ref(),
            DEFAULT_SPOOL_MAX_RECORDS,
            "max_records",
        );
        if let Some(q) = &s.device_quota {
            if device_quota > max_bytes || device_quota == 0 {
                self.error(
                    q.span(),
                    "device_quota must be between 1 byte and max_bytes",
                );
            }
        }
        if let Some(m) = &s.max_bytes {
            if max_bytes < 64 * 1024 {
                self.error(m.span(), "spool max_bytes must be at least 64KiB");
            }
        }
        // "0s" is allowed: each flush then starts as soon as the previous one is done.
        let commit_interval = match &s.commit_interval {
            None => DEFAULT_SPOOL_COMMIT_INTERVAL,
            Some(c) => {
                let r = units::parse_duration(c.get_ref());
                self.check(c.span(), r)
                    .unwrap_or(DEFAULT_SPOOL_COMMIT_INTERVAL)
            }
        };
        if let (Some(c), true) = (&s.commit_interval, commit_interval > MAX_COMMIT_INTERVAL) {
            self.error(
                c.span(),
                format!(
                    "commit_interval must be at most {}: every acknowledgement waits for it",
                    humantime::format_duration(MAX_COMMIT_INTERVAL)
                ),
            );
        }
        let a = &s.max_age;
        SpoolLimits {
            max_bytes,
            device_quota,
            max_rejected,
            max_records,
            commit_interval,
            max_age: [
                self.duration(a.alarm.as_ref(), DEFAULT_MAX_AGE_ALARM),
                self.duration(a.vital.as_ref(), DEFAULT_MAX_AGE_VITAL),
                self.duration(a.routine.as_ref(), DEFAULT_MAX_AGE_ROUTINE),
            ],
        }
    }
}
