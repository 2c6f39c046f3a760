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

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{Config, Window};
use crate::http::Fetcher;
use crate::slots::{Appliance, BootControl, Floor, Record, Slot};
use crate::update::{self, Candidate, Source, Version};

/// The local topic the agent reports on (the gateway forwards and audits it).
pub const STATUS_TOPIC: &str = "_gateway/update/status";
/// The local topic of "check now" commands (from upstream, through the gateway).
pub const COMMAND_TOPIC: &str = "_gateway/cmd/update";
/// Every step, one JSON object a line, in `state_dir`.
const JOURNAL: &str = "journal.jsonl";
/// How far into the journal the broker has acknowledged (a byte offset), in `state_dir`.
const REPORTED: &str = "journal.reported";

/// One step of the update cycle, as journalled and reported.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Event {
    pub time: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<Slot>,
    pub detail: String,
}

/// What a check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    UpToDate,
    Installed { version: String, slot: Slot },
}

/// A "check now" command: `{"now": true}` also reboots at once, outside the window.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct CheckNow {
    #[serde(default)]
    pub now: bool,
}

pub type Boot = Box<dyn BootControl + Send>;

#[derive(Debug)]
pub struct Agent {
    pub cfg: Config,
    pub appliance: Appliance<Boot>,
    fetcher: Fetcher,
    reporter: Option<Reporter>,
}

