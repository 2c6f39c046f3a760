//! The audit stream: the audit log's records forwarded upstream through the spool, like
//! telemetry.
//!
//! Each record becomes a spool record of the gateway's own stream ([`DeviceId::gateway`],
//! upstream topic `{prefix}/{site}/{gateway}/_gateway/audit`, priority vital, QoS 1) whose
//! payload is the record's JSON, hash and index included, so the upstream can check the
//! chain and see gaps. A record is forwarded only once it is durable in the local log
//! ([`AuditLog::durable_unforwarded`]): otherwise a crash right after forwarding could lose
//! it locally, and the restarted gateway would write another record under the same index —
//! a fork in the chain the upstream holds. The position is persisted in the audit store (`meta/forwarded`)
//! once the spool records are durable: after a crash, records are forwarded again, never
//! skipped (the upstream drops duplicates by index).
//!
//! The stream never displaces device data: when the spool is full, room for an audit record
//! is made only by evicting older audit records ([`Ingest::own`]), and the stream has
//! the per-device quota like any device. Spool events about the stream itself (its records
//! evicted or refused) stay in the local log only, so that forwarding cannot feed itself;
//! the upstream sees the gap in indexes, and `wardgate audit tail` shows what filled it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Entry};
use crate::device::GATEWAY_STREAM;
use crate::events::SPOOL_EVENTS;
use crate::ingest::Ingest;

/// The stream's topic; the uplink maps it to `…/_gateway/audit`.
pub const AUDIT_TOPIC: &str = "audit";
const BATCH: usize = 256;
/// Pause after a failure before trying again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// True for records that forwarding itself caused: the spool's events about the gateway's
/// own stream. (Room for an own record is made only among own records, so an eviction on
/// the stream's behalf names the stream as its device too.)
fn self_inflicted(e: &Entry) -> bool {
    e.device.as_deref() == Some(GATEWAY_STREAM) && SPOOL_EVENTS.contains(&e.event.as_str())
}

/// Forwards records until `shutdown`.
pub async fn run(log: Arc<AuditLog>, ingest: Ingest, shutdown: CancellationToken) {
    loop {
        let appended = log.appended();
        tokio::pin!(appended);
        appended.as_mut().enable();
        match forward_batch(&log, &ingest).await {
            Ok(0) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = appended => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(event = "audit.forward_failed", error = %e, "audit records not forwarded; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// Appends the next batch to the spool; returns how many records it covered.
async fn forward_batch(log: &Arc<AuditLog>, ingest: &Ingest) -> Result<usize, String> {
    // The flush is disk work: off the async workers.
    let batch = {
        let log = log.clone();
        tokio::task::spawn_blocking(move || log.durable_unforwarded(BATCH))
    }
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let Some(last) = batch.last().map(|e| e.index) else {
        return Ok(0);
    };
    let mut durable = None;
    for e in &batch {
        if self_inflicted(e) {
            continue;
        }
        let payload = serde_json::to_vec(e).unwrap_or_default().into();
        match ingest.own(AUDIT_TOPIC, payload, e.time_ms) {
            Ok(d) => durable = Some(d),
            // The spool has said why (and audited it); the record stays in the local log.
            Err(err) => tracing::warn!(
                event = "audit.not_forwarded",
                index = e.index,
                error = %err,
                "audit record not forwarded: no room in the spool"
            ),
        }
    }
    // Group commit: the last record durable means every earlier one is.
    if let Some(d) = durable {
        d.wait().await.map_err(|e| e.to_string())?;
    }
    log.set_forwarded(last + 1).map_err(|e| e.to_string())?;
    Ok(batch.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event: &str, device: Option<&str>, detail: &str) -> Entry {
        Entry {
            v: crate::audit::AUDIT_VERSION,
            index: 0,
            time_ms: 0,
            event: event.to_owned(),
            device: device.map(str::to_owned),
            detail: detail.to_owned(),
            prev: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn only_the_spools_events_about_the_gateways_own_stream_stay_local() {
        let own = Some(GATEWAY_STREAM);
        for event in SPOOL_EVENTS {
            assert!(self_inflicted(&entry(event, own, "")), "{event}");
            assert!(
                !self_inflicted(&entry(event, Some("pump-1"), "")),
                "{event}"
            );
        }
        // A device's record evicted for the gateway's stream cannot happen (own records
        // make room among own records only), and a detail text decides nothing.
        let evicted = entry("spool.evicted", Some("pump-1"), "for_device=_gateway");
        assert!(!self_inflicted(&evicted));
        // The gateway's stream in other events is forwarded: a command to the agent.
        assert!(!self_inflicted(&entry("uplink.command_delivered", own, "")));
        assert!(!self_inflicted(&entry("spool.corrupt_record", None, "")));
    }
}
