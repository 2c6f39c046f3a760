//! What an offence costs a device: the one place that decides punishment.
//!
//! [`sanction`] is pure: given the offence, the `[policy]` threshold and the times of the
//! device's earlier counted offences, it says whether this one counts towards quarantine
//! and whether the device is quarantined now, and why. [`crate::quarantine::Quarantine`]
//! keeps each device's history and carries the sanction out; the edge closes the device's
//! connections when it is quarantined. What the device sees on the wire (a refusal code,
//! or the end of its session) is the protocol's answer, decided by the edge.

use std::time::{Duration, Instant};

use super::{Violation, ViolationKind};

/// When repeated violations quarantine a device (`[policy]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    pub violations: usize,
    pub window: Duration,
}

/// What a device did.
#[derive(Debug, Clone, Copy)]
pub enum Offence<'a> {
    Violation(&'a Violation),
    /// Held back by its rate at every publish for this long (`[policy] throttle_limit`).
    RateHardLimit(Duration),
}

/// What it costs the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sanction {
    /// The offence counts towards quarantine: it joins the device's history.
    pub counted: bool,
    /// The device is quarantined, for this reason.
    pub quarantine: Option<String>,
}

/// The sanction for `offence` at `now`, after the counted offences at `history` (any
/// order, any age: those older than the threshold's window are not counted).
///
/// Publishes and subscriptions outside the ACL, and subscriptions past the class's limit,
/// count; the threshold's `violations` counted within its `window` quarantine the device.
/// Malformed or oversized packets end the session but do not count (a buggy device is not
/// a hostile one). Staying over its rate past the hard limit quarantines at once.
pub fn sanction(
    offence: Offence<'_>,
    threshold: &Threshold,
    history: &[Instant],
    now: Instant,
) -> Sanction {
    match offence {
        Offence::RateHardLimit(limit) => Sanction {
            counted: false,
            quarantine: Some(format!(
                "over its rate without pause for {}",
                humantime::format_duration(limit)
            )),
        },
        Offence::Violation(v) => {
            let counted = matches!(
                v.kind(),
                ViolationKind::Acl | ViolationKind::SubscriptionLimit
            );
            let recent = history
                .iter()
                .filter(|t| now.saturating_duration_since(**t) <= threshold.window)
                .count();
            let reached = counted && recent + 1 >= threshold.violations;
            Sanction {
                counted,
                quarantine: reached.then(|| {
                    format!(
                        "{} ACL violations within {}",
                        threshold.violations,
                        humantime::format_duration(threshold.window)
                    )
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Threshold = Threshold {
        violations: 3,
        window: Duration::from_secs(60),
    };

    fn denied() -> Violation {
        Violation::PublishDenied {
            topic: "ward/pump-2/x".into(),
        }
    }

    #[test]
    fn the_third_acl_violation_within_the_window_quarantines() {
        let t0 = Instant::now();
        let v = denied();
        let s = |history: &[Instant], at| sanction(Offence::Violation(&v), &T, history, at);
        assert_eq!(s(&[], t0).quarantine, None);
        assert_eq!(s(&[t0], t0 + Duration::from_secs(1)).quarantine, None);
        let third = s(&[t0, t0], t0 + Duration::from_secs(60));
        assert!(third.counted);
        assert_eq!(
            third.quarantine.as_deref(),
            Some("3 ACL violations within 1m")
        );
        // Older than the window: forgotten.
        assert_eq!(s(&[t0, t0], t0 + Duration::from_secs(61)).quarantine, None);
    }

    #[test]
    fn a_model_of_the_window_agrees_over_many_histories() {
        // Reference: count the offences (this one included) in [now - window, now].
        let t0 = Instant::now();
        let v = denied();
        for seed in 0u64..200 {
            let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let mut history = Vec::new();
            for _ in 0..(seed % 6) {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                history.push(t0 + Duration::from_secs(x >> 57));
            }
            let now = t0 + Duration::from_secs(130);
            let within = history
                .iter()
                .filter(|t| now.duration_since(**t) <= T.window)
                .count();
            let got = sanction(Offence::Violation(&v), &T, &history, now);
            assert_eq!(
                got.quarantine.is_some(),
                within + 1 >= T.violations,
                "{history:?}"
            );
        }
    }

    #[test]
    fn a_subscription_past_the_limit_counts_but_a_malformed_packet_does_not() {
        let now = Instant::now();
        let many = [now, now, now];
        let limit = Violation::TooManySubscriptions { max: 16 };
        assert!(sanction(Offence::Violation(&limit), &T, &many, now)
            .quarantine
            .is_some());
        for v in [
            Violation::Protocol("second CONNECT".into()),
            Violation::OversizedPacket { size: 2, max: 1 },
            Violation::WildcardPublish {
                topic: "a/#".into(),
            },
        ] {
            let s = sanction(Offence::Violation(&v), &T, &many, now);
            assert_eq!(
                s,
                Sanction {
                    counted: false,
                    quarantine: None
                },
                "{v}"
            );
        }
    }

    #[test]
    fn the_rate_hard_limit_quarantines_at_once() {
        let s = sanction(
            Offence::RateHardLimit(Duration::from_secs(300)),
            &T,
            &[],
            Instant::now(),
        );
        assert_eq!(
            s.quarantine.as_deref(),
            Some("over its rate without pause for 5m")
        );
        assert!(!s.counted);
    }
}
