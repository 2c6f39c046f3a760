//! `agent.toml`: where updates come from, what this appliance is, how it boots, when it may
//! reboot and how it knows a new slot is healthy. Every error names its key; unknown keys
//! are errors (a typo must not silently disable a defence).
//!
//! The example with every key is `configs/agent.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::http::Limits;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    repository: RawRepository,
    appliance: RawAppliance,
    boot: RawBoot,
    #[serde(default)]
    maintenance: RawMaintenance,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    report: RawReport,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    url: String,
    trusted_root: PathBuf,
    ca_file: Option<PathBuf>,
    #[serde(default = "d_interval")]
    poll_interval: String,
    #[serde(default = "d_jitter")]
    poll_jitter: String,
    #[serde(default = "d_max_bundle")]
    max_bundle_bytes: u64,
    #[serde(default = "d_speed")]
    low_speed_bytes_per_sec: u64,
    #[serde(default = "d_window")]
    low_speed_window: String,
    #[serde(default = "d_resumes")]
    max_resumes: u32,
}

fn d_interval() -> String {
    "6h".into()
}
fn d_jitter() -> String {
    "30m".into()
}
fn d_max_bundle() -> u64 {
    2 << 30
}
fn d_speed() -> u64 {
    1024
}
fn d_window() -> String {
    "30s".into()
}
fn d_resumes() -> u32 {
    5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppliance {
    hardware: String,
    state_dir: PathBuf,
    slot_a: PathBuf,
    slot_b: PathBuf,
    #[serde(default = "d_cmdline")]
    cmdline: PathBuf,
    #[serde(default = "d_boot_id")]
    boot_id: PathBuf,
    #[serde(default = "d_reboot")]
    reboot_command: Vec<String>,
    #[serde(default = "d_clock_synchronized")]
    clock_synchronized: PathBuf,
    #[serde(default = "d_version_file")]
    version_file: PathBuf,
}

/// The running image's version, written into it when it is built.
fn d_version_file() -> PathBuf {
    "/etc/wardgate/version".into()
}

/// systemd-timesyncd's mark that the clock was synchronized by NTP.
fn d_clock_synchronized() -> PathBuf {
    "/run/systemd/timesync/synchronized".into()
}

fn d_cmdline() -> PathBuf {
    "/proc/cmdline".into()
}
fn d_boot_id() -> PathBuf {
    "/proc/sys/kernel/random/boot_id".into()
}
fn d_reboot() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    backend: String,
    state_file: Option<PathBuf>,
    fw_env_config: Option<PathBuf>,
    autoboot: Option<PathBuf>,
    partition_a: Option<u32>,
    partition_b: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaintenance {
    #[serde(default)]
    windows: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    deadline: Option<String>,
    retry: Option<String>,
    #[serde(default)]
    http: Vec<String>,
    #[serde(default)]
    units: Vec<String>,
    #[serde(default)]
    nft_tables: Vec<String>,
    #[serde(default)]
    commands: Vec<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReport {
    broker: Option<String>,
    #[serde(default = "d_client_id")]
    client_id: String,
    #[serde(default = "d_credentials")]
    credentials: PathBuf,
}

/// Where the gateway writes the agent's broker credentials at each start (beside its
/// admin socket, by default).
fn d_credentials() -> PathBuf {
    "/run/wardgate/broker-agent.secret".into()
}

fn d_client_id() -> String {
    "_wardgate-agent".into()
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub repository: Repository,
    pub appliance: Appliance,
    pub boot: Boot,
    pub maintenance: Vec<Window>,
    pub health: Health,
    pub report: Report,
}

#[derive(Debug, Clone)]
pub struct Repository {
    /// The repository's base: `metadata/` and `targets/` lie beneath it.
    pub url: url::Url,
    pub trusted_root: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub poll_interval: Duration,
    pub poll_jitter: Duration,
    pub max_bundle_bytes: u64,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct Appliance {
    pub hardware: String,
    pub state_dir: PathBuf,
    pub slots: [PathBuf; 2],
    pub cmdline: PathBuf,
    /// A file unique per boot: tells whether the board rebooted since an install.
    pub boot_id: PathBuf,
    pub reboot_command: Vec<String>,
    /// Exists once NTP has set the clock: then a clock behind the last trusted check is
    /// the earlier check's clock having been ahead, and the agent recovers.
    pub clock_synchronized: PathBuf,
    /// The version of the image the board runs (absent on a development board): nothing
    /// older is ever installed, even before the first update is committed.
    pub version_file: PathBuf,
}

#[derive(Debug, Clone)]
pub enum Boot {
    /// A text file on the boot partition read by the U-Boot script (the QEMU image).
    StateFile { path: PathBuf },
    /// U-Boot's own environment through `fw_printenv` / `fw_setenv`.
    UBootEnv { fw_env_config: Option<PathBuf> },
    /// Raspberry Pi firmware: `autoboot.txt` and `reboot "0 tryboot"`.
    RpiTryboot {
        autoboot: PathBuf,
        partitions: [u32; 2],
    },
}

/// A daily maintenance window in UTC, `start..end` minutes after midnight; `end < start`
/// crosses midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

/// Text that is not a maintenance window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not HH:MM-HH:MM (UTC) with start ≠ end")]
pub struct NotAWindow(pub String);

impl Window {
    pub fn parse(s: &str) -> Result<Window, NotAWindow> {
        let hm = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-').ok_or_else(|| NotAWindow(s.to_owned()))?;
        match (hm(a), hm(b)) {
            (Some(start), Some(end)) if start != end => Ok(Window { start, end }),
            _ => Err(NotAWindow(s.to_owned())),
        }
    }

    /// Whether the minute of the day `m` (UTC) lies in the window.
    pub fn contains(&self, m: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

#[derive(Debug, Clone)]
pub struct Health {
    /// How long a new slot has to pass every check.
    pub deadline: Duration,
    /// Pause between rounds of checks.
    pub retry: Duration,
    pub http: Vec<url::Url>,
    pub units: Vec<String>,
    pub nft_tables: Vec<(String, String)>,
    pub commands: Vec<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Report {
    /// The gateway's embedded broker (loopback), for status messages and "check now".
    pub broker: Option<std::net::SocketAddr>,
    /// Must start with `_`: the gateway refuses the agent's credentials with any other.
    pub client_id: String,
    /// The gateway's `username:password` for the agent, made afresh at each of its starts.
    pub credentials: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{path}: {}", .errors.join("; "))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

fn duration(key: &str, s: &str, errors: &mut Vec<String>) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| {
        errors.push(format!("{key}: {s:?}: {e}"));
        Duration::ZERO
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        let mut errors = Vec::new();
        let e = &mut errors;

        let r = &raw.repository;
        let mut base = r.url.clone();
        if !base.ends_with('/') {
            base.push('/');
        }
        let url = match url::Url::parse(&base) {
            Ok(u) if ["https", "http", "file"].contains(&u.scheme()) => u,
            Ok(u) => {
                e.push(format!(
                    "repository.url: scheme {:?} (https, http or file)",
                    u.scheme()
                ));
                url::Url::parse("file:///").expect("a valid URL")
            }
            Err(err) => {
                e.push(format!("repository.url: {:?}: {err}", r.url));
                url::Url::parse("file:///").expect("a valid URL")
            }
        };
        let poll_interval = duration("repository.poll_interval", &r.poll_interval, e);
        if poll_interval < Duration::from_secs(1) {
            e.push("repository.poll_interval: at least 1s".into());
        }
        let poll_jitter = duration("repository.poll_jitter", &r.poll_jitter, e);
        let low_speed_window = duration("repository.low_speed_window", &r.low_speed_window, e);
        if low_speed_window < Duration::from_secs(1) {
            e.push("repository.low_speed_window: at least 1s".into());
        }
        if r.low_speed_bytes_per_sec == 0 {
            e.push("repository.low_speed_bytes_per_sec: above 0 (slow retrieval)".into());
        }
        if r.max_bundle_bytes == 0 {
            e.push("repository.max_bundle_bytes: above 0".into());
        }

        let a = &raw.appliance;
        if a.hardware.trim().is_empty() {
            e.push("appliance.hardware: empty".into());
        }
        if a.slot_a == a.slot_b {
            e.push("appliance.slot_a and slot_b are the same".into());
        }
        if a.reboot_command.is_empty() {
            e.push("appliance.reboot_command: empty".into());
        }

        let b = &raw.boot;
        let need = |k: &str, v: &Option<PathBuf>, e: &mut Vec<String>| -> PathBuf {
            v.clone().unwrap_or_else(|| {
                e.push(format!("boot.{k}: required by backend {:?}", b.backend));
                PathBuf::new()
            })
        };
        let boot = match b.backend.as_str() {
            "state-file" => Boot::StateFile {
                path: need("state_file", &b.state_file, e),
            },
            "uboot-env" => Boot::UBootEnv {
                fw_env_config: b.fw_env_config.clone(),
            },
            "rpi-tryboot" => Boot::RpiTryboot {
                autoboot: need("autoboot", &b.autoboot, e),
                partitions: [b.partition_a.unwrap_or(2), b.partition_b.unwrap_or(3)],
            },
            other => {
                e.push(format!(
                    "boot.backend: {other:?} (state-file, uboot-env or rpi-tryboot)"
                ));
                Boot::StateFile {
                    path: PathBuf::new(),
                }
            }
        };

        let mut maintenance = Vec::new();
        for w in &raw.maintenance.windows {
            match Window::parse(w) {
                Ok(w) => maintenance.push(w),
                Err(err) => e.push(format!("maintenance.windows: {err}")),
            }
        }

        let h = &raw.health;
        let deadline = duration("health.deadline", h.deadline.as_deref().unwrap_or("5m"), e);
        let retry = duration("health.retry", h.retry.as_deref().unwrap_or("5s"), e);
        let mut http = Vec::new();
        for u in &h.http {
            match url::Url::parse(u) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => http.push(u),
                _ => e.push(format!("health.http: {u:?} is not an http(s) URL")),
            }
        }
        let mut nft_tables = Vec::new();
        for t in &h.nft_tables {
            match t.split_once(' ') {
                Some((fam, name))
                    if ["ip", "ip6", "inet", "arp", "bridge", "netdev"].contains(&fam)
                        && !name.trim().is_empty() =>
                {
                    nft_tables.push((fam.to_owned(), name.trim().to_owned()))
                }
                _ => e.push(format!(
                    "health.nft_tables: {t:?} is not \"FAMILY NAME\" (e.g. \"inet wardgate\")"
                )),
            }
        }
        if h.commands.iter().any(Vec::is_empty) {
            e.push("health.commands: an empty command".into());
        }

        if raw.report.broker.is_some() && !raw.report.client_id.starts_with('_') {
            e.push(format!(
                "report.client_id: {:?} must start with `_` (no device id can)",
                raw.report.client_id
            ));
        }
        let broker = match &raw.report.broker {
            None => None,
            Some(s) => match s.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => Some(a),
                Ok(_) => {
                    e.push(format!(
                        "report.broker: {s:?} is not on loopback (the gateway's embedded broker)"
                    ));
                    None
                }
                Err(err) => {
                    e.push(format!("report.broker: {s:?}: {err}"));
                    None
                }
            },
        };

        if !errors.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                errors,
            });
        }
        Ok(Config {
            repository: Repository {
                url,
                trusted_root: r.trusted_root.clone(),
                ca_file: r.ca_file.clone(),
                poll_interval,
                poll_jitter,
                max_bundle_bytes: r.max_bundle_bytes,
                limits: Limits {
                    low_speed_bytes_per_sec: r.low_speed_bytes_per_sec,
                    low_speed_window,
                    max_resumes: r.max_resumes,
                    max_bytes: r.max_bundle_bytes.max(64 << 20),
                    ..Limits::default()
                },
            },
            appliance: Appliance {
                hardware: a.hardware.clone(),
                state_dir: a.state_dir.clone(),
                slots: [a.slot_a.clone(), a.slot_b.clone()],
                cmdline: a.cmdline.clone(),
                boot_id: a.boot_id.clone(),
                reboot_command: a.reboot_command.clone(),
                clock_synchronized: a.clock_synchronized.clone(),
                version_file: a.version_file.clone(),
            },
            boot,
            maintenance,
            health: Health {
                deadline,
                retry,
                http,
                units: h.units.clone(),
                nft_tables,
                commands: h.commands.clone(),
            },
            report: Report {
                broker,
                client_id: raw.report.client_id.clone(),
                credentials: raw.report.credentials.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/agent.toml");
        let c = Config::load(&path).unwrap();
        assert!(matches!(c.boot, Boot::StateFile { .. }));
        assert_eq!(c.repository.url.scheme(), "https");
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_key() {
        let text = r#"
[repository]
url = "ftp://x/"
trusted_root = "/r.json"
low_speed_bytes_per_sec = 0
[appliance]
hardware = "rpi4"
state_dir = "/var/lib/x"
slot_a = "/dev/a"
slot_b = "/dev/a"
[boot]
backend = "grub"
[maintenance]
windows = ["25:00-03:00"]
[health]
nft_tables = ["wardgate"]
[report]
broker = "10.0.0.1:1883"
client_id = "pump-1"
"#;
        let e = Config::parse(Path::new("agent.toml"), text)
            .unwrap_err()
            .to_string();
        for want in [
            "repository.url",
            "low_speed_bytes_per_sec",
            "slot_b are the same",
            "boot.backend",
            "maintenance.windows",
            "health.nft_tables",
            "report.broker",
            "report.client_id",
        ] {
            assert!(e.contains(want), "{want} missing from: {e}");
        }
        let e = Config::parse(Path::new("a.toml"), "[repository]\nurll = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn windows_may_cross_midnight() {
        let w = Window::parse("22:30-02:00").unwrap();
        assert!(w.contains(23 * 60));
        assert!(w.contains(60));
        assert!(!w.contains(12 * 60));
        assert!(!w.contains(2 * 60));
        let w = Window::parse("02:00-05:00").unwrap();
        assert!(w.contains(2 * 60) && !w.contains(5 * 60));
        assert_eq!(w.to_string(), "02:00-05:00");
        assert!(Window::parse("02:00-02:00").is_err());
    }
}
