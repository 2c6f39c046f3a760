//! The boot backends besides the state file ([`crate::slots::StateFile`]):
//!
//! - [`UBootEnv`]: U-Boot's environment, read with `fw_printenv` and changed with one
//!   `fw_setenv --script` (libubootenv writes the whole environment at once, to the
//!   redundant copy where the board has one). Variables: `wardgate_default` (A or B),
//!   `wardgate_try` and `wardgate_tries` during a trial. The board's boot script reads them
//!   as the QEMU image's script reads the state file: boot `wardgate_try` while
//!   `wardgate_tries` is above 0, counting down, else `wardgate_default`.
//! - [`RpiTryboot`]: the Raspberry Pi firmware's A/B support. `autoboot.txt` names the
//!   default partition in `[all]` and the trial one in `[tryboot]`; the firmware boots the
//!   `[tryboot]` partition only on a reboot asked for with `reboot "0 tryboot"` (the
//!   agent's `reboot_command` on such boards), once — any later reset boots `[all]`.
//!
//! Tested by `agent/tests/it/boot.rs`: the U-Boot backend against the real `fw_printenv` /
//! `fw_setenv` on a file-backed environment made by `mkenvimage`, the tryboot backend on a
//! file.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Boot;
use crate::slots::{BootControl, BootError, BootState, Slot, StateFile};

/// The backend a configuration names.
pub fn open(cfg: &Boot) -> Box<dyn BootControl + Send> {
    match cfg {
        Boot::StateFile { path } => Box::new(StateFile { path: path.clone() }),
        Boot::UBootEnv { fw_env_config } => Box::new(UBootEnv {
            fw_env_config: fw_env_config.clone(),
        }),
        Boot::RpiTryboot {
            autoboot,
            partitions,
        } => Box::new(RpiTryboot {
            autoboot: autoboot.clone(),
            partitions: *partitions,
        }),
    }
}

fn slot_value(path: &Path, key: &str, v: &str) -> Result<Slot, BootError> {
    match v.trim() {
        "A" => Ok(Slot::A),
        "B" => Ok(Slot::B),
        _ => Err(BootError::Corrupt {
            path: path.to_owned(),
            line: format!("{key}={v}"),
        }),
    }
}

/// U-Boot's environment through libubootenv's tools.
#[derive(Debug, Clone)]
pub struct UBootEnv {
    /// `-c` for the tools; `None` is their default, `/etc/fw_env.config`.
    pub fw_env_config: Option<PathBuf>,
}

impl UBootEnv {
    fn config_path(&self) -> PathBuf {
        self.fw_env_config
            .clone()
            .unwrap_or_else(|| "/etc/fw_env.config".into())
    }

    fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        if let Some(cfg) = &self.fw_env_config {
            c.arg("-c").arg(cfg);
        }
        c
    }

    fn failed(&self, what: &str, detail: String) -> BootError {
        BootError::Io {
            path: self.config_path(),
            source: std::io::Error::other(format!("{what}: {detail}")),
        }
    }

    fn run(&self, mut c: Command, what: &str) -> Result<String, BootError> {
        let out = c
            .output()
            .map_err(|e| self.failed(what, format!("{e} (install libubootenv-tool)")))?;
        if !out.status.success() {
            return Err(self.failed(
                what,
                format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets (or, with an empty value, deletes) variables in one write.
    fn setenv(&self, vars: &[(&str, String)]) -> Result<(), BootError> {
        let mut script = tempfile_in_tmp()?;
        {
            use std::io::Write;
            for (k, v) in vars {
                writeln!(script.1, "{k}={v}").map_err(|e| self.failed("script", e.to_string()))?;
            }
        }
        let mut c = self.tool("fw_setenv");
        c.arg("-s").arg(&script.0);
        let r = self.run(c, "fw_setenv");
        let _ = std::fs::remove_file(&script.0);
        r.map(drop)
    }
}

/// A private temporary file for `fw_setenv --script`.
fn tempfile_in_tmp() -> Result<(PathBuf, std::fs::File), BootError> {
    let path = std::env::temp_dir().join(format!(
        "wardgate-agent-fw_setenv-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| BootError::Io {
            path: path.clone(),
            source,
        })?;
    Ok((path, f))
}

impl BootControl for UBootEnv {
    fn state(&self) -> Result<BootState, BootError> {
        let text = self.run(self.tool("fw_printenv"), "fw_printenv")?;
        let path = self.config_path();
        let (mut default, mut try_slot, mut tries) = (None, None, None);
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "wardgate_default" => default = Some(slot_value(&path, k, v)?),
                "wardgate_try" if !v.is_empty() => try_slot = Some(slot_value(&path, k, v)?),
                "wardgate_tries" if !v.is_empty() => {
                    tries = Some(v.trim().parse::<u32>().map_err(|_| BootError::Corrupt {
                        path: path.clone(),
                        line: line.to_owned(),
                    })?)
                }
                _ => {}
            }
        }
        Ok(BootState {
            // A board that never had an update boots A.
            default: default.unwrap_or(Slot::A),
            trial: try_slot.map(|s| (s, tries.unwrap_or(0))),
        })
    }

    fn set(&mut self, s: BootState) -> Result<(), BootError> {
        let (try_slot, tries) = match s.trial {
            Some((slot, n)) => (slot.to_string(), n.to_string()),
            // An empty value deletes the variable.
            None => (String::new(), String::new()),
        };
        self.setenv(&[
            ("wardgate_default", s.default.to_string()),
            ("wardgate_try", try_slot),
            ("wardgate_tries", tries),
        ])
    }
}

/// The Raspberry Pi firmware's `autoboot.txt`.
#[derive(Debug, Clone)]
pub struct RpiTryboot {
    pub autoboot: PathBuf,
    /// The boot partition numbers of slots A and B.
    pub partitions: [u32; 2],
}

impl RpiTryboot {
    fn slot_of(&self, line: &str, n: &str) -> Result<Slot, BootError> {
        let corrupt = || BootError::Corrupt {
            path: self.autoboot.clone(),
            line: line.to_owned(),
        };
        let n: u32 = n.trim().parse().map_err(|_| corrupt())?;
        if n == self.partitions[0] {
            Ok(Slot::A)
        } else if n == self.partitions[1] {
            Ok(Slot::B)
        } else {
            Err(corrupt())
        }
    }

    fn partition(&self, s: Slot) -> u32 {
        match s {
            Slot::A => self.partitions[0],
            Slot::B => self.partitions[1],
        }
    }

    fn write(&self, s: BootState) -> Result<(), BootError> {
        let mut text = format!(
            "# Written by wardgate-agent.\n[all]\ntryboot_a_b=1\nboot_partition={}\n",
            self.partition(s.default)
        );
        if let Some((slot, _)) = s.trial {
            text.push_str(&format!(
                "[tryboot]\nboot_partition={}\n",
                self.partition(slot)
            ));
        }
        crate::files::write_atomic(&self.autoboot, &text).map_err(|source| BootError::Io {
            path: self.autoboot.clone(),
            source,
        })
    }
}

impl BootControl for RpiTryboot {
    fn state(&self) -> Result<BootState, BootError> {
        let text = std::fs::read_to_string(&self.autoboot).map_err(|source| BootError::Io {
            path: self.autoboot.clone(),
            source,
        })?;
        let (mut section, mut default, mut trial) = (String::from("all"), None, None);
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_owned();
                continue;
            }
            if let Some(n) = line.strip_prefix("boot_partition=") {
                match section.as_str() {
                    "all" => default = Some(self.slot_of(line, n)?),
                    "tryboot" => trial = Some((self.slot_of(line, n)?, 1)),
                    _ => {}
                }
            }
        }
        Ok(BootState {
            default: default.ok_or_else(|| BootError::Corrupt {
                path: self.autoboot.clone(),
                line: "(no boot_partition in [all])".into(),
            })?,
            trial,
        })
    }

    fn set(&mut self, s: BootState) -> Result<(), BootError> {
        self.write(s)
    }
}
