//! Load balancers: which endpoint serves the next call.
//!
//! A balancer sees the current endpoint slice (rebuilt only when discovery
//! changes) and returns an index; picking allocates nothing and takes no lock.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rpc_core::LoadBalancerKind;
use rpc_transport::Endpoint;

/// Picks an endpoint for a call.
pub trait LoadBalancer: Send + Sync + fmt::Debug + 'static {
    /// Index into `endpoints` (never empty when called).
    fn pick(&self, endpoints: &[Arc<Endpoint>]) -> usize;
}

/// Each call to the next endpoint in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl LoadBalancer for RoundRobin {
    fn pick(&self, endpoints: &[Arc<Endpoint>]) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len()
    }
}

/// A uniformly random endpoint per call (xorshift; not for cryptography).
#[derive(Debug)]
pub struct Random {
    state: AtomicU64,
}

impl Default for Random {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            | 1;
        Self {
            state: AtomicU64::new(seed),
        }
    }
}

impl LoadBalancer for Random {
    fn pick(&self, endpoints: &[Arc<Endpoint>]) -> usize {
        // A racy update only repeats a value: harmless for balancing.
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        (x % endpoints.len() as u64) as usize
    }
}

/// The balancer a configuration names.
pub fn from_kind(kind: LoadBalancerKind) -> Arc<dyn LoadBalancer> {
    match kind {
        LoadBalancerKind::RoundRobin => Arc::new(RoundRobin::default()),
        LoadBalancerKind::Random => Arc::new(Random::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_transport::EndpointConfig;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(
                    format!("127.0.0.1:{}", 1000 + i),
                    EndpointConfig::default(),
                ))
            })
            .collect()
    }

    #[test]
    fn round_robin_cycles() {
        let e = eps(3);
        let rr = RoundRobin::default();
        let picks: Vec<usize> = (0..6).map(|_| rr.pick(&e)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_covers_every_endpoint() {
        let e = eps(4);
        let r = Random::default();
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[r.pick(&e)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 700), "{seen:?}");
    }
}
