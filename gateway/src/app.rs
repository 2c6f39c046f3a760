//! Wiring: load (pure, [`Config::load`]) → build (open the data directory, start the broker,
//! load TLS, bind the edge) → run until cancelled → drain within the grace period.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{AdminError, AdminSocket, AdminState};
use crate::audit::{AuditError, AuditLog};
use crate::broker::{self, BrokerError, EmbeddedBroker};
use crate::commands::Commands;
use crate::config::Config;
use crate::edge::{Edge, EdgeError, EdgeHandle};
use crate::events::Events;
use crate::firewall::live::LiveFirewall;
use crate::ingest::Ingest;
use crate::quarantine::{Quarantine, QuarantineError, StateError};
use crate::registry::{Registry, RegistryError, SharedRegistry};
use crate::spool::{Spool, SpoolError};
use crate::topics::TopicMap;
use crate::uplink::Uplink;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Quarantine(#[from] QuarantineError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("firewall: {0}")]
    Firewall(#[from] crate::firewall::netlink::NetlinkError),
}

/// A gateway whose listeners are bound and whose broker runs, ready to serve.
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    broker: EmbeddedBroker,
    edge: Edge,
    spool: Spool,
    ingest: Ingest,
    registry: SharedRegistry,
    quarantine: std::sync::Arc<Quarantine>,
    admin: AdminSocket,
    started: std::time::Instant,
    firewall: Option<std::sync::Arc<LiveFirewall>>,
    events: Events,
    /// `[admin] metrics_listen`, bound; `None` if off or if it could not be bound.
    exporter: Option<tokio::net::TcpListener>,
    reloader: std::sync::Arc<crate::reload::Reloader>,
}

/// How often records past their `max_age` are swept out of the spool.
const EXPIRY_SWEEP: std::time::Duration = std::time::Duration::from_secs(30);

