//! Configuration: one TOML file, read into [`raw`] structs and validated into [`Config`].
//!
//! Validation collects every problem it finds, each with the file, line and column of the
//! value at fault, so an engineer fixes a broken file in one pass. `wardgate check-config`
//! runs exactly [`Config::load`]. Relative paths in the file are taken relative to the
//! directory that holds the file, so a configuration and its PKI can move together.
//!
//! Defaults (every section but `[gateway]`, `[edge]`, the classes and the devices has them)
//! are the `DEFAULT_*` constants below. The commented example in `configs/wardgate.toml`
//! documents every field and is checked by a unit test.
//!
//! Tested by the unit tests below, one per kind of error, each checking its line.

pub mod raw;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::DeviceId;
use crate::policy::FilterTemplate;
use raw::{RawConfig, RawSize, S};

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
/// Where the update agent finds its credentials for the embedded broker, unless
/// `[broker] agent_credentials` says otherwise: beside the admin socket.
pub const AGENT_CREDENTIALS_FILE: &str = "broker-agent.secret";
pub const DEFAULT_MAX_PAYLOAD: u64 = 64 << 10;
/// Distinct filters a device may subscribe to while the gateway runs, unless its class says
/// otherwise. The embedded broker keeps a log for each filter it has seen until it restarts
/// (see `edge::subscriptions`), so this bounds what one device can make it hold.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 16;
/// QoS 1 and 2 PUBLISHes an MQTT 5 device may have unanswered (the CONNACK's Receive
/// Maximum), unless its class says otherwise; one more ends its session with 0x93.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 64;
/// Topic aliases an MQTT 5 device may set on one connection, unless its class says
/// otherwise; each holds a topic of up to 65,535 bytes.
pub const DEFAULT_TOPIC_ALIAS_MAXIMUM: u16 = 16;
/// How much of its rate a device may send at once, as time at that rate.
pub const DEFAULT_BURST: Duration = Duration::from_secs(1);
pub const DEFAULT_ACL_VIOLATIONS: usize = 3;
pub const DEFAULT_VIOLATION_WINDOW: Duration = Duration::from_secs(600);
/// New edge connections per second from one address, and the burst, at the firewall.
pub const DEFAULT_NEW_CONNECTIONS_PER_SEC: u32 = 5;
pub const DEFAULT_NEW_CONNECTIONS_BURST: u32 = 20;
/// Management ports (SSH) when `[firewall]` names none.
pub const DEFAULT_MANAGEMENT_PORTS: [u16; 1] = [22];

/// How long a device may stay over its rate without pause before it is quarantined.
pub const DEFAULT_THROTTLE_LIMIT: Duration = Duration::from_secs(300);
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 << 20;
pub const DEFAULT_SPOOL_DEVICE_QUOTA: u64 = 32 << 20;
pub const DEFAULT_MAX_AGE_ALARM: Duration = Duration::from_secs(30 * 86_400);
pub const DEFAULT_MAX_AGE_VITAL: Duration = Duration::from_secs(7 * 86_400);
pub const DEFAULT_MAX_AGE_ROUTINE: Duration = Duration::from_secs(86_400);
pub const DEFAULT_UPLINK_PORT: u16 = 8883;
pub const DEFAULT_TOPIC_PREFIX: &str = "wardgate";
/// Bytes of records refused upstream that the spool keeps for inspection.
pub const DEFAULT_SPOOL_MAX_REJECTED: u64 = 16 << 20;
/// Records the spool keeps at most: its in-memory index costs about 80-120 bytes a record
/// (measured by the throughput bench), so about 60 MB at this bound.
pub const DEFAULT_SPOOL_MAX_RECORDS: usize = 500_000;
/// The shortest time between two of the spool's fdatasyncs; records arriving meanwhile
/// share the next one. See `[spool] commit_interval` in the example configuration.
pub const DEFAULT_SPOOL_COMMIT_INTERVAL: Duration = Duration::from_millis(2);
/// Above this, acknowledgements would wait too long for their flush.
pub const MAX_COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// Unacknowledged upstream publishes at most. 32 capped the uplink near 12-16k msg/s on
/// loopback (measured by `wardgate-bench`); 256 sustained 20k. The upstream's Receive
/// Maximum, if lower, still rules (rumqttc keeps to it).
pub const DEFAULT_INFLIGHT: usize = 256;
/// Backlog records sent upstream per second at most after an outage. 500, the earlier
/// default, drained a 5,000-message backlog at 0.03 × a mosquitto bridge's rate; 10,000
/// drained it at 2.7-3.4 × (`wardgate-bench --scenario outage`), leaving the uplink
/// (about 20k msg/s on loopback) room for live traffic meanwhile.
pub const DEFAULT_REPLAY_RATE: u32 = 10_000;
pub const DEFAULT_UPLINK_KEEP_ALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Short enough that the uplink is back within 1.5 s (plus its handshake) of the upstream's
/// return; a fleet of N gateways costs a down upstream about N/1.1 handshakes a second.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(1500);
/// rumqttc's in-flight window is a u16.
pub const MAX_INFLIGHT: usize = 1024;
/// The largest payload MQTT can carry in one packet (remaining length limit).
pub const MQTT_MAX_PAYLOAD: u64 = 268_435_455 - 65_539;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from.
    pub source: PathBuf,
    /// SHA-256 (hex) of the configuration text, audited at start to show config changes.
    pub digest: String,
    pub gateway: GatewayConfig,
    pub edge: EdgeConfig,
    pub broker: BrokerConfig,
    pub admin: AdminConfig,
    /// Records the audit log keeps at most (the oldest tenth is pruned past it).
    pub audit_max_records: u64,
    pub classes: BTreeMap<String, DeviceClass>,
    pub devices: BTreeMap<DeviceId, DeviceEntry>,
    pub spool: crate::spool::SpoolLimits,
    /// When repeated ACL violations quarantine a device.
    pub quarantine: crate::quarantine::Threshold,
    /// A device throttled without pause for this long is quarantined; `None` never.
    pub throttle_limit: Option<Duration>,
    /// No `[uplink]`: a local-only gateway; records wait in the spool until they expire.
    pub uplink: Option<UplinkConfig>,
    /// No `[firewall]`: wardgate leaves nftables alone.
    pub firewall: Option<crate::firewall::FirewallConfig>,
    /// Legacy equipment polled over Modbus (empty without `[modbus]`).
    pub modbus: crate::modbus::ModbusConfig,
}

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub host: String,
    pub port: u16,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_id: String,
    pub topic_prefix: String,
    pub inflight: usize,
    /// Messages per second the uplink sends at most (a backlog drains at this pace).
    pub replay_rate: u32,
    pub keep_alive: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

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
}

#[derive(Debug, Clone)]
pub struct DeviceClass {
    pub name: String,
    pub publish: Vec<FilterTemplate>,
    pub subscribe: Vec<FilterTemplate>,
    pub alarm: Vec<FilterTemplate>,
    pub vital: Vec<FilterTemplate>,
    pub max_payload: u64,
    /// Distinct topic filters one device may subscribe to while the gateway runs.
    pub max_subscriptions: usize,
    /// The Receive Maximum an MQTT 5 device of the class is given.
    pub receive_maximum: u16,
    /// The Topic Alias Maximum an MQTT 5 device of the class is given (0: none).
    pub topic_alias_maximum: u16,
    pub rate: crate::policy::RateLimits,
}

