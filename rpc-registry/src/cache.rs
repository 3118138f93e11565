//! [`ServiceCache`]: the consumer-side instance cache, over any [`Discover`].
//!
//! The first lookup of a service key starts one watch task for it, owned by
//! the cache (aborted when the last clone of the cache is dropped), and waits
//! up to [`CacheOptions::ready_timeout`] for its first snapshot. From then on
//! the list is read without locks: each service holds an
//! `ArcSwap<Vec<ServiceMetaInfo>>`, sorted by node key, and a reader gets an
//! `Arc` to the current list (a reference-count increment, no allocation).
//!
//! The watch task applies changes incrementally: an upsert replaces or
//! inserts one instance, a removal removes one, and a snapshot is diffed
//! against the current list, so readers never see an emptied list being
//! refilled. Losing the registry never empties the list either:
//! `Connected(false)` only marks the service unhealthy, and when the watch
//! stream ends or cannot be opened the task keeps the last list and watches
//! again with exponential backoff; the backend's next snapshot then brings in
//! additions and removals that happened meanwhile.
//!
//! Empty-push protection ([`CacheOptions::empty_protection`]) guards the one
//! update that would hurt most, the one that empties a non-empty list. While
//! the connection is unhealthy such an update waits until the connection is
//! healthy again. For [`CacheOptions::empty_grace`] after the registry comes
//! back from a break, an empty list from the registry waits too, since a
//! registry restarted with no data lists nothing until its providers have
//! registered again: the cache follows the registry's own list meanwhile and
//! publishes it as soon as it lists an instance (so an instance that never
//! comes back is not kept), or at the end of the grace.
//!
//! Every list or health change bumps a per-service version counter,
//! published through a `tokio::sync::watch` channel, so consumers can
//! rebuild derived state (balancers, connection pools) and tests can await a
//! change instead of sleeping.

use crate::support::sleep_until_opt;
use rpc_core::backoff::Backoff;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rpc_core::{Discover, RegistryError, ServiceMetaInfo, WatchEvent};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::support::task::AbortOnDrop;

/// How long a lookup waits for the registry when the snapshot file has a
/// list for the service.
const SEED_WAIT: Duration = Duration::from_secs(2);

/// Default [`CacheOptions::empty_grace`]. Providers register again at their
/// next heartbeat or reconnect after a registry restart: within TTL / 3
/// (10 s at the default 30 s TTL) for the backends that heartbeat, about 4 s
/// for Nacos (the chaos tests' `registry_reset`).
pub const DEFAULT_EMPTY_GRACE: Duration = Duration::from_secs(20);

/// Default bound on the number of service keys a cache follows.
pub const DEFAULT_MAX_SERVICES: usize = 4096;

/// Tuning for [`ServiceCache::with_options`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// Most service keys followed at once; further keys are refused with
    /// [`CacheError::TooManyServices`].
    pub max_services: usize,
    /// How long the first lookup of a key waits for the backend's first
    /// snapshot.
    pub ready_timeout: Duration,
    /// First delay before watching again after the watch failed or ended.
    pub backoff_min: Duration,
    /// Longest delay between attempts to watch again.
    pub backoff_max: Duration,
    /// Empty-push protection: an update that would empty a non-empty list
    /// while the registry connection is unhealthy is held back until the
    /// backend reports the connection healthy again (which confirms it).
    pub empty_protection: bool,
    /// With `empty_protection`: for this long after the registry comes back
    /// from a break (the connection was lost, or the watch ended), a list
    /// that the registry reports empty does not replace a non-empty one. A
    /// registry restarted empty lists nothing until its providers have
    /// registered again; their instances are published as they come back,
    /// and an empty list at the end of the grace. Zero turns this off.
    pub empty_grace: Duration,
    /// Where to keep the last good lists, so that a consumer started while
    /// the registry is down can use them. Written atomically, at most once
    /// a second.
    pub snapshot_file: Option<std::path::PathBuf>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            max_services: DEFAULT_MAX_SERVICES,
            ready_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            empty_protection: true,
            empty_grace: DEFAULT_EMPTY_GRACE,
            snapshot_file: None,
        }
    }
}

/// Why the cache could not produce a service's instances.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The cache already follows its maximum number of service keys.
    #[error("service cache is full: it follows at most {limit} services")]
    TooManyServices {
        /// [`CacheOptions::max_services`].
        limit: usize,
    },
    /// The backend gave no first snapshot in time. The cache keeps trying;
    /// a later lookup may succeed.
    #[error("no instance list for `{service}` after {waited:?}{}", last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    NotReady {
        /// The service key.
        service: String,
        /// How long the lookup waited.
        waited: Duration,
        /// The last watch error, if any.
        last_error: Option<String>,
    },
    /// Called outside a Tokio runtime, so no watch task can run.
    #[error("the service cache must be used within a Tokio runtime")]
    NoRuntime,
}

impl From<CacheError> for RegistryError {
    fn from(e: CacheError) -> Self {
        RegistryError::unavailable("cache", e.to_string(), e)
    }
}

/// An update that empty-push protection keeps from the published list.
enum Held {
    /// An emptying update that arrived while the connection was unhealthy.
    /// A healthy connection confirms it; any newer list event replaces it.
    Unconfirmed(Vec<ServiceMetaInfo>),
    /// The registry's own list, empty, within the grace after the registry
    /// came back from a break. Later events update it, and it is published
    /// as soon as it lists an instance, or at `until` as it is.
    Reset {
        truth: Vec<ServiceMetaInfo>,
        until: Instant,
    },
}

/// Empty-push protection's state; only the watch task changes it.
#[derive(Default)]
struct Protection {
    held: Option<Held>,
    /// When the registry last came back from a break.
    recovered_at: Option<Instant>,
}

/// One service's cached state, shared by its watch task and its handles.
struct Entry {
    key: String,
    empty_protection: bool,
    empty_grace: Duration,
    protection: Mutex<Protection>,
    /// Wakes the snapshot-file writer, if there is one.
    persist: Option<Arc<tokio::sync::Notify>>,
    list: ArcSwap<Vec<ServiceMetaInfo>>,
    ready: AtomicBool,
    healthy: AtomicBool,
    version: watch::Sender<u64>,
    last_error: Mutex<Option<String>>,
}

