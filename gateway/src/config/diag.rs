//! Diagnostics, and the validator every section's checks run on: each problem with the
//! line and column of the value at fault, all of them collected before the file is refused.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawSize, S};
use super::units;
use crate::device::DeviceId;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_diagnostics(path, diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

fn render_diagnostics(path: &Path, diagnostics: &[Diagnostic]) -> String {
    let mut out = format!(
        "configuration {} has {} error(s):",
        path.display(),
        diagnostics.len()
    );
    for d in diagnostics {
        out.push_str(&format!(
            "\n{}:{}:{}: {}",
            path.display(),
            d.line,
            d.column,
            d.message
        ));
    }
    out
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Collects the problems of one file while its sections are validated.
pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    /// The directory relative paths are taken from.
    pub(super) base: PathBuf,
    pub(super) diagnostics: Vec<Diagnostic>,
}

impl Validator<'_> {
    pub(super) fn finish(mut self, path: &Path) -> ConfigError {
        self.diagnostics.sort_by_key(|d| (d.line, d.column));
        ConfigError::Invalid {
            path: path.to_owned(),
            diagnostics: self.diagnostics,
        }
    }

    pub(super) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.diagnostics.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }

    /// Records the error of `r` at `span` and returns its value, if any.
    pub(super) fn check<T>(&mut self, span: Range<usize>, r: Result<T, String>) -> Option<T> {
        r.map_err(|m| self.error(span, m)).ok()
    }

    pub(super) fn path(&mut self, s: &S<String>) -> PathBuf {
        let p = Path::new(s.get_ref());
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    pub(super) fn duration(&mut self, s: Option<&S<String>>, default: Duration) -> Duration {
        match s {
            None => default,
            Some(s) => {
                let r = units::parse_duration(s.get_ref()).and_then(|d| {
                    if d.is_zero() {
                        Err("duration must be greater than zero".to_owned())
                    } else {
                        Ok(d)
                    }
                });
                self.check(s.span(), r).unwrap_or(default)
            }
        }
    }

    pub(super) fn size(&mut self, s: Option<&S<RawSize>>, default: u64) -> u64 {
        match s {
            None => default,
            Some(s) => {
                let r = match s.get_ref() {
                    RawSize::Bytes(n) => Ok(*n),
                    RawSize::Text(t) => units::parse_size(t),
                };
                self.check(s.span(), r).unwrap_or(default)
            }
        }
    }

    /// A TCP or UDP port, 1..=65535.
    pub(super) fn port(&mut self, p: &S<i64>) -> Option<u16> {
        let r = u16::try_from(*p.get_ref())
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| "port must be between 1 and 65535".to_owned());
        self.check(p.span(), r)
    }

    pub(super) fn count(&mut self, s: Option<&S<i64>>, default: usize, what: &str) -> usize {
        match s {
            None => default,
            Some(s) => {
                let n = *s.get_ref();
                let r = if n < 1 {
                    Err(format!("{what} must be at least 1"))
                } else {
                    usize::try_from(n).map_err(|_| format!("{what} is too large"))
                };
                self.check(s.span(), r).unwrap_or(default)
            }
        }
    }

    /// A number between `min` and 65,535 (MQTT's two-byte limits).
    pub(super) fn u16_in(&mut self, s: Option<&S<i64>>, default: u16, min: u16, what: &str) -> u16 {
        let Some(s) = s else { return default };
        let n = *s.get_ref();
        let r = u16::try_from(n)
            .ok()
            .filter(|v| *v >= min)
            .ok_or_else(|| format!("{what} must be between {min} and 65535"));
        self.check(s.span(), r).unwrap_or(default)
    }

    pub(super) fn socket_addr(&mut self, s: &S<String>, what: &str) -> Option<SocketAddr> {
        let r = s.get_ref().parse::<SocketAddr>().map_err(|_| {
            format!(
                "{what} {:?} is not an address with a port, e.g. \"0.0.0.0:8883\" or \"[::]:8883\"",
                s.get_ref()
            )
        });
        self.check(s.span(), r)
    }

    pub(super) fn name(&mut self, s: &S<String>, what: &str) -> Option<String> {
        let r = DeviceId::parse(s.get_ref())
            .map(|_| s.get_ref().clone())
            .map_err(|e| format!("{what}: {e}").replace("device id", "name"));
        self.check(s.span(), r)
    }

    /// The value of a required field, or an error at its section if it is missing.
    pub(super) fn required<'r>(
        &mut self,
        field: &'r Option<S<String>>,
        section: &Range<usize>,
        name: &str,
    ) -> Option<&'r S<String>> {
        if field.is_none() {
            self.error(section.clone(), format!("missing field `{name}`"));
        }
        field.as_ref()
    }

    pub(super) fn section<'r, T>(
        &mut self,
        s: &'r Option<S<T>>,
        name: &str,
    ) -> (Option<&'r T>, Range<usize>) {
        match s {
            Some(s) => (Some(s.get_ref()), s.span()),
            None => {
                self.error(0..0, format!("missing section [{name}]"));
                (None, 0..0)
            }
        }
    }

    /// A number in `min..=max`.
    pub(super) fn int_in(&mut self, s: &S<i64>, min: i64, max: i64, what: &str) -> Option<i64> {
        let n = *s.get_ref();
        let r = if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{what} must be between {min} and {max}"))
        };
        self.check(s.span(), r)
    }

    pub(super) fn parsed<T: std::str::FromStr<Err = String>>(
        &mut self,
        s: &S<String>,
    ) -> Option<T> {
        let r = s.get_ref().parse::<T>();
        self.check(s.span(), r)
    }
}
