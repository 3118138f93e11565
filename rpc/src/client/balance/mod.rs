//! Load balancing: which instance serves the next attempt.
//!
//! A policy implements [`LoadBalancer`]: it names a preferred instance for
//! a call ([`LoadBalancer::pick`]), and may precompute what it needs once
//! per discovery change ([`LoadBalancer::prepare`]: cumulative weights, a
//! hash ring). The framework keeps the rest, the same for every policy, so
//! that no balancer can refuse a call or send one to an instance it should
//! avoid: if the preferred instance was ejected by the outlier detector or
//! already tried by this call, it walks on ([`LoadBalancer::walk`]) to the
//! next fresh one, then to any usable one, and only then back to the
//! preferred one ([`pick`]).
//!
//! The built-in policies, one file each, are named in `rpc.toml`
//! (`load_balancer = "round_robin"`, ...): [`RoundRobin`], [`Random`],
//! [`Weighted`], [`ConsistentHash`], [`P2c`]. A user policy is passed to
//! `Consumer::balancer` and overrides the configured one.
//!
//! Picking takes no lock and allocates nothing (`rpc-bench pick` checks).

mod consistent_hash;
mod p2c;
mod random;
mod round_robin;
mod weighted;

use std::any::Any;
use std::fmt;
use std::hash::Hasher;
use std::sync::Arc;

use rpc_core::{LoadBalancerKind, ServiceMetaInfo};
use rpc_transport::Endpoint;

use super::outlier::Health;

pub use consistent_hash::ConsistentHash;
pub use p2c::P2c;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use weighted::Weighted;

/// One instance of a service, as the balancer sees it.
#[derive(Debug)]
pub struct Instance {
    /// Its registry record.
    pub meta: ServiceMetaInfo,
    /// Its pooled connections (`in_flight()`, `latency_ewma()` for
    /// load-aware policies).
    pub endpoint: Arc<Endpoint>,
    /// Its outlier state (shared by every service on that address).
    pub health: Arc<Health>,
}

/// What a policy precomputed for one instance set
/// ([`LoadBalancer::prepare`]); read back with [`Pick::prepared`].
#[derive(Default)]
pub struct Prepared(Option<Box<dyn Any + Send + Sync>>);

impl Prepared {
    /// Nothing precomputed.
    pub fn none() -> Self {
        Self(None)
    }

    /// Keeps `value` with the set.
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        Self(Some(Box::new(value)))
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Prepared(..)"
        } else {
            "Prepared(none)"
        })
    }
}

/// The instances of one service at one discovery version, with what the
/// balancer prepared for them.
#[derive(Debug, Default)]
pub struct InstanceSet {
    /// The instances, in node-key order.
    pub instances: Vec<Instance>,
    prepared: Prepared,
}

impl InstanceSet {
    /// Builds the set and lets `balancer` prepare for it.
    pub fn new(instances: Vec<Instance>, balancer: &dyn LoadBalancer) -> Self {
        let prepared = balancer.prepare(&instances);
        Self {
            instances,
            prepared,
        }
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

    /// Whether `idx` was tried.
    pub fn has(&self, idx: usize) -> bool {
        idx < 64 && self.0 & (1 << idx) != 0
    }
}

/// One pick: the set, the call's key, and which instances are fresh
/// (neither ejected nor tried by this call).
pub struct Pick<'a> {
    set: &'a InstanceSet,
    key: u64,
    fresh: &'a dyn Fn(usize) -> bool,
}

impl fmt::Debug for Pick<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("instances", &self.set.len())
            .field("key", &self.key)
            .finish()
    }
}

impl<'a> Pick<'a> {
    /// The instances (never empty).
    pub fn instances(&self) -> &'a [Instance] {
        &self.set.instances
    }

    /// Number of instances (at least 1).
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Always `false`: a pick is only asked of a non-empty set.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The call's consistent-hash key: the per-call `hash_key` option, or
    /// a hash of the method and encoded arguments. 0 unless the policy
    /// [`needs_key`](LoadBalancer::needs_key).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// Whether instance `i` is neither ejected nor tried by this call.
    pub fn is_fresh(&self, i: usize) -> bool {
        i < self.len() && (self.fresh)(i)
    }

    /// What [`LoadBalancer::prepare`] returned for this set, as a `T`.
    pub fn prepared<T: Any>(&self) -> Option<&'a T> {
        self.set.prepared.0.as_ref()?.downcast_ref()
    }
}

