//! Device identity.
//!
//! A device is named by the Common Name of its client certificate. That name is spliced
//! into topic filters (`ward/{device}/#`), so it must never carry MQTT topic syntax: a CN of
//! `a/#` would otherwise widen a device's ACL to other devices' topics. [`DeviceId`] is the
//! only way to hold a device name, and it admits only a conservative alphabet.
//!
//! Tested by the unit tests below and, end to end, by the system tests that present
//! certificates with hostile CNs.

use std::fmt;

use serde::Serialize;

/// Longest accepted device id. Long enough for asset tags and serial numbers, short enough
/// to keep topics and log lines readable.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// The name of the gateway's own stream: see [`DeviceId::gateway`].
pub const GATEWAY_STREAM: &str = "_gateway";

/// A validated device id: 1 to [`MAX_DEVICE_ID_LEN`] characters of ASCII letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DeviceId(String);

/// Why a string is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("device id is empty")]
    Empty,
    #[error("device id is longer than {MAX_DEVICE_ID_LEN} characters")]
    TooLong,
    #[error("device id must start with a letter or digit")]
    BadStart,
    #[error("device id may contain only ASCII letters, digits, '-', '_' and '.' (found {0:?})")]
    BadChar(char),
}

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, DeviceIdError> {
        let first = s.chars().next().ok_or(DeviceIdError::Empty)?;
        if s.len() > MAX_DEVICE_ID_LEN {
            return Err(DeviceIdError::TooLong);
        }
        if !first.is_ascii_alphanumeric() {
            return Err(DeviceIdError::BadStart);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(DeviceIdError::BadChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    /// The gateway's own stream (its audit records, in the spool and upstream). Its name
    /// starts with `_`, which no device id can, so it never collides with a device.
    pub fn gateway() -> Self {
        Self(GATEWAY_STREAM.to_owned())
    }

    /// True for the gateway's own stream.
    pub fn is_gateway(&self) -> bool {
        self.0 == GATEWAY_STREAM
    }

    /// A device id, or the gateway's own stream, as stored in a spool record.
    pub fn parse_stored(s: &str) -> Result<Self, DeviceIdError> {
        if s == GATEWAY_STREAM {
            Ok(Self::gateway())
        } else {
            Self::parse(s)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "pump-01",
            "bed.7",
            "A",
            "monitor_2",
            &"x".repeat(MAX_DEVICE_ID_LEN),
        ] {
            assert!(DeviceId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_topic_syntax_and_oddities() {
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(DeviceId::parse("a/b"), Err(DeviceIdError::BadChar('/')));
        assert_eq!(DeviceId::parse("a+"), Err(DeviceIdError::BadChar('+')));
        assert_eq!(DeviceId::parse("a#"), Err(DeviceIdError::BadChar('#')));
        assert_eq!(DeviceId::parse("a b"), Err(DeviceIdError::BadChar(' ')));
        assert_eq!(DeviceId::parse("a\0"), Err(DeviceIdError::BadChar('\0')));
        assert_eq!(DeviceId::parse("pümp"), Err(DeviceIdError::BadChar('ü')));
        assert_eq!(DeviceId::parse("-x"), Err(DeviceIdError::BadStart));
        assert_eq!(DeviceId::parse("$SYS"), Err(DeviceIdError::BadStart));
        assert_eq!(
            DeviceId::parse(&"x".repeat(MAX_DEVICE_ID_LEN + 1)),
            Err(DeviceIdError::TooLong)
        );
    }
}
