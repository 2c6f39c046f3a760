//! Refusals of peers that never showed a device's certificate (failed or stalled TLS
//! handshakes, certificates naming no device, connections over the limit), audited so
//! that a flood of them cannot grow the audit log at its own pace.
//!
//! Per interval (`[edge] refusal_summary`, default 60 s), the first refusal of each source
//! address is audited in full (`edge.connect_refused`); the others are counted, and at the
//! interval's end each source with more gets one summary (`edge.connect_refused_repeated`,
//! with the count). At most [`MAX_SOURCES`] sources are followed per interval; refusals of
//! any further source are summarised together (`peer=other`). So an interval adds at most
//! 2 × `MAX_SOURCES` + 1 records, whatever the flood; the audit log's own bound
//! (`[audit] max_records`) does the rest. Every refusal is still logged (the journal
//! rotates; the audit log is kept and forwarded).
//!
//! Pure bookkeeping under one lock; tested by the unit test below and, end to end, by
//! `tests/system/edge.rs`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

/// Sources followed one by one in an interval.
pub const MAX_SOURCES: usize = 64;

#[derive(Debug, Default)]
struct Interval {
    /// Refusals not audited in full, per source.
    sources: HashMap<IpAddr, u64>,
    /// Refusals of sources beyond [`MAX_SOURCES`].
    others: u64,
}

#[derive(Debug, Default)]
pub(super) struct Unidentified(Mutex<Interval>);

/// What the end of an interval summarises: the source (`None`: the others) and how many
/// of its refusals were not audited in full.
pub(super) type Summary = Vec<(Option<IpAddr>, u64)>;

impl Unidentified {
    /// A refusal of `source`: true if it is to be audited in full.
    pub(super) fn refused(&self, source: IpAddr) -> bool {
        let mut i = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = i.sources.get_mut(&source) {
            *n += 1;
            return false;
        }
        if i.sources.len() >= MAX_SOURCES {
            i.others += 1;
            return false;
        }
        i.sources.insert(source, 0);
        true
    }

    /// Ends the interval: what it left unaudited.
    pub(super) fn end_interval(&self) -> Summary {
        let i = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        let mut out: Summary = i
            .sources
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (Some(s), n))
            .collect();
        out.sort();
        if i.others > 0 {
            out.push((None, i.others));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_full_per_source_and_interval_the_rest_counted() {
        let u = Unidentified::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(u.refused(a));
        assert!(!u.refused(a));
        assert!(!u.refused(a));
        for n in 0..MAX_SOURCES as u32 {
            u.refused(IpAddr::from((0x0a01_0000 + n).to_be_bytes()));
        }
        let summary = u.end_interval();
        assert_eq!(summary.first(), Some(&(Some(a), 2)));
        assert_eq!(
            summary.last(),
            Some(&(None, 1)),
            "one source beyond the limit"
        );
        assert!(u.refused(a), "a new interval");
        assert!(u.end_interval().is_empty());
    }
}
