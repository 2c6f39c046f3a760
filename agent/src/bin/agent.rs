//! `wardgate-agent`: signed over-the-air updates on the appliance (see the agent's README).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::sync::mpsc;
use wardgate_agent::agent::{
    minute_of_day, minutes_to_window, Agent, AgentError, CheckNow, Outcome,
};
use wardgate_agent::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "wardgate-agent",
    version,
    about = "Signed A/B updates for wardgate"
)]
struct Cli {
    /// The agent's configuration.
    #[arg(long, global = true, default_value = "/etc/wardgate/agent.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Decide a pending trial (health check), then check for updates on the interval and on
    /// "check now" commands, rebooting into a new slot inside a maintenance window.
    Run,
    /// Check the configured repository once and install what is newer (no reboot unless --now).
    Check {
        /// Reboot into the new slot at once, outside any maintenance window.
        #[arg(long)]
        now: bool,
    },
    /// Install from a repository directory (a USB stick) or URL, by hand.
    Install {
        /// A repository directory or URL (metadata/ and targets/ beneath it).
        source: String,
        /// This version rather than the newest.
        #[arg(long)]
        version: Option<String>,
        /// Reboot into it at once, outside any maintenance window.
        #[arg(long)]
        now: bool,
    },
    /// The slots, the boot state, the version floor and the last steps.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Commit the slot on trial by hand.
    MarkGood,
    /// Cancel a pending update, or end a running trial and reboot into the old slot; with
    /// --force, make the other slot the default even when nothing is pending.
    Rollback {
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wardgate-agent: {e}");
            return ExitCode::from(wardgate_agent::exit::CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wardgate-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cli.command, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wardgate-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(command: Command, cfg: Config) -> anyhow::Result<()> {
    match command {
        Command::Run => run(cfg).await,
        Command::Check { now } => {
            let mut agent = Agent::new(cfg, None)?;
            let outcome = agent.check(None, None).await;
            Ok(finish_install(&agent, outcome, now).await?)
        }
        Command::Install {
            source,
            version,
            now,
        } => {
            let url = source_url(&source)?;
            let mut agent = Agent::new(cfg, None)?;
            let outcome = agent.check(Some(url), version.as_deref()).await;
            Ok(finish_install(&agent, outcome, now).await?)
        }
        Command::Status { json } => {
            let agent = Agent::new(cfg, None)?;
            let s = agent.status();
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                print_status(&s);
            }
            Ok(())
        }
        Command::MarkGood => {
            let mut agent = Agent::new(cfg, None)?;
            let r = agent.mark_good().await;
            agent.flush_reports(Duration::from_secs(2)).await;
            println!("{}", serde_json::to_string(&r?).unwrap_or_default());
            Ok(())
        }
        Command::Rollback { force } => {
            let mut agent = Agent::new(cfg, None)?;
            let r = agent.rollback(force).await;
            agent.flush_reports(Duration::from_secs(2)).await;
            println!("{}", r?);
            Ok(())
        }
    }
}

/// A directory (USB stick) or a URL, as the repository's base URL.
fn source_url(s: &str) -> anyhow::Result<url::Url> {
    if s.contains("://") {
        let mut s = s.to_owned();
        if !s.ends_with('/') {
            s.push('/');
        }
        return url::Url::parse(&s).map_err(|e| anyhow::anyhow!("{s}: {e}"));
    }
    Ok(wardgate_agent::update::dir_url(std::path::Path::new(s))?)
}

async fn finish_install(
    agent: &Agent,
    outcome: Result<Outcome, AgentError>,
    now: bool,
) -> Result<(), AgentError> {
    let r = match outcome {
        Ok(Outcome::UpToDate) => {
            println!("up to date");
            Ok(())
        }
        Ok(Outcome::Installed { version, slot }) => {
            println!("bundle {version} installed to slot {slot}; one trial boot armed");
            if now || agent.in_window() {
                agent.reboot().await
            } else {
                println!(
                    "reboot waits for a maintenance window ({}); `wardgate-agent run` does it, \
                     or install again with --now",
                    agent
                        .cfg
                        .maintenance
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                Ok(())
            }
        }
        Err(e) => Err(e),
    };
    agent.flush_reports(Duration::from_secs(2)).await;
    r
}

/// The next "check now" command; never, once nobody can send one (without `[report]
/// broker` there is no sender: a closed channel must not wake the loop at once, forever).
async fn command(rx: &mut mpsc::Receiver<CheckNow>) -> CheckNow {
    match rx.recv().await {
        Some(c) => c,
        None => std::future::pending().await,
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<CheckNow>(4);
    let mut agent = Agent::new(cfg, Some(tx))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    agent.report("started", None, None, "agent running").await;
    if let Err(e) = agent.after_boot().await {
        agent.report("error", None, None, &e.to_string()).await;
    }
    let mut next = tokio::time::Instant::now() + agent.jitter();
    let mut force = false;
    // The update whose wait for a window was journaled.
    let mut announced = None;
    loop {
        // An installed update waits for its window (or a forced check-now) to reboot.
        if let Some((version, slot)) = agent.awaiting_reboot() {
            let wait = minutes_to_window(&agent.cfg.maintenance, minute_of_day());
            if wait > 0 && !force && announced.as_ref() != Some(&version) {
                agent
                    .report(
                        "reboot_waiting",
                        Some(&version),
                        Some(slot),
                        &format!("the reboot waits for the maintenance window, in {wait} min"),
                    )
                    .await;
                announced = Some(version);
            }
            if wait == 0 || force {
                if let Err(e) = agent.reboot().await {
                    agent.report("error", None, None, &e.to_string()).await;
                }
                // Systemd stops the agent for the reboot; until then, nothing more to do.
                tokio::select! {
                    _ = term.recv() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => continue,
                }
            }
            tokio::select! {
                _ = term.recv() => return Ok(()),
                c = command(&mut rx) => force = c.now,
                // Re-evaluated each minute (the window opens on a minute boundary).
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            continue;
        }
        tokio::select! {
            _ = term.recv() => {
                agent.report("stopped", None, None, "SIGTERM").await;
                agent.flush_reports(Duration::from_secs(2)).await;
                return Ok(());
            }
            c = command(&mut rx) => force = c.now,
            _ = tokio::time::sleep_until(next) => force = false,
        }
        let _ = agent.check(None, None).await;
        next = tokio::time::Instant::now() + agent.cfg.repository.poll_interval + agent.jitter();
    }
}

fn print_status(s: &serde_json::Value) {
    use std::io::Write;
    // A closed pipe (`| head`) ends the listing, not the process.
    let mut out = std::io::stdout().lock();
    let g = |k: &str| s.get(k).cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "hardware:        {}",
        g("hardware").as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "repository:      {}",
        g("repository").as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "booted slot:     {}",
        g("booted_slot").as_str().unwrap_or("?")
    );
    let _ = writeln!(out, "boot state:      {}", g("boot"));
    let _ = writeln!(
        out,
        "version floor:   {}",
        g("version_floor").as_str().unwrap_or("?")
    );
    let _ = writeln!(out, "last update:     {}", g("last_update"));
    let _ = writeln!(out, "awaiting reboot: {}", g("awaiting_reboot"));
    let _ = writeln!(
        out,
        "windows (UTC):   {} (in a window now: {})",
        g("maintenance_windows"),
        g("in_window")
    );
    let _ = writeln!(out, "last check:      {}", g("last_check"));
    if let Some(j) = s.get("journal").and_then(|j| j.as_array()) {
        let _ = writeln!(out, "journal:");
        for e in j {
            let _ = writeln!(
                out,
                "  {} {:<12} {} {}",
                e.get("time").and_then(|v| v.as_str()).unwrap_or(""),
                e.get("event").and_then(|v| v.as_str()).unwrap_or(""),
                e.get("version").and_then(|v| v.as_str()).unwrap_or("-"),
                e.get("detail").and_then(|v| v.as_str()).unwrap_or("")
            );
        }
    }
}
