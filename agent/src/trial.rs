//! The trial of an installed update, decided.
//!
//! After every boot the agent gathers [`Facts`] — the boot loader's state, and with an
//! update pending, the slot it was written to, the slot that booted and whether the board
//! rebooted since the install — and [`decide`]s a [`Plan`]. That is a pure function, tested
//! below over every case. A plan that needs the health check is finished by [`verdict`].
//! [`Appliance::settle`] carries a verdict out: the boot loader first, then the floor, then
//! the record, so a crash between any two leaves a state that the next boot's decision
//! completes (a commit the boot loader holds and the record does not is finished, never
//! judged again).

use crate::slots::{what_a_slot_holds, Appliance, BootControl, BootState, Record, SlotError};
use wardgate_proto::Slot;

/// An update waiting for its verdict, as found after a boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub version: String,
    /// The slot it was written to.
    pub slot: Slot,
    /// The slot that booted.
    pub booted: Slot,
    /// Whether the board booted since the install (its trial has had its chance).
    pub rebooted_since_install: bool,
}

/// What [`decide`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub boot: BootState,
    pub pending: Option<Pending>,
    /// Why the boot state was rewritten this boot, if it was unreadable
    /// ([`Appliance::repair_boot_state`]).
    pub repaired: Option<String>,
}

/// What to do after a boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No update pending and no trial armed.
    Idle,
    /// A trial of `slot` is armed but no install is recorded (a crash between the two): the
    /// install never finished, so the trial is disarmed rather than left to boot an unjudged
    /// slot.
    Disarm { slot: Slot },
    /// Installed; the reboot into it is not done yet (it waits for a window).
    AwaitReboot,
    /// The trial is running: check its health, then [`verdict`].
    CheckHealth { version: String, slot: Slot },
    /// Decided without a health check.
    Settle(Verdict),
}

/// A pending update's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `slot` becomes the default and the floor rises to `version`. `finish`: the boot
    /// loader already has it (a crash came between its commit and the record).
    Commit {
        version: String,
        slot: Slot,
        finish: bool,
    },
    /// The default boots from now on; `slot` is left as it is.
    RollBack {
        version: String,
        slot: Slot,
        why: Why,
    },
}

/// Why a trial was rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The boot loader booted `booted` instead.
    DidNotComeUp { booted: Slot },
    /// The boot state was unreadable and rewritten, so the trial never had its boot.
    NeverTried { booted: Slot, repaired: String },
    /// The health check failed, and how.
    HealthFailed(String),
}

/// What the health check found of a running trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Good,
    Failed(String),
}

/// The plan for `facts` (see the module docs).
pub fn decide(facts: Facts) -> Plan {
    let Some(p) = facts.pending else {
        return match facts.boot.trial {
            Some((slot, _)) => Plan::Disarm { slot },
            None => Plan::Idle,
        };
    };
    let Pending {
        version,
        slot,
        booted,
        rebooted_since_install,
    } = p;
    if booted != slot && !rebooted_since_install {
        return Plan::AwaitReboot;
    }
    if booted == slot && facts.boot.default == slot && facts.boot.trial.is_none() {
        // Only a commit makes the trial's slot the default: finish it, never judge the slot
        // again and "roll back" while it stays the default.
        return Plan::Settle(Verdict::Commit {
            version,
            slot,
            finish: true,
        });
    }
    if booted != slot {
        let why = match facts.repaired {
            Some(repaired) => Why::NeverTried { booted, repaired },
            None => Why::DidNotComeUp { booted },
        };
        return Plan::Settle(Verdict::RollBack { version, slot, why });
    }
    Plan::CheckHealth { version, slot }
}

/// The end of a trial whose health check found `health`.
pub fn verdict(version: String, slot: Slot, health: Health) -> Verdict {
    match health {
        Health::Good => Verdict::Commit {
            version,
            slot,
            finish: false,
        },
        Health::Failed(reason) => Verdict::RollBack {
            version,
            slot,
            why: Why::HealthFailed(reason),
        },
    }
}

impl<B: BootControl> Appliance<B> {
    /// Carries `v` out and records it; returns the record written.
    pub fn settle(&mut self, v: Verdict) -> Result<Record, SlotError> {
        let record = match v {
            Verdict::Commit {
                version,
                slot,
                finish,
            } => {
                if !finish {
                    self.boot.commit(slot)?;
                    crate::crash_point("boot-committed");
                }
                self.floor.raise(&version.parse()?)?;
                crate::crash_point("floor-raised");
                Record::Committed { version, slot }
            }
            Verdict::RollBack { version, slot, why } => {
                self.boot.abandon()?;
                let reason = match why {
                    Why::DidNotComeUp { booted } => format!(
                        "slot {slot} did not come up; slot {booted} booted instead ({})",
                        what_a_slot_holds(self.slot_path(slot))
                    ),
                    Why::NeverTried { booted, repaired } => format!(
                        "slot {slot} was never tried: the boot loader could not read its \
                         state, so slot {booted} booted ({repaired})"
                    ),
                    Why::HealthFailed(reason) => format!("health check failed: {reason}"),
                };
                Record::RolledBack {
                    version,
                    slot,
                    reason,
                }
            }
        };
        self.save(&record)?;
        Ok(record)
    }

