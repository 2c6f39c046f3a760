//! Byte sizes and durations as they are written in the configuration.
//!
//! Sizes are written as a whole number of bytes (`65536`) or a string with a unit
//! (`"64KiB"`, `"1 MiB"`, `"500kB"`). A hand-written parser rather than a crate: the
//! common crates accept fractions and guess at ambiguous units such as `KB`; a
//! configuration that decides how much patient data fits in a spool should be exact, so
//! only whole numbers and unambiguous units are accepted. Durations use `humantime`.

use std::time::Duration;

/// Units accepted after a number, with their multipliers.
const UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("kB", 1_000),
    ("KiB", 1 << 10),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
];

/// Parses `"64KiB"`-style sizes. Returns a message for the configuration diagnostics.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "size {s:?} must start with a whole number, e.g. \"64KiB\""
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {s:?} is too large"))?;
    let unit = unit.trim_start();
    let mult = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                format!("unknown size unit {unit:?}; use one of B, kB, KiB, MB, MiB, GB, GiB")
            })?
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses `"10s"`, `"500ms"`, `"2m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e} (write e.g. \"10s\" or \"500ms\")"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("64 KiB"), Ok(65_536));
        assert_eq!(parse_size("500kB"), Ok(500_000));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("64KB")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("17179869184GiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("ten seconds").is_err());
    }
}