#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub id: DeviceId,
    pub class: String,
    pub address: IpAddr,
}

impl Config {
    /// Largest payload any class allows: the embedded broker must carry it.
    pub fn max_payload(&self) -> u64 {
        self.classes
            .values()
            .map(|c| c.max_payload)
            .max()
            .unwrap_or(DEFAULT_MAX_PAYLOAD)
    }

    /// How device topics map upstream: under the uplink's prefix, or the default one for a
    /// gateway without an uplink (so that a spool filled offline can still be forwarded
    /// once one is configured).
    pub fn topic_map(&self) -> crate::uplink::TopicMap {
        let prefix = self
            .uplink
            .as_ref()
            .map_or(DEFAULT_TOPIC_PREFIX, |u| u.topic_prefix.as_str());
        crate::uplink::TopicMap::new(prefix, &self.gateway.site, &self.gateway.id)
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_diagnostics(path, diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

fn render_diagnostics(path: &Path, diagnostics: &[Diagnostic]) -> String {
    let mut out = format!(
        "configuration {} has {} error(s):",
        path.display(),
        diagnostics.len()
    );
    for d in diagnostics {
        out.push_str(&format!(
            "\n{}:{}:{}: {}",
            path.display(),
            d.line,
            d.column,
            d.message
        ));
    }
    out
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    /// Reads and validates the file at `path`. Relative paths in it are taken from the
    /// directory that really holds it: through a symbolic link (the appliance links
    /// `/etc/wardgate/wardgate.toml` to the site's copy on its data partition), from the
    /// link's target.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        Self::parse(&text, &real)
    }

    /// Validates `text` as if read from `path` (which anchors relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut v = Validator {
            text,
            base: path.parent().map(Path::to_owned).unwrap_or_default(),
            diagnostics: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                v.error(e.span().unwrap_or(0..0), e.message().to_owned());
                return Err(v.finish(path));
            }
        };
        let config = v.validate(raw, path);
        if v.diagnostics.is_empty() {
            if let Some(mut config) = config {
                let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
                config.digest = hex::encode(d.as_ref());
                return Ok(config);
            }
        }
        Err(v.finish(path))
    }
}

