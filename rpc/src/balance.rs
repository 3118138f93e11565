//! Load balancing: which instance serves the next attempt.
//!
//! An [`InstanceSet`] is built once per discovery change (with whatever the
//! policy needs precomputed: cumulative weights, a hash ring); picking from
//! it takes no lock and allocates nothing. Every balancer skips instances
//! the outlier detector ejected and instances this call already tried,
//! unless that leaves nothing.

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rpc_core::{LoadBalancerKind, ServiceMetaInfo};
use rpc_transport::Endpoint;

use crate::outlier::Health;

/// Virtual nodes per instance on the consistent-hash ring: enough for an
/// even spread over a handful of instances.
const VNODES: u32 = 160;

/// One instance of a service, as the balancer sees it.
#[derive(Debug)]
pub struct Instance {
    /// Its registry record.
    pub meta: ServiceMetaInfo,
    /// Its pooled connections.
    pub endpoint: Arc<Endpoint>,
    /// Its outlier state (shared by every service on that address).
    pub health: Arc<Health>,
}

/// The instances of one service at one discovery version.
#[derive(Debug, Default)]
pub struct InstanceSet {
    /// The instances, in node-key order.
    pub instances: Vec<Instance>,
    /// Running sum of weights (weighted balancing).
    cumulative: Vec<u64>,
    /// `(hash, instance index)`, sorted by hash (consistent hashing).
    ring: Vec<(u64, usize)>,
}

impl InstanceSet {
    /// Builds the set and what `kind` needs precomputed.
    pub fn new(instances: Vec<Instance>, kind: LoadBalancerKind) -> Self {
        let mut set = Self {
            instances,
            cumulative: Vec::new(),
            ring: Vec::new(),
        };
        match kind {
            LoadBalancerKind::Weighted => {
                let mut sum = 0u64;
                set.cumulative = set
                    .instances
                    .iter()
                    .map(|i| {
                        // Weight 0 would make an instance unreachable: treat it as 1.
                        sum += u64::from(i.meta.weight.max(1));
                        sum
                    })
                    .collect();
            }
            LoadBalancerKind::ConsistentHash => {
                for (idx, inst) in set.instances.iter().enumerate() {
                    let node = inst.meta.node_key();
                    for v in 0..VNODES {
                        let mut h = Fnv::default();
                        h.write(node.as_bytes());
                        h.write(&v.to_le_bytes());
                        set.ring.push((h.finish(), idx));
                    }
                }
                set.ring.sort_unstable();
            }
            _ => {}
        }
        set
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }
}

/// Instances a pick must avoid: tried by earlier attempts of this call.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tried(u64);

impl Tried {
    /// Marks `idx` as tried (indices past 63 are not tracked).
    pub fn add(&mut self, idx: usize) {
        if idx < 64 {
            self.0 |= 1 << idx;
        }
    }
    fn has(&self, idx: usize) -> bool {
        idx < 64 && self.0 & (1 << idx) != 0
    }
}

/// A load-balancing policy.
#[derive(Debug)]
pub struct Balancer {
    kind: LoadBalancerKind,
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer of `kind`.
    pub fn new(kind: LoadBalancerKind) -> Self {
        Self {
            kind,
            next: AtomicUsize::new(0),
        }
    }

    /// Its policy.
    pub fn kind(&self) -> LoadBalancerKind {
        self.kind
    }

    /// Whether picks depend on a hash of the call (consistent hashing).
    pub fn needs_hash(&self) -> bool {
        self.kind == LoadBalancerKind::ConsistentHash
    }

