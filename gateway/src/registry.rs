//! The device registry: which devices exist, their class and address, and what each class
//! may do. The edge reads it on every CONNECT.
//!
//! The configuration's `[[device]]` entries are the baseline. Changes made through the
//! admin socket (`wardgate device add|remove`) are an overlay persisted in sled
//! (`data_dir/state`, tree `devices`: device id → JSON `{"added": {class, address}}` or
//! `"removed"`), flushed before they take effect, and applied on top of the configuration
//! at every start. So an admin change survives a restart, and an entry touched by the admin
//! socket wins over the configuration for that id; `device list` shows where each entry
//! comes from. Classes come only from the configuration.
//!
//! Tested by the unit tests below and the admin system tests.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::config::{Config, DeviceClass, DeviceEntry};
use crate::device::DeviceId;
use crate::policy::{Acl, Priorities, Priority};

/// What a registered device is granted, resolved at CONNECT.
#[derive(Debug, Clone)]
pub struct Grant {
    pub class: String,
    pub address: IpAddr,
    pub acl: Acl,
    pub max_payload: usize,
    pub max_subscriptions: usize,
    /// MQTT 5: the CONNACK's Receive Maximum and Topic Alias Maximum.
    pub receive_maximum: u16,
    pub topic_alias_maximum: u16,
    pub rate: crate::policy::RateLimits,
    priorities: Priorities,
}

impl Grant {
    /// The priority class of a topic this device publishes: alarm, vital, else routine.
    pub fn priority(&self, topic: &str) -> Priority {
        self.priorities.of(topic)
    }
}

/// Where a registry entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Admin,
}

/// A registered device as `device list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Registered {
    pub id: DeviceId,
    pub class: String,
    pub address: IpAddr,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Overlay {
    Added { class: String, address: IpAddr },
    Removed,
}

/// Version of a stored overlay entry (tree `devices`, key = device id): 2 is
/// `{"v":2,"overlay":…}`; 1, written before, was the bare overlay, and is still read.
pub const OVERLAY_VERSION: u8 = 2;

#[derive(Serialize)]
struct StoredOverlay<'a> {
    v: u8,
    overlay: &'a Overlay,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ReadOverlay {
    Versioned { v: u8, overlay: Overlay },
    V1(Overlay),
}

/// Why a stored overlay entry cannot be read.
#[derive(Debug, thiserror::Error)]
enum OverlayError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("format version {0}, newer than this wardgate's {OVERLAY_VERSION}")]
    Newer(u8),
}

