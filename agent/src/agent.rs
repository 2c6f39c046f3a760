//! The agent proper: one appliance's update cycle, from a configuration.
//!
//! - after every boot: if an update is pending and this boot is its trial, run the health
//!   check (until its deadline) and commit the slot or roll back and reboot into the old
//!   one; a trial that never came up is recorded as such;
//! - a check: load the repository through TUF, choose the newest bundle for this hardware
//!   above the floor (or the version asked for), refuse one over the size cap or larger than
//!   the slot, stream it into the inactive slot and arm one trial boot;
//! - the reboot into it waits for a maintenance window unless forced.
//!
//! Every step is appended to `state_dir/journal.jsonl` (fsynced) and, when `[report]`
//! names the gateway's broker, published on `_gateway/update/status`, which the gateway
//! audits and forwards upstream. Commands arrive on `_gateway/cmd/update`.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Config;
pub use crate::error::AgentError;
use crate::files::FileError;
use crate::http::Fetcher;
use crate::report::Reporter;
use crate::slots::{Appliance, BootControl, Floor, Record, Slot, SlotError};
use crate::state::StateDir;
use crate::trial::{self, Facts, Health, Pending, Plan};
use crate::update::{self, Candidate, Source, Version};

pub use crate::report::{CheckNow, Report, COMMAND_TOPIC, STATUS_TOPIC};
pub use crate::window::{minute_of_day, minutes_to_window};

/// What a check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    UpToDate,
    Installed { version: String, slot: Slot },
}

pub type Boot = Box<dyn BootControl + Send>;

#[derive(Debug)]
pub struct Agent {
    pub cfg: Config,
    pub appliance: Appliance<Boot>,
    state: StateDir,
    fetcher: Fetcher,
    reporter: Option<Reporter>,
}

pub(crate) fn now() -> String {
    jiff::Timestamp::now().to_string()
}

impl Agent {
    /// An agent for `cfg`; with `commands`, "check now" commands from the broker are sent
    /// there.
    pub fn new(cfg: Config, commands: Option<mpsc::Sender<CheckNow>>) -> Result<Agent, AgentError> {
        let state = StateDir::new(&cfg.appliance.state_dir);
        state.create()?;
        let appliance = Appliance {
            slots: cfg.appliance.slots.clone(),
            boot: crate::boot::open(&cfg.boot),
            floor: Floor {
                path: state.floor(),
                factory: Some(cfg.appliance.version_file.clone()),
            },
            state: state.clone(),
        };
        let fetcher = Fetcher::new(
            cfg.repository.limits.clone(),
            cfg.repository.ca_file.as_deref(),
        );
        let reporter = cfg
            .report
            .broker
            .map(|b| Reporter::start(b, &cfg.report, commands, &state));
        Ok(Agent {
            cfg,
            appliance,
            state,
            fetcher,
            reporter,
        })
    }

    /// Journals and reports one step. The journal is the reports' outbox: a step the broker
    /// does not acknowledge (the gateway is down, or the board reboots first) is sent again
    /// by the next `run` ([`Reporter`]).
    pub async fn report(
        &self,
        event: &str,
        version: Option<&str>,
        slot: Option<Slot>,
        detail: &str,
    ) {
        let e = Report {
            time: now(),
            event: event.to_owned(),
            version: version.map(str::to_owned),
            slot,
            detail: detail.to_owned(),
        };
        tracing::info!(event = format!("update.{event}").as_str(), version, slot = ?slot, detail, "update");
        let line = serde_json::to_string(&e).unwrap_or_default();
        let end = crate::report::append(&self.state.journal(), &line);
        if let Some(r) = &self.reporter {
            r.publish(line, end).await;
        }
    }

    /// Waits (up to `timeout`) until the broker acknowledged every report.
    pub async fn flush_reports(&self, timeout: Duration) {
        if let Some(r) = &self.reporter {
            r.flush(timeout).await;
        }
    }

    /// The journal's last `n` events.
    pub fn journal(&self, n: usize) -> Vec<Report> {
        let text = std::fs::read_to_string(self.state.journal()).unwrap_or_default();
        let all: Vec<Report> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        all[all.len().saturating_sub(n)..].to_vec()
    }