    /// Picks an instance index, or `None` if the set is empty. Prefers
    /// instances neither ejected nor tried; falls back to tried ones, then
    /// to ejected ones, so a call is never refused while an instance exists.
    pub fn pick(&self, set: &InstanceSet, hash: u64, tried: Tried) -> Option<usize> {
        let n = set.len();
        if n == 0 {
            return None;
        }
        // Read the clock only if some instance has been ejected.
        let clock = std::cell::OnceCell::new();
        let ok = |i: usize| {
            let h = &set.instances[i].health;
            h.is_closed() || h.available(*clock.get_or_init(crate::outlier::now_nanos))
        };
        let fresh = |i: usize| !tried.has(i) && ok(i);
        let usable = |i: usize| ok(i);
        let first = self.first_choice(set, hash, &fresh);
        if fresh(first) {
            return Some(first);
        }
        // The preferred instance is out: walk on from it (on the ring for
        // consistent hashing, so a key moves to its next ring neighbour).
        if let Some(i) = self.walk(set, first, hash, &fresh) {
            return Some(i);
        }
        if let Some(i) = self.walk(set, first, hash, &usable) {
            return Some(i);
        }
        Some(first)
    }

    fn first_choice(&self, set: &InstanceSet, hash: u64, fresh: &dyn Fn(usize) -> bool) -> usize {
        let n = set.len();
        match self.kind {
            LoadBalancerKind::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            LoadBalancerKind::Random => random_below(n as u64) as usize,
            LoadBalancerKind::Weighted => {
                let total = set.cumulative.last().copied().unwrap_or(0);
                if total == 0 {
                    return random_below(n as u64) as usize;
                }
                let r = random_below(total);
                set.cumulative.partition_point(|&c| c <= r).min(n - 1)
            }
            LoadBalancerKind::ConsistentHash => ring_slot(set, hash).map_or(0, |s| set.ring[s].1),
            LoadBalancerKind::P2c => {
                if n == 1 {
                    return 0;
                }
                let a = random_below(n as u64) as usize;
                let b = (a + 1 + random_below(n as u64 - 1) as usize) % n;
                match (fresh(a), fresh(b)) {
                    (true, false) => a,
                    (false, true) => b,
                    _ => {
                        let (ea, eb) = (&set.instances[a].endpoint, &set.instances[b].endpoint);
                        let (la, lb) = (ea.in_flight(), eb.in_flight());
                        if la != lb {
                            if la < lb { a } else { b }
                        } else if ea.latency_ewma() <= eb.latency_ewma() {
                            a
                        } else {
                            b
                        }
                    }
                }
            }
        }
    }

    fn walk(
        &self,
        set: &InstanceSet,
        from: usize,
        hash: u64,
        ok: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.kind == LoadBalancerKind::ConsistentHash && !set.ring.is_empty() {
            let start = ring_slot(set, hash).unwrap_or(0);
            let len = set.ring.len();
            return (1..=len)
                .map(|k| set.ring[(start + k) % len].1)
                .find(|&i| ok(i));
        }
        let n = set.len();
        (1..=n).map(|k| (from + k) % n).find(|&i| ok(i))
    }
}

fn ring_slot(set: &InstanceSet, hash: u64) -> Option<usize> {
    if set.ring.is_empty() {
        return None;
    }
    let slot = set.ring.partition_point(|&(h, _)| h < hash);
    Some(if slot == set.ring.len() { 0 } else { slot })
}

/// FNV-1a: a stable hash (the same in every process and release), for the
/// ring and for call keys.
#[derive(Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        // FNV's low bits are weak for short inputs: mix before use on a ring.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The consistent-hash key of a call: its method and encoded arguments.
pub fn call_hash(method: &str, args: &[u8]) -> u64 {
    let mut h = Fnv::default();
    h.write(method.as_bytes());
    h.write(args);
    h.finish()
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(
        std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id()) | 1
    );
}

/// A uniform number in `0..n` (xorshift64*; not for cryptography).
pub(crate) fn random_below(n: u64) -> u64 {
    if n <= 1 {
        return 0;
    }
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    })
}

