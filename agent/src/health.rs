//! The local health check that decides whether a newly booted slot stays: every configured
//! check must pass in one round before the deadline; rounds repeat (a service may still be
//! starting) until then. No cloud is involved.
//!
//! Checks: an HTTP endpoint answering 200 (the gateway's health endpoint), systemd units
//! active (`systemctl is-active`), nftables tables present (`nft list table`), and commands
//! exiting 0. Each failure says which check and why.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use crate::config::Health;
use crate::http::{Fetcher, HttpError};

/// How a check's command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("empty command")]
    Empty,
    #[error("{prog}: {source}")]
    Spawn {
        prog: String,
        source: std::io::Error,
    },
    #[error("did not finish within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Wait(std::io::Error),
    /// Its exit status, and the last 200 characters of what it wrote to stderr.
    #[error("{status}{}", if tail.is_empty() { String::new() } else { format!(": {tail}") })]
    Failed {
        status: std::process::ExitStatus,
        tail: String,
    },
}

/// Which check failed, and why.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{url} answered {status}, not 200")]
    Status {
        url: url::Url,
        status: hyper::StatusCode,
    },
    #[error("{url}: {source}")]
    Http { url: url::Url, source: HttpError },
    #[error("{url}: no answer within {timeout:?}")]
    NoAnswer { url: url::Url, timeout: Duration },
    /// `state`: what systemd says of it (empty if it cannot say).
    #[error("unit {unit} is not active ({source}{state})")]
    Unit {
        unit: String,
        source: CommandError,
        state: String,
    },
    #[error("nft table {family} {table} is not loaded ({source})")]
    Nft {
        family: String,
        table: String,
        source: CommandError,
    },
    #[error("command {argv:?} failed: {source}")]
    Command {
        argv: Vec<String>,
        source: CommandError,
    },
    /// The last round's failure, at the deadline.
    #[error("{last} (still failing after {deadline:?})")]
    Deadline {
        last: Box<HealthError>,
        deadline: Duration,
    },
}

/// Runs `argv` with a timeout; `Err` says how it failed.
async fn run(argv: &[String], timeout: Duration) -> Result<(), CommandError> {
    let (prog, args) = argv.split_first().ok_or(CommandError::Empty)?;
    let child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            prog: prog.clone(),
            source,
        })?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| CommandError::Timeout(timeout))?
        .map_err(CommandError::Wait)?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        // Its last 200 characters: where a failing command says why.
        let start = err.char_indices().rev().nth(199).map_or(0, |(i, _)| i);
        Err(CommandError::Failed {
            status: out.status,
            tail: err[start..].to_owned(),
        })
    }
}

/// What systemd says of a unit that is not active: `; failed/failed, result exit-code,
/// main process exit status 1` — empty if it cannot say.
async fn unit_state(unit: &str, timeout: Duration) -> String {
    let out = Command::new("systemctl")
        .args([
            "show",
            "--property=ActiveState,SubState,Result,ExecMainStatus",
            unit,
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let Ok(Ok(out)) = tokio::time::timeout(timeout, out).await else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("?")
            .to_owned()
    };
    if !out.status.success() || get("ActiveState") == "?" {
        return String::new();
    }
    format!(
        "; {}/{}, result {}, main process exit status {}",
        get("ActiveState"),
        get("SubState"),
        get("Result"),
        get("ExecMainStatus")
    )
}

/// One round of every check.
/// Units first: a service that is not running is the most specific reason, and its HTTP
/// endpoint would only fail after it.
pub async fn round(h: &Health, fetcher: &Fetcher, timeout: Duration) -> Result<(), HealthError> {
    for unit in &h.units {
        let argv = ["systemctl", "is-active", "--quiet", unit.as_str()].map(String::from);
        if let Err(source) = run(&argv, timeout).await {
            return Err(HealthError::Unit {
                unit: unit.clone(),
                source,
                state: unit_state(unit, timeout).await,
            });
        }
    }
    for (family, table) in &h.nft_tables {
        let argv = ["nft", "list", "table", family.as_str(), table.as_str()].map(String::from);
        run(&argv, timeout)
            .await
            .map_err(|source| HealthError::Nft {
                family: family.clone(),
                table: table.clone(),
                source,
            })?;
    }
    for u in &h.http {
        let url = u.clone();
        match tokio::time::timeout(timeout, fetcher.status(u)).await {
            Ok(Ok(s)) if s == hyper::StatusCode::OK => {}
            Ok(Ok(status)) => return Err(HealthError::Status { url, status }),
            Ok(Err(source)) => return Err(HealthError::Http { url, source }),
            Err(_) => return Err(HealthError::NoAnswer { url, timeout }),
        }
    }
    for argv in &h.commands {
        run(argv, timeout)
            .await
            .map_err(|source| HealthError::Command {
                argv: argv.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Rounds until one passes or the deadline passes; `Err` is the last round's failure.
pub async fn until_deadline(h: &Health, fetcher: &Fetcher) -> Result<(), HealthError> {
    let deadline = Instant::now() + h.deadline;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let result = round(h, fetcher, left.max(Duration::from_secs(1))).await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() + h.retry >= deadline => {
                return Err(HealthError::Deadline {
                    last: Box::new(e),
                    deadline: h.deadline,
                })
            }
            Err(e) => {
                tracing::info!(event = "health.retry", reason = %e, "health check not passed yet");
                tokio::time::sleep(h.retry).await;
            }
        }
    }
}
