//! Fault tolerance: whether a failed attempt is tried again, when, and
//! whether retries are affordable.
//!
//! * fail-fast: the first error is the answer.
//! * fail-over: try ANOTHER instance, only when that cannot execute the call
//!   twice ([`RpcError::is_safe_to_retry`]: not sent, refused, overloaded,
//!   shutting down) or the method is listed as idempotent (then any provider
//!   failure qualifies). At most `retries` extra attempts, never past the
//!   call's deadline, with exponential backoff and full jitter, and only
//!   while the [`RetryBudget`] allows: during an outage retries cannot
//!   multiply the load.
//! * fail-safe: no retry; on failure the typed client returns the method's
//!   configured default (JSON), logging the error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rpc_core::{CallPolicy, FaultTolerance, RpcError};

use crate::balance::random_below;
use crate::outlier::now_nanos;

const WINDOW_NANOS: u64 = 10_000_000_000;

/// Whether the failed attempt number `attempt` (0-based) may be retried.
pub(crate) fn should_retry(
    policy: &CallPolicy,
    method: &str,
    err: &RpcError,
    attempt: u32,
) -> bool {
    if policy.fault_tolerance != FaultTolerance::FailOver || attempt >= policy.retries {
        return false;
    }
    err.is_safe_to_retry()
        || (err.is_provider_failure()
            && !matches!(err, RpcError::Timeout { .. })
            && policy.idempotent.iter().any(|m| m == method))
}

/// Backoff before retry number `retry` (1-based): uniform in
/// `0..min(max, base * 2^(retry-1))` ("full jitter").
pub(crate) fn backoff(policy: &CallPolicy, retry: u32) -> Duration {
    let ceiling = policy
        .retry_backoff
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(policy.retry_backoff_max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(random_below(nanos.max(1)))
}

/// Retries may be at most `ratio` of calls over the last 10-20 s, plus
/// `min_per_sec` per second. Lock-free; a race at a window boundary can
/// miscount a few calls, which a budget tolerates.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_window: u64,
    window: AtomicU64,
    calls: AtomicU64,
    retries: AtomicU64,
    prev_calls: AtomicU64,
    prev_retries: AtomicU64,
}

impl RetryBudget {
    /// A budget of `ratio` retries per call plus `min_per_sec` retries a second.
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        Self {
            ratio,
            min_per_window: u64::from(min_per_sec) * (WINDOW_NANOS / 1_000_000_000),
            window: AtomicU64::new(now_nanos() / WINDOW_NANOS),
            calls: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            prev_calls: AtomicU64::new(0),
            prev_retries: AtomicU64::new(0),
        }
    }

    fn roll(&self, now_nanos: u64) {
        let now = now_nanos / WINDOW_NANOS;
        let seen = self.window.load(Ordering::Relaxed);
        if now != seen
            && self
                .window
                .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let (c, r) = if now == seen + 1 {
                (
                    self.calls.swap(0, Ordering::Relaxed),
                    self.retries.swap(0, Ordering::Relaxed),
                )
            } else {
                self.calls.store(0, Ordering::Relaxed);
                self.retries.store(0, Ordering::Relaxed);
                (0, 0)
            };
            self.prev_calls.store(c, Ordering::Relaxed);
            self.prev_retries.store(r, Ordering::Relaxed);
        }
    }

    /// Counts a call.
    pub fn record_call(&self) {
        self.record_call_at(now_nanos());
    }

    /// Counts a call made at `now_nanos` (see `outlier::nanos_at`): the
    /// caller has read the clock already.
    pub(crate) fn record_call_at(&self, now_nanos: u64) {
        self.roll(now_nanos);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&self) -> bool {
        self.roll(now_nanos());
        let calls = self.calls.load(Ordering::Relaxed) + self.prev_calls.load(Ordering::Relaxed);
        let retries =
            self.retries.load(Ordering::Relaxed) + self.prev_retries.load(Ordering::Relaxed);
        let allowed = (calls as f64 * self.ratio) as u64 + self.min_per_window;
        if retries >= allowed {
            return false;
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_core::ClientConfig;

    fn policy() -> CallPolicy {
        ClientConfig::default().policy_for("S:1.0")
    }

    fn refused() -> RpcError {
        RpcError::Connect {
            addr: "a".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }
    }

    fn lost_after_write() -> RpcError {
        RpcError::ConnectionClosed {
            addr: "a".into(),
            source: None,
        }
    }

    #[test]
    fn fail_over_retries_only_what_cannot_run_twice() {
        let p = policy();
        assert!(should_retry(&p, "rename", &refused(), 0));
        assert!(should_retry(&p, "rename", &refused(), 1));
        assert!(!should_retry(&p, "rename", &refused(), 2), "retries = 2");
        assert!(
            !should_retry(&p, "rename", &lost_after_write(), 0),
            "may have run"
        );
        let mut idem = policy();
        idem.idempotent = vec!["get_user".into()];
        assert!(should_retry(&idem, "get_user", &lost_after_write(), 0));
        assert!(!should_retry(&idem, "rename", &lost_after_write(), 0));
    }

    #[test]
    fn fail_fast_and_fail_safe_never_retry() {
        for ft in [FaultTolerance::FailFast, FaultTolerance::FailSafe] {
            let mut p = policy();
            p.fault_tolerance = ft;
            assert!(!should_retry(&p, "m", &refused(), 0));
        }
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = policy();
        let samples: Vec<Duration> = (0..200).map(|_| backoff(&p, 10)).collect();
        assert!(samples.iter().all(|d| *d <= p.retry_backoff_max));
        let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
        assert!(distinct.len() > 50, "no jitter");
        assert!(backoff(&p, 1) <= p.retry_backoff);
    }

    #[test]
    fn the_budget_caps_retries_at_a_share_of_calls() {
        let b = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            b.record_call();
        }
        let granted = (0..100).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 20);
        let floor = RetryBudget::new(0.0, 1);
        let granted = (0..100).filter(|_| floor.try_retry()).count();
        assert_eq!(granted, 10, "1/s over a 10 s window");
    }
}