impl Entry {
    fn new(key: &str, options: &CacheOptions, persist: Option<Arc<tokio::sync::Notify>>) -> Self {
        Self {
            key: key.to_owned(),
            empty_protection: options.empty_protection,
            empty_grace: options.empty_grace,
            protection: Mutex::new(Protection::default()),
            persist,
            list: ArcSwap::from_pointee(Vec::new()),
            ready: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            version: watch::channel(0).0,
            last_error: Mutex::new(None),
        }
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Lists `seed` (from the snapshot file) if nothing arrived yet.
    fn seed(&self, seed: Vec<ServiceMetaInfo>) -> bool {
        if self.ready.load(Ordering::Acquire) {
            return false;
        }
        self.list.store(Arc::new(self.own(seed)));
        if self
            .ready
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.bump();
        true
    }

    /// Returns whether health changed.
    fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn protection(&self) -> std::sync::MutexGuard<'_, Protection> {
        self.protection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// When a list held for the grace after a registry restart is due.
    fn held_until(&self) -> Option<Instant> {
        match self.protection().held {
            Some(Held::Reset { until, .. }) => Some(until),
            _ => None,
        }
    }

    /// Applies one event; only the service's watch task calls this, so a
    /// load followed by a store cannot lose a concurrent update.
    /// `trusted`: the first event of a freshly established watch, which the
    /// backend produced over a connection that just worked. Returns when a
    /// held list is due (see [`Entry::release`]).
    fn apply(&self, event: WatchEvent, trusted: bool) -> Option<Instant> {
        let current = self.list.load();
        let was_healthy = self.healthy.load(Ordering::Acquire);
        let was_ready = self.ready.load(Ordering::Acquire);
        let confirms = trusted || matches!(event, WatchEvent::Connected(true));
        let mut protection = self.protection();
        let mut held = protection.held.take();
        let (health, first) = match &event {
            WatchEvent::Snapshot(_) => (Some(true), !was_ready),
            WatchEvent::Connected(c) => (Some(*c), false),
            _ => (None, false),
        };
        let now = Instant::now();
        if health == Some(true) && !was_healthy && was_ready {
            protection.recovered_at = Some(now);
        }
        // The list the event applies to: the registry's own while a reset
        // is held (so an instance that never comes back is not kept), the
        // published one otherwise (a newer event replaces an unconfirmed
        // hold).
        let base: &[ServiceMetaInfo] = match &held {
            Some(Held::Reset { truth, .. }) => truth,
            _ => &current,
        };
        let mut health = health;
        // Removals do not end the grace: a registry directory that comes back
        // empty may report each instance gone one by one.
        let lists = matches!(event, WatchEvent::Snapshot(_) | WatchEvent::Upsert(_));
        let mut next = match event {
            WatchEvent::Snapshot(snapshot) => {
                self.set_last_error(None);
                let snapshot = self.own(snapshot);
                let (next, delta) = merge_snapshot(base, snapshot);
                if !delta.is_empty() {
                    tracing::debug!(service = %self.key, added = delta.added, removed = delta.removed, updated = delta.updated, "snapshot applied");
                }
                next
            }
            WatchEvent::Upsert(meta) => {
                if meta.service_key() == self.key {
                    tracing::debug!(service = %self.key, node = %meta.node_key(), address = %meta.address(), "instance added or updated");
                    upsert(base, meta)
                } else {
                    tracing::debug!(service = %self.key, node = %meta.node_key(), "ignoring an instance of another service");
                    None
                }
            }
            WatchEvent::Remove(node_key) => {
                tracing::debug!(service = %self.key, node = %node_key, "instance removed");
                remove(base, &node_key)
            }
            WatchEvent::Connected(connected) => {
                if !connected {
                    tracing::warn!(service = %self.key, "registry connection lost; keeping the last known instances");
                }
                match held.take() {
                    // A healthy connection confirms an update held back while it was not.
                    Some(Held::Unconfirmed(list)) if connected => Some(list),
                    other => {
                        protection.held = other;
                        None
                    }
                }
            }
        };
        if let Some(Held::Reset { truth, .. }) = held {
            // A list event during a reset hold: its outcome is the registry's
            // list, which the protection below holds again while it is empty.
            next = next.or(Some(truth));
        }
        if lists {
            // The registry lists instances again: whatever it says from now
            // on is news, not the emptiness of a restart.
            let listed = match &next {
                Some(list) => !list.is_empty(),
                None => !current.is_empty(),
            };
            if listed && protection.recovered_at.take().is_some() {
                tracing::info!(service = %self.key, "the registry lists instances again since it came back");
            }
        }
        let grace_until = protection
            .recovered_at
            .map(|at| at + self.empty_grace)
            .filter(|until| self.empty_protection && now < *until);
        // Empty-push protection: never let an unhealthy registry connection,
        // or a registry just back from a break, wipe a good list.
        if self.empty_protection && !current.is_empty() && next.as_ref().is_some_and(Vec::is_empty)
        {
            if !was_healthy && !confirms {
                tracing::warn!(service = %self.key, instances = current.len(), "holding back an update that would empty the list while the registry is unhealthy");
                protection.held = next.take().map(Held::Unconfirmed);
                // A held snapshot does not vouch for the connection either.
                health = None;
            } else if let Some(until) = grace_until {
                tracing::warn!(service = %self.key, instances = current.len(), left = ?until.saturating_duration_since(now), "the registry lists no instance right after coming back; keeping the last list until its providers register again");
                protection.held = next.take().map(|truth| Held::Reset { truth, until });
            }
        }
        let due = match protection.held {
            Some(Held::Reset { until, .. }) => Some(until),
            _ => None,
        };
        drop(protection);
        drop(current);
        self.publish(next, health, first);
        due
    }

    /// Publishes a list held for the grace after a registry restart, once it
    /// is due: the registry has listed nothing for the whole grace.
    fn release(&self) {
        let mut protection = self.protection();
        let truth = match protection.held.take() {
            Some(Held::Reset { truth, until }) if Instant::now() < until => {
                protection.held = Some(Held::Reset { truth, until });
                return;
            }
            Some(Held::Reset { truth, .. }) => truth,
            other => {
                protection.held = other;
                return;
            }
        };
        if !self.healthy.load(Ordering::Acquire) {
            // The connection broke again meanwhile: wait for it to confirm.
            protection.held = Some(Held::Unconfirmed(truth));
            return;
        }
        drop(protection);
        tracing::warn!(service = %self.key, "the registry still lists no instance at the end of the grace: applying the empty list");
        self.publish(Some(truth), None, false);
    }

    /// Publishes the list before the flags and the version: whoever sees
    /// `ready`, `healthy` or a new version must also see the list.
    fn publish(&self, next: Option<Vec<ServiceMetaInfo>>, health: Option<bool>, first: bool) {
        let mut changed = false;
        if let Some(next) = next {
            self.list.store(Arc::new(next));
            changed = true;
        }
        if let Some(healthy) = health {
            changed |= self.set_healthy(healthy);
        }
        if first {
            self.ready.store(true, Ordering::Release);
            changed = true;
        }
        if changed {
            self.bump();
        }
    }

    fn own(&self, mut list: Vec<ServiceMetaInfo>) -> Vec<ServiceMetaInfo> {
        list.retain(|m| m.service_key() == self.key);
        list
    }
}

/// What a snapshot changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) added: usize,
    pub(crate) removed: usize,
    pub(crate) updated: usize,
}