/// A load-balancing policy. Implement it to plug in your own
/// (`Consumer::balancer`); see the module docs for what the framework does
/// around it.
pub trait LoadBalancer: Send + Sync + fmt::Debug + 'static {
    /// The policy's name, for logs.
    fn name(&self) -> &str;

    /// Precomputes what picks need, once per discovery change.
    fn prepare(&self, instances: &[Instance]) -> Prepared {
        let _ = instances;
        Prepared::none()
    }

    /// Whether picks use [`Pick::key`] (computing it hashes the arguments).
    fn needs_key(&self) -> bool {
        false
    }

    /// The preferred instance's index (taken modulo the set's length).
    fn pick(&self, pick: &Pick<'_>) -> usize;

    /// Walk length: how many candidates [`walk`](Self::walk) offers.
    fn walk_len(&self, pick: &Pick<'_>) -> usize {
        pick.len()
    }

    /// The `step`-th (1-based, up to `walk_len`) alternative to `from`
    /// when `from` is out; the next index by default.
    fn walk(&self, pick: &Pick<'_>, from: usize, step: usize) -> usize {
        (from + step) % pick.len()
    }
}

/// The built-in policy of `kind`.
pub fn built_in(kind: LoadBalancerKind) -> Arc<dyn LoadBalancer> {
    match kind {
        LoadBalancerKind::RoundRobin => Arc::new(RoundRobin::default()),
        LoadBalancerKind::Random => Arc::new(Random),
        LoadBalancerKind::Weighted => Arc::new(Weighted),
        LoadBalancerKind::ConsistentHash => Arc::new(ConsistentHash),
        LoadBalancerKind::P2c => Arc::new(P2c),
    }
}

/// Picks an instance index, or `None` if the set is empty. Prefers
/// instances neither ejected nor tried; falls back to tried ones, then
/// to ejected ones, so a call is never refused while an instance exists.
pub fn pick(
    balancer: &dyn LoadBalancer,
    set: &InstanceSet,
    key: u64,
    tried: Tried,
) -> Option<usize> {
    let n = set.len();
    if n == 0 {
        return None;
    }
    // Read the clock only if some instance has been ejected.
    let clock = std::cell::OnceCell::new();
    let ok = |i: usize| {
        let h = &set.instances[i].health;
        h.is_closed() || h.available(*clock.get_or_init(super::outlier::now_nanos))
    };
    let fresh = |i: usize| !tried.has(i) && ok(i);
    let p = Pick {
        set,
        key,
        fresh: &fresh,
    };
    let first = balancer.pick(&p) % n;
    if fresh(first) {
        return Some(first);
    }
    // The preferred instance is out: walk on from it (on the ring for
    // consistent hashing, so a key moves to its next ring neighbour).
    let len = balancer.walk_len(&p);
    let walk = |ok: &dyn Fn(usize) -> bool| {
        (1..=len)
            .map(|k| balancer.walk(&p, first, k) % n)
            .find(|&i| ok(i))
    };
    walk(&fresh).or_else(|| walk(&ok)).or(Some(first))
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

/// The consistent-hash key of a per-call `hash_key` (a user id, a session).
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = Fnv::default();
    h.write(key);
    h.finish()
}

pub use rpc_core::backoff::random_below;

/// The load-balancing layer: picks the instance for this attempt from the
/// call's instance set, skipping ejected and tried ones, and takes the
/// single probe slot of an instance whose cool-down just ended (outlier
/// detection's admission, decided just before sending).
#[derive(Debug)]
pub struct LoadBalance<S> {
    inner: S,
    balancer: Arc<dyn LoadBalancer>,
    /// The outlier cool-down: how long a probe's slot is held past its deadline.
    cooldown: std::time::Duration,
}

impl<S> LoadBalance<S> {
    /// Around `inner`, picking with `balancer`.
    pub fn new(inner: S, balancer: Arc<dyn LoadBalancer>, cooldown: std::time::Duration) -> Self {
        Self {
            inner,
            balancer,
            cooldown,
        }
    }
}

