//! wardgate-agent: the over-the-air update agent and the fleet manager's release tool.
//!
//! Built so far: [`release`], the repository side (`wardgate-release`). The agent proper
//! (`wardgate-agent`: fetch, verify, A/B install, health check, rollback) is the rest of
//! its issue.

pub mod http;
pub mod release;
pub mod slots;
pub mod update;