    /// The slot the boot loader says it booted: `wardgate.slot=A|B` on the kernel command line.
    pub fn booted_slot(&self) -> Result<Slot, AgentError> {
        let path = &self.cfg.appliance.cmdline;
        let text = std::fs::read_to_string(path).map_err(FileError::at(path))?;
        let why = |why: String| AgentError::Cmdline {
            path: path.clone(),
            why,
        };
        for word in text.split_whitespace() {
            match word.strip_prefix("wardgate.slot=") {
                Some("A") => return Ok(Slot::A),
                Some("B") => return Ok(Slot::B),
                Some(other) => return Err(why(format!("wardgate.slot={other} is not A or B"))),
                None => {}
            }
        }
        Err(why(
            "the boot loader did not name the booted slot (wardgate.slot=A|B)".into(),
        ))
    }

    fn source(&self, base: &url::Url) -> Result<Source, AgentError> {
        let join = |p: &str| {
            base.join(p).map_err(|source| AgentError::Url {
                base: base.clone(),
                source,
            })
        };
        Ok(Source {
            metadata_url: join("metadata/")?,
            targets_url: join("targets/")?,
            trusted_root: self.cfg.repository.trusted_root.clone(),
            datastore: self.state.datastore(),
            fetcher: self.fetcher.clone(),
        })
    }

    /// The first step after a boot (see the module docs and [`trial`]). Returns the record
    /// written, if a pending update was decided; a rollback of a running trial reboots.
    pub async fn after_boot(&mut self) -> Result<Option<Record>, AgentError> {
        let repaired = self.repair_boot_state().await?;
        let pending = match self.appliance.last() {
            Some(Record::Pending { version, slot }) => Some(Pending {
                version,
                slot,
                booted: self.booted_slot()?,
                rebooted_since_install: self.rebooted_since_install(),
            }),
            _ => None,
        };
        let booted = pending.as_ref().map(|p| p.booted);
        let facts = Facts {
            boot: self.appliance.boot.state().map_err(SlotError::from)?,
            pending,
            repaired,
        };
        let verdict = match trial::decide(facts) {
            Plan::Idle | Plan::AwaitReboot => return Ok(None),
            Plan::Disarm { slot } => {
                self.appliance.boot.abandon().map_err(SlotError::from)?;
                self.report(
                    "error",
                    None,
                    Some(slot),
                    &format!("a trial of slot {slot} was armed but its install not recorded (a crash); disarmed"),
                )
                .await;
                return Ok(None);
            }
            Plan::Settle(v) => v,
            Plan::CheckHealth { version, slot } => {
                self.report(
                    "health_check",
                    Some(&version),
                    Some(slot),
                    "trial boot; checking health",
                )
                .await;
                let health =
                    match crate::health::until_deadline(&self.cfg.health, &self.fetcher).await {
                        Ok(()) => Health::Good,
                        Err(e) => Health::Failed(e.to_string()),
                    };
                trial::verdict(version, slot, health)
            }
        };
        let record = self.appliance.settle(verdict)?;
        match &record {
            Record::Committed { version, slot } => {
                self.report(
                    "committed",
                    Some(version),
                    Some(*slot),
                    &format!("slot {slot} passed its health check; the version floor is {version}"),
                )
                .await;
            }
            Record::RolledBack {
                version,
                slot,
                reason,
            } => {
                self.report("rolled_back", Some(version), Some(*slot), reason)
                    .await;
                if booted == Some(*slot) {
                    // Running untested software: back to the old slot at once.
                    self.reboot().await?;
                }
            }
            Record::Pending { .. } => {}
        }
        Ok(Some(record))
    }

    /// Rewrites an unreadable boot state from the update record
    /// ([`Appliance::repair_boot_state`]) and reports it; returns why it was rewritten.
    async fn repair_boot_state(&mut self) -> Result<Option<String>, AgentError> {
        if self.appliance.boot.state().is_ok() {
            return Ok(None);
        }
        let booted = self.booted_slot()?;
        let Some((state, why)) = self.appliance.repair_boot_state(booted)? else {
            return Ok(None);
        };
        self.report("boot_state_repaired", None, Some(state.default), &why)
            .await;
        if state.default != booted {
            // Not rebooted by itself: if the boot loader still cannot read what was written,
            // a reboot would only come back here. The fleet is told; a reboot by hand
            // returns to the committed slot.
            self.report(
                "error",
                None,
                Some(booted),
                &format!(
                    "slot {booted} is running, but slot {} is the committed one; no install \
                     until a reboot returns to it",
                    state.default
                ),
            )
            .await;
        }
        Ok(Some(why))
    }

