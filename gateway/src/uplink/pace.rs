//! Pacing for the uplink: a token bucket for the send rate, and exponential backoff with
//! jitter for reconnects.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

/// A token bucket of `rate` tokens per second, holding at most one second's worth.
#[derive(Debug)]
pub struct Pace {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    pub fn new(rate: u32) -> Pace {
        let rate = f64::from(rate.max(1));
        Pace {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.last = now;
    }

    /// How many sends are allowed now, at most `want`.
    pub fn available(&mut self, want: usize) -> usize {
        self.refill();
        // Truncation is the intent: whole tokens only.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let whole = self.tokens.floor() as usize;
        whole.min(want)
    }

    pub fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// When the next token will be there.
    pub fn next_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.rate)
    }
}

/// Exponential backoff from `min` to `max`, each delay drawn uniformly from its upper half,
/// so that a fleet of gateways does not reconnect in step after an upstream outage.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    rng: SystemRandom,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
            rng: SystemRandom::new(),
        }
    }

    pub fn next(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let mut b = [0u8; 4];
        let r = if self.rng.fill(&mut b).is_ok() {
            f64::from(u32::from_be_bytes(b)) / f64::from(u32::MAX)
        } else {
            1.0
        };
        ceiling.mul_f64(0.5 + 0.5 * r)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The longest the next wait can be.
    pub fn ceiling(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let ceilings = [100, 200, 400, 800, 800];
        for c in ceilings {
            let d = b.next();
            assert!(
                d >= Duration::from_millis(c / 2) && d <= Duration::from_millis(c),
                "{d:?} vs {c}"
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn pace_allows_rate_per_second() {
        let mut p = Pace::new(10);
        assert_eq!(p.available(100), 10);
        for _ in 0..10 {
            p.take();
        }
        assert_eq!(p.available(100), 0);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(p.available(100), 5);
        assert!(p.next_at() <= Instant::now());
    }
}
