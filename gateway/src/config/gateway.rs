//! `[gateway]`, `[edge]`, `[broker]`, `[admin]` and `[audit]`: who the gateway is, where
//! devices connect, the embedded broker, the admin socket, and how much audit it keeps.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::diag::Validator;
use super::raw::{self, S};

pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_EDGE_MAX_CONNECTIONS: usize = 1024;
/// Port 0: the gateway picks a free loopback port at start.
pub const DEFAULT_BROKER_LISTEN: &str = "127.0.0.1:0";
pub const DEFAULT_BROKER_MAX_CONNECTIONS: usize = 1024;
/// rumqttd keeps `segment_size * segment_count` bytes per topic filter in memory; its own
/// defaults (100 MiB × 10) would exhaust a small board.
pub const DEFAULT_SEGMENT_SIZE: u64 = 1 << 20;
pub const DEFAULT_SEGMENT_COUNT: usize = 4;
/// How often refusals of unidentified peers are summarised.
pub const DEFAULT_REFUSAL_SUMMARY: Duration = Duration::from_secs(60);
/// Audit records kept (about 350 bytes each on disk): years of an ordinary ward's events.
pub const DEFAULT_AUDIT_MAX_RECORDS: usize = 200_000;
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/wardgate/admin.sock";
/// Where `GET /metrics` and `GET /health` are served unless `[admin] metrics_listen` says
/// otherwise (`"off"`: nowhere).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Devices with series of their own, with `metrics_per_device`; the rest are `_other`.
pub const DEFAULT_METRICS_MAX_DEVICES: usize = 256;
/// Where the update agent finds its credentials for the embedded broker, unless
/// `[broker] agent_credentials` says otherwise: beside the admin socket.
pub const AGENT_CREDENTIALS_FILE: &str = "broker-agent.secret";

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub id: String,
    pub site: String,
    pub data_dir: PathBuf,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub listen: SocketAddr,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: Option<PathBuf>,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// Refusals of peers without a device certificate: one audited in full per source per
    /// interval, the rest summarised at its end.
    pub refusal_summary: Duration,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// Where the update agent's broker credentials are written at each start.
    pub agent_credentials: PathBuf,
    pub max_connections: usize,
    pub segment_size: u64,
    pub segment_count: usize,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub socket: PathBuf,
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Series per device, for at most this many devices (`None`: none per device).
    pub metrics_per_device: Option<usize>,
    /// How long a stage of the pipeline may go without progress (see `progress`).
    pub stall_after: Duration,
}