    /// After a boot into `booted` (the board rebooted since the install): with a pending
    /// update, its verdict, the health check having found `health`. Returns the record
    /// written, if any.
    pub fn after_boot(
        &mut self,
        booted: Slot,
        health: Health,
    ) -> Result<Option<Record>, SlotError> {
        let pending = match self.last() {
            Some(Record::Pending { version, slot }) => Some(Pending {
                version,
                slot,
                booted,
                rebooted_since_install: true,
            }),
            _ => None,
        };
        let facts = Facts {
            boot: self.boot.state()?,
            pending,
            repaired: None,
        };
        match decide(facts) {
            Plan::Settle(v) => self.settle(v).map(Some),
            Plan::CheckHealth { version, slot } => {
                self.settle(verdict(version, slot, health)).map(Some)
            }
            Plan::Idle | Plan::Disarm { .. } | Plan::AwaitReboot => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Slot = Slot::A;
    const B: Slot = Slot::B;

    fn boot(default: Slot, trial: Option<Slot>) -> BootState {
        BootState {
            default,
            trial: trial.map(|s| (s, 0)),
        }
    }

    fn pending(slot: Slot, booted: Slot, rebooted: bool) -> Option<Pending> {
        Some(Pending {
            version: "1.1.0".into(),
            slot,
            booted,
            rebooted_since_install: rebooted,
        })
    }

    fn facts(boot: BootState, pending: Option<Pending>) -> Facts {
        Facts {
            boot,
            pending,
            repaired: None,
        }
    }

    #[test]
    fn with_nothing_pending_an_armed_trial_is_disarmed_and_otherwise_nothing_happens() {
        assert_eq!(decide(facts(boot(A, None), None)), Plan::Idle);
        assert_eq!(
            decide(facts(boot(A, Some(B)), None)),
            Plan::Disarm { slot: B }
        );
    }

    #[test]
    fn an_install_waits_for_its_reboot_and_a_trial_that_booted_is_checked() {
        // Written to B, A still running, no reboot yet.
        assert_eq!(
            decide(facts(boot(A, Some(B)), pending(B, A, false))),
            Plan::AwaitReboot
        );
        // B booted on its trial (the boot loader spent the try).
        for trial in [Some(B), None] {
            assert_eq!(
                decide(facts(boot(A, trial), pending(B, B, true))),
                Plan::CheckHealth {
                    version: "1.1.0".into(),
                    slot: B
                }
            );
        }
    }

    #[test]
    fn a_trial_that_did_not_boot_is_rolled_back_saying_why() {
        let rolled = |why| {
            Plan::Settle(Verdict::RollBack {
                version: "1.1.0".into(),
                slot: B,
                why,
            })
        };
        assert_eq!(
            decide(facts(boot(A, None), pending(B, A, true))),
            rolled(Why::DidNotComeUp { booted: A })
        );
        let mut f = facts(boot(A, None), pending(B, A, true));
        f.repaired = Some("both copies garbled".into());
        assert_eq!(
            decide(f),
            rolled(Why::NeverTried {
                booted: A,
                repaired: "both copies garbled".into()
            })
        );
        // A reboot is what makes a trial that did not boot a failure: without one, it waits.
        assert_eq!(
            decide(facts(boot(A, None), pending(B, A, false))),
            Plan::AwaitReboot
        );
    }

    #[test]
    fn a_commit_the_boot_loader_holds_but_the_record_does_not_is_finished_never_judged() {
        assert_eq!(
            decide(facts(boot(B, None), pending(B, B, true))),
            Plan::Settle(Verdict::Commit {
                version: "1.1.0".into(),
                slot: B,
                finish: true
            })
        );
    }

    #[test]
    fn the_health_check_decides_a_running_trial() {
        assert_eq!(
            verdict("1.1.0".into(), B, Health::Good),
            Verdict::Commit {
                version: "1.1.0".into(),
                slot: B,
                finish: false
            }
        );
        assert_eq!(
            verdict("1.1.0".into(), B, Health::Failed("unit down".into())),
            Verdict::RollBack {
                version: "1.1.0".into(),
                slot: B,
                why: Why::HealthFailed("unit down".into())
            }
        );
    }

    #[test]
    fn every_plan_over_every_state_keeps_the_invariants() {
        // Over every combination: a pending update is never committed unless it booted, never
        // left undecided once the board rebooted, and a trial slot is never the one written
        // while nothing is pending.
        for default in [A, B] {
            for trial in [None, Some(A), Some(B)] {
                for p in [None, Some((A, A)), Some((A, B)), Some((B, A)), Some((B, B))] {
                    for rebooted in [false, true] {
                        let pend = p.and_then(|(slot, booted)| pending(slot, booted, rebooted));
                        let plan = decide(facts(boot(default, trial), pend.clone()));
                        match (&pend, &plan) {
                            (None, Plan::Idle) => assert!(trial.is_none()),
                            (None, Plan::Disarm { slot }) => assert_eq!(Some(*slot), trial),
                            (Some(p), Plan::AwaitReboot) => {
                                assert!(p.booted != p.slot && !p.rebooted_since_install)
                            }
                            (Some(p), Plan::CheckHealth { slot, .. }) => {
                                assert_eq!((p.booted, *slot), (p.slot, p.slot))
                            }
                            (Some(p), Plan::Settle(Verdict::Commit { slot, finish, .. })) => {
                                // Only a commit makes the trial's slot the default, and it
                                // ends the trial.
                                assert!(
                                    *finish
                                        && p.booted == *slot
                                        && default == *slot
                                        && trial.is_none()
                                )
                            }
                            (Some(p), Plan::Settle(Verdict::RollBack { slot, .. })) => {
                                assert!(p.booted != *slot && p.rebooted_since_install)
                            }
                            other => panic!("{other:?}"),
                        }
                    }
                }
            }
        }
    }
}