fn now() -> String {
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
        let e = Event {
            time: now(),
            event: event.to_owned(),
            version: version.map(str::to_owned),
            slot,
            detail: detail.to_owned(),
        };
        tracing::info!(event = format!("update.{event}").as_str(), version, slot = ?slot, detail, "update");
        let line = serde_json::to_string(&e).unwrap_or_default();
        let journal = self.path(JOURNAL);
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal)
            .and_then(|mut f| {
                writeln!(f, "{line}")?;
                f.sync_all()?;
                f.metadata().map(|m| m.len())
            });
        let end = match written {
            Ok(end) => Some(end),
            Err(err) => {
                tracing::error!(event = "update.journal_failed", path = %journal.display(), error = %err);
                None
            }
        };
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
    pub fn journal(&self, n: usize) -> Vec<Event> {
        let text = std::fs::read_to_string(self.path(JOURNAL)).unwrap_or_default();
        let all: Vec<Event> = text
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
        crate::slots::write_atomic(&clock_floor, &format!("{now}\n"))
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
            crate::slots::write_atomic(&path, &format!("{id}\n"))
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

/// Minutes of the day (UTC) now.
pub fn minute_of_day() -> u32 {
    let t = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    (t.hour() as u32) * 60 + t.minute() as u32
}

/// Minutes from `m` until a window is open (0 inside one, or with no windows).
pub fn minutes_to_window(windows: &[Window], m: u32) -> u32 {
    if windows.is_empty() {
        return 0;
    }
    windows
        .iter()
        .map(|w| {
            if w.contains(m) {
                0
            } else {
                (w.start + 1440 - m) % 1440
            }
        })
        .min()
        .unwrap_or(0)
}

/// Sets the credentials the gateway wrote for the agent (`username:password`) on `o`. Read
/// before every connection attempt: they change with every start of the gateway. Without
/// them the attempt is made anyway, and refused.
fn set_credentials(o: &mut rumqttc::MqttOptions, path: &std::path::Path) {
    match std::fs::read_to_string(path) {
        Ok(s) => match s.trim_end().split_once(':') {
            Some((user, password)) => {
                o.set_credentials(user, password);
            }
            None => {
                tracing::warn!(event = "update.broker_credentials", path = %path.display(), "broker credentials unreadable: no `user:password`");
            }
        },
        Err(e) => {
            tracing::warn!(event = "update.broker_credentials", path = %path.display(), error = %e, "broker credentials unreadable");
        }
    }
}

/// The agent's MQTT session with the gateway's embedded broker.
///
/// Reports are QoS 1. For `run` (the one process that takes commands) the journal is an
/// outbox: `journal.reported` holds the offset up to which the broker acknowledged it, and
/// at its start `run` sends again every line after that offset — the steps of a trial
/// whose gateway never came up, or made just before a reboot, reach the fleet on the next
/// boot, with their own times. Delivery is at least once: a line acknowledged just before
/// a crash may be sent twice. Other invocations (`check`, `install`, …) send their own
/// steps and leave the offset to `run`.
#[derive(Debug)]
struct Reporter {
    client: rumqttc::AsyncClient,
    published: std::sync::atomic::AtomicU64,
    acked: tokio::sync::watch::Receiver<u64>,
    /// The journal offset each unacknowledged publish ends at, in publish order (`None`:
    /// not journaled); `None` for a process that does not keep the offset.
    outbox: Option<Outbox>,
}

#[derive(Debug, Clone)]
struct Outbox {
    ends: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Option<u64>>>>,
    /// Held from queuing an end to handing its publish to the client, so both orders agree.
    order: std::sync::Arc<tokio::sync::Mutex<()>>,
    reported: PathBuf,
}

impl Outbox {
    /// The journal's lines after the acknowledged offset, each with its end offset. A board
    /// without the offset file (a fresh one, or one from before it existed) starts at the
    /// journal's end: old history is not sent again.
    fn backlog(dir: &std::path::Path) -> Vec<(String, u64)> {
        let journal = std::fs::read(dir.join(JOURNAL)).unwrap_or_default();
        let from = match std::fs::read_to_string(dir.join(REPORTED)) {
            Ok(t) => t.trim().parse::<usize>().unwrap_or(0),
            Err(_) => journal.len(),
        };
        if from > journal.len() {
            // The journal was replaced: send none of it rather than guess.
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut at = from;
        for piece in journal[from..].split_inclusive(|&b| b == b'\n') {
            at += piece.len();
            // A line cut short by a power cut is not a report.
            if piece.ends_with(b"\n") {
                let text = String::from_utf8_lossy(&piece[..piece.len() - 1]).into_owned();
                if serde_json::from_str::<Event>(&text).is_ok() {
                    out.push((text, at as u64));
                }
            }
        }
        out
    }

    /// A publish was acknowledged: the offset moves past it.
    fn acked(&self) {
        let end = self
            .ends
            .lock()
            .ok()
            .and_then(|mut q| q.pop_front())
            .flatten();
        if let Some(end) = end {
            if let Err(e) = crate::slots::write_atomic(&self.reported, &format!("{end}\n")) {
                tracing::warn!(event = "update.journal_offset", path = %self.reported.display(), error = %e);
            }
        }
    }
}

impl Reporter {
    fn start(
        broker: std::net::SocketAddr,
        report: &crate::config::Report,
        commands: Option<mpsc::Sender<CheckNow>>,
        state_dir: &std::path::Path,
    ) -> Reporter {
        let mut o =
            rumqttc::MqttOptions::new(&report.client_id, broker.ip().to_string(), broker.port());
        o.set_keep_alive(Duration::from_secs(30));
        let credentials = report.credentials.clone();
        set_credentials(&mut o, &credentials);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 64);
        let (acked_tx, acked) = tokio::sync::watch::channel(0u64);
        let sub = client.clone();
        let subscribe = commands.is_some();
        let outbox = commands.is_some().then(|| Outbox {
            ends: Default::default(),
            order: Default::default(),
            reported: state_dir.join(REPORTED),
        });
        let on_ack = outbox.clone();
        tokio::spawn(async move {
            use rumqttc::{Event, Packet};
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) if subscribe => {
                        let _ = sub.try_subscribe(COMMAND_TOPIC, rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        if let Some(o) = &on_ack {
                            o.acked();
                        }
                        acked_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == COMMAND_TOPIC => {
                        let cmd: CheckNow = serde_json::from_slice(&p.payload).unwrap_or_default();
                        tracing::info!(
                            event = "update.check_now",
                            now = cmd.now,
                            "check-now command"
                        );
                        if let Some(tx) = &commands {
                            let _ = tx.try_send(cmd);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(event = "update.broker_link", error = %e, "gateway broker unreachable; retrying");
                        // rumqttc reconnects on the next poll; pause so a stopped gateway
                        // is not spun on. A restarted gateway has made new credentials.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        set_credentials(&mut eventloop.mqtt_options, &credentials);
                    }
                }
            }
        });
        let reporter = Reporter {
            client,
            published: Default::default(),
            acked,
            outbox,
        };
        if reporter.outbox.is_some() {
            let backlog = Outbox::backlog(state_dir);
            if !backlog.is_empty() {
                tracing::info!(
                    event = "update.reports_resent",
                    count = backlog.len(),
                    "journal steps the broker never acknowledged are sent again"
                );
            }
            for (line, end) in backlog {
                reporter.queue(line, Some(end));
            }
        }
        reporter
    }

    /// Hands one report to the client without waiting (the backlog, at start: the
    /// client's queue holds 64, more wait for the next start).
    fn queue(&self, line: String, end: Option<u64>) {
        let Some(o) = &self.outbox else { return };
        let Ok(_order) = o.order.try_lock() else {
            return;
        };
        if self
            .client
            .try_publish(STATUS_TOPIC, rumqttc::QoS::AtLeastOnce, false, line)
            .is_ok()
        {
            self.published
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Ok(mut q) = o.ends.lock() {
                q.push_back(end);
            }
        }
    }

    async fn publish(&self, line: String, end: Option<u64>) {
        let _order = match &self.outbox {
            Some(o) => Some(o.order.lock().await),
            None => None,
        };
        if let Some(o) = &self.outbox {
            if let Ok(mut q) = o.ends.lock() {
                q.push_back(end);
            }
        }
        self.published
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self
            .client
            .publish(STATUS_TOPIC, rumqttc::QoS::AtLeastOnce, false, line)
            .await
        {
            tracing::warn!(event = "update.report_failed", error = %e);
            // Never sent, so never acknowledged: it stays in the outbox for the next start.
            if let Some(o) = &self.outbox {
                if let Ok(mut q) = o.ends.lock() {
                    q.pop_back();
                }
            }
            self.published
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn flush(&self, timeout: Duration) {
        let want = self.published.load(std::sync::atomic::Ordering::SeqCst);
        let mut acked = self.acked.clone();
        let _ = tokio::time::timeout(timeout, acked.wait_for(|n| *n >= want)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_is_what_follows_the_acknowledged_offset_without_a_line_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let line = |event: &str| {
            serde_json::to_string(&Event {
                time: now(),
                event: event.into(),
                version: None,
                slot: None,
                detail: String::new(),
            })
            .unwrap()
                + "\n"
        };
        let (a, b, c) = (line("started"), line("health_check"), line("rolled_back"));
        let journal = format!("{a}{b}{c}{{\"time\":\"20");
        std::fs::write(dir.path().join(JOURNAL), &journal).unwrap();
        // No offset yet (a fresh board, or one from before the outbox): history stays.
        assert!(Outbox::backlog(dir.path()).is_empty());
        std::fs::write(dir.path().join(REPORTED), format!("{}\n", a.len())).unwrap();
        let got = Outbox::backlog(dir.path());
        let ends: Vec<u64> = got.iter().map(|(_, e)| *e).collect();
        assert_eq!(
            ends,
            [a.len() + b.len(), a.len() + b.len() + c.len()].map(|n| n as u64)
        );
        assert_eq!(got[1].0, c.trim_end());
        std::fs::write(
            dir.path().join(REPORTED),
            format!("{}\n", journal.len() + 1),
        )
        .unwrap();
        assert!(
            Outbox::backlog(dir.path()).is_empty(),
            "a replaced journal is not guessed at"
        );
    }

    #[test]
    fn the_wait_for_a_window_counts_to_the_nearest_start() {
        let w = |s: &str| Window::parse(s).unwrap();
        assert_eq!(minutes_to_window(&[], 700), 0);
        let ws = [w("02:00-05:00"), w("22:00-23:00")];
        assert_eq!(minutes_to_window(&ws, 3 * 60), 0);
        assert_eq!(minutes_to_window(&ws, 12 * 60), 10 * 60);
        assert_eq!(minutes_to_window(&ws, 23 * 60 + 30), 150);
    }
}
