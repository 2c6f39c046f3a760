//! wardgate-agent: the over-the-air update agent and the fleet manager's release tool.
//!
//! A skeleton until its own issue (signed TUF updates, A/B slots, health check and
//! rollback). It is a workspace member already so that the workspace layout, lints and
//! shared `target/` are in place for it.
