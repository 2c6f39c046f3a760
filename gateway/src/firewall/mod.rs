//! The firewall: nftables rules derived from the device registry.
//!
//! [`render`] is a pure function from the configuration, the registry and the quarantine
//! to a [`Ruleset`]: one table of our own, `inet wardgate`, with sets of registered and
//! quarantined device addresses and the chains below. The same model is written as `nft`
//! syntax ([`Ruleset`]'s `Display`, for `wardgate firewall render` and the snapshot tests)
//! and, by [`netlink`], as one atomic nf_tables batch through nftnl; [`live`] keeps the
//! kernel's sets in step with the registry while the gateway runs. Nothing outside our
//! table is ever touched.
//!
//! Policy, deny by default for device traffic:
//! - `input`: packets from a device interface go to `from_devices`: a quarantined address
//!   is dropped (even on an established connection); established and related packets
//!   pass; new connections to the edge port are limited per source address (a dynamic set
//!   with a token bucket, entries expire after a minute) and accepted only from a
//!   registered address; IPv6 neighbour discovery passes; everything else is counted and
//!   dropped. Management ports (SSH, …) are accepted only from the management networks,
//!   on any interface but a device one. The embedded broker's port is dropped unless it
//!   arrives on loopback.
//! - `output`: a local process other than the gateway's user may not reach the embedded
//!   broker on loopback.
//! - `forward`: device traffic is dropped (devices talk only through the gateway's
//!   policy), except to destinations the configuration names; nothing is forwarded to a
//!   device but replies.
//!
//! An address enters the quarantine set only when every device registered at it is
//! quarantined: a monitor sharing an address with a quarantined pump keeps its network,
//! and the edge alone refuses the pump. (Patient safety over tidiness; see the README.)
//!
//! Tested by the snapshot tests below and the system tests in `tests/system/firewall.rs`
//! (network namespaces, real packets).

pub mod live;
pub mod netlink;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

pub use crate::config::{FirewallConfig, Forward, Proto};
pub use ipnet::IpNet;

/// The one table wardgate owns.
pub const TABLE: &str = "wardgate";

/// What the ruleset is rendered from, beside the configuration.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub config: &'a FirewallConfig,
    /// The edge's TCP port (devices' only way in).
    pub edge_port: u16,
    /// The embedded broker's loopback port.
    pub broker_port: u16,
    /// The user the gateway runs as (the only one that may reach the broker).
    pub gateway_uid: u32,
    /// Every registered device's address, with whether that device is quarantined.
    pub devices: Vec<(IpAddr, bool)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn addr(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
    fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetType {
    Ipv4,
    Ipv6,
    Ifname,
}

/// A named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub kind: SetType,
    /// Filled by the data path (the flood meter), with entries that expire.
    pub dynamic_timeout_s: Option<u32>,
    pub elements: Vec<Element>,
}

/// A set element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Element {
    Addr(IpAddr),
    Ifname(String),
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::Addr(a) => write!(f, "{a}"),
            Element::Ifname(i) => write!(f, "{i:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtState {
    Established,
    Related,
    Invalid,
    New,
}

