//! Outlier detection: a circuit breaker per provider address.
//!
//! `outlier_failures` consecutive provider failures (refused or dropped
//! connections, timeouts, overload, handler crashes — see
//! [`RpcError::is_provider_failure`]) eject the instance for a cool-down.
//! When it ends the instance is probed: the next call may go to it; success
//! closes the breaker, failure ejects it again for twice as long (up to 60 s).
//! At most `outlier_max_ejected_percent` of a service's instances are ejected
//! at once, so a correlated failure cannot eject everything.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rpc_core::RpcError;
use tracing::{info, warn};

const MAX_COOLDOWN: Duration = Duration::from_secs(60);

/// Nanoseconds since a process-wide origin: cheap to store in an atomic.
pub(crate) fn now_nanos() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Outlier settings.
#[derive(Clone, Copy, Debug)]
pub struct OutlierPolicy {
    /// Consecutive failures that eject.
    pub failures: u32,
    /// First cool-down.
    pub cooldown: Duration,
    /// Most instances of a service ejected at once, in percent.
    pub max_ejected_percent: u32,
}

/// The breaker state of one provider address.
#[derive(Debug, Default)]
pub struct Health {
    consecutive: AtomicU32,
    /// 0 when not ejected; else `now_nanos()` at which the cool-down ends.
    ejected_until: AtomicU64,
    /// Ejections in a row without a success in between (cool-down doubling).
    ejections: AtomicU32,
    /// Cool-down over and not yet confirmed by a success.
    probing: AtomicBool,
}

impl Health {
    /// Whether calls may go to this instance now.
    pub fn available(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || now >= until
    }

    /// Whether it is ejected right now.
    pub fn is_ejected(&self) -> bool {
        !self.available(now_nanos())
    }

    /// Records a success: closes the breaker.
    pub fn success(&self, addr: &str) {
        self.consecutive.store(0, Ordering::Relaxed);
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            self.probing.store(false, Ordering::Relaxed);
            info!(%addr, "instance recovered: back in rotation");
        }
    }

    /// Records a failed attempt. `ejected_now` counts the service's instances
    /// currently ejected, `total` its size; returns whether this ejected it.
    pub fn failure(
        &self,
        err: &RpcError,
        addr: &str,
        policy: &OutlierPolicy,
        ejected_now: usize,
        total: usize,
    ) -> bool {
        if !err.is_provider_failure() || policy.failures == 0 {
            return false;
        }
        let now = now_nanos();
        let probing_failed = {
            let until = self.ejected_until.load(Ordering::Relaxed);
            until != 0 && now >= until
        };
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if !probing_failed && n < policy.failures {
            return false;
        }
        let cap = (total * policy.max_ejected_percent as usize) / 100;
        if !probing_failed && ejected_now >= cap {
            return false;
        }
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(6);
        let cooldown = policy.cooldown.saturating_mul(1 << k).min(MAX_COOLDOWN);
        self.ejected_until.store(
            now.saturating_add(u64::try_from(cooldown.as_nanos()).unwrap_or(u64::MAX))
                .max(1),
            Ordering::Relaxed,
        );
        self.consecutive.store(0, Ordering::Relaxed);
        self.probing.store(true, Ordering::Relaxed);
        warn!(%addr, failures = n, ?cooldown, error = %err, "instance ejected");
        true
    }

    #[cfg(test)]
    pub(crate) fn eject_for_test(&self) {
        self.ejected_until.store(u64::MAX, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> RpcError {
        RpcError::Connect {
            addr: "a".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }
    }

    const POLICY: OutlierPolicy = OutlierPolicy {
        failures: 3,
        cooldown: Duration::from_millis(40),
        max_ejected_percent: 50,
    };

    #[test]
    fn consecutive_failures_eject_and_success_resets() {
        let h = Health::default();
        assert!(!h.failure(&refused(), "a", &POLICY, 0, 4));
        assert!(!h.failure(&refused(), "a", &POLICY, 0, 4));
        h.success("a");
        assert!(!h.failure(&refused(), "a", &POLICY, 0, 4));
        assert!(!h.failure(&refused(), "a", &POLICY, 0, 4));
        assert!(h.failure(&refused(), "a", &POLICY, 0, 4));
        assert!(h.is_ejected());
    }

    #[test]
    fn caller_errors_do_not_count() {
        let h = Health::default();
        let bad_input = RpcError::Remote {
            service: "s".into(),
            method: "m".into(),
            addr: "a".into(),
            code: rpc_core::StatusCode::MethodNotFound,
            message: String::new(),
        };
        for _ in 0..10 {
            assert!(!h.failure(&bad_input, "a", &POLICY, 0, 4));
        }
        assert!(!h.is_ejected());
    }

    #[test]
    fn the_ejection_cap_keeps_instances_in_rotation() {
        let h = Health::default();
        for _ in 0..10 {
            h.failure(&refused(), "a", &POLICY, 2, 4);
        }
        assert!(!h.is_ejected(), "half the instances are already out");
    }

    #[test]
    fn a_failed_probe_ejects_again_for_longer() {
        let h = Health::default();
        for _ in 0..3 {
            h.failure(&refused(), "a", &POLICY, 0, 2);
        }
        let first = h.ejected_until.load(Ordering::Relaxed) - now_nanos();
        // Cool-down over: probing.
        h.ejected_until
            .store(now_nanos().saturating_sub(1).max(1), Ordering::Relaxed);
        assert!(!h.is_ejected());
        // One failure while probing re-ejects, even over the cap, for longer.
        assert!(h.failure(&refused(), "a", &POLICY, 1, 2));
        let second = h.ejected_until.load(Ordering::Relaxed) - now_nanos();
        assert!(second > first, "{second} <= {first}");
        h.success("a");
        assert!(!h.is_ejected());
    }
}
