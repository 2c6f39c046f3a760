//! `[firewall]`: the nftables table wardgate keeps — device interfaces, who may reach the
//! management ports, connection rates at the door, and destinations devices may reach.

use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;

use super::diag::Validator;
use super::raw::{self, S};

/// New edge connections per second from one address, and the burst, at the firewall.
pub const DEFAULT_NEW_CONNECTIONS_PER_SEC: u32 = 5;
pub const DEFAULT_NEW_CONNECTIONS_BURST: u32 = 20;
/// Management ports (SSH) when `[firewall]` names none.
pub const DEFAULT_MANAGEMENT_PORTS: [u16; 1] = [22];

/// `[firewall]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    /// Interfaces the ward's devices are on.
    pub device_interfaces: Vec<String>,
    /// Networks from which the management ports may be reached.
    pub management_networks: Vec<IpNet>,
    /// TCP ports for management (SSH, metrics), reachable only from those networks.
    pub management_ports: Vec<u16>,
    /// New edge connections per second allowed from one source address, and the burst.
    pub new_connections_per_sec: u32,
    pub new_connections_burst: u32,
    /// Destinations beyond the gateway that devices may reach directly.
    pub forward: Vec<Forward>,
}

/// A destination devices may reach through the gateway's routing (e.g. a PACS server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub name: String,
    pub network: IpNet,
    pub protocol: Proto,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A network in CIDR notation (`10.70.0.0/24`, `fd00::/64`) or a bare address (one host);
/// host bits must be zero, so a typo cannot widen or shift the network unnoticed.
pub fn network(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => s
            .parse::<std::net::IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{s:?} is not an IP address or network"))?,
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?}: host bits are set (write the network address)"
        ));
    }
    Ok(net)
}

impl Validator<'_> {
    /// `[firewall]`, which names the embedded broker's and the edge's ports: both must be
    /// fixed.
    pub(super) fn firewall(
        &mut self,
        f: &S<raw::RawFirewall>,
        broker_listen: SocketAddr,
        edge_listen: Option<SocketAddr>,
    ) -> Option<FirewallConfig> {
        let span = f.span();
        if broker_listen.port() == 0 {
            self.error(
                span.clone(),
                "the firewall names the embedded broker's port: give [broker] listen a \
                 fixed port (e.g. \"127.0.0.1:1883\")",
            );
        }
        if edge_listen.is_some_and(|e| e.port() == 0) {
            self.error(
                span,
                "the firewall names the edge port: give [edge] listen a fixed port",
            );
        }
        self.firewall_section(f)
    }

    fn firewall_section(&mut self, f: &S<raw::RawFirewall>) -> Option<FirewallConfig> {
        let span = f.span();
        let f = f.get_ref();
        let mut ok = true;
        let mut device_interfaces = Vec::new();
        match &f.device_interfaces {
            None => {
                self.error(span.clone(), "missing field `device_interfaces`");
                ok = false;
            }
            Some(list) if list.get_ref().is_empty() => {
                self.error(list.span(), "name at least one device interface");
                ok = false;
            }
            Some(list) => {
                for i in list.get_ref() {
                    let name = i.get_ref();
                    let valid = !name.is_empty()
                        && name.len() < 16
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                    if valid {
                        device_interfaces.push(name.clone());
                    } else {
                        self.error(i.span(), format!("{name:?} is not an interface name"));
                        ok = false;
                    }
                }
            }
        }
        let mut management_networks = Vec::new();
        for n in &f.management_networks {
            match network(n.get_ref()) {
                Ok(c) => management_networks.push(c),
                Err(e) => {
                    self.error(n.span(), e);
                    ok = false;
                }
            }
        }
        let management_ports = match &f.management_ports {
            None => Some(DEFAULT_MANAGEMENT_PORTS.to_vec()),
            Some(ports) => ports.iter().map(|p| self.port(p)).collect(),
        };
        let mut forward = Vec::new();
        for fw in &f.forward {
            let fspan = fw.span();
            let fw = fw.get_ref();
            let name = self
                .required(&fw.name, &fspan, "name")
                .and_then(|n| self.name(n, "forward name"));
            let network = self
                .required(&fw.network, &fspan, "network")
                .and_then(|n| self.check(n.span(), network(n.get_ref())));
            let protocol = match &fw.protocol {
                None => Some(Proto::Tcp),
                Some(p) => {
                    let r = match p.get_ref().as_str() {
                        "tcp" => Ok(Proto::Tcp),
                        "udp" => Ok(Proto::Udp),
                        other => Err(format!("protocol {other:?}: write \"tcp\" or \"udp\"")),
                    };
                    self.check(p.span(), r)
                }
            };
            let port = match &fw.port {
                None => {
                    self.error(fspan.clone(), "missing field `port`");
                    None
                }
                Some(p) => self.port(p),
            };
            match (name, network, protocol, port) {
                (Some(name), Some(network), Some(protocol), Some(port)) => forward.push(Forward {
                    name,
                    network,
                    protocol,
                    port,
                }),
                _ => ok = false,
            }
        }
        let rate = |v: &mut Self, s: Option<&S<i64>>, default: u32, what: &str| {
            let n = v.count(s, default as usize, what);
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        let new_connections_per_sec = rate(
            self,
            f.new_connections_per_sec.as_ref(),
            DEFAULT_NEW_CONNECTIONS_PER_SEC,
            "new_connections_per_sec",
        );
        let new_connections_burst = rate(
            self,
            f.new_connections_burst.as_ref(),
            DEFAULT_NEW_CONNECTIONS_BURST,
            "new_connections_burst",
        );
        let management_ports = management_ports?;
        ok.then_some(FirewallConfig {
            device_interfaces,
            management_networks,
            management_ports,
            new_connections_per_sec,
            new_connections_burst,
            forward,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_host_bits_are_refused() {
        assert_eq!(network("10.70.0.0/24").unwrap().to_string(), "10.70.0.0/24");
        assert_eq!(network("10.70.0.5").unwrap().prefix_len(), 32);
        assert_eq!(network("fd00::/64").unwrap().to_string(), "fd00::/64");
        assert_eq!(network("fd00::1").unwrap().prefix_len(), 128);
        assert!(network("0.0.0.0/0").is_ok());
        assert!(network("10.70.0.5/24").unwrap_err().contains("host bits"));
        assert!(network("10.70.0.0/33").is_err());
        assert!(network("ward").is_err());
    }
}
