//! Configuration: one TOML file, read into [`raw`] structs and validated into [`Config`].
//!
//! Validation collects every problem it finds, each with the file, line and column of the
//! value at fault ([`diag`]), so an engineer fixes a broken file in one pass. `wardgate
//! check-config` runs exactly [`Config::load`]. Relative paths in the file are taken
//! relative to the directory that holds the file, so a configuration and its PKI can move
//! together.
//!
//! One file per section, each owning its validated types, its `DEFAULT_*` constants and its
//! checks: [`gateway`] (`[gateway]`, `[edge]`, `[broker]`, `[admin]`, `[audit]`),
//! [`classes`] (`[[device_class]]`, `[[device]]`, `[policy]`), [`spool`], [`uplink`],
//! [`firewall`], [`modbus`]. Configuration is at the bottom of the crate: it imports only
//! `device` and `policy`'s pure topic filters, and every domain takes its settings from
//! here. Every section but `[gateway]`, `[edge]`, the classes and the devices has defaults.
//! The commented example in `configs/wardgate.toml` documents every field and is checked
//! by a unit test.
//!
//! Tested by the unit tests in `tests.rs`, one per kind of error, each checking its line.

pub mod classes;
pub mod diag;
pub mod firewall;
pub mod gateway;
pub mod modbus;
pub mod raw;
pub mod spool;
pub mod units;
pub mod uplink;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use classes::*;
pub use diag::{ConfigError, Diagnostic};
pub use firewall::{
    FirewallConfig, Forward, Proto, DEFAULT_MANAGEMENT_PORTS, DEFAULT_NEW_CONNECTIONS_BURST,
    DEFAULT_NEW_CONNECTIONS_PER_SEC,
};
pub use gateway::*;
pub use modbus::ModbusConfig;
pub use spool::*;
pub use uplink::*;

use crate::device::DeviceId;
use diag::Validator;
use raw::RawConfig;

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
    pub spool: SpoolLimits,
    /// When repeated ACL violations quarantine a device.
    pub quarantine: Threshold,
    /// A device throttled without pause for this long is quarantined; `None` never.
    pub throttle_limit: Option<Duration>,
    /// No `[uplink]`: a local-only gateway; records wait in the spool until they expire.
    pub uplink: Option<UplinkConfig>,
    /// No `[firewall]`: wardgate leaves nftables alone.
    pub firewall: Option<FirewallConfig>,
    /// Legacy equipment polled over Modbus (empty without `[modbus]`).
    pub modbus: ModbusConfig,
}

/// Where the digest of the configuration in force is kept (in `data_dir/state`): audited
/// at start against the last run's, and rewritten by a live reload.
pub const CONFIG_DIGEST_KEY: &[u8] = b"config_digest";

impl Config {
    /// The configuration in one line, as the audit records it: its file, digest and sizes.
    pub fn summary(&self) -> String {
        format!(
            "file={} sha256={} devices={} classes={}",
            self.source.display(),
            self.digest,
            self.devices.len(),
            self.classes.len()
        )
    }

    /// Largest payload any class allows: the embedded broker must carry it.
    pub fn max_payload(&self) -> u64 {
        self.classes
            .values()
            .map(|c| c.max_payload)
            .max()
            .unwrap_or(DEFAULT_MAX_PAYLOAD)
    }

    /// The upstream topic prefix: the uplink's, or the default one for a gateway without an
    /// uplink (so that a spool filled offline can still be forwarded once one is
    /// configured).
    pub fn topic_prefix(&self) -> &str {
        self.uplink
            .as_ref()
            .map_or(DEFAULT_TOPIC_PREFIX, |u| u.topic_prefix.as_str())
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

impl Validator<'_> {
    fn validate(&mut self, raw: RawConfig, path: &Path) -> Option<Config> {
        let gateway = self.gateway(&raw.gateway);
        let edge = self.edge(&raw.edge);
        let admin = self.admin(&raw.admin);
        let broker = self.broker(&raw.broker, &admin);
        let audit_max_records = self.audit(&raw.audit);
        let classes = self.classes(&raw.device_class);
        let devices = self.devices(&raw.device, &classes);
        let spool = self.spool(&raw.spool);
        let (quarantine, throttle_limit) = self.policy(&raw.policy);
        let uplink = raw
            .uplink
            .as_ref()
            .and_then(|u| self.uplink(u, gateway.as_ref()));
        let modbus = match &raw.modbus {
            Some(m) => self.modbus(m, &devices, &classes),
            None => ModbusConfig::default(),
        };
        let firewall = raw
            .firewall
            .as_ref()
            .and_then(|f| self.firewall(f, broker.listen, edge.as_ref().map(|e| e.listen)));
        if !self.diagnostics.is_empty() {
            return None;
        }
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
    }
}

#[cfg(test)]
pub(crate) mod tests;