    /// Looks for an update at `base` (default: the configured repository) — `version` for
    /// exactly that one — and installs it into the inactive slot. Refusals are reported.
    pub async fn check(
        &mut self,
        base: Option<url::Url>,
        version: Option<&str>,
    ) -> Result<Outcome, AgentError> {
        let base = base.unwrap_or_else(|| self.cfg.repository.url.clone());
        let result = self.check_inner(&base, version).await;
        let detail = match &result {
            Ok(Outcome::UpToDate) => "no newer bundle for this hardware".to_owned(),
            Ok(Outcome::Installed { version, slot }) => {
                format!("bundle {version} written to slot {slot}; one trial boot armed")
            }
            Err(e) => e.to_string(),
        };
        let _ = std::fs::write(
            self.state.last_check(),
            serde_json::json!({"time": now(), "repository": base.as_str(), "result": detail})
                .to_string(),
        );
        match &result {
            Ok(Outcome::UpToDate) => self.report("checked", None, None, &detail).await,
            Ok(Outcome::Installed { version, slot }) => {
                self.report("installed", Some(version), Some(*slot), &detail)
                    .await
            }
            Err(_) => self.report("refused", None, None, &detail).await,
        }
        result
    }

    async fn check_inner(
        &mut self,
        base: &url::Url,
        version: Option<&str>,
    ) -> Result<Outcome, AgentError> {
        let floor = self.appliance.floor.get()?;
        self.appliance.may_install()?;
        // TUF's expiry checks trust the clock. A board without a battery-backed clock can
        // boot with a stale time and would take expired (frozen) metadata for fresh: the
        // clock must not be behind the last repository this agent trusted.
        let clock_floor = self.state.clock_floor();
        let now = jiff::Timestamp::now();
        if let Some(last) = std::fs::read_to_string(&clock_floor)
            .ok()
            .and_then(|t| t.trim().parse::<jiff::Timestamp>().ok())
        {
            if now < last {
                if !self.cfg.appliance.clock_synchronized.exists() {
                    return Err(AgentError::ClockBehind { now, last });
                }
                // NTP has set the clock: the earlier check ran with a clock ahead. Forget
                // what that clock stamped and re-verify from the trusted root.
                update::forget_time(&self.state.datastore())?;
                std::fs::remove_file(&clock_floor).map_err(FileError::at(&clock_floor))?;
                self.report(
                    "clock_recovered",
                    None,
                    None,
                    &format!(
                        "the clock ({now}, set by NTP) is behind the last trusted check \
                         ({last}), which ran with a clock ahead: timestamp and snapshot \
                         re-verified from the trusted root"
                    ),
                )
                .await;
            }
        }
        let repo = update::load(&self.source(base)?).await?;
        crate::files::write_atomic(&clock_floor, &format!("{now}\n"))
            .map_err(FileError::at(&clock_floor))?;
        let hw = &self.cfg.appliance.hardware;
        let candidate: Candidate = match version {
            Some(v) => update::select(&repo, v, hw, &floor)?,
            // A version that failed its trial is not retried by itself (nor anything older):
            // only a newer bundle, or an install by hand.
            None => match update::newest(&repo, hw, &self.automatic_floor(&floor))? {
                Some(c) => c,
                None => return Ok(Outcome::UpToDate),
            },
        };
        if candidate.length > self.cfg.repository.max_bundle_bytes {
            return Err(AgentError::TooLarge {
                version: candidate.version,
                length: candidate.length,
                max: self.cfg.repository.max_bundle_bytes,
            });
        }
        let state = self.appliance.boot.state().map_err(SlotError::from)?;
        let target = state.default.other();
        // The slot written is never the one running: if the board runs the slot that is
        // not its default (a fallback, a forced boot), nothing is installed until that is
        // resolved.
        let booted = self.booted_slot()?;
        if booted == target {
            return Err(AgentError::RunningSlot {
                booted,
                default: state.default,
            });
        }
        let capacity = slot_capacity(&self.appliance.slots[target as usize])?;
        if let Some(capacity) = capacity {
            if candidate.length > capacity {
                return Err(AgentError::SlotTooSmall {
                    version: candidate.version,
                    length: candidate.length,
                    slot: target,
                    capacity,
                });
            }
        }
        self.report(
            "downloading",
            Some(&candidate.version.to_string()),
            Some(target),
            &format!("{} bytes from {base}", candidate.length),
        )
        .await;
        // This boot's id before the trial is armed: a crash right after arming must not
        // leave a pending update that looks as if the board had rebooted since.
        if let Some(id) = self.boot_id() {
            let path = self.state.installed_boot_id();
            crate::files::write_atomic(&path, &format!("{id}\n")).map_err(FileError::at(&path))?;
        }
        let slot = self
            .appliance
            .install_resumable(&repo, &candidate, &self.fetcher)
            .await?;
        Ok(Outcome::Installed {
            version: candidate.version.to_string(),
            slot,
        })
    }

