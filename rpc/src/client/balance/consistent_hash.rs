//! Consistent hashing: calls with the same key go to the same instance.

use std::hash::Hasher;

use super::{Fnv, Instance, LoadBalancer, Pick, Prepared};

/// Virtual nodes per instance on the ring: enough for an even spread over
/// a handful of instances.
const VNODES: u32 = 160;

/// Calls with the same key go to the same instance while it is listed and
/// healthy; removing an instance moves only its keys (to their next ring
/// neighbour). The key is the per-call `hash_key` option when set, else a
/// hash of the method and encoded arguments.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsistentHash;

/// `(hash, instance index)`, sorted by hash.
struct Ring(Vec<(u64, usize)>);

impl Ring {
    fn slot(&self, key: u64) -> Option<usize> {
        if self.0.is_empty() {
            return None;
        }
        let slot = self.0.partition_point(|&(h, _)| h < key);
        Some(if slot == self.0.len() { 0 } else { slot })
    }
}

impl LoadBalancer for ConsistentHash {
    fn name(&self) -> &str {
        "consistent_hash"
    }

    fn prepare(&self, instances: &[Instance]) -> Prepared {
        let mut ring = Vec::with_capacity(instances.len() * VNODES as usize);
        for (idx, inst) in instances.iter().enumerate() {
            let node = inst.meta.node_key();
            for v in 0..VNODES {
                let mut h = Fnv::default();
                h.write(node.as_bytes());
                h.write(&v.to_le_bytes());
                ring.push((h.finish(), idx));
            }
        }
        ring.sort_unstable();
        Prepared::new(Ring(ring))
    }

    fn needs_key(&self) -> bool {
        true
    }

    fn pick(&self, pick: &Pick<'_>) -> usize {
        pick.prepared::<Ring>()
            .and_then(|r| r.slot(pick.key()).map(|s| r.0[s].1))
            .unwrap_or(0)
    }

    fn walk_len(&self, pick: &Pick<'_>) -> usize {
        pick.prepared::<Ring>().map_or(pick.len(), |r| r.0.len())
    }

    fn walk(&self, pick: &Pick<'_>, from: usize, step: usize) -> usize {
        match pick.prepared::<Ring>() {
            Some(r) if !r.0.is_empty() => {
                let start = r.slot(pick.key()).unwrap_or(0);
                r.0[(start + step) % r.0.len()].1
            }
            _ => (from + step) % pick.len(),
        }
    }
}
