//! Per-device counters since the gateway started: what `wardgate device show` prints.
//!
//! [`crate::events::Events`] holds them, one set per device, and bumps them as decisions
//! are taken; the spool keeps its own (stored, evicted, expired, refused) and the admin
//! socket shows both side by side. Counters live in memory: they describe this run. The
//! audit log is the durable record.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeCounters {
    /// PUBLISH packets accepted into the spool.
    pub accepted: u64,
    /// Times the device was held back by its rate (a wait before its next packet).
    pub throttled: u64,
    /// Connections refused after the certificate named this device.
    pub refused: u64,
    /// Publishes or subscriptions outside its ACL (each closed the connection).
    pub acl_violations: u64,
    /// Other policy violations: oversized, malformed, wildcard or invalid topics.
    pub protocol_violations: u64,
    /// SUBSCRIBEs refused for taking the device past its `max_subscriptions`.
    #[serde(default)]
    pub subscription_limit: u64,
    /// Modbus: completed polls, and requests that timed out, got an exception code, or
    /// failed otherwise (connection, CRC, framing).
    #[serde(default)]
    pub modbus_polls: u64,
    #[serde(default)]
    pub modbus_timeouts: u64,
    #[serde(default)]
    pub modbus_exceptions: u64,
    #[serde(default)]
    pub modbus_errors: u64,
}