impl Gateway {
    pub async fn build(config: Config) -> Result<Gateway, AppError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.gateway.data_dir)
            .map_err(|source| AppError::DataDir {
                path: config.gateway.data_dir.clone(),
                source,
            })?;
        let started = std::time::Instant::now();
        // The one handle every part records its decisions through.
        let metrics = crate::metrics::Metrics::new(
            config
                .admin
                .metrics_per_device
                .map(|max_devices| crate::metrics::PerDevice { max_devices }),
        );
        let progress =
            std::sync::Arc::new(crate::progress::Progress::new(config.admin.stall_after));
        let events = Events::audited(
            std::sync::Arc::new(AuditLog::open(
                &config.gateway.data_dir,
                config.audit_max_records,
            )?),
            metrics,
            progress,
        );
        let state = crate::quarantine::open_state(&config.gateway.data_dir)?;
        audit_config(&config, &state, &events);
        let registry = Registry::open(&config, &state)?.shared();
        let spool = Spool::open(
            &config.gateway.data_dir,
            config.spool.clone(),
            events.clone(),
        )?;
        let broker = broker::start(&config.broker, config.max_payload(), events.clone()).await?;
        let quarantine =
            std::sync::Arc::new(Quarantine::open(&state, config.quarantine, events.clone())?);
        // The firewall is in place before the edge listens; if it cannot be, the gateway
        // does not start (and the early-boot ruleset keeps devices out).
        let firewall = match &config.firewall {
            Some(fw) => Some(LiveFirewall::start(
                fw.clone(),
                config.edge.listen.port(),
                broker.addr.port(),
                registry.clone(),
                quarantine.clone(),
                events.clone(),
            )?),
            None => None,
        };
        // The one door into the spool, for every producer.
        let ingest = Ingest::new(spool.clone(), TopicMap::of(&config), events.clone());
        let edge = Edge::bind(
            config.edge.clone(),
            ingest.clone(),
            registry.clone(),
            broker.clone(),
            quarantine.clone(),
            config.throttle_limit,
            events.clone(),
        )
        .await?;
        let admin = AdminSocket::bind(&config.admin.socket)?;
        // Metrics and health are for operators: if the address cannot be had, the gateway
        // serves devices without them, and says so.
        let exporter = match config.admin.metrics_listen {
            None => None,
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::error!(
                        event = "exporter.bind_failed",
                        %addr,
                        error = %e,
                        "metrics and health endpoint unavailable"
                    );
                    None
                }
            },
        };
        let reloader = std::sync::Arc::new(crate::reload::Reloader::new(
            config.clone(),
            state.clone(),
            registry.clone(),
            edge.handle(),
            firewall.clone(),
            events.clone(),
        ));
        Ok(Gateway {
            reloader,
            config,
            broker,
            edge,
            spool,
            ingest,
            registry,
            quarantine,
            admin,
            started,
            firewall,
            events,
            exporter,
        })
    }

    /// Reloads the configuration while running (`SIGHUP`, `wardgate reload`).
    pub fn reloader(&self) -> std::sync::Arc<crate::reload::Reloader> {
        self.reloader.clone()
    }

    /// Where `/metrics` and `/health` are served (with the OS's port if the config said 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.exporter.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The address devices connect to (with the OS's port if the config said 0).
    pub fn edge_addr(&self) -> SocketAddr {
        self.edge.local_addr().unwrap_or(self.config.edge.listen)
    }

    pub fn edge_handle(&self) -> EdgeHandle {
        self.edge.handle()
    }

    /// Serves until `shutdown` is cancelled, then waits for sessions to close, at most the
    /// configured grace period.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            event = "gateway.ready",
            gateway = %self.config.gateway.id,
            site = %self.config.gateway.site,
            edge = %self.edge_addr(),
            broker = %self.broker.addr,
            metrics = %self.metrics_addr().map_or_else(|| "off".to_owned(), |a| a.to_string()),
            devices = self.config.devices.len(),
            "wardgate ready"
        );
        // Everything a device needs is up: broker, TLS material, edge listener.
        notify_systemd(&[sd_notify::NotifyState::Ready]);
        let tracker = TaskTracker::new();
        let uplink_connected = self
            .config
            .uplink
            .as_ref()
            .map(|_| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let admin_state = AdminState {
            gateway: self.config.gateway.id.clone(),
            site: self.config.gateway.site.clone(),
            started: self.started,
            edge_addr: self.edge_addr().to_string(),
            registry: self.registry.clone(),
            quarantine: self.quarantine.clone(),
            edge: self.edge.handle(),
            spool: self.spool.clone(),
            uplink_connected: uplink_connected.clone(),
            firewall: self.firewall.clone(),
            events: self.events.clone(),
            reloader: Some(self.reloader.clone()),
        };
        tracker.spawn(self.admin.run(admin_state, shutdown.clone()));
        let sources = crate::exporter::Sources {
            events: self.events.clone(),
            progress: self.events.progress().clone(),
            edge: self.edge.handle(),
            spool: self.spool.clone(),
            registry: self.registry.clone(),
            quarantine: self.quarantine.clone(),
            firewall: self.firewall.clone(),
        };
        if self.config.uplink.is_some() {
            // Judged from the first moment: not ready until it connects.
            self.events.progress().uplink_configured();
        }
        tracker.spawn(watchdog(sources.clone(), shutdown.clone()));
        if let Some(listener) = self.exporter {
            tracker.spawn(crate::exporter::run(listener, sources, shutdown.clone()));
        }
        let modbus = if self.config.modbus.devices.is_empty() {
            crate::modbus::ModbusHandle::default()
        } else {
            let sink = crate::modbus::Sink {
                ingest: self.ingest.clone(),
                registry: self.registry.clone(),
                local: crate::modbus::local_client(&self.broker, shutdown.clone()),
                events: self.events.clone(),
            };
            crate::modbus::start(&self.config.modbus, sink, shutdown.clone(), &tracker)
        };
        match &self.config.uplink {
            Some(u) => {
                if let Some(log) = self.events.audit_log() {
                    tracker.spawn(crate::audit_stream::run(
                        log.clone(),
                        self.ingest.clone(),
                        shutdown.clone(),
                    ));
                }
                let topics = TopicMap::of(&self.config);
                // Commands from upstream: to devices, Modbus registers and the agent.
                let commands = Commands::start(
                    &self.broker,
                    topics.clone(),
                    self.registry.clone(),
                    modbus,
                    self.events.clone(),
                    shutdown.clone(),
                );
                let uplink = Uplink {
                    connected: uplink_connected.unwrap_or_default(),
                    commands,
                    config: u.clone(),
                    topics,
                    spool: self.spool.clone(),
                    events: self.events.clone(),
                };
                tracker.spawn(uplink.run(shutdown.clone()));
            }
            None => tracing::warn!(
                event = "uplink.none",
                "no [uplink] configured: records stay in the spool until they expire"
            ),
        }
        // The update agent's reports, audited and forwarded (see `updates`).
        tracker.spawn(crate::updates::run(
            &self.broker,
            self.ingest.clone(),
            self.events.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(sweep_expired(self.spool.clone(), shutdown.clone()));
        // Returns once `shutdown` is cancelled: from here on we are stopping.
        self.edge.run(shutdown, tracker.clone()).await;
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        tracker.close();
        let grace = self.config.gateway.shutdown_grace;
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                event = "gateway.drain_timeout",
                sessions = tracker.len(),
                "sessions still open after the shutdown grace period; leaving them"
            );
        }
        self.events.flush();
        if let Err(e) = self.spool.flush() {
            tracing::error!(event = "spool.flush_failed", error = %e, "final spool flush failed");
        }
        tracing::info!(event = "gateway.stopped", "wardgate stopped");
    }
}

