//! The firewall of a running gateway: applied at start, before the edge listens, and kept
//! in step with the registry and the quarantine by changing its sets in place.
//!
//! Every change is audited (`firewall.applied`, `firewall.updated`, or
//! `firewall.update_failed`). When the gateway stops, the table stays: devices stay
//! confined (fail closed) until the next start replaces it.

use std::sync::{Arc, Mutex, PoisonError};

use super::netlink::{self, NetlinkError};
use super::{render, FirewallConfig, Inputs, Ruleset};
use crate::quarantine::Quarantine;
use crate::registry::SharedRegistry;

#[derive(Debug)]
pub struct LiveFirewall {
    config: FirewallConfig,
    edge_port: u16,
    broker_port: u16,
    uid: u32,
    registry: SharedRegistry,
    quarantine: Arc<Quarantine>,
    events: crate::events::Events,
    current: Mutex<Ruleset>,
}

impl LiveFirewall {
    /// Renders the ruleset from the registry and quarantine, replaces the table with it,
    /// and reads the kernel's table list back.
    pub fn start(
        config: FirewallConfig,
        edge_port: u16,
        broker_port: u16,
        registry: SharedRegistry,
        quarantine: Arc<Quarantine>,
        events: crate::events::Events,
    ) -> Result<Arc<LiveFirewall>, NetlinkError> {
        let fw = LiveFirewall {
            config,
            edge_port,
            broker_port,
            uid: super::own_uid(),
            registry,
            quarantine,
            events,
            current: Mutex::new(Ruleset {
                sets: Vec::new(),
                chains: Vec::new(),
            }),
        };
        let ruleset = fw.render();
        netlink::apply(&ruleset)?;
        if !netlink::table_exists()? {
            return Err(NetlinkError::Build(
                "the kernel accepted the batch but does not list table inet wardgate".into(),
            ));
        }
        let detail = summary(&ruleset);
        fw.events.firewall_applied(&detail);
        *fw.current.lock().unwrap_or_else(PoisonError::into_inner) = ruleset;
        let fw = Arc::new(fw);
        // Quarantine and release change the sets at once.
        let weak = Arc::downgrade(&fw);
        fw.quarantine.on_change(Box::new(move || {
            if let Some(fw) = weak.upgrade() {
                fw.refresh();
            }
        }));
        Ok(fw)
    }

    fn render(&self) -> Ruleset {
        let devices = {
            let registry = self.registry.read().unwrap_or_else(PoisonError::into_inner);
            registry
                .list()
                .into_iter()
                .map(|d| (d.address, self.quarantine.reason(&d.id).is_some()))
                .collect()
        };
        render(&Inputs {
            config: &self.config,
            edge_port: self.edge_port,
            broker_port: self.broker_port,
            gateway_uid: self.uid,
            devices,
        })
    }

    /// Brings the kernel's table in step with the registry and quarantine: set elements in
    /// place, or the whole table if more changed.
    pub fn refresh(&self) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let next = self.render();
        let result = match netlink::set_changes(&current, &next) {
            Some(changes) if changes.is_empty() => return,
            Some(changes) => netlink::update_sets(&next, &changes).map(|()| {
                changes
                    .iter()
                    .map(|c| {
                        let list = |v: &Vec<super::Element>| {
                            v.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(",")
                        };
                        format!("{}:+[{}]-[{}]", c.set, list(&c.add), list(&c.remove))
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            }),
            None => netlink::apply(&next).map(|()| format!("replaced: {}", summary(&next))),
        };
        match result {
            Ok(detail) => {
                self.events.firewall_updated(&detail);
                *current = next;
            }
            Err(e) => self.events.firewall_update_failed(&e),
        }
    }
}

fn summary(r: &Ruleset) -> String {
    r.sets
        .iter()
        .filter(|s| s.dynamic_timeout_s.is_none())
        .map(|s| format!("{}={}", s.name, s.elements.len()))
        .collect::<Vec<_>>()
        .join(" ")
}
