//! wardgate: a secure edge IoT gateway for smart hospital wards.
//!
//! See `DESIGN.md` in the shared folder and the README for the architecture. One module
//! per domain noun; `app` wires them, `cli` is the command line.

pub mod admin;
pub mod app;
pub mod audit;
pub mod audit_stream;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod counters;
pub mod demo;
pub mod device;
pub mod edge;
pub mod events;
pub mod exit;
pub mod exporter;
pub mod firewall;
pub mod fsutil;
pub mod ingest;
pub mod metrics;
pub mod modbus;
pub mod mqtt;
pub mod pki;
pub mod policy;
pub mod progress;
pub mod quarantine;
pub mod registry;
pub mod reload;
pub mod spool;
pub mod topics;
pub mod updates;
pub mod uplink;