/// How often `STATUS=` is told to systemd, and the health judged for it.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Feeds systemd's watchdog (`WatchdogSec=`) only while nothing is stalled
/// ([`crate::progress`]): a gateway that is up but stuck stops the pings and systemd
/// restarts it. Tells systemd a one-line `STATUS=` as it goes. Without a `NOTIFY_SOCKET`
/// (or a watchdog) the pings are not sent.
async fn watchdog(sources: crate::exporter::Sources, shutdown: CancellationToken) {
    let period = sd_notify::watchdog_enabled();
    // Twice per period, as sd_watchdog_enabled(3) advises.
    let every = period.map_or(STATUS_EVERY, |p| (p / 2).min(STATUS_EVERY));
    let watched = period.is_some();
    // The first verdict one period in: the edge starts accepting after this task starts.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut was_stalled = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = sources.clone();
        let Ok((health, line)) = tokio::task::spawn_blocking(move || {
            let health = s.health();
            (health.clone(), status_line(&s, &health))
        })
        .await
        else {
            continue;
        };
        if health.stalled != was_stalled {
            was_stalled = health.stalled;
            if health.stalled {
                tracing::error!(event = "gateway.stalled", reasons = ?health.reasons, "the pipeline is stuck: watchdog pings stop");
            } else {
                tracing::info!(
                    event = "gateway.unstalled",
                    "the pipeline moves again: watchdog pings resume"
                );
            }
        }
        let status = sd_notify::NotifyState::Status(&line);
        if watched && !health.stalled {
            notify_systemd(&[sd_notify::NotifyState::Watchdog, status]);
        } else {
            notify_systemd(&[status]);
        }
    }
}

/// The one line `STATUS=` and the demo show: devices, spool depth, uplink, and why not
/// ready.
pub fn status_line(s: &crate::exporter::Sources, health: &crate::progress::Health) -> String {
    let l = s.levels_light();
    let uplink = match l.uplink_connected {
        None => "no uplink",
        Some(true) => "uplink connected",
        Some(false) => "uplink down",
    };
    let mut line = format!(
        "{} devices connected, spool {} records, {uplink}",
        l.devices_connected,
        l.spool.iter().map(|(_, r, _)| r).sum::<u64>()
    );
    if !health.ready {
        line.push_str("; not ready: ");
        line.push_str(&health.reasons.join("; "));
    }
    line
}

/// Tells systemd (when it started us with `Type=notify`) about our state. Without a
/// `NOTIFY_SOCKET` this does nothing.
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(event = "gateway.notify_failed", error = %e, "sd_notify failed");
    }
}

/// Audits the configuration in force at start, and says when it differs from the last run.
fn audit_config(config: &Config, state: &sled::Db, events: &Events) {
    const KEY: &[u8] = crate::config::CONFIG_DIGEST_KEY;
    let previous = state
        .get(KEY)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    events.config_in_force(&config.summary(), &config.digest, previous.as_deref());
    crate::reload::record_digest(state, &config.digest);
}

async fn sweep_expired(spool: Spool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_SWEEP);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                spool.expire();
            }
        }
    }
}
