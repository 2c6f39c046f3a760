//! An IP network in CIDR notation (`10.70.0.0/24`, `fd00::/64`, or a bare address).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    fn max_prefix(addr: IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Parses `ADDR/PREFIX` or `ADDR`; host bits must be zero.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network"))?;
        let max = Cidr::max_prefix(addr);
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v4) => u128::from(u32::from(v4)),
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        let host_bits = u32::from(max - prefix);
        let host_mask = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        if bits(addr) & host_mask != 0 {
            return Err(format!(
                "{s:?}: host bits are set (write the network address)"
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == Cidr::max_prefix(self.addr) {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_networks_and_refuses_host_bits() {
        assert_eq!(
            "10.70.0.0/24".parse::<Cidr>().unwrap().to_string(),
            "10.70.0.0/24"
        );
        assert_eq!("10.70.0.5".parse::<Cidr>().unwrap().prefix(), 32);
        assert_eq!(
            "fd00::/64".parse::<Cidr>().unwrap().to_string(),
            "fd00::/64"
        );
        assert!("0.0.0.0/0".parse::<Cidr>().is_ok());
        assert!("10.70.0.5/24"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("host bits"));
        assert!("10.70.0.0/33".parse::<Cidr>().is_err());
        assert!("ward".parse::<Cidr>().is_err());
    }
}
