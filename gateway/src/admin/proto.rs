//! The admin protocol: one JSON request per line, one JSON response per line.
//!
//! ```text
//! → {"cmd":"device_show","id":"pump-1"}
//! ← {"ok":true,"data":{…}}            or   {"ok":false,"error":"device pump-9 is not registered"}
//! ```
//!
//! The same types serialise the server's answers and print them in the CLI, so `--json`
//! output is exactly what the socket said.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::counters::EdgeCounters;
use crate::registry::Source;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    DeviceList,
    DeviceShow {
        id: String,
    },
    DeviceAdd {
        id: String,
        class: String,
        address: IpAddr,
    },
    DeviceRemove {
        id: String,
    },
    DeviceQuarantine {
        id: String,
        reason: String,
    },
    DeviceRelease {
        id: String,
    },
    /// The last `count` audit records, oldest first.
    AuditTail {
        count: usize,
    },
    /// Checks the audit chain; answers the number of records, or names the first bad one.
    AuditVerify,
    /// Reads the configuration file again and applies it (`crate::reload`).
    Reload,
}

impl Request {
    /// True for requests that change state (audited with the caller's identity).
    pub fn changes(&self) -> bool {
        !matches!(
            self,
            Request::Status
                | Request::DeviceList
                | Request::DeviceShow { .. }
                | Request::AuditTail { .. }
                | Request::AuditVerify
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub gateway: String,
    pub site: String,
    pub version: String,
    pub uptime_s: u64,
    pub edge: String,
    /// "connected", "disconnected" or "none" (no `[uplink]`).
    pub uplink: String,
    pub devices: DeviceTotals,
    pub spool: SpoolStatus,
    /// Whether messages are moving, and why not (as `GET /health` says).
    #[serde(default)]
    pub health: Option<crate::progress::Health>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceTotals {
    pub registered: usize,
    pub connected: usize,
    /// Device connections attached to the embedded broker (the others need none).
    #[serde(default)]
    pub broker_sessions: usize,
    pub quarantined: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpoolStatus {
    pub records: usize,
    pub bytes: u64,
    pub corrupt: u64,
    /// Set aside because the upstream refused them (or they cannot be published there).
    #[serde(default)]
    pub rejected: u64,
}

/// One device as `device list` and `device show` report it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: String,
    /// `None` for a quarantined device that is no longer registered.
    pub class: Option<String>,
    pub address: Option<IpAddr>,
    pub source: Option<Source>,
    /// Peer addresses of its live connections.
    pub connections: Vec<String>,
    pub quarantine: Option<QuarantineView>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineView {
    pub since_ms: u64,
    pub reason: String,
}

/// Since the gateway started: the edge's counters and the spool's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counters {
    #[serde(flatten)]
    pub edge: EdgeCounters,
    /// Records of this device evicted from the spool to make room.
    pub evicted: u64,
    /// Records dropped after their priority class's `max_age`.
    pub expired: u64,
    /// Publishes the spool had no room for (not acknowledged).
    pub spool_refused: u64,
    #[serde(default)]
    pub rejected: u64,
}

/// The table `wardgate device list` prints, a line per device.
pub fn device_table(views: &[DeviceView]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<18} {:<16} {:<7} {:<12} {:>9} {:>9} {:>8} {:>10}",
        "DEVICE",
        "CLASS",
        "ADDRESS",
        "SOURCE",
        "STATE",
        "ACCEPTED",
        "THROTTLED",
        "REFUSED",
        "VIOLATIONS"
    );
    for v in views {
        let _ = writeln!(
            out,
            "{:<20} {:<18} {:<16} {:<7} {:<12} {:>9} {:>9} {:>8} {:>10}",
            v.id,
            v.class.as_deref().unwrap_or("-"),
            v.address.map_or("-".into(), |a| a.to_string()),
            v.source
                .map_or("-".into(), |s| format!("{s:?}").to_lowercase()),
            v.state(),
            v.counters.edge.accepted,
            v.counters.edge.throttled,
            v.counters.edge.refused,
            v.counters.edge.acl_violations
                + v.counters.edge.protocol_violations
                + v.counters.edge.subscription_limit,
        );
    }
    out
}

impl DeviceView {
    /// One word for where the device stands.
    pub fn state(&self) -> &'static str {
        if self.quarantine.is_some() {
            "quarantined"
        } else if self.class.is_none() {
            "unregistered"
        } else if self.connections.is_empty() {
            "offline"
        } else {
            "connected"
        }
    }
}
