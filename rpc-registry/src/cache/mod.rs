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

mod entry;
mod merge;
mod protection;

use entry::*;
use merge::*;

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

mod snapshot;

#[cfg(test)]
mod tests;
