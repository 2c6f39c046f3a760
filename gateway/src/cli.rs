//! The command line.
//!
//! Exit codes: the table in [`crate::exit`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::admin::proto::{device_table, DeviceView, Request, Status};
use crate::app::Gateway;
use crate::config::{Config, ConfigError};
use crate::device::DeviceId;
use crate::pki::{self, PkiDir};

pub use crate::exit::CONFIG as EXIT_CONFIG;
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
    /// Run the gateway. SIGHUP reloads the configuration (as `wardgate reload`); SIGTERM or
    /// SIGINT stop it.
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
    /// Read the configuration file again and apply it to the running gateway: TLS material,
    /// CRL, classes and devices at once; other sections are named as needing a restart. An
    /// invalid file changes nothing and says why (exit 1).
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the gateway's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// The running gateway's state, through its admin socket.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the gateway's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Read and change the running gateway's device registry and quarantine.
    Device {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// The nftables ruleset wardgate derives from the registry.
    Firewall {
        #[command(subcommand)]
        command: FirewallCommand,
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

/// Where the admin socket is: `--socket`, else `[admin] socket` of `--config`, else the
/// default.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// Configuration file whose `[admin] socket` to use.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The admin socket itself.
    #[arg(long, global = true, conflicts_with = "config")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Every registered or quarantined device, with its state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One device: registration, connections, quarantine and counters.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Register a device (applies at once and survives restarts).
    Add {
        id: String,
        #[arg(long)]
        class: String,
        #[arg(long)]
        address: std::net::IpAddr,
    },
    /// Unregister a device and close its connections.
    Remove { id: String },
    /// Quarantine a device: close its connections and refuse it until released.
    Quarantine {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Release a device from quarantine.
    Release { id: String },
}

#[derive(Debug, Subcommand)]
enum FirewallCommand {
    /// Print the ruleset `[firewall]` and the configuration's devices give, in `nft -f`
    /// syntax, without touching the kernel.
    Render {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Load that ruleset into the kernel now, in one atomic batch (root), and read it back.
    /// `wardgate run` does this itself at start, with admin-socket changes and quarantine.
    Apply {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the live table `inet wardgate` as the kernel holds it (runs `nft list`).
    Show,
}

/// The audit log is read from the running gateway (over its admin socket), or offline
/// from a data directory with `--data-dir` (the gateway must be stopped: sled allows one
/// process per store).
#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the whole chain; exit 0 if intact, 1 naming the first bad record.
    Verify {
        /// Read this data directory offline instead of asking the gateway.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the most recent records, oldest first.
    Tail {
        /// Read this data directory offline instead of asking the gateway.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(short = 'n', long, default_value_t = 20)]
        count: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
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
        Command::Firewall { command } => firewall_command(command),
        Command::Status { admin, json } => admin_command(&admin, &Request::Status, json),
        Command::Reload { admin, json } => admin_command(&admin, &Request::Reload, json),
        Command::Device { admin, command } => {
            let (request, json) = match command {
                DeviceCommand::List { json } => (Request::DeviceList, json),
                DeviceCommand::Show { id, json } => (Request::DeviceShow { id }, json),
                DeviceCommand::Add { id, class, address } => {
                    (Request::DeviceAdd { id, class, address }, false)
                }
                DeviceCommand::Remove { id } => (Request::DeviceRemove { id }, false),
                DeviceCommand::Quarantine { id, reason } => {
                    (Request::DeviceQuarantine { id, reason }, false)
                }
                DeviceCommand::Release { id } => (Request::DeviceRelease { id }, false),
            };
            admin_command(&admin, &request, json)
        }
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
    let signals = watch_signals(shutdown.clone(), gateway.reloader())?;
    gateway.run(shutdown).await;
    signals.abort();
    Ok(())
}

/// SIGTERM and SIGINT cancel `shutdown`; SIGHUP reloads the configuration.
fn watch_signals(
    shutdown: CancellationToken,
    reloader: std::sync::Arc<crate::reload::Reloader>,
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
                    // A failure is audited and leaves the previous configuration in force.
                    let r = reloader.clone();
                    let _ = tokio::task::spawn_blocking(move || r.reload()).await;
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
        AuditCommand::Verify { data_dir, admin } => {
            let (source, verified) = match data_dir {
                Some(dir) => (
                    dir.display().to_string(),
                    crate::audit::verify(&dir).map_err(|e| e.to_string()),
                ),
                None => {
                    let socket = admin_socket(&admin)?;
                    let r = crate::admin::client::call(&socket, &Request::AuditVerify)?;
                    let verified = match (r.ok, r.data) {
                        (true, Some(n)) => {
                            serde_json::from_value::<u64>(n).map_err(|e| e.to_string())
                        }
                        _ => Err(r.error.unwrap_or_else(|| "failed".into())),
                    };
                    ("running gateway".to_owned(), verified)
                }
            };
            match verified {
                Ok(n) => {
                    println!("{source}: {n} audit records, chain intact");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{source}: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::Tail {
            data_dir,
            count,
            json,
            admin,
        } => {
            let entries = match data_dir {
                Some(dir) => crate::audit::tail(&dir, count)?,
                None => {
                    let socket = admin_socket(&admin)?;
                    let r = crate::admin::client::call(&socket, &Request::AuditTail { count })?;
                    if !r.ok {
                        anyhow::bail!("{}", r.error.unwrap_or_else(|| "failed".into()));
                    }
                    serde_json::from_value(r.data.unwrap_or_default())?
                }
            };
            print_audit(&entries, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_audit(entries: &[crate::audit::Entry], json: bool) -> anyhow::Result<()> {
    for e in entries {
        if json {
            println!("{}", serde_json::to_string(e)?);
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
    Ok(())
}

fn firewall_command(command: FirewallCommand) -> anyhow::Result<ExitCode> {
    let from_config = |path: &Path| -> anyhow::Result<Option<crate::firewall::Ruleset>> {
        let config = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                config_failure(&e);
                return Ok(None);
            }
        };
        let Some(fw) = &config.firewall else {
            anyhow::bail!("{}: no [firewall] section", config.source.display());
        };
        let devices = config
            .devices
            .values()
            .map(|d| (d.address, false))
            .collect();
        Ok(Some(crate::firewall::render(&crate::firewall::Inputs {
            config: fw,
            edge_port: config.edge.listen.port(),
            broker_port: config.broker.listen.port(),
            gateway_uid: crate::firewall::own_uid(),
            devices,
        })))
    };
    match command {
        FirewallCommand::Render { config } => {
            let Some(ruleset) = from_config(&config)? else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            println!(
                "# wardgate firewall render --config {}\n# From the configuration's devices; \
                 the running gateway adds admin-socket changes and quarantine.",
                config.display()
            );
            print!("{ruleset}");
        }
        FirewallCommand::Apply { config } => {
            let Some(ruleset) = from_config(&config)? else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            crate::firewall::netlink::apply(&ruleset)?;
            if !crate::firewall::netlink::table_exists()? {
                anyhow::bail!("the kernel accepted the batch but holds no table inet wardgate");
            }
            println!("table inet wardgate loaded");
        }
        FirewallCommand::Show => {
            let out = std::process::Command::new("nft")
                .args(["list", "table", "inet", crate::firewall::TABLE])
                .output()
                .context("cannot run nft (apt-get install nftables)")?;
            if !out.status.success() {
                anyhow::bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn admin_socket(args: &AdminArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    match &args.config {
        None => Ok(PathBuf::from(crate::config::DEFAULT_ADMIN_SOCKET)),
        Some(path) => match Config::load(path) {
            Ok(c) => Ok(c.admin.socket),
            Err(e) => anyhow::bail!("{e}"),
        },
    }
}

/// Sends `request` over the admin socket and prints the answer.
fn admin_command(args: &AdminArgs, request: &Request, json: bool) -> anyhow::Result<ExitCode> {
    let socket = admin_socket(args)?;
    let response = crate::admin::client::call(&socket, request)?;
    if !response.ok {
        let error = response.error.unwrap_or_else(|| "failed".into());
        eprintln!("wardgate: {error}");
        return Ok(ExitCode::FAILURE);
    }
    let data = response.data.unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(ExitCode::SUCCESS);
    }
    match request {
        Request::Status => print_status(&serde_json::from_value(data)?),
        Request::DeviceList => print!(
            "{}",
            device_table(&serde_json::from_value::<Vec<DeviceView>>(data)?)
        ),
        Request::DeviceShow { .. } => print_device(&serde_json::from_value(data)?),
        Request::DeviceAdd { id, .. } => println!("registered {id}"),
        Request::DeviceRemove { id } => println!("removed {id}; its connections are closed"),
        Request::DeviceQuarantine { id, .. } => {
            println!("quarantined {id}; its connections are closed")
        }
        Request::DeviceRelease { id } => println!("released {id}"),
        // `wardgate audit` prints these itself.
        Request::AuditTail { .. } | Request::AuditVerify => println!("{data}"),
        Request::Reload => {
            let r: crate::reload::Reloaded = serde_json::from_value(data)?;
            println!("reloaded: sha256 {} (was {})", r.digest, r.previous);
            for (device, why) in &r.rechecked {
                println!("  {device} disconnected to be judged anew: {why}");
            }
            if !r.needs_restart.is_empty() {
                println!(
                    "  changed, applied at the next start: {}",
                    r.needs_restart.join(", ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &Status) {
    let up = humantime::format_duration(Duration::from_secs(s.uptime_s));
    println!(
        "gateway   {} (site {}), wardgate {}, up {up}",
        s.gateway, s.site, s.version
    );
    println!("edge      {}", s.edge);
    println!("uplink    {}", s.uplink);
    println!(
        "devices   {} registered, {} connected, {} quarantined; {} with a broker session",
        s.devices.registered, s.devices.connected, s.devices.quarantined, s.devices.broker_sessions
    );
    println!(
        "spool     {} records, {} bytes, {} corrupt set aside, {} rejected upstream",
        s.spool.records, s.spool.bytes, s.spool.corrupt, s.spool.rejected
    );
    match &s.health {
        Some(h) if h.ready => println!("health    ready: messages are moving"),
        Some(h) => println!(
            "health    NOT READY{}: {}",
            if h.stalled { " (stalled)" } else { "" },
            h.reasons.join("; ")
        ),
        None => {}
    }
}

fn print_device(v: &DeviceView) {
    let c = &v.counters;
    let address = v.address.map_or("-".into(), |a| a.to_string());
    let source = v
        .source
        .map_or("-".into(), |s| format!("{s:?}").to_lowercase());
    let connections = if v.connections.is_empty() {
        "-".to_owned()
    } else {
        v.connections.join(", ")
    };
    let mut rows = vec![
        ("device", v.id.clone()),
        ("state", v.state().to_owned()),
        ("class", v.class.clone().unwrap_or_else(|| "-".into())),
        ("address", address),
        ("source", source),
        ("connections", connections),
    ];
    if let Some(q) = &v.quarantine {
        rows.push(("quarantined since", format!("{} (unix ms)", q.since_ms)));
        rows.push(("quarantine reason", q.reason.clone()));
    }
    rows.push(("counters since start", String::new()));
    for (name, n) in [
        ("  accepted", c.edge.accepted),
        ("  throttled", c.edge.throttled),
        ("  refused", c.edge.refused),
        ("  acl violations", c.edge.acl_violations),
        ("  other violations", c.edge.protocol_violations),
        ("  subscription limit", c.edge.subscription_limit),
        ("  evicted", c.evicted),
        ("  expired", c.expired),
        ("  spool refused", c.spool_refused),
        ("  rejected upstream", c.rejected),
    ] {
        rows.push((name, n.to_string()));
    }
    for (name, value) in rows {
        println!("{name:<22}{value}");
    }
}
