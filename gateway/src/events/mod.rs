//! Security events: every decision the gateway takes, each named, audited and logged once.
//!
//! [`Events`] is one handle, built by `app.rs` and handed to every part (edge, spool,
//! ingest, Modbus, uplink, broker, firewall, admin, quarantine, update reports): it holds
//! the audit log and the per-device counters. Nothing here is process-wide, so two gateways
//! in one process (as tests run them) keep their records apart.
//!
//! Each decision is one method, in the file of the room that takes it ([`edge`], [`spool`],
//! [`control`]): it writes one structured `tracing` record whose `event` field is the
//! decision's stable name (`edge.connect_refused`, `spool.evicted`, …), so operators can
//! alert on it and tests can wait for it; appends a record under the same name to the
//! hash-chained audit log ([`crate::audit`]) with the device and a detail text; bumps
//! the device's counters; and bumps the metric series of its kind ([`crate::metrics`]).
//! The handle also carries the pipeline's progress stamps ([`crate::progress`]), which
//! the spool, the edge and the uplink set and `/health` and the watchdog read. Fields never carry payloads or key material; strings that a peer
//! controls (client ids, topics) are written escaped and cut ([`shown`]).
//!
//! Tested through the system tests, which wait for these names in the gateway's log and
//! count the audit records of every refusal path; the counters by the admin socket's tests.

mod control;
mod edge;
mod spool;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

pub use crate::policy::violation::shown;
pub use control::ModbusFailure;
pub use edge::{Refusal, Violation};
pub use spool::SPOOL_EVENTS;

use crate::audit::AuditLog;
use crate::counters::EdgeCounters;
use crate::device::DeviceId;
use crate::metrics::Metrics;
use crate::progress::Progress;

/// The gateway's events: its audit log (if it keeps one) and its per-device counters.
/// Cheap to clone; clones share both.
#[derive(Clone, Default)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    audit: Option<Arc<AuditLog>>,
    counters: Mutex<HashMap<DeviceId, EdgeCounters>>,
    metrics: Metrics,
    progress: Arc<Progress>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            audit: None,
            counters: Mutex::default(),
            metrics: Metrics::default(),
            progress: Arc::new(Progress::new(crate::progress::DEFAULT_STALL_AFTER)),
        }
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("audited", &self.inner.audit.is_some())
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Events recorded in `audit` as well as logged, counted and measured in `metrics`,
    /// with the pipeline's `progress`: the running gateway's.
    pub fn audited(audit: Arc<AuditLog>, metrics: Metrics, progress: Arc<Progress>) -> Events {
        Events {
            inner: Arc::new(Inner {
                audit: Some(audit),
                counters: Mutex::default(),
                metrics,
                progress,
            }),
        }
    }

    /// Events logged and counted but audited nowhere: for tools that open the spool
    /// offline, benchmarks and unit tests.
    pub fn unaudited() -> Events {
        Events::default()
    }

    /// The audit log these events are recorded in.
    pub fn audit_log(&self) -> Option<&Arc<AuditLog>> {
        self.inner.audit.as_ref()
    }

    /// The metric series these events bump.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The pipeline's progress stamps.
    pub fn progress(&self) -> &Arc<Progress> {
        &self.inner.progress
    }

    /// `device`'s counters since the gateway started.
    pub fn counters(&self, device: &DeviceId) -> EdgeCounters {
        self.inner
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .copied()
            .unwrap_or_default()
    }

    /// Applies `f` to the counters of `device`.
    fn count(&self, device: &DeviceId, f: impl FnOnce(&mut EdgeCounters)) {
        let mut all = self
            .inner
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Looked up first: the id is cloned only for a device's first count.
        match all.get_mut(device) {
            Some(c) => f(c),
            None => f(all.entry(device.clone()).or_default()),
        }
    }

    /// Appends a record to the audit log, if there is one. A failure to audit is itself
    /// logged loudly: it must never pass silently.
    fn audit(&self, event: &str, device: Option<&DeviceId>, detail: impl AsRef<str>) {
        self.audit_str(event, device.map(DeviceId::as_str), detail.as_ref());
    }

    /// [`Events::audit`] for a device named by a string another part could not validate
    /// (a PKI index entry).
    fn audit_str(&self, event: &str, device: Option<&str>, detail: &str) {
        if let Some(log) = &self.inner.audit {
            match log.record(event, device, detail) {
                Ok(_) => {
                    self.inner.metrics.audit_records.inc();
                }
                Err(e) => {
                    tracing::error!(event = "audit.write_failed", error = %e, "audit record could not be written");
                }
            }
        }
    }

    /// Flushes the audit log (at shutdown).
    pub fn flush(&self) {
        if let Some(log) = &self.inner.audit {
            if let Err(e) = log.flush() {
                tracing::error!(event = "audit.flush_failed", error = %e, "audit log flush failed");
            }
        }
    }
}

fn dev(device: Option<&DeviceId>) -> &str {
    device.map_or("-", DeviceId::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_belong_to_their_handle() {
        let a = Events::unaudited();
        let b = Events::unaudited();
        let d = DeviceId::parse("pump-1").unwrap();
        a.count(&d, |c| c.accepted += 2);
        a.clone().count(&d, |c| c.accepted += 1);
        assert_eq!(a.counters(&d).accepted, 3);
        assert_eq!(b.counters(&d), EdgeCounters::default());
    }
}
