//! The exit codes of `wardgate-agent`, in one table (sysexits.h names where one fits).
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (for `check` and `install`: installed, or nothing newer to install) |
//! | 1 | a failure, said on stderr: a refused or failed update, a command that cannot be carried out |
//! | 2 | a usage error (clap) |
//! | 78 | an invalid configuration (`EX_CONFIG`) |

/// The configuration is invalid.
pub const CONFIG: u8 = 78;
