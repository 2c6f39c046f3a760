//! wardgate-agent: the over-the-air update agent and the fleet manager's release tool.
//!
//! [`release`] is the repository side (`wardgate-release`); the rest is the agent on the
//! appliance (`wardgate-agent`): [`update`] chooses a bundle through TUF over [`http`],
//! [`slots`] and [`boot`] install it into the inactive slot and drive the boot loader,
//! [`health`] decides whether a new slot stays, [`agent`] ties them to a configuration
//! ([`config`]), [`report`] journals and reports each step, [`window`] times the reboot.

pub mod agent;
pub mod boot;
pub mod config;
pub mod exit;
pub mod files;
pub mod health;
pub mod http;
pub mod install;
pub mod release;
pub mod report;
pub mod slots;
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