impl Delta {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Diffs `snapshot` against `current` (sorted by node key). Returns the new
/// list (`None` if nothing changed) and what changed.
pub(crate) fn merge_snapshot(
    current: &[ServiceMetaInfo],
    mut snapshot: Vec<ServiceMetaInfo>,
) -> (Option<Vec<ServiceMetaInfo>>, Delta) {
    snapshot.sort_by_cached_key(ServiceMetaInfo::node_key);
    // Duplicates of a node in one snapshot: the last one wins.
    snapshot.reverse();
    snapshot.dedup_by_key(|m| m.node_key());
    snapshot.reverse();

    let mut delta = Delta::default();
    let (mut i, mut j) = (0, 0);
    while i < current.len() || j < snapshot.len() {
        let order = match (current.get(i), snapshot.get(j)) {
            (Some(c), Some(s)) => c.node_key().cmp(&s.node_key()),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                delta.removed += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                delta.added += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                if current[i] != snapshot[j] {
                    delta.updated += 1;
                }
                i += 1;
                j += 1;
            }
        }
    }
    ((!delta.is_empty()).then_some(snapshot), delta)
}

/// Inserts or replaces `meta` in a list sorted by node key.
pub(crate) fn upsert(
    current: &[ServiceMetaInfo],
    meta: ServiceMetaInfo,
) -> Option<Vec<ServiceMetaInfo>> {
    let key = meta.node_key();
    match current.binary_search_by(|m| m.node_key().cmp(&key)) {
        Ok(at) if current[at] == meta => None,
        Ok(at) => {
            let mut next = current.to_vec();
            next[at] = meta;
            Some(next)
        }
        Err(at) => {
            let mut next = Vec::with_capacity(current.len() + 1);
            next.extend_from_slice(&current[..at]);
            next.push(meta);
            next.extend_from_slice(&current[at..]);
            Some(next)
        }
    }
}

/// Removes the instance `node_key` from a list sorted by node key.
pub(crate) fn remove(current: &[ServiceMetaInfo], node_key: &str) -> Option<Vec<ServiceMetaInfo>> {
    let at = current
        .binary_search_by(|m| m.node_key().as_str().cmp(node_key))
        .ok()?;
    let mut next = current.to_vec();
    next.remove(at);
    Some(next)
}

/// A followed service. Cheap to clone; reads never lock.
#[derive(Clone)]
pub struct ServiceHandle {
    entry: Arc<Entry>,
}

impl ServiceHandle {
    /// The service key (`name:version`).
    pub fn key(&self) -> &str {
        &self.entry.key
    }

    /// The current instances, sorted by node key. Empty until the first
    /// snapshot, and while the service has no instances.
    pub fn instances(&self) -> Arc<Vec<ServiceMetaInfo>> {
        self.entry.list.load_full()
    }

    /// Whether the first snapshot has arrived.
    pub fn is_ready(&self) -> bool {
        self.entry.ready.load(Ordering::Acquire)
    }

    /// Whether the backend currently reports a working registry connection.
    /// While it does not, [`ServiceHandle::instances`] is the last known list.
    pub fn is_healthy(&self) -> bool {
        self.entry.healthy.load(Ordering::Acquire)
    }

    /// The current version: it grows on every list or health change.
    pub fn version(&self) -> u64 {
        *self.entry.version.borrow()
    }

    /// Follows the version counter; `changed()` fires on every list or
    /// health change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.entry.version.subscribe()
    }

    /// Waits until `accept(instances, healthy)` holds and returns that list.
    /// Unbounded: wrap it in a timeout.
    pub async fn wait_until(
        &self,
        mut accept: impl FnMut(&[ServiceMetaInfo], bool) -> bool,
    ) -> Arc<Vec<ServiceMetaInfo>> {
        let mut changes = self.changes();
        loop {
            // Mark seen before reading: the writer stores, then bumps, so a
            // change after this read still wakes `changed()`.
            changes.borrow_and_update();
            let list = self.instances();
            if accept(&list, self.is_healthy()) {
                return list;
            }
            if changes.changed().await.is_err() {
                return list;
            }
        }
    }

    /// The last error from watching the service, cleared by a snapshot.
    pub fn last_error(&self) -> Option<String> {
        self.entry.last_error()
    }
}

impl fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("key", &self.entry.key)
            .field("instances", &self.entry.list.load().len())
            .field("ready", &self.is_ready())
            .field("healthy", &self.is_healthy())
            .field("version", &self.version())
            .finish()
    }
}