struct Validator<'a> {
    text: &'a str,
    base: PathBuf,
    diagnostics: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn finish(mut self, path: &Path) -> ConfigError {
        self.diagnostics.sort_by_key(|d| (d.line, d.column));
        ConfigError::Invalid {
            path: path.to_owned(),
            diagnostics: self.diagnostics,
        }
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.diagnostics.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }

    /// Records the error of `r` at `span` and returns its value, if any.
    fn check<T>(&mut self, span: Range<usize>, r: Result<T, String>) -> Option<T> {
        r.map_err(|m| self.error(span, m)).ok()
    }

    fn path(&mut self, s: &S<String>) -> PathBuf {
        let p = Path::new(s.get_ref());
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    fn duration(&mut self, s: Option<&S<String>>, default: Duration) -> Duration {
        match s {
            None => default,
            Some(s) => {
                let r = units::parse_duration(s.get_ref()).and_then(|d| {
                    if d.is_zero() {
                        Err("duration must be greater than zero".to_owned())
                    } else {
                        Ok(d)
                    }
                });
                self.check(s.span(), r).unwrap_or(default)
            }
        }
    }

    fn size(&mut self, s: Option<&S<RawSize>>, default: u64) -> u64 {
        match s {
            None => default,
            Some(s) => {
                let r = match s.get_ref() {
                    RawSize::Bytes(n) => Ok(*n),
                    RawSize::Text(t) => units::parse_size(t),
                };
                self.check(s.span(), r).unwrap_or(default)
            }
        }
    }

    /// A TCP or UDP port, 1..=65535.
    fn port(&mut self, p: &S<i64>) -> Option<u16> {
        let r = u16::try_from(*p.get_ref())
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| "port must be between 1 and 65535".to_owned());
        self.check(p.span(), r)
    }

    fn count(&mut self, s: Option<&S<i64>>, default: usize, what: &str) -> usize {
        match s {
            None => default,
            Some(s) => {
                let n = *s.get_ref();
                let r = if n < 1 {
                    Err(format!("{what} must be at least 1"))
                } else {
                    usize::try_from(n).map_err(|_| format!("{what} is too large"))
                };
                self.check(s.span(), r).unwrap_or(default)
            }
        }
    }

    /// A number between `min` and 65,535 (MQTT's two-byte limits).
    fn u16_in(&mut self, s: Option<&S<i64>>, default: u16, min: u16, what: &str) -> u16 {
        let Some(s) = s else { return default };
        let n = *s.get_ref();
        let r = u16::try_from(n)
            .ok()
            .filter(|v| *v >= min)
            .ok_or_else(|| format!("{what} must be between {min} and 65535"));
        self.check(s.span(), r).unwrap_or(default)
    }

    fn socket_addr(&mut self, s: &S<String>, what: &str) -> Option<SocketAddr> {
        let r = s.get_ref().parse::<SocketAddr>().map_err(|_| {
            format!(
                "{what} {:?} is not an address with a port, e.g. \"0.0.0.0:8883\" or \"[::]:8883\"",
                s.get_ref()
            )
        });
        self.check(s.span(), r)
    }

    fn name(&mut self, s: &S<String>, what: &str) -> Option<String> {
        let r = DeviceId::parse(s.get_ref())
            .map(|_| s.get_ref().clone())
            .map_err(|e| format!("{what}: {e}").replace("device id", "name"));
        self.check(s.span(), r)
    }

    /// The value of a required field, or an error at its section if it is missing.
    fn required<'r>(
        &mut self,
        field: &'r Option<S<String>>,
        section: &Range<usize>,
        name: &str,
    ) -> Option<&'r S<String>> {
        if field.is_none() {
            self.error(section.clone(), format!("missing field `{name}`"));
        }
        field.as_ref()
    }

    fn section<'r, T>(&mut self, s: &'r Option<S<T>>, name: &str) -> (Option<&'r T>, Range<usize>) {
        match s {
            Some(s) => (Some(s.get_ref()), s.span()),
            None => {
                self.error(0..0, format!("missing section [{name}]"));
                (None, 0..0)
            }
        }
    }

    fn validate(&mut self, raw: RawConfig, path: &Path) -> Option<Config> {
        let (g, span) = self.section(&raw.gateway, "gateway");
        let gateway = match g {
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
        };

        let (e, span) = self.section(&raw.edge, "edge");
        let edge = match e {
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
        };

        let admin_socket = match &raw.admin.socket {
            Some(s) => self.path(s),
            None => PathBuf::from(DEFAULT_ADMIN_SOCKET),
        };
        let b = &raw.broker;
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
        let broker = BrokerConfig {
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
        };

        let admin = AdminConfig {
            socket: admin_socket,
        };
        let audit_max_records = self.count(
            raw.audit.max_records.as_ref(),
            DEFAULT_AUDIT_MAX_RECORDS,
            "max_records",
        ) as u64;
        if audit_max_records < 1000 {
            if let Some(m) = &raw.audit.max_records {
                self.error(m.span(), "max_records must be at least 1000");
            }
        }

        let mut classes = BTreeMap::new();
        for c in &raw.device_class {
            let span = c.span();
            let c = c.get_ref();
            let name = self.required(&c.name, &span, "name");
            let Some(name_field) = name else { continue };
            let Some(name) = self.name(name_field, "device class name") else {
                continue;
            };
            let publish = self.acl_templates(&c.publish);
            let subscribe = self.acl_templates(&c.subscribe);
            let alarm = self.templates(&c.alarm);
            let vital = self.templates(&c.vital);
            let max_payload = self.size(c.max_payload.as_ref(), DEFAULT_MAX_PAYLOAD);
            if let Some(s) = &c.max_payload {
                if max_payload == 0 || max_payload > MQTT_MAX_PAYLOAD {
                    self.error(
                        s.span(),
                        format!("max_payload must be between 1 byte and {MQTT_MAX_PAYLOAD} bytes"),
                    );
                }
            }
            let max_subscriptions = self.count(
                c.max_subscriptions.as_ref(),
                DEFAULT_MAX_SUBSCRIPTIONS,
                "max_subscriptions",
            );
            let receive_maximum = self.u16_in(
                c.receive_maximum.as_ref(),
                DEFAULT_RECEIVE_MAXIMUM,
                1,
                "receive_maximum",
            );
            let topic_alias_maximum = self.u16_in(
                c.topic_alias_maximum.as_ref(),
                DEFAULT_TOPIC_ALIAS_MAXIMUM,
                0,
                "topic_alias_maximum",
            );
            let messages_per_sec = c
                .messages_per_sec
                .as_ref()
                .map(|m| self.count(Some(m), 1, "messages_per_sec"));
            let bytes_per_sec = c.bytes_per_sec.as_ref().map(|b| {
                let n = self.size(Some(b), 1);
                if n == 0 {
                    self.error(b.span(), "bytes_per_sec must be at least 1 byte");
                }
                n
            });
            #[allow(clippy::cast_precision_loss)]
            let rate = crate::policy::RateLimits {
                messages_per_sec: messages_per_sec.map(|m| m as f64),
                bytes_per_sec: bytes_per_sec.map(|b| b as f64),
                burst: self.duration(c.burst.as_ref(), DEFAULT_BURST),
            };
            let class = DeviceClass {
                rate,
                name: name.clone(),
                publish,
                subscribe,
                alarm,
                vital,
                max_payload,
                max_subscriptions,
                receive_maximum,
                topic_alias_maximum,
            };
            if classes.insert(name.clone(), class).is_some() {
                self.error(
                    name_field.span(),
                    format!("device class {name:?} is defined twice"),
                );
            }
        }

        let mut devices: BTreeMap<DeviceId, DeviceEntry> = BTreeMap::new();
        for d in &raw.device {
            let span = d.span();
            let d = d.get_ref();
            let id_field = self.required(&d.id, &span, "id");
            let class = self.required(&d.class, &span, "class");
            let address = self.required(&d.address, &span, "address");
            let id = id_field.and_then(|f| {
                let r = DeviceId::parse(f.get_ref()).map_err(|e| e.to_string());
                self.check(f.span(), r)
            });
            if let Some(class) = class {
                if !classes.contains_key(class.get_ref()) {
                    self.error(
                        class.span(),
                        format!("unknown device class {:?}", class.get_ref()),
                    );
                }
            }
            let address = address.and_then(|a| {
                let r = a
                    .get_ref()
                    .parse::<IpAddr>()
                    .map_err(|_| format!("device address {:?} is not an IP address", a.get_ref()));
                self.check(a.span(), r)
            });
            let (Some(id_field), Some(id), Some(class), Some(address)) =
                (id_field, id, class, address)
            else {
                continue;
            };
            let entry = DeviceEntry {
                id: id.clone(),
                class: class.get_ref().clone(),
                address,
            };
            if devices.insert(id.clone(), entry).is_some() {
                self.error(id_field.span(), format!("device {id} is registered twice"));
            }
        }

        let spool = self.spool(&raw.spool);
        let quarantine = crate::quarantine::Threshold {
            violations: self.count(
                raw.policy.acl_violations.as_ref(),
                DEFAULT_ACL_VIOLATIONS,
                "acl_violations",
            ),
            window: self.duration(
                raw.policy.violation_window.as_ref(),
                DEFAULT_VIOLATION_WINDOW,
            ),
        };
        // "0s" turns the hard limit off; any other value must parse as a duration.
        let throttle_limit = match &raw.policy.throttle_limit {
            None => Some(DEFAULT_THROTTLE_LIMIT),
            Some(s) => {
                let r = units::parse_duration(s.get_ref()).map(|d| (!d.is_zero()).then_some(d));
                self.check(s.span(), r)
                    .unwrap_or(Some(DEFAULT_THROTTLE_LIMIT))
            }
        };
        let uplink = raw
            .uplink
            .as_ref()
            .and_then(|u| self.uplink(u, gateway.as_ref()));
        let modbus = match &raw.modbus {
            Some(m) => self.modbus(m, &devices, &classes),
            None => crate::modbus::ModbusConfig::default(),
        };
        let firewall = raw.firewall.as_ref().and_then(|f| {
            let span = f.span();
            let fixed = |a: Option<SocketAddr>| a.is_some_and(|a| a.port() != 0);
            if !fixed(Some(broker.listen)) {
                self.error(
                    span.clone(),
                    "the firewall names the embedded broker's port: give [broker] listen a \
                     fixed port (e.g. \"127.0.0.1:1883\")",
                );
            }
            if edge.as_ref().is_some_and(|e| e.listen.port() == 0) {
                self.error(
                    span.clone(),
                    "the firewall names the edge port: give [edge] listen a fixed port",
                );
            }
            self.firewall(f)
        });

        if self.diagnostics.is_empty() {
            Some(Config {
                spool,
                quarantine,
                throttle_limit,
                uplink: uplink.flatten(),
                firewall,
                modbus,
                source: path.to_owned(),
                digest: String::new(),
                gateway: gateway?,
                edge: edge?,
                broker,
                admin,
                audit_max_records,
                classes,
                devices,
            })
        } else {
            None
        }
    }

    fn spool(&mut self, s: &raw::RawSpool) -> crate::spool::SpoolLimits {
        let max_bytes = self.size(s.max_bytes.as_ref(), DEFAULT_SPOOL_MAX_BYTES);
        let device_quota = self.size(s.device_quota.as_ref(), DEFAULT_SPOOL_DEVICE_QUOTA);
        // sled's cache, before the spool became a log: still read, so that a file naming
        // it loads, and checked, but it sizes nothing now.
        let _ = self.size(s.cache.as_ref(), 0);
        let max_rejected = self.size(s.max_rejected.as_ref(), DEFAULT_SPOOL_MAX_REJECTED);
        let max_records = self.count(
            s.max_records.as_ref(),
            DEFAULT_SPOOL_MAX_RECORDS,
            "max_records",
        );
        if let Some(q) = &s.device_quota {
            if device_quota > max_bytes || device_quota == 0 {
                self.error(
                    q.span(),
                    "device_quota must be between 1 byte and max_bytes",
                );
            }
        }
        if let Some(m) = &s.max_bytes {
            if max_bytes < 64 * 1024 {
                self.error(m.span(), "spool max_bytes must be at least 64KiB");
            }
        }
        // "0s" is allowed: each flush then starts as soon as the previous one is done.
        let commit_interval = match &s.commit_interval {
            None => DEFAULT_SPOOL_COMMIT_INTERVAL,
            Some(c) => {
                let r = units::parse_duration(c.get_ref());
                self.check(c.span(), r)
                    .unwrap_or(DEFAULT_SPOOL_COMMIT_INTERVAL)
            }
        };
        if let (Some(c), true) = (&s.commit_interval, commit_interval > MAX_COMMIT_INTERVAL) {
            self.error(
                c.span(),
                format!(
                    "commit_interval must be at most {}: every acknowledgement waits for it",
                    humantime::format_duration(MAX_COMMIT_INTERVAL)
                ),
            );
        }
        let a = &s.max_age;
        crate::spool::SpoolLimits {
            max_bytes,
            device_quota,
            max_rejected,
            max_records,
            commit_interval,
            max_age: [
                self.duration(a.alarm.as_ref(), DEFAULT_MAX_AGE_ALARM),
                self.duration(a.vital.as_ref(), DEFAULT_MAX_AGE_VITAL),
                self.duration(a.routine.as_ref(), DEFAULT_MAX_AGE_ROUTINE),
            ],
        }
    }

    /// `Some(None)` when the section has errors (already reported).
    fn int_in(&mut self, s: &S<i64>, min: i64, max: i64, what: &str) -> Option<i64> {
        let n = *s.get_ref();
        let r = if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{what} must be between {min} and {max}"))
        };
        self.check(s.span(), r)
    }

    fn parsed<T: std::str::FromStr<Err = String>>(&mut self, s: &S<String>) -> Option<T> {
        let r = s.get_ref().parse::<T>();
        self.check(s.span(), r)
    }

    fn modbus(
        &mut self,
        m: &S<raw::RawModbus>,
        devices: &BTreeMap<DeviceId, DeviceEntry>,
        classes: &BTreeMap<String, DeviceClass>,
    ) -> crate::modbus::ModbusConfig {
        use crate::modbus::{Bus, BusKind, ModbusDevice, Parity, Register};
        let m = m.get_ref();
        let mut buses: Vec<Bus> = Vec::new();
        for b in &m.bus {
            let span = b.span();
            let b = b.get_ref();
            let name = self
                .required(&b.name, &span, "name")
                .and_then(|n| self.name(n, "bus name"));
            let timeout = self.duration(b.timeout.as_ref(), crate::modbus::DEFAULT_TIMEOUT);
            let kind = match (&b.tcp, &b.serial) {
                (Some(t), None) => {
                    let addr = t.get_ref();
                    let ok = addr.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0)
                    });
                    if ok {
                        Some(BusKind::Tcp(addr.clone()))
                    } else {
                        self.error(t.span(), format!("tcp {addr:?}: write \"HOST:PORT\""));
                        None
                    }
                }
                (None, Some(path)) => {
                    let baud = b
                        .baud
                        .as_ref()
                        .map_or(Some(i64::from(crate::modbus::DEFAULT_BAUD)), |x| {
                            self.int_in(x, 300, 4_000_000, "baud")
                        });
                    let parity = match &b.parity {
                        None => Some(Parity::None),
                        Some(p) => {
                            let r = match p.get_ref().as_str() {
                                "none" => Ok(Parity::None),
                                "even" => Ok(Parity::Even),
                                "odd" => Ok(Parity::Odd),
                                other => Err(format!("parity {other:?}: write none, even or odd")),
                            };
                            self.check(p.span(), r)
                        }
                    };
                    let stop_bits = b
                        .stop_bits
                        .as_ref()
                        .map_or(Some(1), |x| self.int_in(x, 1, 2, "stop_bits"));
                    let data_bits = b
                        .data_bits
                        .as_ref()
                        .map_or(Some(8), |x| self.int_in(x, 7, 8, "data_bits"));
                    match (baud, parity, stop_bits, data_bits) {
                        (Some(baud), Some(parity), Some(stop_bits), Some(data_bits)) => {
                            Some(BusKind::Rtu {
                                path: self.path(path),
                                baud: u32::try_from(baud).unwrap_or(crate::modbus::DEFAULT_BAUD),
                                parity,
                                stop_bits: u8::try_from(stop_bits).unwrap_or(1),
                                data_bits: u8::try_from(data_bits).unwrap_or(8),
                            })
                        }
                        _ => None,
                    }
                }
                _ => {
                    self.error(span.clone(), "a bus has exactly one of `tcp` or `serial`");
                    None
                }
            };
            if let (Some(name), Some(kind)) = (name, kind) {
                if buses.iter().any(|x| x.name == name) {
                    self.error(span, format!("bus {name} is defined twice"));
                } else {
                    buses.push(Bus {
                        name,
                        kind,
                        timeout,
                    });
                }
            }
        }
        let mut out = Vec::new();
        for d in &m.device {
            let span = d.span();
            let d = d.get_ref();
            let id = self.required(&d.id, &span, "id").and_then(|i| {
                let r = DeviceId::parse(i.get_ref())
                    .map_err(|e| e.to_string())
                    .and_then(|id| {
                        if devices.contains_key(&id) {
                            Ok(id)
                        } else {
                            Err(format!(
                                "modbus device {id} is not a registered [[device]] (its class decides its topics)"
                            ))
                        }
                    });
                self.check(i.span(), r)
            });
            let bus = self.required(&d.bus, &span, "bus").and_then(|b| {
                let found = buses.iter().find(|x| &x.name == b.get_ref());
                match found {
                    Some(x) => Some(x.clone()),
                    None => {
                        self.error(b.span(), format!("unknown bus {:?}", b.get_ref()));
                        None
                    }
                }
            });
            let rtu = matches!(bus.as_ref().map(|b| &b.kind), Some(BusKind::Rtu { .. }));
            let unit = match &d.unit {
                None => {
                    self.error(span.clone(), "missing field `unit`");
                    None
                }
                Some(u) if rtu => self.int_in(u, 1, 247, "unit (on a serial bus)"),
                Some(u) => self.int_in(u, 0, 255, "unit"),
            };
            let interval = self.duration(d.interval.as_ref(), crate::modbus::DEFAULT_INTERVAL);
            let heartbeat = self.duration(d.heartbeat.as_ref(), crate::modbus::DEFAULT_HEARTBEAT);
            let mut registers: Vec<Register> = Vec::new();
            for r in &d.register {
                let rspan = r.span();
                let r = r.get_ref();
                let name = self
                    .required(&r.name, &rspan, "name")
                    .and_then(|n| self.name(n, "register name"));
                let function = self
                    .required(&r.function, &rspan, "function")
                    .and_then(|f| self.parsed::<crate::modbus::Function>(f));
                let address = match &r.address {
                    None => {
                        self.error(rspan.clone(), "missing field `address`");
                        None
                    }
                    Some(a) => self.int_in(a, 0, 65535, "address"),
                };
                let value_type = match (&r.value_type, function) {
                    (None, Some(f)) if f.is_bits() => Some(crate::modbus::ValueType::Bool),
                    (None, _) => Some(crate::modbus::ValueType::U16),
                    (Some(t), _) => self.parsed::<crate::modbus::ValueType>(t),
                };
                let word_order = match &r.word_order {
                    None => Some(crate::modbus::WordOrder::Big),
                    Some(w) => self.parsed::<crate::modbus::WordOrder>(w),
                };
                let (Some(name), Some(function), Some(address), Some(value_type), Some(word_order)) =
                    (name, function, address, value_type, word_order)
                else {
                    continue;
                };
                let is_bool = value_type == crate::modbus::ValueType::Bool;
                if function.is_bits() != is_bool {
                    self.error(
                        rspan.clone(),
                        format!("register {name}: coils and discrete inputs are bool, registers are numbers"),
                    );
                    continue;
                }
                let write = match (&r.write_min, &r.write_max) {
                    (None, None) => None,
                    (Some(lo), Some(hi)) => {
                        if !matches!(
                            function,
                            crate::modbus::Function::Holding | crate::modbus::Function::Coil
                        ) {
                            self.error(lo.span(), format!("register {name}: only holding registers and coils can be written"));
                        }
                        if lo.get_ref() > hi.get_ref() {
                            self.error(
                                hi.span(),
                                format!("register {name}: write_max is below write_min"),
                            );
                        }
                        Some((*lo.get_ref(), *hi.get_ref()))
                    }
                    _ => {
                        self.error(rspan.clone(), format!("register {name}: a writable register needs both write_min and write_max"));
                        None
                    }
                };
                let scale = r.scale.as_ref().map_or(1.0, |x| *x.get_ref());
                if scale == 0.0 {
                    if let Some(x) = &r.scale {
                        self.error(x.span(), "scale must not be zero");
                    }
                }
                let reg = Register {
                    address: u16::try_from(address).unwrap_or(0),
                    name: name.clone(),
                    function,
                    value_type,
                    word_order,
                    scale,
                    offset: r.offset.as_ref().map_or(0.0, |x| *x.get_ref()),
                    unit: r.unit.as_ref().map(|u| u.get_ref().clone()),
                    deadband: r.deadband.as_ref().map_or(0.0, |x| x.get_ref().abs()),
                    write,
                };
                if reg.span().end > 65536 {
                    self.error(
                        rspan.clone(),
                        format!("register {name} runs past address 65535"),
                    );
                    continue;
                }
                if registers.iter().any(|x| x.name == name) {
                    self.error(rspan.clone(), format!("register {name} is defined twice"));
                    continue;
                }
                if let Some(other) = registers.iter().find(|x| {
                    x.function == function
                        && x.span().start < reg.span().end
                        && reg.span().start < x.span().end
                }) {
                    self.error(
                        rspan.clone(),
                        format!(
                            "register {name} overlaps register {} in the same table",
                            other.name
                        ),
                    );
                    continue;
                }
                // Its values are published under its class's policy: a topic the class may
                // not publish is a configuration error, not a denial at every heartbeat.
                let acl = id.as_ref().and_then(|id| {
                    let class = classes.get(&devices.get(id)?.class)?;
                    Some(crate::policy::Acl::for_device(
                        id,
                        &class.publish,
                        &class.subscribe,
                    ))
                });
                if let (Some(acl), Some(id)) = (acl, id.as_ref()) {
                    let topic = format!("ward/{id}/modbus/{name}");
                    if !acl.may_publish(&topic) {
                        self.error(
                            rspan.clone(),
                            format!("register {name}: the class of {id} may not publish {topic}"),
                        );
                        continue;
                    }
                }
                registers.push(reg);
            }
            if d.register.is_empty() {
                self.error(
                    span.clone(),
                    "a modbus device needs at least one [[modbus.device.register]]",
                );
            }
            if let (Some(id), Some(bus), Some(unit)) = (id, bus, unit) {
                if out.iter().any(|x: &ModbusDevice| x.id == id) {
                    self.error(span, format!("modbus device {id} is defined twice"));
                    continue;
                }
                out.push(ModbusDevice {
                    id,
                    bus: bus.name,
                    unit: u8::try_from(unit).unwrap_or(1),
                    interval,
                    heartbeat,
                    registers,
                });
            }
        }
        crate::modbus::ModbusConfig {
            buses,
            devices: out,
        }
    }

    fn firewall(&mut self, f: &S<raw::RawFirewall>) -> Option<crate::firewall::FirewallConfig> {
        use crate::firewall::{Cidr, Forward, Proto};
        let span = f.span();
        let f = f.get_ref();
        let mut ok = true;
        let mut device_interfaces = Vec::new();
        match &f.device_interfaces {
            None => {
                self.error(span.clone(), "missing field `device_interfaces`");
                ok = false;
            }
            Some(list) if list.get_ref().is_empty() => {
                self.error(list.span(), "name at least one device interface");
                ok = false;
            }
            Some(list) => {
                for i in list.get_ref() {
                    let name = i.get_ref();
                    let valid = !name.is_empty()
                        && name.len() < 16
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                    if valid {
                        device_interfaces.push(name.clone());
                    } else {
                        self.error(i.span(), format!("{name:?} is not an interface name"));
                        ok = false;
                    }
                }
            }
        }
        let mut management_networks = Vec::new();
        for n in &f.management_networks {
            match n.get_ref().parse::<Cidr>() {
                Ok(c) => management_networks.push(c),
                Err(e) => {
                    self.error(n.span(), e);
                    ok = false;
                }
            }
        }
        let management_ports = match &f.management_ports {
            None => Some(DEFAULT_MANAGEMENT_PORTS.to_vec()),
            Some(ports) => ports.iter().map(|p| self.port(p)).collect(),
        };
        let mut forward = Vec::new();
        for fw in &f.forward {
            let fspan = fw.span();
            let fw = fw.get_ref();
            let name = self
                .required(&fw.name, &fspan, "name")
                .and_then(|n| self.name(n, "forward name"));
            let network = self
                .required(&fw.network, &fspan, "network")
                .and_then(|n| self.check(n.span(), n.get_ref().parse::<Cidr>()));
            let protocol = match &fw.protocol {
                None => Some(Proto::Tcp),
                Some(p) => {
                    let r = match p.get_ref().as_str() {
                        "tcp" => Ok(Proto::Tcp),
                        "udp" => Ok(Proto::Udp),
                        other => Err(format!("protocol {other:?}: write \"tcp\" or \"udp\"")),
                    };
                    self.check(p.span(), r)
                }
            };
            let port = match &fw.port {
                None => {
                    self.error(fspan.clone(), "missing field `port`");
                    None
                }
                Some(p) => self.port(p),
            };
            match (name, network, protocol, port) {
                (Some(name), Some(network), Some(protocol), Some(port)) => forward.push(Forward {
                    name,
                    network,
                    protocol,
                    port,
                }),
                _ => ok = false,
            }
        }
        let rate = |v: &mut Self, s: Option<&S<i64>>, default: u32, what: &str| {
            let n = v.count(s, default as usize, what);
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        let new_connections_per_sec = rate(
            self,
            f.new_connections_per_sec.as_ref(),
            DEFAULT_NEW_CONNECTIONS_PER_SEC,
            "new_connections_per_sec",
        );
        let new_connections_burst = rate(
            self,
            f.new_connections_burst.as_ref(),
            DEFAULT_NEW_CONNECTIONS_BURST,
            "new_connections_burst",
        );
        let management_ports = management_ports?;
        ok.then_some(crate::firewall::FirewallConfig {
            device_interfaces,
            management_networks,
            management_ports,
            new_connections_per_sec,
            new_connections_burst,
            forward,
        })
    }

    fn uplink(
        &mut self,
        u: &S<raw::RawUplink>,
        gateway: Option<&GatewayConfig>,
    ) -> Option<Option<UplinkConfig>> {
        let span = u.span();
        let u = u.get_ref();
        let host = self
            .required(&u.host, &span, "host")
            .map(|h| h.get_ref().clone());
        let ca = self.required(&u.ca, &span, "ca").map(|p| self.path(p));
        let cert = self.required(&u.cert, &span, "cert").map(|p| self.path(p));
        let key = self.required(&u.key, &span, "key").map(|p| self.path(p));
        let port = match &u.port {
            None => Some(DEFAULT_UPLINK_PORT),
            Some(p) => self.port(p),
        };
        let client_id = match &u.client_id {
            Some(c) => self.name(c, "uplink client id"),
            None => gateway.map(|g| g.id.clone()),
        };
        let topic_prefix = match &u.topic_prefix {
            None => Some(DEFAULT_TOPIC_PREFIX.to_owned()),
            Some(t) => {
                let r = crate::policy::acl::validate_topic_name(t.get_ref())
                    .map(|_| t.get_ref().trim_end_matches('/').to_owned())
                    .map_err(|e| format!("topic_prefix: {e}"));
                self.check(t.span(), r)
            }
        };
        let inflight = self.count(u.inflight.as_ref(), DEFAULT_INFLIGHT, "inflight");
        if let Some(i) = &u.inflight {
            if inflight > MAX_INFLIGHT {
                self.error(i.span(), format!("inflight must be at most {MAX_INFLIGHT}"));
            }
        }
        let replay_rate = self.count(
            u.replay_rate.as_ref(),
            DEFAULT_REPLAY_RATE as usize,
            "replay_rate",
        );
        let keep_alive = self.duration(u.keep_alive.as_ref(), DEFAULT_UPLINK_KEEP_ALIVE);
        let backoff_min = self.duration(u.backoff_min.as_ref(), DEFAULT_BACKOFF_MIN);
        let backoff_max = self.duration(u.backoff_max.as_ref(), DEFAULT_BACKOFF_MAX);
        if let (Some(b), true) = (&u.backoff_max, backoff_max < backoff_min) {
            self.error(b.span(), "backoff_max must not be below backoff_min");
        }
        Some(match (host, port, ca, cert, key, client_id, topic_prefix) {
            (
                Some(host),
                Some(port),
                Some(ca),
                Some(cert),
                Some(key),
                Some(client_id),
                Some(topic_prefix),
            ) => Some(UplinkConfig {
                host,
                port,
                ca,
                cert,
                key,
                client_id,
                topic_prefix,
                inflight,
                replay_rate: u32::try_from(replay_rate).unwrap_or(u32::MAX),
                keep_alive,
                backoff_min,
                backoff_max,
            }),
            _ => None,
        })
    }

    fn templates(&mut self, list: &[S<String>]) -> Vec<FilterTemplate> {
        list.iter()
            .filter_map(|t| {
                let r = FilterTemplate::parse(t.get_ref())
                    .map_err(|e| format!("topic filter {:?}: {e}", t.get_ref()));
                self.check(t.span(), r)
            })
            .collect()
    }

    /// Templates that grant access: as [`Self::templates`], and none may reach the
    /// gateway's own topic space (`_gateway/…`, where the update agent reports and takes
    /// "check now, reboot now" commands) — so the first level must be a name (or
    /// `{device}`): not empty (`/#`), not a wildcard, and not beginning with `_`.
    fn acl_templates(&mut self, list: &[S<String>]) -> Vec<FilterTemplate> {
        for t in list {
            let first = t.get_ref().split('/').next().unwrap_or_default();
            if first.is_empty() || first == "+" || first == "#" || first.starts_with('_') {
                let r: Result<(), String> = Err(format!(
                    "topic filter {:?}: its first level must be a name (not empty, not a \
                     wildcard, not starting with '_'): the `_gateway/` topics are the \
                     gateway's own",
                    t.get_ref()
                ));
                self.check(t.span(), r);
            }
        }
        self.templates(list)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid configuration, for tests here and in other modules.
    pub(crate) const MINIMAL: &str = r#"
[gateway]
id = "gw-1"
site = "st-mary"
data_dir = "/var/lib/wardgate"

[edge]
listen = "0.0.0.0:8883"
ca = "pki/ca.pem"
cert = "pki/server.pem"
key = "pki/server.key"

[[device_class]]
name = "pump"
publish = ["ward/{device}/#"]

[[device]]
id = "pump-1"
class = "pump"
address = "10.0.0.5"
"#;

    fn errors(text: &str) -> Vec<Diagnostic> {
        match Config::parse(text, Path::new("/etc/wardgate/wardgate.toml")) {
            Ok(_) => panic!("expected errors"),
            Err(ConfigError::Invalid { diagnostics, .. }) => diagnostics,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_class_filter_must_start_with_a_name_not_an_empty_level() {
        let text = MINIMAL.replace(
            "publish = [\"ward/{device}/#\"]",
            "publish = [\"/#\", \"ward/{device}/#\"]\nsubscribe = [\"/ward/{device}\"]",
        );
        let d = errors(&text);
        assert_eq!(d.len(), 2, "{d:?}");
        for (diag, filter) in d.iter().zip(["\"/#\"", "\"/ward/{device}\""]) {
            assert!(diag.message.contains(filter), "{diag:?}");
            assert!(diag.message.contains("must be a name"), "{diag:?}");
        }
    }

    #[test]
    fn no_class_may_reach_the_gateways_own_topics() {
        let text = MINIMAL.replace(
            "publish = [\"ward/{device}/#\"]",
            "publish = [\"#\", \"ward/{device}/#\"]\nsubscribe = [\"_gateway/cmd/#\", \"+/alarm\"]",
        );
        let d = errors(&text);
        assert_eq!(d.len(), 3, "{d:?}");
        for (diag, filter) in d.iter().zip(["\"#\"", "\"_gateway/cmd/#\"", "\"+/alarm\""]) {
            assert!(diag.message.contains(filter), "{diag:?}");
            assert!(diag.message.contains("the gateway's own"), "{diag:?}");
        }
        assert!(d[0].line < d[1].line);
    }

    #[test]
    fn relative_paths_are_taken_from_where_a_linked_file_really_is() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("data");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(site.join("wardgate.toml"), MINIMAL).unwrap();
        std::os::unix::fs::symlink(site.join("wardgate.toml"), etc.join("wardgate.toml")).unwrap();
        let c = Config::load(&etc.join("wardgate.toml")).unwrap();
        assert_eq!(
            c.edge.ca,
            std::fs::canonicalize(&site).unwrap().join("pki/ca.pem")
        );
    }

    #[test]
    fn mqtt5_limits_of_a_class_are_two_byte_numbers_with_safe_defaults() {
        let c = Config::parse(MINIMAL, Path::new("/etc/w.toml")).unwrap();
        assert_eq!(c.classes["pump"].receive_maximum, DEFAULT_RECEIVE_MAXIMUM);
        assert_eq!(
            c.classes["pump"].topic_alias_maximum,
            DEFAULT_TOPIC_ALIAS_MAXIMUM
        );
        let set = |lines: &str| {
            MINIMAL.replace(
                "publish = [\"ward/{device}/#\"]",
                &format!("publish = [\"ward/{{device}}/#\"]\n{lines}"),
            )
        };
        let c = Config::parse(
            &set("receive_maximum = 8\ntopic_alias_maximum = 0"),
            Path::new("/etc/w.toml"),
        )
        .unwrap();
        assert_eq!(c.classes["pump"].receive_maximum, 8);
        assert_eq!(c.classes["pump"].topic_alias_maximum, 0);
        let d = errors(&set("receive_maximum = 0\ntopic_alias_maximum = 65536"));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0]
            .message
            .contains("receive_maximum must be between 1 and 65535"));
        assert!(d[1]
            .message
            .contains("topic_alias_maximum must be between 0 and 65535"));
    }

    #[test]
    fn commit_interval_is_a_duration_of_at_most_a_tenth_of_a_second() {
        let c = Config::parse(MINIMAL, Path::new("/etc/w.toml")).unwrap();
        assert_eq!(c.spool.commit_interval, DEFAULT_SPOOL_COMMIT_INTERVAL);
        let text = format!("{MINIMAL}\n[spool]\ncommit_interval = \"0s\"\n");
        let c = Config::parse(&text, Path::new("/etc/w.toml")).unwrap();
        assert_eq!(c.spool.commit_interval, Duration::ZERO);
        let d = errors(&format!("{MINIMAL}\n[spool]\ncommit_interval = \"1s\"\n"));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].message
                .contains("commit_interval must be at most 100ms"),
            "{d:?}"
        );
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::parse(MINIMAL, Path::new("/etc/wardgate/wardgate.toml")).unwrap();
        assert_eq!(c.edge.ca, Path::new("/etc/wardgate/pki/ca.pem"));
        assert_eq!(c.edge.crl, None);
        assert_eq!(c.edge.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(c.broker.listen, DEFAULT_BROKER_LISTEN.parse().unwrap());
        assert_eq!(c.broker.segment_size, DEFAULT_SEGMENT_SIZE);
        assert_eq!(c.admin.socket, Path::new(DEFAULT_ADMIN_SOCKET));
        assert_eq!(c.classes["pump"].max_payload, DEFAULT_MAX_PAYLOAD);
        assert!(c.classes["pump"].subscribe.is_empty());
        let id = DeviceId::parse("pump-1").unwrap();
        assert_eq!(
            c.devices[&id].address,
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/wardgate.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.devices.is_empty());
        assert!(!c.classes.is_empty());
    }

    #[test]
    fn syntax_error_has_its_line() {
        let d = errors("[gateway]\nid = \"gw\"\nsite = \n");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 3);
    }

    #[test]
    fn unknown_field_has_its_line() {
        let text = MINIMAL.replace("site = \"st-mary\"", "site = \"st-mary\"\nsiet = \"x\"");
        let d = errors(&text);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].line, 5);
        assert!(d[0].message.contains("siet"), "{}", d[0].message);
    }

    #[test]
    fn missing_sections_and_fields_are_all_reported() {
        let d = errors("[gateway]\nid = \"gw\"\n\n[[device]]\nid = \"d\"\n");
        let messages: Vec<(usize, &str)> = d.iter().map(|d| (d.line, d.message.as_str())).collect();
        assert_eq!(
            messages,
            vec![
                (1, "missing field `site`"),
                (1, "missing field `data_dir`"),
                (1, "missing section [edge]"),
                (4, "missing field `class`"),
                (4, "missing field `address`"),
            ]
        );
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_line() {
        let text = r#"
[gateway]
id = "gw/1"
site = "st-mary"
data_dir = "/var/lib/wardgate"
shutdown_grace = "soon"

[edge]
listen = "8883"
ca = "ca.pem"
cert = "server.pem"
key = "server.key"
max_connections = 0

[broker]
listen = "0.0.0.0:1883"
segment_size = "1MB!"

[[device_class]]
name = "pump"
publish = ["ward/{device}/#", "ward/x{device}"]
subscribe = ["ward/#/cmd"]
max_payload = "64KB"

[[device_class]]
name = "pump"

[[device]]
id = "pump 1"
class = "pump"
address = "10.0.0.5"

[[device]]
id = "pump-2"
class = "pumpp"
address = "10.0.0.300"

[[device]]
id = "pump-3"
class = "pump"
address = "10.0.0.7"

[[device]]
id = "pump-3"
class = "pump"
address = "10.0.0.8"
"#;
        let d = errors(text);
        let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
        assert_eq!(
            lines,
            vec![3, 6, 9, 13, 16, 17, 21, 22, 23, 26, 29, 35, 36, 44],
            "{d:#?}"
        );
        assert!(d[0].message.contains("gateway id"));
        assert!(d[4].message.contains("not a loopback"));
        assert!(d[6].message.contains("whole level"));
        assert!(d[8].message.contains("unknown size unit"));
        assert!(d[9].message.contains("defined twice"));
        assert!(d[10].message.contains("only ASCII"));
        assert!(d[11].message.contains("unknown device class"));
        assert!(d[12].message.contains("not an IP address"));
        assert!(d[13].message.contains("registered twice"));
    }

    #[test]
    fn spool_and_uplink_sections() {
        let ok = format!(
            "{MINIMAL}\n[spool]\nmax_bytes = \"1MiB\"\n[spool.max_age]\nroutine = \"1h\"\n\n\
             [uplink]\nhost = \"broker\"\nca = \"u/ca.pem\"\ncert = \"u/c.pem\"\nkey = \"u/c.key\"\n"
        );
        let c = Config::parse(&ok, Path::new("/etc/wardgate/wardgate.toml")).unwrap();
        assert_eq!(c.spool.max_bytes, 1 << 20);
        assert_eq!(c.spool.max_age[2], Duration::from_secs(3600));
        assert_eq!(c.spool.max_age[0], DEFAULT_MAX_AGE_ALARM);
        let u = c.uplink.unwrap();
        assert_eq!(
            (u.port, u.client_id.as_str()),
            (DEFAULT_UPLINK_PORT, "gw-1")
        );
        assert_eq!(u.ca, Path::new("/etc/wardgate/u/ca.pem"));

        let bad = format!(
            "{MINIMAL}\n[spool]\nmax_bytes = \"1MiB\"\ndevice_quota = \"2MiB\"\n\n\
             [uplink]\nport = 0\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\ninflight = 5000\n\
             topic_prefix = \"a/#\"\nbackoff_min = \"2s\"\nbackoff_max = \"1s\"\n"
        );
        let d = errors(&bad);
        let got: Vec<(usize, &str)> = d.iter().map(|d| (d.line, d.message.as_str())).collect();
        assert_eq!(
            got[0],
            (24, "device_quota must be between 1 byte and max_bytes")
        );
        assert_eq!(got[1], (26, "missing field `host`"));
        assert_eq!(got[2].0, 27);
        assert!(got[3].1.contains("inflight must be at most"), "{got:?}");
        assert!(got[4].1.contains("topic_prefix"), "{got:?}");
        assert_eq!(got[5], (34, "backoff_max must not be below backoff_min"));
    }

    #[test]
    fn rendered_errors_name_file_and_line() {
        let text = MINIMAL.replace("\"10.0.0.5\"", "\"ten\"");
        let e = Config::parse(&text, Path::new("/etc/w.toml")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/etc/w.toml:20:11: device address \"ten\""),
            "{s}"
        );
    }

    #[test]
    fn firewall_section_with_defaults_and_every_error_at_once() {
        let ok = format!(
            "{MINIMAL}\n[broker]\nlisten = \"127.0.0.1:1883\"\n[firewall]\n\
             device_interfaces = [\"ward0\"]\nmanagement_networks = [\"10.70.0.0/24\"]\n\
             [[firewall.forward]]\nname = \"pacs\"\nnetwork = \"10.1.2.3\"\nport = 104\n"
        );
        let c = Config::parse(&ok, Path::new("/etc/wardgate/wardgate.toml")).unwrap();
        let f = c.firewall.unwrap();
        assert_eq!(f.management_ports, DEFAULT_MANAGEMENT_PORTS);
        assert_eq!(f.new_connections_per_sec, DEFAULT_NEW_CONNECTIONS_PER_SEC);
        assert_eq!(f.forward[0].network.to_string(), "10.1.2.3");

        let bad = format!(
            "{MINIMAL}\n[firewall]\ndevice_interfaces = []\nmanagement_networks = [\"10.70.0.1/24\"]\n\
             management_ports = [0]\n[[firewall.forward]]\nname = \"pacs\"\nnetwork = \"x\"\n\
             protocol = \"icmp\"\n"
        );
        let msgs: Vec<String> = errors(&bad).into_iter().map(|d| d.message).collect();
        let has = |needle: &str| msgs.iter().any(|m| m.contains(needle));
        assert!(has("fixed port"), "{msgs:?}");
        assert!(has("at least one device interface"), "{msgs:?}");
        assert!(has("host bits"), "{msgs:?}");
        assert!(has("port must be between"), "{msgs:?}");
        assert!(has("not an IP address"), "{msgs:?}");
        assert!(has("protocol \"icmp\""), "{msgs:?}");
        assert!(has("missing field `port`"), "{msgs:?}");
    }

    #[test]
    fn modbus_maps_are_checked_and_every_error_has_its_line() {
        let ok = format!(
            "{MINIMAL}\n[[modbus.bus]]\nname = \"plant\"\ntcp = \"10.70.3.10:502\"\n\
             [[modbus.bus]]\nname = \"rs485\"\nserial = \"/dev/ttyUSB0\"\nparity = \"even\"\n\
             [[modbus.device]]\nid = \"pump-1\"\nbus = \"plant\"\nunit = 1\n\
             [[modbus.device.register]]\nname = \"temp\"\nfunction = \"holding\"\naddress = 0\n\
             type = \"f32\"\nword_order = \"little\"\nscale = 0.1\nwrite_min = 2.0\nwrite_max = 8.0\n\
             [[modbus.device.register]]\nname = \"door\"\nfunction = \"coil\"\naddress = 0\n"
        );
        let c = Config::parse(&ok, Path::new("/etc/wardgate/wardgate.toml")).unwrap();
        let d = &c.modbus.devices[0];
        assert_eq!(d.registers[0].value_type, crate::modbus::ValueType::F32);
        assert_eq!(d.registers[0].write, Some((2.0, 8.0)));
        assert_eq!(d.registers[1].value_type, crate::modbus::ValueType::Bool);
        assert_eq!(d.interval, crate::modbus::DEFAULT_INTERVAL);

        let bad = format!(
            "{MINIMAL}\n[[modbus.bus]]\nname = \"plant\"\ntcp = \"nowhere\"\n\
             [[modbus.device]]\nid = \"ghost\"\nbus = \"attic\"\nunit = 1\n\
             [[modbus.device.register]]\nname = \"x\"\nfunction = \"holding\"\naddress = 0\n\
             [[modbus.device]]\nid = \"pump-1\"\nbus = \"plant\"\nunit = 300\n\
             [[modbus.device.register]]\nname = \"a\"\nfunction = \"holding\"\naddress = 10\ntype = \"f64\"\n\
             [[modbus.device.register]]\nname = \"b\"\nfunction = \"holding\"\naddress = 12\n\
             [[modbus.device.register]]\nname = \"c\"\nfunction = \"input\"\naddress = 65535\ntype = \"u32\"\n\
             [[modbus.device.register]]\nname = \"d\"\nfunction = \"coil\"\naddress = 0\ntype = \"u16\"\n\
             [[modbus.device.register]]\nname = \"e\"\nfunction = \"input\"\naddress = 0\ntype = \"u128\"\n\
             [[modbus.device.register]]\nname = \"f\"\nfunction = \"input\"\naddress = 5\nwrite_min = 1.0\nwrite_max = 2.0\n\
             [[device_class]]\nname = \"quiet\"\npublish = [\"ward/{{device}}/status\"]\n\
             [[device]]\nid = \"pump-2\"\nclass = \"quiet\"\naddress = \"10.0.0.6\"\n\
             [[modbus.device]]\nid = \"pump-2\"\nbus = \"plant\"\nunit = 2\n\
             [[modbus.device.register]]\nname = \"x\"\nfunction = \"holding\"\naddress = 0\n"
        );
        let diags = errors(&bad);
        let has = |needle: &str| diags.iter().find(|d| d.message.contains(needle));
        for needle in [
            "write \"HOST:PORT\"",
            "not a registered [[device]]",
            "unknown bus \"attic\"",
            "unit must be between 0 and 255",
            "register b overlaps register a",
            "register c runs past address 65535",
            "may not publish ward/pump-2/modbus/x",
            "coils and discrete inputs are bool",
            "type \"u128\"",
            "only holding registers and coils can be written",
        ] {
            assert!(has(needle).is_some(), "{needle}: {diags:?}");
        }
        // Each error points at its own line.
        let line = |needle: &str| has(needle).map(|d| d.line).unwrap();
        assert!(line("unknown bus") < line("register b overlaps"));
    }
}
