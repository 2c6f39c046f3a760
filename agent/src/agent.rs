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

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::http::Fetcher;
use crate::slots::{Appliance, BootControl, Floor, Record, Slot};
use crate::update::{self, Candidate, Source, Version};

pub use crate::report::{CheckNow, Report, COMMAND_TOPIC, STATUS_TOPIC};
use crate::report::{Reporter, JOURNAL};
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
    fetcher: Fetcher,
    reporter: Option<Reporter>,
}

pub(crate) fn now() -> String {
    jiff::Timestamp::now().to_string()
}

impl Agent {
    /// An agent for `cfg`; with `commands`, "check now" commands from the broker are sent
    /// there.
    pub fn new(cfg: Config, commands: Option<mpsc::Sender<CheckNow>>) -> Result<Agent, String> {
        let dir = &cfg.appliance.state_dir;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let appliance = Appliance {
            slots: cfg.appliance.slots.clone(),
            boot: crate::boot::open(&cfg.boot),
            floor: Floor {
                path: dir.join("floor"),
                factory: Some(cfg.appliance.version_file.clone()),
            },
            record: dir.join("update.json"),
        };
        let fetcher = Fetcher::new(
            cfg.repository.limits.clone(),
            cfg.repository.ca_file.as_deref(),
        );
        let reporter = cfg
            .report
            .broker
            .map(|b| Reporter::start(b, &cfg.report, commands, dir));
        Ok(Agent {
            cfg,
            appliance,
            fetcher,
            reporter,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.cfg.appliance.state_dir.join(name)
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
        let end = crate::report::append(&self.path(JOURNAL), &line);
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
        let text = std::fs::read_to_string(self.path(JOURNAL)).unwrap_or_default();
        let all: Vec<Report> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        all[all.len().saturating_sub(n)..].to_vec()
    }

    /// The slot the boot loader says it booted: `wardgate.slot=A|B` on the kernel command line.
    pub fn booted_slot(&self) -> Result<Slot, String> {
        let path = &self.cfg.appliance.cmdline;
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for word in text.split_whitespace() {
            match word.strip_prefix("wardgate.slot=") {
                Some("A") => return Ok(Slot::A),
                Some("B") => return Ok(Slot::B),
                Some(other) => {
                    return Err(format!(
                        "{}: wardgate.slot={other} is not A or B",
                        path.display()
                    ))
                }
                None => {}
            }
        }
        Err(format!(
            "{}: the boot loader did not name the booted slot (wardgate.slot=A|B)",
            path.display()
        ))
    }

    fn source(&self, base: &url::Url) -> Result<Source, String> {
        let join = |p: &str| base.join(p).map_err(|e| format!("{base}: {e}"));
        Ok(Source {
            metadata_url: join("metadata/")?,
            targets_url: join("targets/")?,
            trusted_root: self.cfg.repository.trusted_root.clone(),
            datastore: self.path("datastore"),
            fetcher: self.fetcher.clone(),
        })
    }

    /// The first step after a boot (see the module docs). Returns the record written, if a
    /// pending update was decided; a rollback of a running trial reboots.
    pub async fn after_boot(&mut self) -> Result<Option<Record>, String> {
        let repaired = self.repair_boot_state().await?;
        let Some(Record::Pending { version, slot }) = self.appliance.last() else {
            // A trial armed with no record of its install (a crash between the two): the
            // install never finished, so the trial is disarmed rather than left to boot
            // an unjudged slot.
            if let Some(slot) = self.appliance.disarm_unrecorded_trial()? {
                self.report(
                    "error",
                    None,
                    Some(slot),
                    &format!("a trial of slot {slot} was armed but its install not recorded (a crash); disarmed"),
                )
                .await;
            }
            return Ok(None);
        };
        let booted = self.booted_slot()?;
        if booted != slot && !self.rebooted_since_install() {
            // Installed, the reboot into it not yet done (waiting for a window): still pending.
            return Ok(None);
        }
        let health = if booted == slot {
            self.report(
                "health_check",
                Some(&version),
                Some(slot),
                "trial boot; checking health",
            )
            .await;
            crate::health::until_deadline(&self.cfg.health, &self.fetcher).await
        } else {
            Ok(())
        };
        let mut record = self.appliance.after_boot(booted, health)?;
        if let (Some(Record::RolledBack { reason, slot, .. }), Some(why)) = (&mut record, &repaired)
        {
            // The trial never had its boot: what the slot holds does not matter.
            *reason = format!(
                "slot {slot} was never tried: the boot loader could not read its state, so \
                 slot {booted} booted ({why})"
            );
            if let Some(r) = &record {
                self.appliance.save(r)?;
            }
        }
        match &record {
            Some(Record::Committed { version, slot }) => {
                self.report(
                    "committed",
                    Some(version),
                    Some(*slot),
                    &format!("slot {slot} passed its health check; the version floor is {version}"),
                )
                .await;
            }
            Some(Record::RolledBack {
                version,
                slot,
                reason,
            }) => {
                self.report("rolled_back", Some(version), Some(*slot), reason)
                    .await;
                if booted == *slot {
                    // Running untested software: back to the old slot at once.
                    self.reboot().await?;
                }
            }
            _ => {}
        }
        Ok(record)
    }

    /// Rewrites an unreadable boot state from the update record
    /// ([`Appliance::repair_boot_state`]) and reports it; returns why it was rewritten.
    async fn repair_boot_state(&mut self) -> Result<Option<String>, String> {
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
    ) -> Result<Outcome, String> {
        let base = base.unwrap_or_else(|| self.cfg.repository.url.clone());
        let result = self.check_inner(&base, version).await;
        let detail = match &result {
            Ok(Outcome::UpToDate) => "no newer bundle for this hardware".to_owned(),
            Ok(Outcome::Installed { version, slot }) => {
                format!("bundle {version} written to slot {slot}; one trial boot armed")
            }
            Err(e) => e.clone(),
        };
        let _ = std::fs::write(
            self.path("last-check.json"),
            serde_json::json!({"time": now(), "repository": base.as_str(), "result": detail})
                .to_string(),
        );
        match &result {
            Ok(Outcome::UpToDate) => self.report("checked", None, None, &detail).await,
            Ok(Outcome::Installed { version, slot }) => {
                self.report("installed", Some(version), Some(*slot), &detail)
                    .await
            }
            Err(e) => self.report("refused", None, None, e).await,
        }
        result
    }

    async fn check_inner(
        &mut self,
        base: &url::Url,
        version: Option<&str>,
    ) -> Result<Outcome, String> {
        let floor = self.appliance.floor.get()?;
        self.appliance.may_install()?;
        // TUF's expiry checks trust the clock. A board without a battery-backed clock can
        // boot with a stale time and would take expired (frozen) metadata for fresh: the
        // clock must not be behind the last repository this agent trusted.
        let clock_floor = self.path("clock-floor");
        let now = jiff::Timestamp::now();
        if let Some(last) = std::fs::read_to_string(&clock_floor)
            .ok()
            .and_then(|t| t.trim().parse::<jiff::Timestamp>().ok())
        {
            if now < last {
                if !self.cfg.appliance.clock_synchronized.exists() {
                    return Err(format!(
                        "the system clock ({now}) is behind the last trusted check ({last}); \
                         refusing to judge metadata expiry until the time is set (NTP)"
                    ));
                }
                // NTP has set the clock: the earlier check ran with a clock ahead. Forget
                // what that clock stamped and re-verify from the trusted root.
                update::forget_time(&self.path("datastore")).and_then(|()| {
                    std::fs::remove_file(&clock_floor)
                        .map_err(|e| format!("{}: {e}", clock_floor.display()))
                })?;
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
        let repo = update::load(&self.source(base)?)
            .await
            .map_err(|e| e.to_string())?;
        crate::files::write_atomic(&clock_floor, &format!("{now}\n"))
            .map_err(|e| format!("{}: {e}", clock_floor.display()))?;
        let hw = &self.cfg.appliance.hardware;
        let candidate: Candidate = match version {
            Some(v) => update::select(&repo, v, hw, &floor).map_err(|e| e.to_string())?,
            // A version that failed its trial is not retried by itself (nor anything older):
            // only a newer bundle, or an install by hand.
            None => match update::newest(&repo, hw, &self.automatic_floor(&floor))
                .map_err(|e| e.to_string())?
            {
                Some(c) => c,
                None => return Ok(Outcome::UpToDate),
            },
        };
        if candidate.length > self.cfg.repository.max_bundle_bytes {
            return Err(format!(
                "bundle {} is {} bytes, above max_bundle_bytes {}",
                candidate.version, candidate.length, self.cfg.repository.max_bundle_bytes
            ));
        }
        let state = self.appliance.boot.state().map_err(|e| e.to_string())?;
        let target = state.default.other();
        // The slot written is never the one running: if the board runs the slot that is
        // not its default (a fallback, a forced boot), nothing is installed until that is
        // resolved.
        let booted = self.booted_slot()?;
        if booted == target {
            return Err(format!(
                "slot {booted} is running but slot {} is the default: refusing to write the \
                 running slot",
                state.default
            ));
        }
        let capacity = slot_capacity(&self.appliance.slots[target as usize])?;
        if let Some(cap) = capacity {
            if candidate.length > cap {
                return Err(format!(
                    "bundle {} is {} bytes; slot {target} holds {cap}",
                    candidate.version, candidate.length
                ));
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
            let path = self.path("installed-boot-id");
            crate::files::write_atomic(&path, &format!("{id}\n"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
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
    pub async fn reboot(&self) -> Result<(), String> {
        let argv = &self.cfg.appliance.reboot_command;
        self.report("rebooting", None, None, &format!("{argv:?}"))
            .await;
        self.flush_reports(Duration::from_secs(2)).await;
        let (prog, args) = argv.split_first().ok_or("empty reboot command")?;
        let status = tokio::process::Command::new(prog)
            .args(args)
            .status()
            .await
            .map_err(|e| format!("reboot command {argv:?}: {e}"))?;
        if !status.success() {
            return Err(format!("reboot command {argv:?}: {status}"));
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
        let at_install = std::fs::read_to_string(self.path("installed-boot-id")).ok();
        match (at_install, self.boot_id()) {
            (Some(then), Some(now)) => then.trim() != now,
            // Without a record of the boot, assume it happened: a trial is never retried blind.
            _ => true,
        }
    }

    /// Commits the running trial by hand (after checking it some other way).
    pub async fn mark_good(&mut self) -> Result<Record, String> {
        let booted = self.booted_slot()?;
        match self.appliance.last() {
            Some(Record::Pending { slot, .. }) if slot == booted => {}
            _ => {
                return Err(format!(
                    "slot {booted} is not on trial: nothing to mark good"
                ))
            }
        }
        let r = self
            .appliance
            .after_boot(booted, Ok(()))?
            .ok_or("no pending update")?;
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
    pub async fn rollback(&mut self, force: bool) -> Result<String, String> {
        let booted = self.booted_slot()?;
        match self.appliance.last() {
            Some(Record::Pending { version, slot }) if slot != booted => {
                self.appliance.boot.abandon().map_err(|e| e.to_string())?;
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
                self.appliance.boot.abandon().map_err(|e| e.to_string())?;
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
                    Ok(true) => {
                        return Err(format!(
                            "slot {other} was invalidated (a download that failed \
                             verification) or is empty; it cannot be booted"
                        ))
                    }
                    Err(e) => return Err(format!("slot {other} ({}): {e}", other_path.display())),
                }
                if let Some(p) = update::Progress::load(&self.appliance.download_path()) {
                    if p.slot == self.appliance.slots[other as usize] {
                        return Err(format!(
                            "slot {other} holds an unfinished download of {} ({} of {} bytes); \
                             it cannot be booted",
                            p.target, p.offset, p.length
                        ));
                    }
                }
                self.appliance
                    .boot
                    .commit(other)
                    .map_err(|e| e.to_string())?;
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
            _ => Err(format!(
                "slot {booted} is committed and no update is pending; `rollback --force` makes \
                 slot {} the default, whatever it holds",
                booted.other()
            )),
        }
    }

    /// Everything `wardgate-agent status` shows.
    pub fn status(&self) -> serde_json::Value {
        let boot = self.appliance.boot.state();
        let last_check: Option<serde_json::Value> = std::fs::read(self.path("last-check.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        serde_json::json!({
            "hardware": self.cfg.appliance.hardware,
            "repository": self.cfg.repository.url.as_str(),
            "booted_slot": self.booted_slot().map(|s| s.to_string()).unwrap_or_else(|e| e),
            "boot": match boot {
                Ok(s) => serde_json::json!({
                    "default": s.default,
                    "trial": s.trial.map(|(slot, tries)| serde_json::json!({"slot": slot, "tries": tries})),
                }),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            },
            "version_floor": self.appliance.floor.get().map(|v| v.to_string()).unwrap_or_else(|e| e),
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
fn slot_capacity(path: &std::path::Path) -> Result<Option<u64>, String> {
    use std::io::{Seek, SeekFrom};
    let meta = std::fs::metadata(path).map_err(|e| format!("slot {}: {e}", path.display()))?;
    if meta.is_file() {
        return Ok(None);
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("slot {}: {e}", path.display()))?;
    f.seek(SeekFrom::End(0))
        .map(Some)
        .map_err(|e| format!("slot {}: {e}", path.display()))
}