/// Owns one service's watch task; marks the service unhealthy when the
/// task is aborted, so handles outliving the cache say their list is stale.
struct Follower {
    entry: Arc<Entry>,
    _task: AbortOnDrop,
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.entry.set_healthy(false) {
            self.entry.bump();
        }
    }
}

#[derive(Clone)]
struct Slot {
    entry: Arc<Entry>,
    _follower: Arc<Follower>,
}

struct Inner<D> {
    discover: Arc<D>,
    options: CacheOptions,
    // Copy-on-write: lookups are lock-free; inserting a new key (rare)
    // copies the map under `insert`.
    services: Arc<ArcSwap<HashMap<String, Slot>>>,
    insert: Mutex<()>,
    /// Lists read from the snapshot file at start-up.
    seed: HashMap<String, Vec<ServiceMetaInfo>>,
    /// Wakes the snapshot-file writer.
    persist: Option<Arc<tokio::sync::Notify>>,
    _writer: Option<AbortOnDrop>,
}

/// The consumer-side cache of service instances. Cheap to clone; the watch
/// tasks stop when the last clone is dropped.
pub struct ServiceCache<D> {
    inner: Arc<Inner<D>>,
}

impl<D> Clone for ServiceCache<D> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<D> fmt::Debug for ServiceCache<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceCache")
            .field("services", &self.inner.services.load().len())
            .field("options", &self.inner.options)
            .finish()
    }
}

impl<D: Discover> ServiceCache<D> {
    /// A cache over `discover` with default options.
    pub fn new(discover: D) -> Self {
        Self::with_options(discover, CacheOptions::default())
    }

    /// A cache over `discover`.
    pub fn with_options(discover: D, options: CacheOptions) -> Self {
        let services = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        let (seed, persist, writer) = match &options.snapshot_file {
            Some(path) => {
                let seed = snapshot::load(path);
                let notify = Arc::new(tokio::sync::Notify::new());
                let writer = AbortOnDrop::spawn(snapshot::writer(
                    path.clone(),
                    Arc::clone(&services),
                    Arc::clone(&notify),
                ));
                if writer.is_none() {
                    tracing::warn!(path = %path.display(), "no Tokio runtime: the instance snapshot file will not be written");
                }
                (seed, Some(notify), writer)
            }
            None => (HashMap::new(), None, None),
        };
        Self {
            inner: Arc::new(Inner {
                discover: Arc::new(discover),
                options,
                services,
                insert: Mutex::new(()),
                seed,
                persist,
                _writer: writer,
            }),
        }
    }

    /// The backend.
    pub fn discover(&self) -> &D {
        &self.inner.discover
    }

    /// The options in force.
    pub fn options(&self) -> &CacheOptions {
        &self.inner.options
    }

    /// How many service keys the cache follows.
    pub fn len(&self) -> usize {
        self.inner.services.load().len()
    }

    /// Whether the cache follows no service yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The handle of a service already followed, without starting anything
    /// or waiting. Lock-free.
    pub fn get(&self, service_key: &str) -> Option<ServiceHandle> {
        self.inner
            .services
            .load()
            .get(service_key)
            .map(|slot| ServiceHandle {
                entry: Arc::clone(&slot.entry),
            })
    }

    /// The instances of `service_key`. Lock-free once the service is
    /// followed and has its first snapshot; otherwise as
    /// [`ServiceCache::service`].
    pub async fn instances(
        &self,
        service_key: &str,
    ) -> Result<Arc<Vec<ServiceMetaInfo>>, CacheError> {
        if let Some(slot) = self.inner.services.load().get(service_key)
            && slot.entry.ready.load(Ordering::Acquire)
        {
            return Ok(slot.entry.list.load_full());
        }
        Ok(self.service(service_key).await?.instances())
    }

    /// Follows `service_key` (starting its watch task on first use) and
    /// waits up to [`CacheOptions::ready_timeout`] for its first snapshot.
    pub async fn service(&self, service_key: &str) -> Result<ServiceHandle, CacheError> {
        let handle = match self.get(service_key) {
            Some(handle) => handle,
            None => self.follow(service_key)?,
        };
        if handle.is_ready() {
            return Ok(handle);
        }
        let seed = self.inner.seed.get(service_key);
        // With a saved list to fall back on, do not keep the caller waiting
        // long for a registry that may be down.
        let timeout = match seed {
            Some(_) => self.inner.options.ready_timeout.min(SEED_WAIT),
            None => self.inner.options.ready_timeout,
        };
        let entry = Arc::clone(&handle.entry);
        let mut changes = handle.changes();
        let ready = changes.wait_for(|_| entry.ready.load(Ordering::Acquire));
        let arrived = matches!(tokio::time::timeout(timeout, ready).await, Ok(Ok(_)));
        if arrived || handle.is_ready() {
            return Ok(handle);
        }
        if let Some(seed) = seed {
            if handle.entry.seed(seed.clone()) {
                tracing::warn!(service = service_key, instances = seed.len(), last_error = ?handle.last_error(), "registry unavailable: starting from the instance snapshot file");
            }
            return Ok(handle);
        }
        Err(CacheError::NotReady {
            service: service_key.to_owned(),
            waited: timeout,
            last_error: handle.last_error(),
        })
    }

    fn follow(&self, service_key: &str) -> Result<ServiceHandle, CacheError> {
        let _insert = self
            .inner
            .insert
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.inner.services.load_full();
        if let Some(slot) = current.get(service_key) {
            return Ok(ServiceHandle {
                entry: Arc::clone(&slot.entry),
            });
        }
        let limit = self.inner.options.max_services;
        if current.len() >= limit {
            tracing::warn!(service = service_key, limit, "service cache is full");
            return Err(CacheError::TooManyServices { limit });
        }
        let entry = Arc::new(Entry::new(
            service_key,
            &self.inner.options,
            self.inner.persist.clone(),
        ));
        let task = AbortOnDrop::spawn(follow(
            Arc::clone(&self.inner.discover),
            Arc::clone(&entry),
            self.inner.options.backoff_min,
            self.inner.options.backoff_max,
        ))
        .ok_or(CacheError::NoRuntime)?;
        let slot = Slot {
            entry: Arc::clone(&entry),
            _follower: Arc::new(Follower {
                entry: Arc::clone(&entry),
                _task: task,
            }),
        };
        let mut next = HashMap::clone(&current);
        next.insert(service_key.to_owned(), slot);
        self.inner.services.store(Arc::new(next));
        Ok(ServiceHandle { entry })
    }
}