    /// The floor for automatic checks: the version floor, or the last rolled-back version if
    /// that is higher.
    fn automatic_floor(&self, floor: &Version) -> Version {
        match self.appliance.last() {
            Some(Record::RolledBack { version, .. }) => match version.parse() {
                Ok(v) if &v > floor => v,
                _ => floor.clone(),
            },
            _ => floor.clone(),
        }
    }

    /// Whether a reboot may happen now (inside a window, or no windows configured).
    pub fn in_window(&self) -> bool {
        minutes_to_window(&self.cfg.maintenance, minute_of_day()) == 0
    }

    /// Runs the reboot command.
    pub async fn reboot(&self) -> Result<(), AgentError> {
        let argv = &self.cfg.appliance.reboot_command;
        self.report("rebooting", None, None, &format!("{argv:?}"))
            .await;
        self.flush_reports(Duration::from_secs(2)).await;
        let (prog, args) = argv.split_first().ok_or(AgentError::EmptyReboot)?;
        let failed = |why: String| AgentError::Reboot {
            argv: argv.clone(),
            why,
        };
        let status = tokio::process::Command::new(prog)
            .args(args)
            .status()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !status.success() {
            return Err(failed(status.to_string()));
        }
        Ok(())
    }

    /// The installed update waiting for its reboot, if any.
    pub fn awaiting_reboot(&self) -> Option<(String, Slot)> {
        match self.appliance.last() {
            Some(Record::Pending { version, slot })
                if self.booted_slot().ok() != Some(slot) && !self.rebooted_since_install() =>
            {
                Some((version, slot))
            }
            _ => None,
        }
    }

