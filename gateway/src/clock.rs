//! Time, as the gateway tells it.
//!
//! Two clocks, for two questions. The wall clock ([`now_ms`]) stamps what leaves the
//! process or outlives it: audit records, spool records' receipt times, quarantine entries,
//! Modbus values. It may step (NTP setting an RTC-less board's clock), so nothing that
//! decides an age or a deadline reads it: those use the monotonic [`std::time::Instant`]
//! (the spool's `max_age`, rate buckets, backoffs).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch on the wall clock; 0 if the clock is before it.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