fn persist_if_changed(entry: &Entry, before: u64) {
    if entry.version() != before {
        if let Some(persist) = &entry.persist {
            persist.notify_one();
        }
    }
}

/// The watch task of one service: watches, applies, and on failure keeps
/// the list and watches again with jittered exponential backoff. A list held for
/// the grace after a registry restart is published when due, while the
/// watch is open.
async fn follow<D: Discover>(
    discover: Arc<D>,
    entry: Arc<Entry>,
    backoff_min: Duration,
    backoff_max: Duration,
) {
    let mut backoff = Backoff::new(backoff_min, backoff_max);
    // Refused credentials or a bad setting are reported once, at error
    // level, and retried at the slowest pace: they are not an outage, and
    // someone has to act (issue 14).
    let mut refused_reported = false;
    loop {
        let mut refused = false;
        match discover.watch(&entry.key).await {
            Ok(mut watch) => {
                refused_reported = false;
                let mut first = true;
                let mut due = entry.held_until();
                loop {
                    let before = entry.version();
                    let event = tokio::select! {
                        event = watch.next() => event,
                        () = sleep_until_opt(due), if due.is_some() => {
                            entry.release();
                            due = entry.held_until();
                            persist_if_changed(&entry, before);
                            continue;
                        }
                    };
                    let Some(event) = event else { break };
                    if matches!(event, WatchEvent::Snapshot(_)) {
                        backoff.reset();
                    }
                    due = entry.apply(event, std::mem::take(&mut first));
                    persist_if_changed(&entry, before);
                }
                tracing::warn!(service = %entry.key, "registry watch ended; keeping the last known instances");
                entry.set_last_error(Some("watch ended".into()));
            }
            Err(e) => {
                // The whole chain: the outer message alone ("get /rpc/X/")
                // hides what actually failed.
                let chain = rpc_core::error::report(&e);
                refused = !e.is_transient();
                if !refused {
                    tracing::warn!(service = %entry.key, error = %chain, "cannot watch the registry; keeping the last known instances");
                } else if !std::mem::replace(&mut refused_reported, true) {
                    tracing::error!(service = %entry.key, kind = ?e.kind(), error = %chain, retry_every = ?backoff_max, "the registry refused the watch; fix the registry credentials or settings");
                }
                entry.set_last_error(Some(chain));
            }
        }
        if entry.set_healthy(false) {
            entry.bump();
        }
        let pause = if refused {
            backoff_max
        } else {
            backoff.next_pause()
        };
        tracing::debug!(service = %entry.key, ?pause, "watching again after a pause");
        tokio::time::sleep(pause).await;
    }
}

/// The instance snapshot file: the last good lists, for starting while
/// the registry is down.
mod snapshot {
    use std::collections::{BTreeMap, HashMap};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use arc_swap::ArcSwap;
    use rpc_core::ServiceMetaInfo;
    use serde::{Deserialize, Serialize};

    use super::Slot;

    /// Writes happen at most this often, however busy discovery is.
    const MIN_INTERVAL: Duration = Duration::from_secs(1);

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct File {
        saved_at_ms: u64,
        services: BTreeMap<String, Vec<ServiceMetaInfo>>,
    }

