//! System tests: `wardgate` runs as a process; real clients talk to it over TLS.
//!
//! One test binary (see STYLE.md); `support/` holds the harness. Prerequisites that are
//! missing (mosquitto-clients, openssl) fail the test with what to install.

// Test code fails by panicking; unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod admin;
mod appliance;
mod audit;
mod cli;
mod conformance;
mod data_path;
mod edge;
mod firewall;
mod modbus;
mod mqtt5;
mod operations;
mod quarantine;
mod rate;
mod reload;
mod sessions;
mod support;
mod updates;
mod uplink;
