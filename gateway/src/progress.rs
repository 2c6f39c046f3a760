//! What shows that messages are moving: each stage of the pipeline stamps its progress
//! here as it works, and [`Progress::health`] judges from the stamps, not from liveness —
//! a process that is up but stuck is not healthy. Read by `GET /health`, `wardgate
//! status`, the `wardgate_ready` metric and the systemd watchdog.
//!
//! - The edge: its accept loop runs.
//! - The spool: its writer has committed within [`Progress::stall_after`] of the oldest
//!   append still waiting for a commit.
//! - The uplink (if there is one): connected; and with records waiting, acknowledged
//!   within `stall_after` — or, while not connected, still trying (a connection attempt
//!   within `stall_after` plus its backoff).
//!
//! Two verdicts. Ready (`/health` 200) needs every stage moving, the uplink connected
//! included: a gateway cut off from the hospital is not delivering. Stalled (the watchdog
//! stops its pings, so systemd restarts the gateway) is narrower: a stage that should be
//! moving and is not — a connected uplink with records in flight and no acknowledgement,
//! a spool writer that stopped committing, an edge that stopped accepting, an uplink that
//! stopped trying. An outage of the hospital's broker makes the gateway not ready, never
//! stalled: restarting it would not mend the network, and the spool holds the data.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `[admin] stall_after` unless set: how long a stage may go without progress.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

/// How long one connection attempt of the uplink may take (TCP, TLS, CONNACK) before its
/// loop counts as stopped.
pub const CONNECT_ALLOWANCE: Duration = Duration::from_secs(30);

/// The stamps, in ms since `start` (0: never).
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    stall_after: Duration,
    edge_accepting: AtomicBool,
    /// The oldest append still waiting for its group commit, if any.
    spool_waiting_since: AtomicU64,
    uplink_configured: AtomicBool,
    uplink_connected: AtomicBool,
    uplink_attempt: AtomicU64,
    /// The backoff before the next attempt, ms.
    uplink_backoff: AtomicU64,
    uplink_in_flight: AtomicU64,
    uplink_last_ack: AtomicU64,
    /// Since when records have been in flight with no acknowledgement.
    uplink_waiting_since: AtomicU64,
}

/// The verdict, with every reason it is not ready.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    pub ready: bool,
    /// Whether a stage is stuck (see the module docs): the watchdog is not fed.
    pub stalled: bool,
    /// Why it is not ready, one line each; empty when ready.
    pub reasons: Vec<String>,
}

/// What the spool says when health is judged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    /// Records waiting to be sent upstream.
    pub records: u64,
}

impl Progress {
    pub fn new(stall_after: Duration) -> Progress {
        Progress {
            start: Instant::now(),
            stall_after,
            edge_accepting: AtomicBool::new(false),
            spool_waiting_since: AtomicU64::new(0),
            uplink_configured: AtomicBool::new(false),
            uplink_connected: AtomicBool::new(false),
            uplink_attempt: AtomicU64::new(0),
            uplink_backoff: AtomicU64::new(0),
            uplink_in_flight: AtomicU64::new(0),
            uplink_last_ack: AtomicU64::new(0),
            uplink_waiting_since: AtomicU64::new(0),
        }
    }

    pub fn stall_after(&self) -> Duration {
        self.stall_after
    }

