//! wardgate-agent: the over-the-air update agent on the appliance.
//!
//! The fleet manager's release tool, `wardgate-release`, is a binary of this package
//! (`src/bin/release/`) and not part of the library. The agent (`wardgate-agent`): [`update`] chooses a bundle through TUF over [`http`],
//! [`slots`], [`install`] and [`boot`] install it into the inactive slot and drive the boot
//! loader, [`health`] checks a new slot and [`trial`] decides whether it stays, [`agent`]
//! ties them to a configuration ([`config`]) and its state directory ([`state`]),
//! [`report`] journals and reports each step, [`window`] times the reboot.

pub mod agent;
pub mod boot;
pub mod config;
pub mod error;
pub mod exit;
pub mod files;
pub mod health;
pub mod http;
pub mod install;
pub mod report;
pub mod slots;
pub mod state;
pub mod trial;
pub mod update;
pub mod version;
pub mod window;

/// Test-only crash points: with `WARDGATE_AGENT_CRASH_AT` naming this point, the process
/// aborts here, as a power cut would stop it (for the tests of each crash window:
/// `progress-saved`, `trial-armed`, `boot-committed`, `floor-raised`).
pub(crate) fn crash_point(name: &str) {
    if std::env::var_os("WARDGATE_AGENT_CRASH_AT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}