impl Validator<'_> {
    pub(super) fn gateway(&mut self, raw: &Option<S<raw::RawGateway>>) -> Option<GatewayConfig> {
        let (g, span) = self.section(raw, "gateway");
        match g {
            None => None,
            Some(g) => {
                let id = self.required(&g.id, &span, "id");
                let site = self.required(&g.site, &span, "site");
                let data_dir = self.required(&g.data_dir, &span, "data_dir");
                let id = id.and_then(|s| self.name(s, "gateway id"));
                let site = site.and_then(|s| self.name(s, "site"));
                let data_dir = data_dir.map(|s| self.path(s));
                let shutdown_grace =
                    self.duration(g.shutdown_grace.as_ref(), DEFAULT_SHUTDOWN_GRACE);
                match (id, site, data_dir) {
                    (Some(id), Some(site), Some(data_dir)) => Some(GatewayConfig {
                        id,
                        site,
                        data_dir,
                        shutdown_grace,
                    }),
                    _ => None,
                }
            }
        }
    }

    pub(super) fn edge(&mut self, raw: &Option<S<raw::RawEdge>>) -> Option<EdgeConfig> {
        let (e, span) = self.section(raw, "edge");
        match e {
            None => None,
            Some(e) => {
                let listen = self.required(&e.listen, &span, "listen");
                let ca = self.required(&e.ca, &span, "ca");
                let cert = self.required(&e.cert, &span, "cert");
                let key = self.required(&e.key, &span, "key");
                let listen = listen.and_then(|l| self.socket_addr(l, "edge listen address"));
                let ca = ca.map(|p| self.path(p));
                let cert = cert.map(|p| self.path(p));
                let key = key.map(|p| self.path(p));
                let crl = e.crl.as_ref().map(|c| self.path(c));
                let handshake_timeout =
                    self.duration(e.handshake_timeout.as_ref(), DEFAULT_HANDSHAKE_TIMEOUT);
                let connect_timeout =
                    self.duration(e.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT);
                let max_connections = self.count(
                    e.max_connections.as_ref(),
                    DEFAULT_EDGE_MAX_CONNECTIONS,
                    "max_connections",
                );
                let refusal_summary =
                    self.duration(e.refusal_summary.as_ref(), DEFAULT_REFUSAL_SUMMARY);
                if refusal_summary.is_zero() {
                    if let Some(r) = &e.refusal_summary {
                        self.error(r.span(), "refusal_summary must be longer than 0s");
                    }
                }
                match (listen, ca, cert, key) {
                    (Some(listen), Some(ca), Some(cert), Some(key)) => Some(EdgeConfig {
                        listen,
                        ca,
                        cert,
                        key,
                        crl,
                        handshake_timeout,
                        connect_timeout,
                        max_connections,
                        refusal_summary,
                    }),
                    _ => None,
                }
            }
        }
    }

    pub(super) fn admin(&mut self, raw: &raw::RawAdmin) -> AdminConfig {
        let socket = match &raw.socket {
            Some(s) => self.path(s),
            None => PathBuf::from(DEFAULT_ADMIN_SOCKET),
        };
        let metrics_listen = match &raw.metrics_listen {
            Some(l) if l.get_ref() == "off" => None,
            Some(l) => self.socket_addr(l, "metrics listen address"),
            None => DEFAULT_METRICS_LISTEN.parse().ok(),
        };
        let max = self.count(
            raw.metrics_max_devices.as_ref(),
            DEFAULT_METRICS_MAX_DEVICES,
            "metrics_max_devices",
        );
        let metrics_per_device = raw
            .metrics_per_device
            .as_ref()
            .is_some_and(|b| *b.get_ref())
            .then_some(max);
        let stall_after = self.duration(
            raw.stall_after.as_ref(),
            crate::progress::DEFAULT_STALL_AFTER,
        );
        AdminConfig {
            socket,
            metrics_listen,
            metrics_per_device,
            stall_after,
        }
    }

    /// The broker; its agent credentials default to beside the admin socket.
    pub(super) fn broker(&mut self, b: &raw::RawBroker, admin: &AdminConfig) -> BrokerConfig {
        let admin_socket = &admin.socket;
        let broker_listen = match &b.listen {
            None => DEFAULT_BROKER_LISTEN.parse().ok(),
            Some(l) => {
                let addr = self.socket_addr(l, "broker listen address");
                if let Some(a) = addr.filter(|a| !a.ip().is_loopback()) {
                    self.error(
                        l.span(),
                        format!(
                            "broker listen address {a} is not a loopback address: the embedded \
                             broker must be reachable only through the edge"
                        ),
                    );
                }
                addr
            }
        };
        let segment_size = self.size(b.segment_size.as_ref(), DEFAULT_SEGMENT_SIZE);
        if segment_size < 1024 {
            if let Some(s) = &b.segment_size {
                self.error(s.span(), "segment_size must be at least 1KiB");
            }
        }
        BrokerConfig {
            listen: broker_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            agent_credentials: match &b.agent_credentials {
                Some(s) => self.path(s),
                None => admin_socket
                    .parent()
                    .unwrap_or(Path::new("/run/wardgate"))
                    .join(AGENT_CREDENTIALS_FILE),
            },
            max_connections: self.count(
                b.max_connections.as_ref(),
                DEFAULT_BROKER_MAX_CONNECTIONS,
                "max_connections",
            ),
            segment_size,
            segment_count: self.count(
                b.segment_count.as_ref(),
                DEFAULT_SEGMENT_COUNT,
                "segment_count",
            ),
        }
    }

    /// `[audit] max_records`.
    pub(super) fn audit(&mut self, a: &raw::RawAudit) -> u64 {
        let max_records = self.count(
            a.max_records.as_ref(),
            DEFAULT_AUDIT_MAX_RECORDS,
            "max_records",
        ) as u64;
        if max_records < 1000 {
            if let Some(m) = &a.max_records {
                self.error(m.span(), "max_records must be at least 1000");
            }
        }
        max_records
    }
}