/// One piece of a rule, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    IifnameInSet(String),
    OifnameInSet(String),
    Iifname(String),
    IifnameNot(String),
    Oifname(String),
    CtState(Vec<CtState>),
    /// `ip saddr @set`.
    SaddrInSet {
        family: Family,
        set: String,
    },
    Saddr(IpNet),
    Daddr(IpNet),
    Dport {
        proto: Proto,
        port: u16,
    },
    Icmpv6Type(&'static str),
    SkuidNot(u32),
    /// Per source address: `update @set { ip saddr limit rate over R/second burst B packets }`.
    Meter {
        family: Family,
        set: String,
        rate: u32,
        burst: u32,
    },
    Counter,
    Accept,
    Drop,
    Jump(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub stmts: Vec<Stmt>,
    pub comment: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Input,
    Output,
    Forward,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// A base chain: its hook (filter type, priority 0, policy accept: only our own
    /// traffic classes are decided here, others' tables keep theirs).
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

pub const DEVICE_IFACES: &str = "device_ifaces";
/// How long an idle source stays in the flood meter.
const METER_TIMEOUT_S: u32 = 60;

/// The set names for registered devices, quarantined ones and the flood meter, per family.
pub fn set_name(what: &str, family: Family) -> String {
    format!("{what}_{}", family.suffix())
}

fn rule(stmts: Vec<Stmt>, comment: &str) -> Rule {
    Rule {
        stmts,
        comment: comment.to_owned(),
    }
}

/// The ruleset for `inputs`. Pure.
pub fn render(inputs: &Inputs<'_>) -> Ruleset {
    let c = inputs.config;
    let families = [Family::V4, Family::V6];
    // An address is quarantined at the firewall only if every device at it is.
    let mut registered = BTreeSet::new();
    let mut cut = BTreeSet::new();
    let mut keep = BTreeSet::new();
    for (ip, quarantined) in &inputs.devices {
        let ip = canonical(*ip);
        if *quarantined {
            cut.insert(ip);
        } else {
            keep.insert(ip);
            registered.insert(ip);
        }
    }
    let quarantined: BTreeSet<IpAddr> = cut.difference(&keep).copied().collect();
    let of = |set: &BTreeSet<IpAddr>, f: Family| -> Vec<Element> {
        set.iter()
            .filter(|ip| Family::of(**ip) == f)
            .map(|ip| Element::Addr(*ip))
            .collect()
    };

    let mut sets = vec![Set {
        name: DEVICE_IFACES.into(),
        kind: SetType::Ifname,
        dynamic_timeout_s: None,
        elements: c
            .device_interfaces
            .iter()
            .map(|i| Element::Ifname(i.clone()))
            .collect(),
    }];
    for f in families {
        let kind = match f {
            Family::V4 => SetType::Ipv4,
            Family::V6 => SetType::Ipv6,
        };
        let plain = |what: &str, elements: Vec<Element>| Set {
            name: set_name(what, f),
            kind,
            dynamic_timeout_s: None,
            elements,
        };
        sets.push(plain("devices", of(&registered, f)));
        sets.push(plain("quarantine", of(&quarantined, f)));
        sets.push(Set {
            dynamic_timeout_s: Some(METER_TIMEOUT_S),
            ..plain("flood", Vec::new())
        });
    }

    let edge = Stmt::Dport {
        proto: Proto::Tcp,
        port: inputs.edge_port,
    };
    let broker = Stmt::Dport {
        proto: Proto::Tcp,
        port: inputs.broker_port,
    };
    let from_devices = || Stmt::IifnameInSet(DEVICE_IFACES.into());
    let saddr = |f: Family, what: &str| Stmt::SaddrInSet {
        family: f,
        set: set_name(what, f),
    };

    let mut input = vec![
        rule(
            vec![from_devices(), Stmt::Jump("from_devices".into())],
            "device interfaces: deny by default",
        ),
        rule(
            vec![
                Stmt::IifnameNot("lo".into()),
                broker.clone(),
                Stmt::Counter,
                Stmt::Drop,
            ],
            "the embedded broker is loopback only",
        ),
    ];
    for port in &c.management_ports {
        let port = Stmt::Dport {
            proto: Proto::Tcp,
            port: *port,
        };
        for net in &c.management_networks {
            input.push(rule(
                vec![Stmt::Saddr(*net), port.clone(), Stmt::Accept],
                "management from the management networks",
            ));
        }
        input.push(rule(
            vec![port, Stmt::Counter, Stmt::Drop],
            "management from anywhere else",
        ));
    }

    let mut devices = Vec::new();
    for f in families {
        devices.push(rule(
            vec![saddr(f, "quarantine"), Stmt::Counter, Stmt::Drop],
            "quarantined",
        ));
    }
    devices.push(rule(
        vec![
            Stmt::CtState(vec![CtState::Established, CtState::Related]),
            Stmt::Accept,
        ],
        "replies and the rest of accepted connections",
    ));
    devices.push(rule(
        vec![
            Stmt::CtState(vec![CtState::Invalid]),
            Stmt::Counter,
            Stmt::Drop,
        ],
        "invalid",
    ));
    for t in [
        "nd-neighbor-solicit",
        "nd-neighbor-advert",
        "nd-router-solicit",
    ] {
        devices.push(rule(
            vec![Stmt::Icmpv6Type(t), Stmt::Accept],
            "IPv6 neighbour discovery",
        ));
    }
    for f in families {
        devices.push(rule(
            vec![
                edge.clone(),
                Stmt::CtState(vec![CtState::New]),
                Stmt::Meter {
                    family: f,
                    set: set_name("flood", f),
                    rate: c.new_connections_per_sec,
                    burst: c.new_connections_burst,
                },
                Stmt::Counter,
                Stmt::Drop,
            ],
            "new connections over the per-address rate",
        ));
    }
    for f in families {
        devices.push(rule(
            vec![saddr(f, "devices"), edge.clone(), Stmt::Accept],
            "registered devices reach the edge",
        ));
    }
    devices.push(rule(vec![Stmt::Counter, Stmt::Drop], "anything else"));

    let output = vec![rule(
        vec![
            Stmt::Oifname("lo".into()),
            broker,
            Stmt::SkuidNot(inputs.gateway_uid),
            Stmt::Counter,
            Stmt::Drop,
        ],
        "only the gateway reaches the embedded broker",
    )];

    let mut forward = Vec::new();
    for f in families {
        forward.push(rule(
            vec![
                from_devices(),
                saddr(f, "quarantine"),
                Stmt::Counter,
                Stmt::Drop,
            ],
            "quarantined",
        ));
    }
    forward.push(rule(
        vec![from_devices(), Stmt::Jump("device_forward".into())],
        "device interfaces: deny by default",
    ));
    forward.push(rule(
        vec![
            Stmt::OifnameInSet(DEVICE_IFACES.into()),
            Stmt::CtState(vec![CtState::Established, CtState::Related]),
            Stmt::Accept,
        ],
        "replies to devices",
    ));
    forward.push(rule(
        vec![
            Stmt::OifnameInSet(DEVICE_IFACES.into()),
            Stmt::Counter,
            Stmt::Drop,
        ],
        "nothing else reaches a device",
    ));
    let mut device_forward = vec![rule(
        vec![
            Stmt::CtState(vec![CtState::Established, CtState::Related]),
            Stmt::Accept,
        ],
        "replies and the rest of allowed connections",
    )];
    for d in &c.forward {
        let f = Family::of(d.network.addr());
        device_forward.push(rule(
            vec![
                saddr(f, "devices"),
                Stmt::Daddr(d.network),
                Stmt::Dport {
                    proto: d.protocol,
                    port: d.port,
                },
                Stmt::Accept,
            ],
            &format!("allowed destination {}", d.name),
        ));
    }
    device_forward.push(rule(
        vec![Stmt::Counter, Stmt::Drop],
        "device to device, device to anywhere",
    ));

    let chain = |name: &str, hook, rules| Chain {
        name: name.into(),
        hook,
        rules,
    };
    Ruleset {
        sets,
        chains: vec![
            chain("input", Some(Hook::Input), input),
            chain("from_devices", None, devices),
            chain("output", Some(Hook::Output), output),
            chain("forward", Some(Hook::Forward), forward),
            chain("device_forward", None, device_forward),
        ],
    }
}

/// The user this process runs as: its sockets' owner, which the ruleset matches.
pub fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// A network as nft lists it: one host as its bare address.
struct Net<'a>(&'a IpNet);

impl fmt::Display for Net<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 at the firewall.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl fmt::Display for Stmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stmt::IifnameInSet(s) => write!(f, "iifname @{s}"),
            Stmt::OifnameInSet(s) => write!(f, "oifname @{s}"),
            Stmt::Iifname(i) => write!(f, "iifname {i:?}"),
            Stmt::IifnameNot(i) => write!(f, "iifname != {i:?}"),
            Stmt::Oifname(i) => write!(f, "oifname {i:?}"),
            Stmt::CtState(states) => {
                let names: Vec<&str> = states
                    .iter()
                    .map(|s| match s {
                        CtState::Established => "established",
                        CtState::Related => "related",
                        CtState::Invalid => "invalid",
                        CtState::New => "new",
                    })
                    .collect();
                write!(f, "ct state {}", names.join(","))
            }
            Stmt::SaddrInSet { family, set } => write!(f, "{} saddr @{set}", family.addr()),
            Stmt::Saddr(n) => write!(f, "{} saddr {}", Family::of(n.addr()).addr(), Net(n)),
            Stmt::Daddr(n) => write!(f, "{} daddr {}", Family::of(n.addr()).addr(), Net(n)),
            Stmt::Dport { proto, port } => write!(f, "{proto} dport {port}"),
            Stmt::Icmpv6Type(t) => write!(f, "icmpv6 type {t}"),
            Stmt::SkuidNot(uid) => write!(f, "meta skuid != {uid}"),
            Stmt::Meter {
                family,
                set,
                rate,
                burst,
            } => write!(
                f,
                "update @{set} {{ {} saddr limit rate over {rate}/second burst {burst} packets }}",
                family.addr()
            ),
            Stmt::Counter => f.write_str("counter"),
            Stmt::Accept => f.write_str("accept"),
            Stmt::Drop => f.write_str("drop"),
            Stmt::Jump(c) => write!(f, "jump {c}"),
        }
    }
}

