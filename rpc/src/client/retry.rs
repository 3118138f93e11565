//! Fault tolerance: whether a failed attempt is tried again, when, and
//! whether retries are affordable.
//!
//! * fail-fast: the first error is the answer.
//! * fail-over: try ANOTHER instance, only when that cannot execute the call
//!   twice ([`RpcError::is_safe_to_retry`]: not sent, refused, overloaded,
//!   shutting down) or the method is idempotent (`#[rpc(idempotent)]` or
//!   listed in `client.idempotent`; then any provider
//!   failure qualifies). At most `retries` extra attempts, never past the
//!   call's deadline, with exponential backoff and full jitter, and only
//!   while the [`RetryBudget`] allows: during an outage retries cannot
//!   multiply the load.
//! * fail-safe: no retry; on failure the typed client returns the method's
//!   configured default (JSON), logging the error.

use rpc_core::metric_names::{CLIENT_BUDGET_EXHAUSTED, CLIENT_RETRIES, SERVICE};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rpc_core::{CallPolicy, FaultTolerance, RpcError};
use rpc_transport::RawReply;
use tokio::time::Instant;
use tracing::debug;

use super::balance::random_below;
use super::outlier::{nanos_at, now_nanos};
use super::{Call, ClientContext};

const WINDOW_NANOS: u64 = 10_000_000_000;

/// Whether the failed attempt number `attempt` (0-based) may be retried.
/// `idempotent`: the method's `#[rpc(idempotent)]`; the configured list
/// can add methods, not remove them.
pub(crate) fn should_retry(
    policy: &CallPolicy,
    method: &str,
    idempotent: bool,
    err: &RpcError,
    attempt: u32,
) -> bool {
    if policy.fault_tolerance != FaultTolerance::FailOver || attempt >= policy.retries {
        return false;
    }
    err.is_safe_to_retry()
        || (err.is_provider_failure()
            && !matches!(err, RpcError::Timeout { .. })
            && (idempotent || policy.idempotent.iter().any(|m| m == method)))
}

/// The fault-tolerance layer: runs the attempts of one call (module docs).
/// Each attempt gets what is left of the deadline; a retry goes to another
/// instance (the balancer skips tried ones).
#[derive(Debug)]
pub struct Retry<S> {
    inner: S,
    policy: CallPolicy,
    budget: Arc<RetryBudget>,
}

impl<S> Retry<S> {
    /// Around `inner`, retrying by `policy` within `budget` (shared by the
    /// service's clients).
    pub fn new(inner: S, policy: CallPolicy, budget: Arc<RetryBudget>) -> Self {
        Self {
            inner,
            policy,
            budget,
        }
    }
}

impl<S: Call> Call for Retry<S> {
    async fn call(&self, cx: &mut ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError> {
        self.budget.record_call_at(nanos_at(cx.started));
        let mut attempt = 0u32;
        loop {
            // The first attempt has the whole budget: no need to read the clock.
            if attempt > 0 || cx.waited {
                let now = Instant::now();
                cx.attempt_start = now;
                cx.remaining = cx.deadline.saturating_duration_since(now);
            }
            if cx.remaining.is_zero() {
                return Err(RpcError::Timeout {
                    service: cx.service.to_owned(),
                    method: cx.method.name.to_owned(),
                    timeout: cx.timeout,
                });
            }
            cx.attempt = attempt;
            let err = match self.inner.call(cx, args).await {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            if !should_retry(
                &self.policy,
                cx.method.name,
                cx.method.idempotent,
                &err,
                attempt,
            ) {
                return Err(err);
            }
            if !self.budget.try_retry() {
                debug!(service = %cx.service, method = cx.method.name, "retry budget exhausted");
                metrics::counter!(CLIENT_BUDGET_EXHAUSTED, SERVICE => cx.service.to_owned())
                    .increment(1);
                return Err(err);
            }
            metrics::counter!(CLIENT_RETRIES, SERVICE => cx.service.to_owned()).increment(1);
            if let Some(idx) = cx.picked {
                cx.tried.add(idx);
            }
            attempt += 1;
            let pause = backoff(&self.policy, attempt)
                .min(cx.deadline.saturating_duration_since(Instant::now()));
            debug!(service = %cx.service, method = cx.method.name, attempt, ?pause, error = %err, "retrying on another instance");
            tokio::time::sleep(pause).await;
        }
    }
}

/// Backoff before retry number `retry` (1-based): uniform in
/// `0..min(max, base * 2^(retry-1))` ("full jitter").
pub(crate) fn backoff(policy: &CallPolicy, retry: u32) -> Duration {
    let ceiling = rpc_core::backoff::step(policy.retry_backoff, policy.retry_backoff_max, retry);
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

    /// Calls counted in the current window (for tests and stats).
    #[doc(hidden)]
    pub fn calls_in_window(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
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
        assert!(should_retry(&p, "rename", false, &refused(), 0));
        assert!(should_retry(&p, "rename", false, &refused(), 1));
        assert!(
            !should_retry(&p, "rename", false, &refused(), 2),
            "retries = 2"
        );
        assert!(
            !should_retry(&p, "rename", false, &lost_after_write(), 0),
            "may have run"
        );
        let mut idem = policy();
        idem.idempotent = vec!["get_user".into()];
        assert!(should_retry(
            &idem,
            "get_user",
            false,
            &lost_after_write(),
            0
        ));
        assert!(!should_retry(
            &idem,
            "rename",
            false,
            &lost_after_write(),
            0
        ));
        // The attribute alone is enough.
        assert!(should_retry(&p, "rename", true, &lost_after_write(), 0));
    }

    #[test]
    fn fail_fast_and_fail_safe_never_retry() {
        for ft in [FaultTolerance::FailFast, FaultTolerance::FailSafe] {
            let mut p = policy();
            p.fault_tolerance = ft;
            assert!(!should_retry(&p, "m", true, &refused(), 0));
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
