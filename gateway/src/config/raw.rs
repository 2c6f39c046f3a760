//! The configuration file as written: serde structs that refuse unknown fields and keep
//! the source position of every value that validation may complain about. Required fields
//! are `Option`s here so that validation can report every missing one at once, rather than
//! serde stopping at the first.

use serde::Deserialize;
use toml::Spanned;

/// A size: a whole number of bytes or a string with a unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub gateway: Option<S<RawGateway>>,
    pub edge: Option<S<RawEdge>>,
    #[serde(default)]
    pub broker: RawBroker,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub spool: RawSpool,
    #[serde(default)]
    pub policy: RawPolicy,
    pub uplink: Option<S<RawUplink>>,
    pub firewall: Option<S<RawFirewall>>,
    pub modbus: Option<S<RawModbus>>,
    #[serde(default)]
    pub device_class: Vec<S<RawDeviceClass>>,
    #[serde(default)]
    pub device: Vec<S<RawDevice>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub id: Option<S<String>>,
    pub site: Option<S<String>>,
    pub data_dir: Option<S<String>>,
    pub shutdown_grace: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEdge {
    pub listen: Option<S<String>>,
    pub ca: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    pub crl: Option<S<String>>,
    pub handshake_timeout: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub max_connections: Option<S<i64>>,
    pub refusal_summary: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    pub listen: Option<S<String>>,
    pub agent_credentials: Option<S<String>>,
    pub max_connections: Option<S<i64>>,
    pub segment_size: Option<S<RawSize>>,
    pub segment_count: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub max_records: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub socket: Option<S<String>>,
    pub metrics_listen: Option<S<String>>,
    pub metrics_per_device: Option<S<bool>>,
    pub metrics_max_devices: Option<S<i64>>,
    pub stall_after: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeviceClass {
    pub name: Option<S<String>>,
    #[serde(default)]
    pub publish: Vec<S<String>>,
    #[serde(default)]
    pub subscribe: Vec<S<String>>,
    /// Topics (of the publish filters) that are alarms, and vital signs; the rest is routine.
    #[serde(default)]
    pub alarm: Vec<S<String>>,
    #[serde(default)]
    pub vital: Vec<S<String>>,
    pub max_payload: Option<S<RawSize>>,
    pub max_subscriptions: Option<S<i64>>,
    pub receive_maximum: Option<S<i64>>,
    pub topic_alias_maximum: Option<S<i64>>,
    pub messages_per_sec: Option<S<i64>>,
    pub bytes_per_sec: Option<S<RawSize>>,
    pub burst: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    pub id: Option<S<String>>,
    pub class: Option<S<String>>,
    pub address: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    pub max_bytes: Option<S<RawSize>>,
    pub device_quota: Option<S<RawSize>>,
    pub cache: Option<S<RawSize>>,
    pub max_rejected: Option<S<RawSize>>,
    pub max_records: Option<S<i64>>,
    pub commit_interval: Option<S<String>>,
    #[serde(default)]
    pub max_age: RawMaxAge,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMaxAge {
    pub alarm: Option<S<String>>,
    pub vital: Option<S<String>>,
    pub routine: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUplink {
    pub host: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub ca: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    pub client_id: Option<S<String>>,
    pub topic_prefix: Option<S<String>>,
    pub inflight: Option<S<i64>>,
    pub replay_rate: Option<S<i64>>,
    pub keep_alive: Option<S<String>>,
    pub backoff_min: Option<S<String>>,
    pub backoff_max: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub acl_violations: Option<S<i64>>,
    pub violation_window: Option<S<String>>,
    pub throttle_limit: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFirewall {
    pub device_interfaces: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub management_networks: Vec<S<String>>,
    pub management_ports: Option<Vec<S<i64>>>,
    pub new_connections_per_sec: Option<S<i64>>,
    pub new_connections_burst: Option<S<i64>>,
    #[serde(default)]
    pub forward: Vec<S<RawForward>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForward {
    pub name: Option<S<String>>,
    pub network: Option<S<String>>,
    pub protocol: Option<S<String>>,
    pub port: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModbus {
    #[serde(default)]
    pub bus: Vec<S<RawBus>>,
    #[serde(default)]
    pub device: Vec<S<RawModbusDevice>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBus {
    pub name: Option<S<String>>,
    pub tcp: Option<S<String>>,
    pub serial: Option<S<String>>,
    pub baud: Option<S<i64>>,
    pub parity: Option<S<String>>,
    pub stop_bits: Option<S<i64>>,
    pub data_bits: Option<S<i64>>,
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModbusDevice {
    pub id: Option<S<String>>,
    pub bus: Option<S<String>>,
    pub unit: Option<S<i64>>,
    pub interval: Option<S<String>>,
    pub heartbeat: Option<S<String>>,
    #[serde(default)]
    pub register: Vec<S<RawRegister>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegister {
    pub name: Option<S<String>>,
    pub function: Option<S<String>>,
    pub address: Option<S<i64>>,
    #[serde(rename = "type")]
    pub value_type: Option<S<String>>,
    pub word_order: Option<S<String>>,
    pub scale: Option<S<f64>>,
    pub offset: Option<S<f64>>,
    pub unit: Option<S<String>>,
    pub deadband: Option<S<f64>>,
    pub write_min: Option<S<f64>>,
    pub write_max: Option<S<f64>>,
}