/// A stored overlay entry of this version or the one before.
fn decode_overlay(bytes: &[u8]) -> Result<Overlay, OverlayError> {
    match serde_json::from_slice::<ReadOverlay>(bytes)? {
        ReadOverlay::Versioned { v, overlay } if v == OVERLAY_VERSION => Ok(overlay),
        ReadOverlay::V1(overlay) => Ok(overlay),
        ReadOverlay::Versioned { v, .. } => Err(OverlayError::Newer(v)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} is already registered")]
    Exists(DeviceId),
    #[error("device {0} is not registered")]
    Unknown(DeviceId),
    #[error("no device class {0:?} in the configuration")]
    UnknownClass(String),
    #[error("registry store: {0}")]
    Store(#[from] sled::Error),
}

#[derive(Debug)]
pub struct Registry {
    classes: BTreeMap<String, DeviceClass>,
    devices: BTreeMap<DeviceId, (DeviceEntry, Source)>,
    store: Option<(sled::Db, sled::Tree)>,
}

pub type SharedRegistry = Arc<RwLock<Registry>>;

impl Registry {
    /// The configuration's registry, without persistence (for tests and tools).
    pub fn from_config(config: &Config) -> Self {
        Self {
            classes: config.classes.clone(),
            devices: config
                .devices
                .iter()
                .map(|(id, e)| (id.clone(), (e.clone(), Source::Config)))
                .collect(),
            store: None,
        }
    }

    /// The configuration's registry with the persisted admin changes applied.
    pub fn open(config: &Config, db: &sled::Db) -> Result<Self, RegistryError> {
        let tree = db.open_tree("devices")?;
        let mut r = Self::from_config(config);
        for item in tree.iter() {
            let (k, v) = item?;
            let id = std::str::from_utf8(&k)
                .ok()
                .and_then(|d| DeviceId::parse(d).ok());
            match (id, decode_overlay(&v)) {
                (Some(id), Ok(Overlay::Removed)) => {
                    r.devices.remove(&id);
                }
                (Some(id), Err(error)) => {
                    // Fail closed: what the entry says is unknown (a newer wardgate wrote it
                    // before a downgrade, or it is damaged) and may be a removal, so the
                    // device is refused until an admin adds it again (which rewrites it).
                    let was_registered = r.devices.remove(&id).is_some();
                    tracing::error!(
                        event = "registry.unreadable_entry",
                        device = %id,
                        error = %error,
                        was_registered,
                        "registry entry unreadable: the device is refused until `device add` \
                         writes it again"
                    );
                }
                (Some(id), Ok(Overlay::Added { class, address })) => {
                    if !r.classes.contains_key(&class) {
                        tracing::error!(
                            event = "registry.unknown_class",
                            device = %id,
                            class,
                            "device added through the admin socket names a class the \
                             configuration no longer has: it is refused until fixed"
                        );
                    }
                    let entry = DeviceEntry {
                        id: id.clone(),
                        class,
                        address,
                    };
                    r.devices.insert(id, (entry, Source::Admin));
                }
                (None, _) => tracing::error!(
                    event = "registry.unreadable_entry",
                    key = ?String::from_utf8_lossy(&k),
                    "registry entry under a key that is no device id: ignored"
                ),
            }
        }
        r.store = Some((db.clone(), tree));
        Ok(r)
    }

    pub fn shared(self) -> SharedRegistry {
        Arc::new(RwLock::new(self))
    }

    /// The grant of a registered device, or `None` for an unknown one.
    pub fn grant(&self, device: &DeviceId) -> Option<Grant> {
        let (entry, _) = self.devices.get(device)?;
        // A missing class (an admin entry whose class left the config) grants nothing.
        let class = self.classes.get(&entry.class)?;
        Some(Grant {
            class: class.name.clone(),
            address: entry.address,
            acl: Acl::for_device(device, &class.publish, &class.subscribe),
            max_payload: usize::try_from(class.max_payload).unwrap_or(usize::MAX),
            max_subscriptions: class.max_subscriptions,
            receive_maximum: class.receive_maximum,
            topic_alias_maximum: class.topic_alias_maximum,
            rate: class.rate,
            priorities: Priorities {
                alarm: class.alarm.iter().map(|t| t.expand(device)).collect(),
                vital: class.vital.iter().map(|t| t.expand(device)).collect(),
            },
        })
    }

    /// A device class of the configuration, by name.
    pub fn class(&self, name: &str) -> Option<&DeviceClass> {
        self.classes.get(name)
    }

    pub fn get(&self, device: &DeviceId) -> Option<Registered> {
        self.devices.get(device).map(|(e, s)| Registered {
            id: e.id.clone(),
            class: e.class.clone(),
            address: e.address,
            source: *s,
        })
    }

    pub fn list(&self) -> Vec<Registered> {
        self.devices.keys().filter_map(|d| self.get(d)).collect()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn persist(&self, device: &DeviceId, overlay: &Overlay) -> Result<(), RegistryError> {
        if let Some((db, tree)) = &self.store {
            let stored = StoredOverlay {
                v: OVERLAY_VERSION,
                overlay,
            };
            let value = serde_json::to_vec(&stored).unwrap_or_default();
            tree.insert(device.as_str(), value)?;
            db.flush()?;
        }
        Ok(())
    }

    /// Registers a device (persisted before it takes effect).
    pub fn add(
        &mut self,
        device: &DeviceId,
        class: &str,
        address: IpAddr,
    ) -> Result<(), RegistryError> {
        if self.devices.contains_key(device) {
            return Err(RegistryError::Exists(device.clone()));
        }
        if !self.classes.contains_key(class) {
            return Err(RegistryError::UnknownClass(class.to_owned()));
        }
        self.persist(
            device,
            &Overlay::Added {
                class: class.to_owned(),
                address,
            },
        )?;
        let entry = DeviceEntry {
            id: device.clone(),
            class: class.to_owned(),
            address,
        };
        self.devices.insert(device.clone(), (entry, Source::Admin));
        Ok(())
    }

    /// Unregisters a device (persisted before it takes effect).
    pub fn remove(&mut self, device: &DeviceId) -> Result<Registered, RegistryError> {
        let registered = self
            .get(device)
            .ok_or_else(|| RegistryError::Unknown(device.clone()))?;
        self.persist(device, &Overlay::Removed)?;
        self.devices.remove(device);
        Ok(registered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = crate::config::tests::MINIMAL;
        Config::parse(text, std::path::Path::new("/etc/wardgate/x.toml")).unwrap()
    }

    #[test]
    fn admin_changes_persist_over_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let c = config();
        let p1 = DeviceId::parse("pump-1").unwrap();
        let p2 = DeviceId::parse("pump-2").unwrap();
        let local: IpAddr = "127.0.0.2".parse().unwrap();
        // One store for both "runs" (sled holds its file lock until background work ends;
        // reopening the path at once can race it). What the second run reads is the tree.
        let db = crate::quarantine::open_state(dir.path()).unwrap();
        {
            let mut r = Registry::open(&c, &db).unwrap();
            assert!(matches!(
                r.add(&p1, "pump", local),
                Err(RegistryError::Exists(_))
            ));
            assert!(matches!(
                r.add(&p2, "nope", local),
                Err(RegistryError::UnknownClass(_))
            ));
            r.add(&p2, "pump", local).unwrap();
            assert_eq!(r.remove(&p1).unwrap().source, Source::Config);
            assert!(matches!(r.remove(&p1), Err(RegistryError::Unknown(_))));
        }
        let r = Registry::open(&c, &db).unwrap();
        assert!(
            r.grant(&p1).is_none(),
            "a removed config device stays removed"
        );
        let got = r.get(&p2).unwrap();
        assert_eq!((got.address, got.source), (local, Source::Admin));
        assert!(r.grant(&p2).unwrap().acl.may_publish("ward/pump-2/x"));
    }

    #[test]
    fn entries_of_the_previous_format_are_read_and_a_newer_one_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::quarantine::open_state(dir.path()).unwrap();
        let tree = db.open_tree("devices").unwrap();
        // As wardgate wrote them before entries carried a version.
        tree.insert("pump-1", &br#""removed""#[..]).unwrap();
        tree.insert(
            "pump-7",
            &br#"{"added":{"class":"pump","address":"127.0.0.7"}}"#[..],
        )
        .unwrap();
        tree.insert(
            "pump-8",
            &br#"{"v":3,"overlay":{"added":{"class":"pump","address":"127.0.0.8"}}}"#[..],
        )
        .unwrap();
        let r = Registry::open(&config(), &db).unwrap();
        assert!(r.get(&DeviceId::parse("pump-1").unwrap()).is_none());
        let seven = r.get(&DeviceId::parse("pump-7").unwrap()).unwrap();
        assert_eq!(seven.address, "127.0.0.7".parse::<IpAddr>().unwrap());
        assert!(r.get(&DeviceId::parse("pump-8").unwrap()).is_none());
        assert!(decode_overlay(br#"{"v":3,"overlay":"removed"}"#)
            .unwrap_err()
            .to_string()
            .contains("newer than this wardgate's 2"));
        // What this version writes, it reads.
        let mut r = r;
        r.add(
            &DeviceId::parse("pump-9").unwrap(),
            "pump",
            "127.0.0.9".parse().unwrap(),
        )
        .unwrap();
        let stored = tree.get("pump-9").unwrap().unwrap();
        assert!(stored.starts_with(br#"{"v":2,"overlay":"#), "{stored:?}");
        assert_eq!(
            decode_overlay(&stored).unwrap(),
            Overlay::Added {
                class: "pump".into(),
                address: "127.0.0.9".parse().unwrap()
            }
        );
    }

    #[test]
    fn an_entry_this_wardgate_cannot_read_refuses_its_device_until_it_is_added_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::quarantine::open_state(dir.path()).unwrap();
        let tree = db.open_tree("devices").unwrap();
        let p1 = DeviceId::parse("pump-1").unwrap();
        assert!(Registry::open(&config(), &db).unwrap().get(&p1).is_some());
        // Written by a newer wardgate (a removal, for all this one knows), or damaged.
        for bytes in [&br#"{"v":3,"overlay":"removed"}"#[..], b"{\"v\":2,\"ov"] {
            tree.insert("pump-1", bytes).unwrap();
            let mut r = Registry::open(&config(), &db).unwrap();
            assert!(
                r.get(&p1).is_none(),
                "{bytes:?}: the config device is refused"
            );
            assert!(r.grant(&p1).is_none());
            // An admin's `device add` writes the entry anew.
            r.add(&p1, "pump", "127.0.0.1".parse().unwrap()).unwrap();
            assert!(Registry::open(&config(), &db).unwrap().get(&p1).is_some());
        }
    }
}
