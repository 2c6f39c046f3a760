//! Bundle versions, as the floor, the update record and the repository's targets name them.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A bundle version: dot-separated numbers, compared numerically ("1.10.0" > "1.9.2").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(Vec<u64>);

/// Text that is not a [`Version`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a version (numbers separated by dots)")]
pub struct NotAVersion(pub String);

impl FromStr for Version {
    type Err = NotAVersion;
    fn from_str(s: &str) -> Result<Version, NotAVersion> {
        let parts: Result<Vec<u64>, _> = s.split('.').map(str::parse).collect();
        match parts {
            Ok(p) if !p.is_empty() => Ok(Version(p)),
            _ => Err(NotAVersion(s.to_owned())),
        }
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.0.len().max(other.0.len());
        for i in 0..n {
            let (a, b) = (
                self.0.get(i).copied().unwrap_or(0),
                other.0.get(i).copied().unwrap_or(0),
            );
            match a.cmp(&b) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        Ordering::Equal
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("1.10.0") > v("1.9.2"));
        assert!(v("2") > v("1.99"));
        assert_eq!(v("1.2"), v("1.2"));
        assert_eq!(v("1.2").cmp(&v("1.2.0")), Ordering::Equal);
        assert!("1.x".parse::<Version>().is_err());
        assert!("".parse::<Version>().is_err());
    }
}
