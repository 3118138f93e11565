//! Jittered exponential backoff: the one implementation every reconnect,
//! re-register and re-watch loop in the workspace uses.
//!
//! Without jitter, every consumer and provider of a registry that restarts
//! waits the same 100 ms, 200 ms, 400 ms … and comes back in lockstep: the
//! thundering herd Dubbo, rpcx and etcd users report. The pause here is
//! "equal jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter",
//! 2015): half of the exponential step is kept, so a loop never spins, and
//! the other half is uniform random, which spreads a herd over half a step.
//!
//! The random numbers come from a per-thread xorshift64* generator seeded
//! from std's random hash keys: jitter and load balancing need uniform and
//! cheap, not unpredictable, and this keeps a random-number crate out of
//! the dependency tree.

use std::cell::Cell;
use std::hash::BuildHasher;
use std::time::Duration;

thread_local! {
    static RNG: Cell<u64> = Cell::new(
        std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id()) | 1
    );
}

/// A uniform number in `0..n` (0 when `n` is 0 or 1); xorshift64*, not for
/// cryptography.
#[inline]
pub fn random_below(n: u64) -> u64 {
    if n <= 1 {
        return 0;
    }
    random_u64() % n
}

/// A uniform 64-bit number from the thread's xorshift64* generator
/// (seeded per thread from std's `RandomState`), not for cryptography:
/// jitter, and trace and span ids (W3C Trace Context asks for random ids,
/// not secret ones).
#[inline]
pub fn random_u64() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// The exponential step after `failures` consecutive failures (1 for the
/// first): `min * 2^(failures - 1)`, capped at `max`; zero for none.
pub fn step(min: Duration, max: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    min.saturating_mul(1u32 << (failures - 1).min(20)).min(max)
}

/// The pause after `failures` consecutive failures: uniform in
/// `[step / 2, step]` of [`step`] ("equal jitter"). `failures = 0` gives
/// zero.
pub fn pause(min: Duration, max: Duration, failures: u32) -> Duration {
    let step = step(min, max, failures);
    let half = step / 2;
    let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random_below(spread.saturating_add(1)))
}

/// A reconnect loop's backoff state: [`next_pause`](Self::next_pause)
/// after each failure, [`reset`](Self::reset) after a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Steps from `min` (the first pause is in `[min / 2, min]`) doubling
    /// up to `max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            failures: 0,
        }
    }

    /// Counts a failure and returns the pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        pause(self.min, self.max, self.failures)
    }

    /// After a success: the next failure pauses about `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures counted since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_within_half_a_step_and_stop_at_the_cap() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        for step in [100, 200, 400, 800, 1000, 1000] {
            let p = b.next_pause();
            assert!(
                p >= step * MS / 2 && p <= step * MS,
                "{p:?} for step {step} ms"
            );
        }
        b.reset();
        assert!(b.next_pause() <= 100 * MS);
        assert_eq!(pause(MS, MS, 0), Duration::ZERO);
        // Large failure counts neither overflow nor exceed the cap.
        assert!(pause(MS, 5 * MS, u32::MAX) <= 5 * MS);
    }

    #[test]
    fn pauses_are_spread_not_equal() {
        // 200 loops that failed once pause within [50, 100] ms; with jitter
        // they cover the range rather than landing on one value.
        let pauses: Vec<Duration> = (0..200).map(|_| pause(100 * MS, 5000 * MS, 1)).collect();
        let lo = pauses.iter().min().copied().unwrap_or_default();
        let hi = pauses.iter().max().copied().unwrap_or_default();
        assert!(lo >= 50 * MS && hi <= 100 * MS);
        assert!(hi - lo >= 40 * MS, "spread only {:?}", hi - lo);
        let below = pauses.iter().filter(|p| **p < 75 * MS).count();
        assert!(
            (60..=140).contains(&below),
            "{below} of 200 below the middle"
        );
    }

    #[test]
    fn random_below_stays_in_range() {
        assert_eq!(random_below(0), 0);
        assert_eq!(random_below(1), 0);
        assert!((0..1000).all(|_| random_below(7) < 7));
    }
}
