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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    pub listen: Option<S<String>>,
    pub max_connections: Option<S<i64>>,
    pub segment_size: Option<S<RawSize>>,
    pub segment_count: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub socket: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeviceClass {
    pub name: Option<S<String>>,
    #[serde(default)]
    pub publish: Vec<S<String>>,
    #[serde(default)]
    pub subscribe: Vec<S<String>>,
    pub max_payload: Option<S<RawSize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    pub id: Option<S<String>>,
    pub class: Option<S<String>>,
    pub address: Option<S<String>>,
}
