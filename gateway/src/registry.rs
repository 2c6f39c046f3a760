//! The device registry: which devices exist, their class and address, and what each class
//! may do. Built from the configuration; the edge reads it on every CONNECT.
//!
//! Runtime changes (add, remove, quarantine) arrive with the admin socket in their own
//! issue; the registry is shared behind a lock so that they can.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use crate::config::{Config, DeviceClass, DeviceEntry};
use crate::device::DeviceId;
use crate::policy::{Acl, TopicFilter};
use crate::spool::Priority;

/// What a registered device is granted, resolved at CONNECT.
#[derive(Debug, Clone)]
pub struct Grant {
    pub class: String,
    pub address: IpAddr,
    pub acl: Acl,
    pub max_payload: usize,
    pub rate: crate::policy::RateLimits,
    alarm: Vec<TopicFilter>,
    vital: Vec<TopicFilter>,
}

impl Grant {
    /// The priority class of a topic this device publishes: alarm, vital, else routine.
    pub fn priority(&self, topic: &str) -> Priority {
        if self.alarm.iter().any(|f| f.matches(topic)) {
            Priority::Alarm
        } else if self.vital.iter().any(|f| f.matches(topic)) {
            Priority::Vital
        } else {
            Priority::Routine
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Registry {
    classes: BTreeMap<String, DeviceClass>,
    devices: BTreeMap<DeviceId, DeviceEntry>,
}

pub type SharedRegistry = Arc<RwLock<Registry>>;

impl Registry {
    pub fn from_config(config: &Config) -> Self {
        Self {
            classes: config.classes.clone(),
            devices: config.devices.clone(),
        }
    }

    pub fn shared(self) -> SharedRegistry {
        Arc::new(RwLock::new(self))
    }

    /// The grant of a registered device, or `None` for an unknown one.
    pub fn grant(&self, device: &DeviceId) -> Option<Grant> {
        let entry = self.devices.get(device)?;
        // Validation guarantees the class exists; a missing one grants nothing.
        let class = self.classes.get(&entry.class)?;
        Some(Grant {
            class: class.name.clone(),
            address: entry.address,
            acl: Acl::for_device(device, &class.publish, &class.subscribe),
            max_payload: usize::try_from(class.max_payload).unwrap_or(usize::MAX),
            rate: class.rate,
            alarm: class.alarm.iter().map(|t| t.expand(device)).collect(),
            vital: class.vital.iter().map(|t| t.expand(device)).collect(),
        })
    }
}
