//! The command line.
//!
//! Exit codes:
//!
//! | code | meaning                                                        |
//! |------|----------------------------------------------------------------|
//! | 0    | success                                                        |
//! | 1    | runtime failure (a file, a port, a certificate)                |
//! | 2    | bad command-line usage                                         |
//! | 70   | the embedded broker stopped ([`crate::broker::BROKER_DIED_EXIT`]) |
//! | 78   | the configuration is invalid (EX_CONFIG); every error is printed |

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::app::Gateway;
use crate::config::{Config, ConfigError};
use crate::device::DeviceId;
use crate::pki::{self, PkiDir};

pub const EXIT_CONFIG: u8 = 78;
pub const DEFAULT_CONFIG: &str = "/etc/wardgate/wardgate.toml";

#[derive(Debug, Parser)]
#[command(
    name = "wardgate",
    version,
    about = "Secure edge IoT gateway for hospital wards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. SIGHUP reloads certificates and CRL; SIGTERM or SIGINT stop it.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration file and print every error (exit 0, or 78).
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Manage the site PKI: device CA, server certificate, device certificates, CRL.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// The hash-chained audit log of security decisions (read offline, from the data dir).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run a self-contained demonstration on loopback: a throwaway PKI and configuration,
    /// the gateway, and simulated ward devices; prints what flows and what is refused.
    Demo {
        /// Directory for the demo's PKI and configuration (default: a temporary one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// How long to run (e.g. "20s"); "0s" runs until Ctrl-C.
        #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the whole chain; exit 0 if intact, 1 naming the first bad record.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print the most recent records, oldest first.
    Tail {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(short = 'n', long, default_value_t = 20)]
        count: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the site's device CA, the gateway's server certificate and an empty CRL.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        site: String,
        /// Common name of the gateway's server certificate.
        #[arg(long, default_value = "wardgate")]
        gateway_id: String,
        /// DNS name or IP address devices use to reach the gateway (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issue a device certificate with CN = DEVICE_ID into OUT.
    Issue {
        device_id: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = pki::DEFAULT_DEVICE_LIFETIME_DAYS)]
        days: i64,
    },
    /// Revoke every certificate of DEVICE_ID and write a new CRL (then SIGHUP the gateway).
    Revoke {
        device_id: String,
        #[arg(long)]
        dir: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells its story on stdout; its log shows only the security events.
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn,rumqttd=off,rustls=error",
        _ => "info,rumqttd=off,rustls=error",
    };
    init_logging(default_filter);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wardgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr. RUST_LOG overrides `default_filter`, which silences rumqttd (it logs
/// every client disconnect at error level; the edge logs sessions itself) and rustls's
/// warnings about clients' SNI.
fn init_logging(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::CheckConfig { config } => Ok(match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} device classes, {} devices)",
                    config.display(),
                    c.classes.len(),
                    c.devices.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        }),
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return Ok(config_failure(&e)),
            };
            runtime()?.block_on(run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki { command } => pki_command(command),
        Command::Audit { command } => audit_command(command),
        Command::Demo { dir, duration } => {
            runtime()?.block_on(crate::demo::run(dir, duration))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    match e {
        ConfigError::Invalid { .. } => ExitCode::from(EXIT_CONFIG),
        ConfigError::Read { .. } => ExitCode::FAILURE,
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let gateway = Gateway::build(config).await?;
    let shutdown = CancellationToken::new();
    let signals = watch_signals(shutdown.clone(), gateway.edge_handle())?;
    gateway.run(shutdown).await;
    signals.abort();
    Ok(())
}

/// SIGTERM and SIGINT cancel `shutdown`; SIGHUP reloads TLS material and CRL.
fn watch_signals(
    shutdown: CancellationToken,
    edge: crate::edge::EdgeHandle,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    // A failure is logged and leaves the previous material in force.
                    let _ = edge.reload_tls();
                }
            }
        }
        tracing::info!(event = "gateway.stopping", "signal received; shutting down");
        shutdown.cancel();
    }))
}

fn device_arg(s: &str) -> anyhow::Result<DeviceId> {
    DeviceId::parse(s).with_context(|| format!("invalid device id {s:?}"))
}

fn pki_command(command: PkiCommand) -> anyhow::Result<ExitCode> {
    match command {
        PkiCommand::Init {
            dir,
            site,
            gateway_id,
            sans,
        } => {
            DeviceId::parse(&site).with_context(|| format!("invalid site name {site:?}"))?;
            let r = pki::init(&PkiDir::new(&dir), &site, &gateway_id, &sans)?;
            println!("site CA:            {}", r.ca.display());
            println!(
                "server certificate: {} ({})",
                r.server_cert.display(),
                r.server_names.join(", ")
            );
            println!("CRL:                {}", r.crl.display());
        }
        PkiCommand::Issue {
            device_id,
            dir,
            out,
            days,
        } => {
            let device = device_arg(&device_id)?;
            let r = pki::issue(&PkiDir::new(&dir), &device, &out, days)?;
            println!("certificate: {}", r.cert.display());
            println!("key:         {}", r.key.display());
            println!("CA:          {}", r.ca.display());
            println!("serial:      {}", r.serial);
            println!("not after:   {}", r.not_after);
        }
        PkiCommand::Revoke { device_id, dir } => {
            let device = device_arg(&device_id)?;
            let serials = pki::revoke(&PkiDir::new(&dir), &device)?;
            println!(
                "revoked {} certificate(s) of {device}: {}",
                serials.len(),
                serials.join(", ")
            );
            println!(
                "CRL written to {}; send SIGHUP to the gateway to apply it now",
                Path::new(&dir).join("crl.pem").display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn audit_command(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify { data_dir } => match crate::audit::verify(&data_dir) {
            Ok(n) => {
                println!("{}: {n} audit records, chain intact", data_dir.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: {e}", data_dir.display());
                Ok(ExitCode::FAILURE)
            }
        },
        AuditCommand::Tail {
            data_dir,
            count,
            json,
        } => {
            for e in crate::audit::tail(&data_dir, count)? {
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    println!(
                        "{:>6} {} {:<26} {:<16} {}",
                        e.index,
                        e.time_ms,
                        e.event,
                        e.device.as_deref().unwrap_or("-"),
                        e.detail
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