    /// This boot's id (the kernel's, unique per boot).
    fn boot_id(&self) -> Option<String> {
        std::fs::read_to_string(&self.cfg.appliance.boot_id)
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Whether the board booted since the pending update was installed: then its trial has
    /// had its chance, whatever the boot loader's state says (the Raspberry Pi's
    /// `autoboot.txt`, for one, keeps its `[tryboot]` section after a failed tryboot).
    fn rebooted_since_install(&self) -> bool {
        let at_install = std::fs::read_to_string(self.state.installed_boot_id()).ok();
        match (at_install, self.boot_id()) {
            (Some(then), Some(now)) => then.trim() != now,
            // Without a record of the boot, assume it happened: a trial is never retried blind.
            _ => true,
        }
    }

    /// Commits the running trial by hand (after checking it some other way).
    pub async fn mark_good(&mut self) -> Result<Record, AgentError> {
        let booted = self.booted_slot()?;
        match self.appliance.last() {
            Some(Record::Pending { slot, .. }) if slot == booted => {}
            _ => return Err(AgentError::NotOnTrial(booted)),
        }
        let r = self
            .appliance
            .after_boot(booted, Health::Good)?
            .ok_or(AgentError::NotOnTrial(booted))?;
        if let Record::Committed { version, slot } = &r {
            self.report(
                "committed",
                Some(version),
                Some(*slot),
                "marked good by hand",
            )
            .await;
        }
        Ok(r)
    }

    /// Rolls back by hand: cancels an update waiting for its reboot, ends a running trial
    /// (and reboots), or — with `force` — makes the other slot the default (and reboots).
    pub async fn rollback(&mut self, force: bool) -> Result<String, AgentError> {
        let booted = self.booted_slot()?;
        match self.appliance.last() {
            Some(Record::Pending { version, slot }) if slot != booted => {
                self.appliance.boot.abandon().map_err(SlotError::from)?;
                let r = Record::RolledBack {
                    version: version.clone(),
                    slot,
                    reason: "cancelled by hand before its trial boot".into(),
                };
                self.appliance.save(&r)?;
                self.report(
                    "rolled_back",
                    Some(&version),
                    Some(slot),
                    "cancelled by hand before its trial boot",
                )
                .await;
                Ok(format!("update {version} cancelled; slot {booted} stays"))
            }
            Some(Record::Pending { version, slot }) => {
                let reason = "ended by hand during its trial";
                self.appliance.boot.abandon().map_err(SlotError::from)?;
                self.appliance.save(&Record::RolledBack {
                    version: version.clone(),
                    slot,
                    reason: reason.into(),
                })?;
                self.report("rolled_back", Some(&version), Some(slot), reason)
                    .await;
                self.reboot().await?;
                Ok(format!(
                    "trial of {version} ended; rebooting into slot {}",
                    slot.other()
                ))
            }
            _ if force => {
                let other = booted.other();
                let other_path = &self.appliance.slots[other as usize];
                match crate::slots::is_invalidated(other_path) {
                    Ok(false) => {}
                    Ok(true) => return Err(AgentError::Invalidated(other)),
                    Err(source) => {
                        return Err(AgentError::SlotUnreadable {
                            path: other_path.clone(),
                            source,
                        })
                    }
                }
                if let Some(p) = update::Progress::load(&self.state.download()) {
                    if p.slot == self.appliance.slots[other as usize] {
                        return Err(AgentError::UnfinishedDownload {
                            slot: other,
                            target: p.target,
                            offset: p.offset,
                            length: p.length,
                        });
                    }
                }
                self.appliance.boot.commit(other).map_err(SlotError::from)?;
                let version = match self.appliance.last() {
                    Some(Record::Committed { version, .. }) => version,
                    _ => "unknown".into(),
                };
                let r = Record::RolledBack {
                    version: version.clone(),
                    slot: booted,
                    reason: format!("by hand: slot {other} made the default"),
                };
                self.appliance.save(&r)?;
                self.report(
                    "rolled_back",
                    Some(&version),
                    Some(booted),
                    &format!("by hand: slot {other} made the default"),
                )
                .await;
                self.reboot().await?;
                Ok(format!("slot {other} is the default; rebooting"))
            }
            _ => Err(AgentError::NothingToRollBack(booted)),
        }
    }

    /// Everything `wardgate-agent status` shows.
    pub fn status(&self) -> serde_json::Value {
        let boot = self.appliance.boot.state();
        let last_check: Option<serde_json::Value> = std::fs::read(self.state.last_check())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        serde_json::json!({
            "hardware": self.cfg.appliance.hardware,
            "repository": self.cfg.repository.url.as_str(),
            "booted_slot": self.booted_slot().map_or_else(|e| e.to_string(), |s| s.to_string()),
            "boot": match boot {
                Ok(s) => serde_json::json!({
                    "default": s.default,
                    "trial": s.trial.map(|(slot, tries)| serde_json::json!({"slot": slot, "tries": tries})),
                }),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            },
            "version_floor": self.appliance.floor.get().map_or_else(|e| e.to_string(), |v| v.to_string()),
            "last_update": self.appliance.last(),
            "awaiting_reboot": self.awaiting_reboot().map(|(v, s)| serde_json::json!({"version": v, "slot": s})),
            "maintenance_windows": self.cfg.maintenance.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "in_window": self.in_window(),
            "last_check": last_check,
            "journal": self.journal(10),
        })
    }

    /// A random delay in `0..=jitter`.
    pub fn jitter(&self) -> Duration {
        let max = self.cfg.repository.poll_jitter.as_millis() as u64;
        if max == 0 {
            return Duration::ZERO;
        }
        let mut b = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut b);
        Duration::from_millis(u64::from_le_bytes(b) % (max + 1))
    }
}

/// The size of a slot (a block device's or a file's); `None` for a file that may grow.
fn slot_capacity(path: &std::path::Path) -> Result<Option<u64>, AgentError> {
    use std::io::{Seek, SeekFrom};
    let unreadable = |source| AgentError::SlotUnreadable {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if meta.is_file() {
        return Ok(None);
    }
    let mut f = std::fs::File::open(path).map_err(unreadable)?;
    f.seek(SeekFrom::End(0)).map(Some).map_err(unreadable)
}
