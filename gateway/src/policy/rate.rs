//! Rate policy: token buckets for messages per second and bytes per second.
//!
//! A bucket holds at most `rate × burst` tokens and refills at `rate` per second. Admitting
//! a message takes its cost at once and may leave the bucket in debt; the debt is the time
//! the edge waits before it reads the device's next packet. So a device over its rate is
//! slowed by backpressure (its socket is not read; TCP pushes back) and nothing it sent is
//! dropped, and a message larger than the whole bucket still gets through, just late.
//!
//! [`DeviceRates`] keeps each device's buckets across its connections and measures how long
//! it has been over its rate without a pause: the edge quarantines a device past
//! `[policy] throttle_limit`.
//!
//! Pure: the caller passes the time. Tested by the unit tests below and, end to end, by the
//! system tests of a flooding device.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::device::DeviceId;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` per second holding `burst` worth of it.
    pub fn new(rate: f64, burst: Duration, now: Instant) -> TokenBucket {
        let capacity = (rate * burst.as_secs_f64()).max(1.0);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes `cost` tokens; returns how long to wait until the bucket is out of debt.
    pub fn take(&mut self, cost: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
        self.tokens -= cost;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A class's limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub messages_per_sec: Option<f64>,
    pub bytes_per_sec: Option<f64>,
    pub burst: Duration,
}

/// One device's buckets.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(limits: &RateLimits, now: Instant) -> RateLimiter {
        RateLimiter {
            messages: limits
                .messages_per_sec
                .map(|r| TokenBucket::new(r, limits.burst, now)),
            bytes: limits
                .bytes_per_sec
                .map(|r| TokenBucket::new(r, limits.burst, now)),
        }
    }

    /// Admits one message of `size` bytes; returns how long the device must wait.
    pub fn admit(&mut self, size: usize, now: Instant) -> Duration {
        let m = self
            .messages
            .as_mut()
            .map_or(Duration::ZERO, |b| b.take(1.0, now));
        #[allow(clippy::cast_precision_loss)]
        let b = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.take(size as f64, now));
        m.max(b)
    }
}

/// What the rate policy says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// How long the device must wait before its next packet is read.
    pub wait: Duration,
    /// How long the device has been held back at every message, without a pause.
    pub over_for: Option<Duration>,
}

#[derive(Debug)]
struct DeviceRate {
    limits: RateLimits,
    limiter: RateLimiter,
    over_since: Option<Instant>,
}

/// The rate state of every device, kept across its connections: reconnecting neither
/// refills its buckets nor restarts the hard-limit clock, and two sessions of one device
/// share one rate.
#[derive(Debug, Default)]
pub struct DeviceRates(Mutex<HashMap<DeviceId, DeviceRate>>);

impl DeviceRates {
    /// Admits one message of `size` bytes from `device` under `limits`.
    pub fn admit(
        &self,
        device: &DeviceId,
        limits: &RateLimits,
        size: usize,
        now: Instant,
    ) -> Admission {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let state = all.entry(device.clone()).or_insert_with(|| DeviceRate {
            limits: *limits,
            limiter: RateLimiter::new(limits, now),
            over_since: None,
        });
        if state.limits != *limits {
            // Its class changed (removed and added again): start from the new limits.
            *state = DeviceRate {
                limits: *limits,
                limiter: RateLimiter::new(limits, now),
                over_since: None,
            };
        }
        let wait = state.limiter.admit(size, now);
        if wait.is_zero() {
            // Within its rate at least once: not a sustained flood.
            state.over_since = None;
            return Admission {
                wait,
                over_for: None,
            };
        }
        let since = *state.over_since.get_or_insert(now);
        Admission {
            wait,
            over_for: Some(now.saturating_duration_since(since)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hard_limit_clock_runs_across_reconnects_and_stops_on_a_pause() {
        let d = DeviceId::parse("monitor-9").unwrap();
        let limits = RateLimits {
            messages_per_sec: Some(10.0),
            bytes_per_sec: None,
            burst: Duration::from_millis(100),
        };
        let rates = DeviceRates::default();
        let t0 = Instant::now();
        assert_eq!(rates.admit(&d, &limits, 1, t0).over_for, None);
        let first = rates.admit(&d, &limits, 1, t0);
        assert_eq!(first.over_for, Some(Duration::ZERO));
        // Back to back at the rate it is allowed: still over, the clock keeps running,
        // whichever connection the message comes on.
        let t1 = t0 + first.wait;
        let a = rates.admit(&d, &limits, 1, t1);
        assert_eq!(a.over_for, Some(t1 - t0));
        // A pause long enough to refill the bucket ends the episode.
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(rates.admit(&d, &limits, 1, t2).over_for, None);
    }

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, Duration::from_secs(1), t0);
        for _ in 0..10 {
            assert_eq!(b.take(1.0, t0), Duration::ZERO);
        }
        // The eleventh message owes a tenth of a second.
        assert_eq!(b.take(1.0, t0), Duration::from_millis(100));
        // Paid after waiting; then one more per 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.take(1.0, t1), Duration::from_millis(100));
        let t2 = t0 + Duration::from_secs(10);
        assert_eq!(
            b.take(1.0, t2),
            Duration::ZERO,
            "refilled, capped at the burst"
        );
    }

    #[test]
    fn a_message_larger_than_the_bucket_gets_through_late() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, Duration::from_secs(1), t0);
        assert_eq!(b.take(3000.0, t0), Duration::from_secs(2));
    }

    #[test]
    fn limiter_waits_for_the_slower_bucket() {
        let t0 = Instant::now();
        let limits = RateLimits {
            messages_per_sec: Some(100.0),
            bytes_per_sec: Some(1000.0),
            burst: Duration::from_secs(1),
        };
        let mut l = RateLimiter::new(&limits, t0);
        assert_eq!(l.admit(1000, t0), Duration::ZERO);
        assert_eq!(l.admit(500, t0), Duration::from_millis(500));
        let none = RateLimits {
            messages_per_sec: None,
            bytes_per_sec: None,
            burst: Duration::from_secs(1),
        };
        let mut free = RateLimiter::new(&none, t0);
        assert_eq!(free.admit(1 << 30, t0), Duration::ZERO);
    }
}
