//! The gateway's side of over-the-air updates: it relays, it does not install.
//!
//! `wardgate-agent` (a separate process, root, on the same appliance) publishes each step
//! of its update cycle on the embedded broker's `_gateway/update/status`. The gateway:
//! - forwards every step upstream through the spool as the gateway's own stream, topic
//!   `{prefix}/{site}/{gateway}/_gateway/update` (QoS 1, priority vital, room made only from
//!   the stream's own records, like the audit stream);
//! - writes an audit record for the security decisions among them: `update.installed`,
//!   `update.committed`, `update.rolled_back`, `update.refused`, `update.rebooting`,
//!   `update.clock_recovered`, `update.boot_state_repaired`.
//!
//! A report that is not a JSON object with a string `event`, or is larger than 64 KiB, is
//! refused (logged and audited as `update.report_refused`), not forwarded.
//!
//! The other direction — an upstream "check now" on `…/_gateway/cmd/update` — is delivered
//! to the local `_gateway/cmd/update` by the uplink's command routing.
//!
//! Tested end to end by `tests/system/updates.rs` with the real agent.

use tokio_util::sync::CancellationToken;

use crate::events::Events;
use crate::ingest::Ingest;

use wardgate_proto::{Report, MAX_REPORT};
pub use wardgate_proto::{COMMAND_TOPIC, STATUS_TOPIC};

/// The stream topic; the uplink maps it to `…/_gateway/update`.
pub const UPDATE_TOPIC: &str = "update";
const CLIENT_ID: &str = "_wardgate-updates";

/// Relays the agent's reports until `shutdown`.
pub fn run(
    broker: &crate::broker::EmbeddedBroker,
    ingest: Ingest,
    events: Events,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    let mut reports =
        crate::broker::local_subscriber(broker, CLIENT_ID, STATUS_TOPIC, shutdown.clone());
    async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                p = reports.recv() => match p {
                    Some(p) if p.topic == STATUS_TOPIC => relay(&ingest, &events, &p.payload),
                    Some(_) => {}
                    None => return,
                },
            }
        }
    }
}

/// One report: audited if it is a decision, and queued for upstream.
fn relay(ingest: &Ingest, events: &Events, payload: &[u8]) {
    let report = if payload.len() > MAX_REPORT {
        Err(format!("{} bytes, above {MAX_REPORT}", payload.len()))
    } else {
        serde_json::from_slice::<Report>(payload)
            .map_err(|e| format!("not an update report (a JSON object with an \"event\"): {e}"))
    };
    let report = match report {
        Ok(r) => r,
        Err(why) => {
            events.update_report_refused(&why);
            return;
        }
    };
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    events.update_reported(
        &report.event,
        &or_dash(report.version.as_deref().unwrap_or_default()),
        &report
            .slot
            .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        &or_dash(&report.detail),
        report.is_audited(),
    );
    let payload = bytes::Bytes::copy_from_slice(payload);
    if let Err(e) = ingest.own(UPDATE_TOPIC, payload, crate::clock::now_ms()) {
        tracing::warn!(event = "update.not_forwarded", error = %e, "agent report not forwarded: no room in the spool");
    }
}
