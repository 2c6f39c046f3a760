//! Snapshot tests: the rendered ruleset for a few registries, compared with the files in
//! `snapshots/`. After an intended change, `WARDGATE_UPDATE_SNAPSHOTS=1 cargo test -p
//! wardgate --lib firewall` rewrites them; the diff is then part of the review.

use super::*;
use crate::config::firewall::network;

fn config() -> FirewallConfig {
    FirewallConfig {
        device_interfaces: vec!["ward0".into()],
        management_networks: Vec::new(),
        management_ports: Vec::new(),
        new_connections_per_sec: 5,
        new_connections_burst: 10,
        forward: Vec::new(),
    }
}

fn inputs<'a>(config: &'a FirewallConfig, devices: Vec<(&str, bool)>) -> Inputs<'a> {
    Inputs {
        config,
        edge_port: 8883,
        broker_port: 1883,
        gateway_uid: 0,
        devices: devices
            .into_iter()
            .map(|(ip, q)| (ip.parse().unwrap(), q))
            .collect(),
    }
}

fn snapshot(name: &str, ruleset: &Ruleset) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/firewall/snapshots")
        .join(format!("{name}.nft"));
    let got = ruleset.to_string();
    if std::env::var_os("WARDGATE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; WARDGATE_UPDATE_SNAPSHOTS=1 writes it",
            path.display()
        )
    });
    assert_eq!(
        got,
        want,
        "rendered ruleset differs from {}",
        path.display()
    );
}

#[test]
fn an_empty_ward_admits_no_device() {
    let c = config();
    let r = render(&inputs(&c, vec![]));
    snapshot("empty", &r);
    let devices = r.sets.iter().find(|s| s.name == "devices_v4").unwrap();
    assert!(devices.elements.is_empty());
}

#[test]
fn a_ward_with_quarantine_management_and_a_forward() {
    let mut c = config();
    c.device_interfaces.push("ward1".into());
    c.management_networks = vec![
        network("10.70.0.0/24").unwrap(),
        network("fd70::/64").unwrap(),
    ];
    c.management_ports = vec![22, 9100];
    c.forward = vec![Forward {
        name: "pacs".into(),
        network: network("10.1.2.3").unwrap(),
        protocol: Proto::Tcp,
        port: 104,
    }];
    let r = render(&inputs(
        &c,
        vec![
            ("10.70.1.21", false),
            ("10.70.1.22", true),
            // Two devices behind one address, one quarantined: the address stays open.
            ("10.70.1.30", true),
            ("10.70.1.30", false),
            ("::ffff:10.70.1.40", false),
            ("fd70::1:50", false),
        ],
    ));
    snapshot("ward", &r);
    let elements = |name: &str| -> Vec<String> {
        r.sets
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .elements
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        elements("devices_v4"),
        ["10.70.1.21", "10.70.1.30", "10.70.1.40"]
    );
    assert_eq!(elements("quarantine_v4"), ["10.70.1.22"]);
    assert_eq!(elements("devices_v6"), ["fd70::1:50"]);
}

#[test]
fn registry_changes_become_set_element_changes_and_more_replaces_the_table() {
    let c = config();
    let before = render(&inputs(
        &c,
        vec![("10.70.1.21", false), ("10.70.1.22", false)],
    ));
    let after = render(&inputs(
        &c,
        vec![("10.70.1.21", true), ("10.70.1.23", false)],
    ));
    let changes = netlink::set_changes(&before, &after).unwrap();
    let addr = |s: &str| Element::Addr(s.parse().unwrap());
    assert_eq!(
        changes,
        [
            netlink::SetChange {
                set: "devices_v4".into(),
                add: vec![addr("10.70.1.23")],
                remove: vec![addr("10.70.1.21"), addr("10.70.1.22")],
            },
            netlink::SetChange {
                set: "quarantine_v4".into(),
                add: vec![addr("10.70.1.21")],
                remove: vec![],
            },
        ]
    );
    assert_eq!(netlink::set_changes(&after, &after), Some(vec![]));
    let mut other = c.clone();
    other.management_ports = vec![2222];
    let reshaped = render(&inputs(&other, vec![]));
    assert_eq!(
        netlink::set_changes(&before, &reshaped),
        None,
        "chains differ"
    );
}