impl<S: super::Call> super::Call for LoadBalance<S> {
    async fn call(
        &self,
        cx: &mut super::ClientContext<'_>,
        args: &[u8],
    ) -> Result<rpc_transport::RawReply, rpc_core::RpcError> {
        use super::outlier::Admission;
        let no_provider = || rpc_core::RpcError::NoProvider {
            service: cx.service.to_owned(),
        };
        let Some(versioned) = cx.set.as_ref() else {
            return Err(no_provider());
        };
        let set = &versioned.set;
        let key = if self.balancer.needs_key() {
            match cx.hash_key {
                Some(k) => k,
                None => call_hash(cx.method.name, args),
            }
        } else {
            0
        };
        let b = &*self.balancer;
        let Some(idx) = pick(b, set, key, cx.tried) else {
            return Err(no_provider());
        };
        // After a cool-down, one call probes. The others keep away until
        // its outcome is recorded, which comes just after its deadline at
        // the latest (or, if it is cancelled, a cool-down after it).
        let hold = cx.remaining.saturating_add(self.cooldown);
        let admission = if set.instances[idx].health.is_closed() {
            // The common case: nothing ejected, no clock to read.
            Admission::Normal
        } else {
            set.instances[idx]
                .health
                .admit(super::outlier::now_nanos(), hold)
        };
        let (idx, probe) = match admission {
            Admission::Normal => (idx, false),
            Admission::Probe => (idx, true),
            // Another call took the probe a moment ago, which made the
            // instance unavailable again: pick again.
            Admission::Taken => {
                let again = pick(b, set, key, cx.tried).unwrap_or(idx);
                let probe = again != idx
                    && set.instances[again]
                        .health
                        .admit(super::outlier::now_nanos(), hold)
                        == Admission::Probe;
                (again, probe)
            }
        };
        cx.picked = Some(idx);
        cx.probe = probe;
        cx.recorded = false;
        let outcome = self.inner.call(cx, args).await;
        if cx.probe && !cx.recorded {
            // An attempt layer answered without reaching `Outlier`: the
            // probe says nothing about the instance, so the next call probes.
            if let Some(instance) = cx.instance() {
                instance.health.release_probe();
            }
        }
        outcome
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
        InstanceSet::new(instances, &*built_in(kind))
    }

    #[test]
    fn round_robin_cycles() {
        let s = set(&[1, 1, 1], LoadBalancerKind::RoundRobin);
        let b = built_in(LoadBalancerKind::RoundRobin);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(&*b, &s, 0, Tried::default()).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_covers_every_instance() {
        let s = set(&[1, 1, 1, 1], LoadBalancerKind::Random);
        let b = built_in(LoadBalancerKind::Random);
        let mut seen = [0; 4];
        for _ in 0..4000 {
            seen[pick(&*b, &s, 0, Tried::default()).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn weighted_follows_the_weights() {
        let s = set(&[100, 300], LoadBalancerKind::Weighted);
        let b = built_in(LoadBalancerKind::Weighted);
        let mut seen = [0u32; 2];
        for _ in 0..20_000 {
            seen[pick(&*b, &s, 0, Tried::default()).unwrap()] += 1;
        }
        let share = f64::from(seen[1]) / 20_000.0;
        assert!((0.72..0.78).contains(&share), "{seen:?}");
    }

    #[test]
    fn consistent_hash_moves_only_the_keys_of_a_removed_instance() {
        let kind = LoadBalancerKind::ConsistentHash;
        let b = built_in(kind);
        let four = set(&[1, 1, 1, 1], kind);
        let mut three_instances = set(&[1, 1, 1, 1], kind).instances;
        let removed = three_instances.remove(2);
        let three = InstanceSet::new(three_instances, &*b);
        let addr = |s: &InstanceSet, i: usize| s.instances[i].meta.address();
        let mut moved = 0;
        let mut spread = [0u32; 4];
        for k in 0..4000u32 {
            let h = call_hash("get", &k.to_le_bytes());
            let before = addr(&four, pick(&*b, &four, h, Tried::default()).unwrap());
            let after = addr(&three, pick(&*b, &three, h, Tried::default()).unwrap());
            spread[pick(&*b, &four, h, Tried::default()).unwrap()] += 1;
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
        let first = pick(&*b, &four, h, Tried::default());
        assert!((0..100).all(|_| pick(&*b, &four, h, Tried::default()) == first));
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
            let b = built_in(kind);
            s.instances[0].health.eject_for_test();
            let mut tried = Tried::default();
            tried.add(1);
            for k in 0..50u64 {
                assert_eq!(pick(&*b, &s, k * 7919, tried), Some(2), "{kind:?}");
            }
            // Everything excluded: still a pick (never refuse while instances exist).
            tried.add(2);
            assert!(pick(&*b, &s, 1, tried).is_some());
        }
    }
}