impl fmt::Display for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_transport::EndpointConfig;

    fn set(weights: &[u32], kind: LoadBalancerKind) -> InstanceSet {
        let instances = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut meta = ServiceMetaInfo::new("S", "1.0", "127.0.0.1", 1000 + i as u16);
                meta.weight = *w;
                Instance {
                    endpoint: Arc::new(Endpoint::new(meta.address(), EndpointConfig::default())),
                    health: Arc::new(Health::default()),
                    meta,
                }
            })
            .collect();
        InstanceSet::new(instances, kind)
    }

    #[test]
    fn round_robin_cycles() {
        let s = set(&[1, 1, 1], LoadBalancerKind::RoundRobin);
        let b = Balancer::new(LoadBalancerKind::RoundRobin);
        let picks: Vec<_> = (0..6)
            .map(|_| b.pick(&s, 0, Tried::default()).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_covers_every_instance() {
        let s = set(&[1, 1, 1, 1], LoadBalancerKind::Random);
        let b = Balancer::new(LoadBalancerKind::Random);
        let mut seen = [0; 4];
        for _ in 0..4000 {
            seen[b.pick(&s, 0, Tried::default()).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn weighted_follows_the_weights() {
        let s = set(&[100, 300], LoadBalancerKind::Weighted);
        let b = Balancer::new(LoadBalancerKind::Weighted);
        let mut seen = [0u32; 2];
        for _ in 0..20_000 {
            seen[b.pick(&s, 0, Tried::default()).unwrap()] += 1;
        }
        let share = f64::from(seen[1]) / 20_000.0;
        assert!((0.72..0.78).contains(&share), "{seen:?}");
    }

    #[test]
    fn consistent_hash_moves_only_the_keys_of_a_removed_instance() {
        let kind = LoadBalancerKind::ConsistentHash;
        let b = Balancer::new(kind);
        let four = set(&[1, 1, 1, 1], kind);
        let mut three_instances = set(&[1, 1, 1, 1], kind).instances;
        let removed = three_instances.remove(2);
        let three = InstanceSet::new(three_instances, kind);
        let addr = |s: &InstanceSet, i: usize| s.instances[i].meta.address();
        let mut moved = 0;
        let mut spread = [0u32; 4];
        for k in 0..4000u32 {
            let h = call_hash("get", &k.to_le_bytes());
            let before = addr(&four, b.pick(&four, h, Tried::default()).unwrap());
            let after = addr(&three, b.pick(&three, h, Tried::default()).unwrap());
            spread[b.pick(&four, h, Tried::default()).unwrap()] += 1;
            if before != after {
                moved += 1;
                assert_eq!(
                    before,
                    removed.meta.address(),
                    "key {k} moved off a surviving instance"
                );
            }
        }
        assert!(spread.iter().all(|&c| c > 600), "uneven ring: {spread:?}");
        assert!(moved > 600 && moved < 1400, "moved {moved}");
        // Same key, same instance, every time.
        let h = call_hash("get", b"user-42");
        let first = b.pick(&four, h, Tried::default());
        assert!((0..100).all(|_| b.pick(&four, h, Tried::default()) == first));
    }

    #[test]
    fn tried_and_ejected_instances_are_avoided_while_others_exist() {
        for kind in [
            LoadBalancerKind::RoundRobin,
            LoadBalancerKind::Random,
            LoadBalancerKind::Weighted,
            LoadBalancerKind::ConsistentHash,
            LoadBalancerKind::P2c,
        ] {
            let s = set(&[1, 1, 1], kind);
            let b = Balancer::new(kind);
            s.instances[0].health.eject_for_test();
            let mut tried = Tried::default();
            tried.add(1);
            for k in 0..50u64 {
                assert_eq!(b.pick(&s, k * 7919, tried), Some(2), "{kind:?}");
            }
            // Everything excluded: still a pick (never refuse while instances exist).
            tried.add(2);
            assert!(b.pick(&s, 1, tried).is_some());
        }
    }
}