    /// Now, in ms since the start; never 0, which means "never".
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn age(&self, stamp: &AtomicU64) -> Option<Duration> {
        match stamp.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(self.now().saturating_sub(t))),
        }
    }

    pub fn edge_accepting(&self, on: bool) {
        self.edge_accepting.store(on, Ordering::Relaxed);
    }

    /// An append now waits for a group commit (the first since the last commit).
    pub fn spool_waiting(&self) {
        let _ = self.spool_waiting_since.compare_exchange(
            0,
            self.now(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The writer committed everything appended so far.
    pub fn spool_committed(&self) {
        self.spool_waiting_since.store(0, Ordering::Relaxed);
    }

    pub fn uplink_configured(&self) {
        self.uplink_configured.store(true, Ordering::Relaxed);
    }

    /// A connection attempt starts; the next waits `backoff` if it fails.
    pub fn uplink_attempt(&self, backoff: Duration) {
        self.uplink_attempt.store(self.now(), Ordering::Relaxed);
        self.uplink_backoff.store(
            u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn uplink_connected(&self, on: bool) {
        self.uplink_connected.store(on, Ordering::Relaxed);
        self.uplink_in_flight(0);
    }

    /// Records in flight now.
    pub fn uplink_in_flight(&self, n: usize) {
        self.uplink_in_flight.store(n as u64, Ordering::Relaxed);
        if n == 0 {
            self.uplink_waiting_since.store(0, Ordering::Relaxed);
        } else {
            let _ = self.uplink_waiting_since.compare_exchange(
                0,
                self.now(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// The upstream acknowledged a record.
    pub fn uplink_acknowledged(&self) {
        let now = self.now();
        self.uplink_last_ack.store(now, Ordering::Relaxed);
        // Still waiting for the others in flight, from now.
        if self.uplink_waiting_since.load(Ordering::Relaxed) != 0 {
            self.uplink_waiting_since.store(now, Ordering::Relaxed);
        }
    }

    pub fn is_uplink_connected(&self) -> Option<bool> {
        self.uplink_configured
            .load(Ordering::Relaxed)
            .then(|| self.uplink_connected.load(Ordering::Relaxed))
    }

    pub fn uplink_in_flight_now(&self) -> u64 {
        self.uplink_in_flight.load(Ordering::Relaxed)
    }

    /// Time since the last acknowledgement, if there was one.
    pub fn uplink_last_ack_age(&self) -> Option<Duration> {
        self.age(&self.uplink_last_ack)
    }

    /// The verdict now, with `backlog` waiting in the spool.
    pub fn health(&self, backlog: Backlog) -> Health {
        let stall = self.stall_after;
        let mut reasons = Vec::new();
        let mut stalled = false;
        let secs = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs()));
        if !self.edge_accepting.load(Ordering::Relaxed) {
            reasons.push("the edge is not accepting connections".to_owned());
            stalled = true;
        }
        if let Some(waited) = self.age(&self.spool_waiting_since).filter(|w| *w >= stall) {
            reasons.push(format!(
                "the spool has not committed for {} (records wait to be made durable)",
                secs(waited)
            ));
            stalled = true;
        }
        if self.uplink_configured.load(Ordering::Relaxed) {
            if self.uplink_connected.load(Ordering::Relaxed) {
                if let Some(waited) = self.age(&self.uplink_waiting_since).filter(|w| *w >= stall) {
                    reasons.push(format!(
                        "the uplink is connected but nothing was acknowledged for {} ({} records in flight)",
                        secs(waited),
                        self.uplink_in_flight.load(Ordering::Relaxed)
                    ));
                    stalled = true;
                }
            } else {
                let since = self.age(&self.uplink_attempt).map_or_else(
                    || "never connected".to_owned(),
                    |a| format!("last connection attempt {} ago", secs(a)),
                );
                reasons.push(format!(
                    "the uplink is not connected ({since}; {} records waiting)",
                    backlog.records
                ));
                let backoff = Duration::from_millis(self.uplink_backoff.load(Ordering::Relaxed));
                if self
                    .age(&self.uplink_attempt)
                    .is_some_and(|a| a > stall + backoff + CONNECT_ALLOWANCE)
                {
                    reasons.push("the uplink stopped trying to connect".to_owned());
                    stalled = true;
                }
            }
        }
        Health {
            ready: reasons.is_empty(),
            stalled,
            reasons,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_gateway_is_ready_once_its_edge_accepts_and_its_uplink_connects() {
        let p = Progress::new(Duration::from_secs(60));
        assert!(!p.health(Backlog::default()).ready);
        p.edge_accepting(true);
        assert_eq!(p.health(Backlog::default()).reasons, Vec::<String>::new());
        p.uplink_configured();
        p.uplink_attempt(Duration::from_secs(1));
        let h = p.health(Backlog { records: 3 });
        assert!(!h.ready && !h.stalled, "{h:?}");
        assert!(
            h.reasons[0].contains("not connected") && h.reasons[0].contains("3 records"),
            "{h:?}"
        );
        p.uplink_connected(true);
        assert!(p.health(Backlog { records: 3 }).ready);
    }

    #[test]
    fn records_in_flight_unacknowledged_past_the_limit_are_a_stall_and_an_ack_ends_it() {
        let p = Progress::new(Duration::ZERO);
        p.edge_accepting(true);
        p.uplink_configured();
        p.uplink_connected(true);
        // With a limit of zero, any wait is past it.
        p.uplink_in_flight(5);
        let h = p.health(Backlog { records: 5 });
        assert!(!h.ready && h.stalled, "{h:?}");
        assert!(h.reasons[0].contains("nothing was acknowledged"), "{h:?}");
        p.uplink_in_flight(0);
        assert!(p.health(Backlog::default()).ready);
    }

    #[test]
    fn a_spool_that_stops_committing_is_a_stall_and_an_outage_is_not() {
        let p = Progress::new(Duration::ZERO);
        p.edge_accepting(true);
        p.spool_waiting();
        assert!(p.health(Backlog::default()).stalled);
        p.spool_committed();
        assert!(p.health(Backlog::default()).ready);
        // Disconnected and retrying: not ready, not stalled.
        let p = Progress::new(Duration::from_secs(60));
        p.edge_accepting(true);
        p.uplink_configured();
        p.uplink_attempt(Duration::from_secs(30));
        let h = p.health(Backlog { records: 100 });
        assert!(!h.ready && !h.stalled, "{h:?}");
    }
}