impl fmt::Display for Ruleset {
    /// The table in `nft -f` syntax.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {TABLE} {{")?;
        for s in &self.sets {
            let kind = match s.kind {
                SetType::Ipv4 => "ipv4_addr",
                SetType::Ipv6 => "ipv6_addr",
                SetType::Ifname => "ifname",
            };
            writeln!(f, "\tset {} {{", s.name)?;
            writeln!(f, "\t\ttype {kind}")?;
            if let Some(t) = s.dynamic_timeout_s {
                writeln!(f, "\t\tsize 65535")?;
                writeln!(f, "\t\tflags dynamic,timeout")?;
                writeln!(f, "\t\ttimeout {t}s")?;
            }
            if !s.elements.is_empty() {
                let elements: Vec<String> = s.elements.iter().map(ToString::to_string).collect();
                writeln!(f, "\t\telements = {{ {} }}", elements.join(", "))?;
            }
            writeln!(f, "\t}}\n")?;
        }
        for (i, c) in self.chains.iter().enumerate() {
            writeln!(f, "\tchain {} {{", c.name)?;
            if let Some(h) = c.hook {
                let hook = match h {
                    Hook::Input => "input",
                    Hook::Output => "output",
                    Hook::Forward => "forward",
                };
                writeln!(
                    f,
                    "\t\ttype filter hook {hook} priority filter; policy accept;"
                )?;
            }
            for r in &c.rules {
                let stmts: Vec<String> = r.stmts.iter().map(ToString::to_string).collect();
                writeln!(f, "\t\t{} comment {:?}", stmts.join(" "), r.comment)?;
            }
            writeln!(f, "\t}}")?;
            if i + 1 < self.chains.len() {
                writeln!(f)?;
            }
        }
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests;
