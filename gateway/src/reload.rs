//! Live reload (`SIGHUP`, `wardgate reload`): the configuration file read again and what
//! can change while devices stay connected applied at once — the TLS material and CRL, the
//! device classes (ACLs, rates, sizes, priorities) and the configuration's devices — and
//! anything else named as needing a restart.
//!
//! First the TLS material and CRL the running configuration names are read again, whatever
//! the file now says: a revocation is never held back by a broken configuration (this is
//! what SIGHUP did before). Then the file is checked whole ([`Config::load`]); an invalid one
//! changes nothing more, and the failure is audited (`config.reload_failed`) with every
//! diagnostic. Then the registry (rebuilt from the new devices and classes with the admin
//! socket's persisted changes on top, swapped in one step), then the firewall's sets. Healthy connections stay: only a connected device that is no longer
//! registered, whose class or its definition changed, or whose address changed is
//! disconnected (`config.device_rechecked`), to be judged anew when it reconnects. The
//! change is audited (`config.changed`, with both digests).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::{Config, ConfigError};
use crate::device::DeviceId;
use crate::edge::EdgeHandle;
use crate::events::Events;
use crate::firewall::live::LiveFirewall;
use crate::registry::{Registry, RegistryError, SharedRegistry};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS material: {0}")]
    Tls(#[from] crate::edge::tls::TlsError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reloaded {
    /// SHA-256 of the file now in force, and of the one before.
    pub digest: String,
    pub previous: String,
    /// Connected devices disconnected to be judged anew, with why.
    pub rechecked: Vec<(String, String)>,
    /// Sections that changed but take effect only at the next start.
    pub needs_restart: Vec<String>,
}

#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    current: Mutex<Config>,
    state: sled::Db,
    registry: SharedRegistry,
    edge: EdgeHandle,
    firewall: Option<Arc<LiveFirewall>>,
    events: Events,
}

impl Reloader {
    pub fn new(
        config: Config,
        state: sled::Db,
        registry: SharedRegistry,
        edge: EdgeHandle,
        firewall: Option<Arc<LiveFirewall>>,
        events: Events,
    ) -> Reloader {
        Reloader {
            path: config.source.clone(),
            current: Mutex::new(config),
            state,
            registry,
            edge,
            firewall,
            events,
        }
    }

    /// Reads the configuration file again and applies it (see the module docs).
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        // One reload at a time: the configuration in force is held from the first step on.
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let result = self.apply(&mut current);
        if let Err(e) = &result {
            self.events.config_reload_failed(&self.path, e);
        }
        result
    }

    fn apply(&self, current: &mut Config) -> Result<Reloaded, ReloadError> {
        self.edge.reload_tls()?;
        let new = Config::load(&self.path)?;
        let rechecked = {
            let mut registry = self
                .registry
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let fresh = Registry::open(&new, &self.state)?;
            let mut connected: Vec<DeviceId> =
                self.edge.connected().into_iter().map(|(d, _)| d).collect();
            connected.dedup();
            let rechecked: Vec<(DeviceId, String)> = connected
                .into_iter()
                .filter_map(|d| recheck(&registry, &fresh, &d).map(|why| (d, why)))
                .collect();
            *registry = fresh;
            rechecked
        };
        // Outside the registry's lock: closing a session reads it.
        for (device, why) in &rechecked {
            let closed = self.edge.close_device(device);
            self.events.device_rechecked(device, why, closed);
        }
        if let Some(fw) = &self.firewall {
            fw.refresh();
        }
        let needs_restart = needs_restart(current, &new);
        let reloaded = Reloaded {
            digest: new.digest.clone(),
            previous: current.digest.clone(),
            rechecked: rechecked
                .into_iter()
                .map(|(d, why)| (d.to_string(), why))
                .collect(),
            needs_restart: needs_restart.iter().map(|s| (*s).to_owned()).collect(),
        };
        record_digest(&self.state, &new.digest);
        self.events.config_reloaded(
            &new.summary(),
            &new.digest,
            &reloaded.previous,
            reloaded.rechecked.len(),
            &needs_restart,
        );
        *current = new;
        Ok(reloaded)
    }
}

/// Records `digest` as the configuration in force (`data_dir/state`), for the next start's
/// comparison; a failure is logged.
pub fn record_digest(state: &sled::Db, digest: &str) {
    if let Err(e) = state
        .insert(crate::config::CONFIG_DIGEST_KEY, digest.as_bytes())
        .and_then(|_| state.flush().map(|_| ()))
    {
        tracing::error!(event = "state.write_failed", error = %e, "cannot record the configuration digest");
    }
}

/// Why a connected `device` must be judged anew under `new`, if it must.
fn recheck(old: &Registry, new: &Registry, device: &DeviceId) -> Option<String> {
    let Some(now) = new.get(device) else {
        return Some("no longer registered".into());
    };
    let before = old.get(device)?;
    if before.class != now.class {
        return Some(format!("class {} → {}", before.class, now.class));
    }
    if before.address != now.address {
        return Some(format!("address {} → {}", before.address, now.address));
    }
    if old.class(&now.class) != new.class(&now.class) {
        return Some(format!("class {} changed", now.class));
    }
    None
}

/// The sections that differ between `old` and `new` and apply only at a start.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut out = Vec::new();
    for (name, changed) in [
        ("gateway", differs(&old.gateway, &new.gateway)),
        ("edge", differs(&old.edge, &new.edge)),
        ("broker", differs(&old.broker, &new.broker)),
        ("admin", differs(&old.admin, &new.admin)),
        ("audit", old.audit_max_records != new.audit_max_records),
        ("spool", differs(&old.spool, &new.spool)),
        (
            "policy",
            differs(&old.quarantine, &new.quarantine) || old.throttle_limit != new.throttle_limit,
        ),
        ("uplink", differs(&old.uplink, &new.uplink)),
        ("firewall", differs(&old.firewall, &new.firewall)),
        ("modbus", differs(&old.modbus, &new.modbus)),
    ] {
        if changed {
            out.push(name);
        }
    }
    out
}
