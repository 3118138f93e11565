//! Random: a uniform pick.

use super::{LoadBalancer, Pick, random_below};

/// A uniform pick (a per-thread xorshift generator: no lock, no syscall).
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

impl LoadBalancer for Random {
    fn name(&self) -> &str {
        "random"
    }

    fn pick(&self, pick: &Pick<'_>) -> usize {
        random_below(pick.len() as u64) as usize
    }
}
