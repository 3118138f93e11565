//! Round robin: each call takes the next instance in node-key order.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{LoadBalancer, Pick};

/// Each call takes the next instance, in node-key order. One counter per
/// service client, shared by its calls (a relaxed atomic increment).
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl LoadBalancer for RoundRobin {
    fn name(&self) -> &str {
        "round_robin"
    }

    fn pick(&self, pick: &Pick<'_>) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % pick.len()
    }
}
