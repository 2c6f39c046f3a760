//! What the gateway and its update agent say to each other on the embedded broker: the
//! topics, the report of each update step, and the "check now" command. One copy, used by
//! both: the gateway relays and audits what the agent reports, and each side's tests read
//! the other's words through these types.
//!
//! A report is one JSON object: `{"time", "event", "version"?, "slot"?, "detail"}`. The
//! gateway reads it leniently (only `event` is required, at most [`MAX_REPORT`] bytes), so an
//! agent of another version still reaches the hospital; [`AUDITED`] names the steps that
//! are security decisions, which the gateway writes to its audit log.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where the agent reports each step.
pub const STATUS_TOPIC: &str = "_gateway/update/status";
/// Where the agent takes "check now" commands (from upstream, through the gateway).
pub const COMMAND_TOPIC: &str = "_gateway/cmd/update";
/// The largest report the gateway relays.
pub const MAX_REPORT: usize = 64 * 1024;

/// Steps that are security decisions (audited by the gateway).
pub const AUDITED: [&str; 7] = [
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

/// An appliance's root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "A" => Some(Slot::A),
            "B" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// One step of the update cycle, as the agent journals and reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    /// RFC 3339, UTC, when the agent took the step.
    #[serde(default)]
    pub time: String,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Slot>,
    #[serde(default)]
    pub detail: String,
}

impl Report {
    /// Whether the step is a security decision.
    pub fn is_audited(&self) -> bool {
        AUDITED.contains(&self.event.as_str())
    }
}

/// A "check now" command: `{"now": true}` also reboots at once, outside the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckNow {
    #[serde(default)]
    pub now: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back_as_written_and_only_its_event_is_required() {
        let r = Report {
            time: "2026-12-03T10:00:00Z".into(),
            event: "committed".into(),
            version: Some("1.2.0".into()),
            slot: Some(Slot::B),
            detail: "health check passed".into(),
        };
        let text = serde_json::to_string(&r).expect("serializes");
        assert_eq!(
            text,
            r#"{"time":"2026-12-03T10:00:00Z","event":"committed","version":"1.2.0","slot":"B","detail":"health check passed"}"#
        );
        assert_eq!(serde_json::from_str::<Report>(&text).ok(), Some(r.clone()));
        assert!(r.is_audited());
        let bare: Report = serde_json::from_str(r#"{"event":"started"}"#).expect("lenient");
        assert!(!bare.is_audited() && bare.slot.is_none());
        assert!(serde_json::from_str::<Report>(r#"{"version":"1"}"#).is_err());
        // A field of the wrong shape is refused, not shown as something else.
        assert!(serde_json::from_str::<Report>(r#"{"event":"installed","slot":"C"}"#).is_err());
        assert!(serde_json::from_str::<Report>(r#"{"event":"installed","version":1}"#).is_err());
    }

    #[test]
    fn check_now_defaults_to_the_window() {
        assert_eq!(
            serde_json::from_str::<CheckNow>("{}").ok(),
            Some(CheckNow { now: false })
        );
        assert!(
            serde_json::from_str::<CheckNow>(r#"{"now":true}"#)
                .expect("parses")
                .now
        );
    }
}
