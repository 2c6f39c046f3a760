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

    /// The packets and bytes each dropping rule of the kernel's table counted, summed by the
    /// rule's comment (a closed set: the renderer's). Read with `nft --json`, within
    /// [`NFT_TIMEOUT`]; empty if that fails (logged).
    pub async fn drops(&self) -> Vec<(String, u64, u64)> {
        match read_drops().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(event = "firewall.counters_unreadable", error = %e, "firewall drop counters could not be read");
                Vec::new()
            }
        }
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

/// How long reading the firewall's counters may take.
pub const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `nft --json list table`, its output read while it runs (a table with many devices in
/// its sets is more than a pipe holds), killed past [`NFT_TIMEOUT`].
async fn read_drops() -> Result<Vec<(String, u64, u64)>, String> {
    let out = tokio::process::Command::new("nft")
        .args(["--json", "list", "table", "inet", super::TABLE])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(NFT_TIMEOUT, out)
        .await
        .map_err(|_| format!("nft did not answer within {NFT_TIMEOUT:?}"))?
        .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft: {}", out.status));
    }
    drops_of(&out.stdout)
}

/// The drop counters in `nft --json list table` output.
fn drops_of(json: &[u8]) -> Result<Vec<(String, u64, u64)>, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let mut by_rule: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let exprs = rule["expr"].as_array().cloned().unwrap_or_default();
        if !exprs.iter().any(|e| e.get("drop").is_some()) {
            continue;
        }
        let Some(counter) = exprs.iter().find_map(|e| e.get("counter")) else {
            continue;
        };
        let name = rule["comment"].as_str().map_or_else(
            || format!("chain {}", rule["chain"].as_str().unwrap_or("?")),
            str::to_owned,
        );
        let t = by_rule.entry(name).or_default();
        t.0 += counter["packets"].as_u64().unwrap_or(0);
        t.1 += counter["bytes"].as_u64().unwrap_or(0);
    }
    Ok(by_rule.into_iter().map(|(k, (p, b))| (k, p, b)).collect())
}

#[cfg(test)]
mod counter_tests {
    #[test]
    fn drop_counters_are_summed_by_rule_comment_and_accepts_ignored() {
        // As nft 1.0.6 prints `list table` with --json (trimmed).
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"rule": {"family": "inet", "table": "wardgate", "chain": "from_devices", "handle": 5,
            "comment": "quarantined", "expr": [{"match": {}}, {"counter": {"packets": 3, "bytes": 180}}, {"drop": null}]}},
          {"rule": {"family": "inet", "table": "wardgate", "chain": "from_devices", "handle": 6,
            "comment": "quarantined", "expr": [{"match": {}}, {"counter": {"packets": 1, "bytes": 80}}, {"drop": null}]}},
          {"rule": {"family": "inet", "table": "wardgate", "chain": "from_devices", "handle": 7,
            "comment": "registered devices reach the edge", "expr": [{"match": {}}, {"accept": null}]}},
          {"rule": {"family": "inet", "table": "wardgate", "chain": "from_devices", "handle": 9,
            "comment": "anything else", "expr": [{"counter": {"packets": 12, "bytes": 720}}, {"drop": null}]}}]}"#;
        assert_eq!(
            super::drops_of(json).unwrap(),
            vec![
                ("anything else".to_owned(), 12, 720),
                ("quarantined".to_owned(), 4, 260)
            ]
        );
        assert!(super::drops_of(b"not json").is_err());
    }
}
