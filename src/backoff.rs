//! Exponential backoff with full jitter: each wait is uniform in [0, min(ceiling, initial*2^n)].
//!
//! After a healthy session is lost, the first `FAST_RETRY_WINDOW` retries come every
//! `FAST_RETRY_MAX` at most, so a server restart costs about a second, not a growing backoff;
//! at most one such window per `FAST_RETRY_WINDOW * 2`, so a session that keeps dying gets the
//! normal backoff.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::constants::{
    BACKOFF_CEILING, BACKOFF_INITIAL, FAST_RETRY_MAX, FAST_RETRY_WINDOW, PROBE_DELAY_MAX,
};

pub struct Backoff {
    attempt: u32,
    rng: u64,
    /// When the current (or last) fast-retry window opened.
    fast_since: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        // RandomState is seeded from the OS: enough entropy for jitter, without a crate.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        Backoff {
            attempt: 0,
            rng: h.finish() | 1,
            fast_since: None,
        }
    }
}

impl Backoff {
    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        if self
            .fast_since
            .is_some_and(|t| t.elapsed() < FAST_RETRY_WINDOW)
        {
            return self.half_to_full(FAST_RETRY_MAX);
        }
        let cap = BACKOFF_INITIAL
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_CEILING);
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(self.unit())
    }

    /// After an attempt that nothing answered (see `PROBE_DELAY_MAX`).
    pub fn probe_delay(&mut self) -> Duration {
        self.half_to_full(PROBE_DELAY_MAX)
    }

    /// For failures that only an operator can fix (a host key mismatch): wait at the ceiling.
    pub fn ceiling_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.half_to_full(BACKOFF_CEILING)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// An established session was lost: retry fast for a while (see the module comment).
    pub fn session_lost(&mut self) {
        let recent = self
            .fast_since
            .is_some_and(|t| t.elapsed() < FAST_RETRY_WINDOW * 2);
        if !recent {
            self.fast_since = Some(Instant::now());
            self.attempt = 0;
        }
    }

    /// `d` give or take a quarter, so that agents asking on the same schedule (a standby
    /// pair started together) drift apart.
    pub fn around(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.75 + self.unit() / 2.0)
    }

    /// Uniform in [d/2, d].
    fn half_to_full(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.5 + self.unit() / 2.0)
    }

    /// xorshift64*: uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_jittered_and_capped() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (n, d) in delays.iter().enumerate() {
            let cap = BACKOFF_INITIAL.saturating_mul(1 << n).min(BACKOFF_CEILING);
            assert!(*d <= cap, "attempt {n}: {d:?} > {cap:?}");
        }
        assert!(
            delays.windows(2).any(|w| w[0] != w[1]),
            "no jitter: {delays:?}"
        );
        // Late delays are spread over the whole ceiling, not pinned to it.
        let late: Vec<Duration> = (0..50).map(|_| b.next_delay()).collect();
        assert!(late.iter().any(|d| *d < BACKOFF_CEILING / 2));
        assert!(late.iter().any(|d| *d > BACKOFF_CEILING / 2));
        b.reset();
        assert!(b.next_delay() <= BACKOFF_INITIAL);
        assert!(b.ceiling_delay() >= BACKOFF_CEILING / 2);
    }

    #[test]
    fn a_lost_session_retries_fast_once_per_window() {
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.next_delay();
        }
        b.session_lost();
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= FAST_RETRY_MAX && d >= FAST_RETRY_MAX / 2, "{d:?}");
        }
        // Lost again soon after: no second fast window (it is still the first one here).
        let opened = b.fast_since;
        b.session_lost();
        assert_eq!(b.fast_since, opened);
        // Once the window is over, the normal backoff starts from the beginning.
        b.fast_since = Some(Instant::now() - FAST_RETRY_WINDOW);
        assert!(b.next_delay() <= BACKOFF_INITIAL);
    }
}