    /// Reads the file; a missing or unreadable file is an empty seed (logged).
    pub(super) fn load(path: &Path) -> HashMap<String, Vec<ServiceMetaInfo>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the instance snapshot file");
                return HashMap::new();
            }
        };
        match serde_json::from_slice::<File>(&bytes) {
            Ok(f) => f.services.into_iter().collect(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a malformed instance snapshot file");
                HashMap::new()
            }
        }
    }

    pub(super) async fn writer(
        path: PathBuf,
        services: Arc<ArcSwap<HashMap<String, Slot>>>,
        notify: Arc<tokio::sync::Notify>,
    ) {
        loop {
            notify.notified().await;
            let file = File {
                saved_at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                services: services
                    .load()
                    .iter()
                    .filter(|(_, slot)| slot.entry.ready.load(std::sync::atomic::Ordering::Acquire))
                    .map(|(k, slot)| (k.clone(), slot.entry.list.load().to_vec()))
                    .collect(),
            };
            if let Err(e) = write_atomically(&path, &file) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the instance snapshot file");
            }
            tokio::time::sleep(MIN_INTERVAL).await;
        }
    }

    fn write_atomically(path: &Path, file: &File) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
        crate::support::fs::write_atomic(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use rpc_core::Watch;
    use tokio::sync::mpsc;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn meta(port: u16) -> ServiceMetaInfo {
        ServiceMetaInfo::new("Echo", "1.0", "127.0.0.1", port)
    }

    fn ports(list: &[ServiceMetaInfo]) -> Vec<u16> {
        list.iter().map(|m| m.service_port).collect()
    }

    #[test]
    fn snapshots_are_diffed_not_replaced_blindly() {
        let current = vec![meta(1), meta(2), meta(3)];
        let mut changed = meta(2);
        changed.weight = 1;
        let (next, delta) = merge_snapshot(&current, vec![meta(4), changed.clone(), meta(1)]);
        assert_eq!(
            delta,
            Delta {
                added: 1,
                removed: 1,
                updated: 1
            }
        );
        assert_eq!(next.unwrap(), vec![meta(1), changed, meta(4)]);
        let (same, delta) = merge_snapshot(&current, vec![meta(3), meta(1), meta(2)]);
        assert!(same.is_none());
        assert!(delta.is_empty());
        let (dedup, _) = merge_snapshot(&[], vec![meta(1), meta(1)]);
        assert_eq!(dedup.unwrap(), vec![meta(1)]);
    }

    #[test]
    fn upserts_and_removals_keep_node_key_order() {
        // Node keys sort as strings: port 10 before port 9.
        let list = upsert(&[], meta(9)).unwrap();
        let list = upsert(&list, meta(10)).unwrap();
        let list = upsert(&list, meta(5)).unwrap();
        assert_eq!(ports(&list), vec![10, 5, 9]);
        assert!(upsert(&list, meta(5)).is_none());
        let mut heavier = meta(5);
        heavier.weight = 3;
        let list = upsert(&list, heavier).unwrap();
        assert_eq!(list[1].weight, 3);
        let list = remove(&list, &meta(10).node_key()).unwrap();
        assert_eq!(ports(&list), vec![5, 9]);
        assert!(remove(&list, &meta(10).node_key()).is_none());
    }

    /// A scripted backend: every `watch` call hands out the next channel
    /// the test pushes, or fails when there is none.
    #[derive(Clone, Default)]
    struct Scripted {
        watches: Arc<Mutex<Vec<mpsc::Receiver<WatchEvent>>>>,
        calls: Arc<AtomicUsize>,
        opened: Arc<tokio::sync::Notify>,
        /// Fail as the registry refusing our credentials, not as an outage.
        refuse: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Scripted {
        fn push(&self) -> mpsc::Sender<WatchEvent> {
            let (tx, rx) = mpsc::channel(16);
            self.watches.lock().unwrap().push(rx);
            tx
        }
    }

    impl Discover for Scripted {
        async fn discover(&self, _: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
            Ok(Vec::new())
        }
        async fn watch(&self, _: &str) -> Result<Watch, RegistryError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let next = {
                let mut w = self.watches.lock().unwrap();
                if w.is_empty() {
                    None
                } else {
                    Some(w.remove(0))
                }
            };
            self.opened.notify_waiters();
            match next {
                Some(rx) => Ok(Watch::new(rx)),
                None if self.refuse.load(Ordering::SeqCst) => Err(RegistryError::denied(
                    "scripted",
                    rpc_core::RegistryErrorKind::Unauthenticated,
                    "get /rpc/Echo:1.0/",
                    "bad token",
                    None,
                )),
                None => Err(RegistryError::unavailable(
                    "scripted",
                    "get /rpc/Echo:1.0/",
                    std::io::Error::other("the root cause"),
                )),
            }
        }
    }

    fn options() -> CacheOptions {
        CacheOptions {
            max_services: 2,
            ready_timeout: Duration::from_millis(300),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            ..CacheOptions::default()
        }
    }

    async fn until(
        handle: &ServiceHandle,
        accept: impl FnMut(&[ServiceMetaInfo], bool) -> bool,
    ) -> Vec<u16> {
        let list = tokio::time::timeout(WAIT, handle.wait_until(accept))
            .await
            .expect("timed out waiting for the cache");
        ports(&list)
    }

    #[tokio::test]
    async fn follows_incremental_changes_and_survives_outages() {
        let backend = Scripted::default();
        let first = backend.push();
        first
            .send(WatchEvent::Snapshot(vec![meta(2), meta(1)]))
            .await
            .unwrap();
        let cache = ServiceCache::with_options(backend.clone(), options());
        let handle = cache.service("Echo:1.0").await.unwrap();
        assert_eq!(ports(&handle.instances()), vec![1, 2]);
        assert!(handle.is_healthy());

        let v = handle.version();
        first.send(WatchEvent::Upsert(meta(3))).await.unwrap();
        assert_eq!(until(&handle, |l, _| l.len() == 3).await, vec![1, 2, 3]);
        assert!(handle.version() > v);
        first
            .send(WatchEvent::Remove(meta(1).node_key()))
            .await
            .unwrap();
        assert_eq!(until(&handle, |l, _| l.len() == 2).await, vec![2, 3]);

        // Connection loss: unhealthy, list kept.
        first.send(WatchEvent::Connected(false)).await.unwrap();
        assert_eq!(until(&handle, |_, healthy| !healthy).await, vec![2, 3]);
        first.send(WatchEvent::Connected(true)).await.unwrap();
        assert_eq!(until(&handle, |_, healthy| healthy).await, vec![2, 3]);

        // The stream ends and watching fails a few times: the list is kept.
        drop(first);
        assert_eq!(until(&handle, |_, healthy| !healthy).await, vec![2, 3]);
        let calls = backend.calls.load(Ordering::SeqCst);
        tokio::time::timeout(WAIT, async {
            while backend.calls.load(Ordering::SeqCst) < calls + 2 {
                backend.opened.notified().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(ports(&handle.instances()), vec![2, 3]);
        assert!(handle.last_error().is_some());

        // Back: the snapshot catches up with an addition and a removal.
        let second = backend.push();
        second
            .send(WatchEvent::Snapshot(vec![meta(3), meta(4)]))
            .await
            .unwrap();
        assert_eq!(
            until(&handle, |l, h| h && l.len() == 2 && l[0].service_port == 3).await,
            vec![3, 4]
        );
        assert!(handle.last_error().is_none());
        assert_eq!(
            ports(&cache.instances("Echo:1.0").await.unwrap()),
            vec![3, 4]
        );
    }

    #[tokio::test]
    async fn an_empty_push_while_unhealthy_is_held_until_confirmed() {
        // The grace after a break is the next tests'; without it the
        // confirming `Connected(true)` applies the held update at once.
        let (handle, w, _cache) = listing_1_and_2(Duration::ZERO).await;

        // A healthy connection may empty the list: that is news, not noise.
        w.send(WatchEvent::Remove(meta(1).node_key()))
            .await
            .unwrap();
        w.send(WatchEvent::Remove(meta(2).node_key()))
            .await
            .unwrap();
        assert_eq!(until(&handle, |l, _| l.is_empty()).await, Vec::<u16>::new());
        w.send(WatchEvent::Snapshot(vec![meta(1), meta(2)]))
            .await
            .unwrap();
        until(&handle, |l, _| l.len() == 2).await;

        // Unhealthy: an empty snapshot (a restarting server) and removing the
        // last instances are both held back.
        w.send(WatchEvent::Connected(false)).await.unwrap();
        w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
        w.send(WatchEvent::Remove(meta(1).node_key()))
            .await
            .unwrap();
        // A marker event proves the ones before it were processed.
        w.send(WatchEvent::Upsert(meta(9))).await.unwrap();
        assert_eq!(
            until(&handle, |l, _| l.len() == 2 && l[1].service_port == 9).await,
            vec![2, 9]
        );
        w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
        w.send(WatchEvent::Connected(false)).await.unwrap();
        w.send(WatchEvent::Upsert(meta(2))).await.unwrap();
        assert_eq!(ports(&handle.instances()), vec![2, 9]);
        w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
        assert!(!handle.is_healthy());

        // The connection is healthy again: the held update was true after all.
        w.send(WatchEvent::Connected(true)).await.unwrap();
        assert_eq!(
            until(&handle, |l, h| h && l.is_empty()).await,
            Vec::<u16>::new()
        );
    }

    const GRACE: Duration = Duration::from_secs(10);

    /// A cache with `grace` over a registry that lists 1 and 2.
    async fn listing_1_and_2(
        grace: Duration,
    ) -> (
        ServiceHandle,
        mpsc::Sender<WatchEvent>,
        ServiceCache<Scripted>,
    ) {
        let backend = Scripted::default();
        let w = backend.push();
        w.send(WatchEvent::Snapshot(vec![meta(1), meta(2)]))
            .await
            .unwrap();
        let cache = ServiceCache::with_options(
            backend,
            CacheOptions {
                empty_grace: grace,
                ..options()
            },
        );
        let handle = cache.service("Echo:1.0").await.unwrap();
        (handle, w, cache)
    }

    /// [`listing_1_and_2`], then the registry breaks and comes back with no
    /// data; also returns when it came back. The clock is tokio's paused
    /// one: it moves only when every task waits for it, so the grace is
    /// measured, not slept.
    async fn back_empty() -> (
        ServiceHandle,
        mpsc::Sender<WatchEvent>,
        Instant,
        ServiceCache<Scripted>,
    ) {
        let (handle, w, cache) = listing_1_and_2(GRACE).await;
        w.send(WatchEvent::Connected(false)).await.unwrap();
        until(&handle, |_, h| !h).await;
        let back = Instant::now();
        w.send(WatchEvent::Connected(true)).await.unwrap();
        w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
        until(&handle, |_, h| h).await;
        (handle, w, back, cache)
    }

    /// Issue 14: refused credentials are not retried like an outage. Over
    /// the same 3 s, an outage is retried on the jittered backoff (10 ms
    /// doubling to 1 s: 8 or more watches), a refusal every `backoff_max`
    /// (1 s: at most 4 watches).
    #[tokio::test(start_paused = true)]
    async fn a_refused_watch_is_retried_at_the_slowest_pace() {
        async fn watches_in_3s(refuse: bool) -> usize {
            let backend = Scripted::default();
            backend.refuse.store(refuse, Ordering::SeqCst);
            let options = CacheOptions {
                backoff_min: Duration::from_millis(10),
                backoff_max: Duration::from_secs(1),
                ..options()
            };
            let cache = ServiceCache::with_options(backend.clone(), options);
            // Never ready: the first watch fails. Its task goes on.
            assert!(cache.service("Echo:1.0").await.is_err());
            tokio::time::sleep(Duration::from_secs(3)).await;
            backend.calls.load(Ordering::SeqCst)
        }
        let outage = watches_in_3s(false).await;
        let refused = watches_in_3s(true).await;
        assert!(outage >= 8, "an outage was retried only {outage} times");
        assert!(refused <= 4, "a refusal was retried {refused} times");
    }

    #[tokio::test(start_paused = true)]
    async fn a_registry_back_empty_keeps_the_list_until_its_providers_return() {
        let (handle, w, back, _cache) = back_empty().await;
        // Half the grace later (the clock moves once the empty snapshot has
        // been taken in): still the last list, and healthy.
        tokio::time::sleep(GRACE / 2).await;
        assert_eq!(ports(&handle.instances()), vec![1, 2]);
        assert!(handle.is_healthy());
        // A provider registers again: the registry's own list is published,
        // without 2, which the registry has not listed since it came back.
        w.send(WatchEvent::Upsert(meta(1))).await.unwrap();
        assert_eq!(until(&handle, |l, _| l.len() == 1).await, vec![1]);
        assert!(back.elapsed() < GRACE);
        // Holding is over: the last instance leaving now empties the list.
        w.send(WatchEvent::Remove(meta(1).node_key()))
            .await
            .unwrap();
        assert_eq!(until(&handle, |l, _| l.is_empty()).await, Vec::<u16>::new());
        assert!(back.elapsed() < GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_registry_still_empty_at_the_end_of_the_grace_empties_the_list() {
        let (handle, w, back, _cache) = back_empty().await;
        // Events that leave the registry's list empty do not end the hold.
        w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
        w.send(WatchEvent::Remove(meta(2).node_key()))
            .await
            .unwrap();
        let list = tokio::time::timeout(2 * GRACE, handle.wait_until(|l, _| l.is_empty()))
            .await
            .expect("the empty list was never applied");
        assert!(list.is_empty());
        let held = back.elapsed();
        assert!(
            held >= GRACE && held < GRACE + Duration::from_secs(1),
            "held for {held:?}, grace {GRACE:?}"
        );
        assert!(handle.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn instances_removed_one_by_one_after_a_break_are_held_too() {
        let (handle, w, _cache) = listing_1_and_2(GRACE).await;
        // How the local backend reports a directory that came back empty.
        w.send(WatchEvent::Connected(false)).await.unwrap();
        w.send(WatchEvent::Connected(true)).await.unwrap();
        w.send(WatchEvent::Remove(meta(1).node_key()))
            .await
            .unwrap();
        w.send(WatchEvent::Remove(meta(2).node_key()))
            .await
            .unwrap();
        tokio::time::sleep(GRACE / 2).await;
        assert_eq!(ports(&handle.instances()), vec![2]);
        w.send(WatchEvent::Upsert(meta(1))).await.unwrap();
        assert_eq!(until(&handle, |l, _| l[0].service_port == 1).await, vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_grace_an_emptying_update_applies_at_once() {
        let (handle, w, _back, _cache) = back_empty().await;
        w.send(WatchEvent::Snapshot(vec![meta(1)])).await.unwrap();
        assert_eq!(until(&handle, |l, _| l.len() == 1).await, vec![1]);
        tokio::time::sleep(GRACE).await;
        let at = Instant::now();
        w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
        assert_eq!(until(&handle, |l, _| l.is_empty()).await, Vec::<u16>::new());
        assert_eq!(at.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn without_protection_an_empty_push_applies_at_once() {
        let backend = Scripted::default();
        let w = backend.push();
        w.send(WatchEvent::Snapshot(vec![meta(1)])).await.unwrap();
        let cache = ServiceCache::with_options(
            backend.clone(),
            CacheOptions {
                empty_protection: false,
                ..options()
            },
        );
        let handle = cache.service("Echo:1.0").await.unwrap();
        w.send(WatchEvent::Connected(false)).await.unwrap();
        w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
        assert_eq!(until(&handle, |l, _| l.is_empty()).await, Vec::<u16>::new());
    }

    #[tokio::test]
    async fn the_snapshot_file_lets_a_consumer_start_while_the_registry_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("instances.json");
        let opts = CacheOptions {
            snapshot_file: Some(file.clone()),
            ..options()
        };
        {
            // A run with a working registry writes the file.
            let backend = Scripted::default();
            let w = backend.push();
            w.send(WatchEvent::Snapshot(vec![meta(1), meta(2)]))
                .await
                .unwrap();
            let cache = ServiceCache::with_options(backend, opts.clone());
            let _h = cache.service("Echo:1.0").await.unwrap();
            tokio::time::timeout(WAIT, async {
                while !file.exists() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the snapshot file was not written");
        }
        // A new consumer, registry down: it starts from the file.
        let down = Scripted::default();
        let cache = ServiceCache::with_options(down.clone(), opts);
        let handle = cache.service("Echo:1.0").await.unwrap();
        assert_eq!(ports(&handle.instances()), vec![1, 2]);
        assert!(!handle.is_healthy());
        // Another service is not in the file: it fails as before.
        assert!(cache.service("Other:1.0").await.is_err());
        // The registry comes back: its truth replaces the saved list. (One
        // watch per service: `Other:1.0` keeps retrying too, and the
        // scripted backend hands the next watch to whoever asks first.)
        let (w, other) = (down.push(), down.push());
        w.send(WatchEvent::Snapshot(vec![meta(3)])).await.unwrap();
        other
            .send(WatchEvent::Snapshot(vec![meta(3)]))
            .await
            .unwrap();
        assert_eq!(until(&handle, |l, h| h && l.len() == 1).await, vec![3]);
    }

    #[tokio::test]
    async fn the_first_lookup_times_out_without_a_snapshot_then_recovers() {
        let backend = Scripted::default();
        let cache = ServiceCache::with_options(backend.clone(), options());
        let err = cache.service("Echo:1.0").await.unwrap_err();
        match &err {
            CacheError::NotReady {
                service,
                last_error,
                ..
            } => {
                assert_eq!(service, "Echo:1.0");
                // The whole chain, not only the outer message (issue 12,
                // fault 6).
                let last = last_error.as_deref().unwrap_or_default();
                assert!(last.contains("get /rpc/Echo:1.0/"), "{last}");
                assert!(last.contains("the root cause"), "{last}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(RegistryError::from(err).to_string().contains("cache"));
        let tx = backend.push();
        tx.send(WatchEvent::Snapshot(vec![meta(7)])).await.unwrap();
        let list = cache.instances("Echo:1.0").await.unwrap();
        assert_eq!(ports(&list), vec![7]);
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn the_number_of_services_is_bounded() {
        let backend = Scripted::default();
        for _ in 0..2 {
            backend
                .push()
                .send(WatchEvent::Snapshot(vec![]))
                .await
                .unwrap();
        }
        let cache = ServiceCache::with_options(backend, options());
        cache.service("A:1").await.unwrap();
        cache.service("B:1").await.unwrap();
        assert!(matches!(
            cache.service("C:1").await,
            Err(CacheError::TooManyServices { limit: 2 })
        ));
        // Known keys still work.
        assert!(cache.instances("A:1").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn instances_of_other_services_are_ignored() {
        let backend = Scripted::default();
        let tx = backend.push();
        tx.send(WatchEvent::Snapshot(vec![
            ServiceMetaInfo::new("Other", "1.0", "h", 1),
            meta(1),
        ]))
        .await
        .unwrap();
        let cache = ServiceCache::with_options(backend, options());
        let handle = cache.service("Echo:1.0").await.unwrap();
        assert_eq!(ports(&handle.instances()), vec![1]);
        tx.send(WatchEvent::Upsert(ServiceMetaInfo::new(
            "Echo", "2.0", "h", 2,
        )))
        .await
        .unwrap();
        tx.send(WatchEvent::Upsert(meta(3))).await.unwrap();
        assert_eq!(until(&handle, |l, _| l.len() >= 2).await, vec![1, 3]);
    }

    #[tokio::test]
    async fn dropping_the_cache_stops_its_watch_tasks() {
        let backend = Scripted::default();
        let tx = backend.push();
        tx.send(WatchEvent::Snapshot(vec![meta(1)])).await.unwrap();
        let cache = ServiceCache::with_options(backend, options());
        let handle = cache.service("Echo:1.0").await.unwrap();
        let clone = cache.clone();
        drop(cache);
        assert!(handle.is_healthy(), "a clone keeps the task");
        drop(clone);
        // The aborted task drops its watch, closing the backend's channel.
        tokio::time::timeout(WAIT, tx.closed()).await.unwrap();
        assert!(!handle.is_healthy());
        assert_eq!(ports(&handle.instances()), vec![1]);
    }
}
