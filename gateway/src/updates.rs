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

/// Where the agent reports, on the embedded broker.
pub const STATUS_TOPIC: &str = "_gateway/update/status";
/// Where the agent takes "check now" commands, on the embedded broker.
pub const COMMAND_TOPIC: &str = "_gateway/cmd/update";
/// The stream topic; the uplink maps it to `…/_gateway/update`.
pub const UPDATE_TOPIC: &str = "update";
const MAX_REPORT: usize = 64 * 1024;
const CLIENT_ID: &str = "_wardgate-updates";
/// Steps that are security decisions (and so audited).
const AUDITED: [&str; 7] = [
    "installed",
    "committed",
    "rolled_back",
    "refused",
    "rebooting",
    // An unreadable boot state rewritten from the agent's update record.
    "boot_state_repaired",
    // Trusted metadata forgotten and re-verified after the clock ran ahead.
    "clock_recovered",
];

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
    let parsed: Option<serde_json::Value> = (payload.len() <= MAX_REPORT)
        .then(|| serde_json::from_slice(payload).ok())
        .flatten();
    let Some(event) = parsed
        .as_ref()
        .and_then(|v| v.get("event"))
        .and_then(|e| e.as_str())
        .map(str::to_owned)
    else {
        let why = if payload.len() > MAX_REPORT {
            format!("{} bytes, above {MAX_REPORT}", payload.len())
        } else {
            "not a JSON object with an \"event\"".to_owned()
        };
        events.update_report_refused(&why);
        return;
    };
    let v = parsed.unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_owned();
    events.update_reported(
        &event,
        &field("version"),
        &field("slot"),
        &field("detail"),
        AUDITED.contains(&event.as_str()),
    );
    let payload = bytes::Bytes::copy_from_slice(payload);
    if let Err(e) = ingest.own(UPDATE_TOPIC, payload, crate::clock::now_ms()) {
        tracing::warn!(event = "update.not_forwarded", error = %e, "agent report not forwarded: no room in the spool");
    }
}
