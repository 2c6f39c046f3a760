//! The exit codes of `wardgate`, in one table (sysexits.h names where one fits). systemd's
//! `RestartPreventExitStatus` and the appliance tests read them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | a runtime failure: a file, a port, a certificate, the firewall, a failed check |
//! | 2 | a usage error (clap) |
//! | 70 | the embedded broker stopped under a running gateway (`EX_SOFTWARE`) |
//! | 78 | an invalid configuration, every problem named (`EX_CONFIG`) |

/// The embedded broker stopped: the gateway exits so that systemd restarts it whole.
pub const BROKER_DIED: u8 = 70;
/// The configuration is invalid.
pub const CONFIG: u8 = 78;
