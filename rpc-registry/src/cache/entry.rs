//! One followed service: its published list, health and version. The
//! empty-push protection's decisions are [`Protection`]'s; this file feeds
//! it events and publishes what it decides.

use rpc_core::metric_names::{CLIENT_INSTANCES, REGISTRY_WATCH_CONNECTED, SERVICE};

use super::protection::{Protection, Step, View};
use super::*;

/// One service's cached state, shared by its watch task and its handles.
pub(super) struct Entry {
    pub(super) key: String,
    /// Only the watch task changes it.
    pub(super) protection: Mutex<Protection>,
    /// Wakes the snapshot-file writer, if there is one.
    pub(super) persist: Option<Arc<tokio::sync::Notify>>,
    pub(super) list: ArcSwap<Vec<ServiceMetaInfo>>,
    pub(super) ready: AtomicBool,
    pub(super) healthy: AtomicBool,
    pub(super) version: watch::Sender<u64>,
    pub(super) last_error: Mutex<Option<String>>,
}

impl Entry {
    pub(super) fn new(
        key: &str,
        options: &CacheOptions,
        persist: Option<Arc<tokio::sync::Notify>>,
    ) -> Self {
        Self {
            key: key.to_owned(),
            protection: Mutex::new(Protection::new(
                options.empty_protection,
                options.empty_grace,
            )),
            persist,
            list: ArcSwap::from_pointee(Vec::new()),
            ready: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            version: watch::channel(0).0,
            last_error: Mutex::new(None),
        }
    }

    pub(super) fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    pub(super) fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Lists `seed` (from the snapshot file) if nothing arrived yet.
    pub(super) fn seed(&self, seed: Vec<ServiceMetaInfo>) -> bool {
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
    pub(super) fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    pub(super) fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    pub(super) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn protection(&self) -> std::sync::MutexGuard<'_, Protection> {
        self.protection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// When a list held for the grace after a registry restart is due.
    pub(super) fn held_until(&self) -> Option<Instant> {
        self.protection().due().map(Instant::from_std)
    }

    /// Applies one event; only the service's watch task calls this, so a
    /// load followed by a store cannot lose a concurrent update.
    /// `trusted`: the first event of a freshly established watch, which the
    /// backend produced over a connection that just worked. Returns when a
    /// held list is due (see [`Entry::release`]).
    pub(super) fn apply(&self, event: WatchEvent, trusted: bool) -> Option<Instant> {
        let current = self.list.load();
        let mut protection = self.protection();
        let base = protection.base(&current);
        let (step, next) = match event {
            WatchEvent::Snapshot(snapshot) => {
                self.set_last_error(None);
                let (next, delta) = merge_snapshot(base, self.own(snapshot));
                if !delta.is_empty() {
                    tracing::debug!(service = %self.key, added = delta.added, removed = delta.removed, updated = delta.updated, "snapshot applied");
                }
                (Step::Snapshot, next)
            }
            WatchEvent::Upsert(meta) => {
                let next = if meta.service_key() == self.key {
                    tracing::debug!(service = %self.key, node = %meta.node_key(), address = %meta.address(), "instance added or updated");
                    upsert(base, meta)
                } else {
                    tracing::debug!(service = %self.key, node = %meta.node_key(), "ignoring an instance of another service");
                    None
                };
                (Step::Upsert, next)
            }
            WatchEvent::Remove(node_key) => {
                tracing::debug!(service = %self.key, node = %node_key, "instance removed");
                (Step::Remove, remove(base, &node_key))
            }
            WatchEvent::Connected(connected) => {
                if !connected {
                    tracing::warn!(service = %self.key, "registry connection lost; keeping the last known instances");
                }
                (Step::Connected(connected), None)
            }
        };
        let view = View {
            now: Instant::now().into_std(),
            current: &current,
            healthy: self.healthy.load(Ordering::Acquire),
            ready: self.ready.load(Ordering::Acquire),
            trusted,
            service: &self.key,
        };
        let outcome = protection.settle(view, step, next);
        drop(protection);
        drop(current);
        self.publish(outcome.list, outcome.health, outcome.first);
        outcome.due.map(Instant::from_std)
    }

    /// Publishes a list held for the grace after a registry restart, once it
    /// is due: the registry has listed nothing for the whole grace.
    pub(super) fn release(&self) {
        let now = Instant::now().into_std();
        let healthy = self.healthy.load(Ordering::Acquire);
        let list = self.protection().release(now, healthy, &self.key);
        if list.is_some() {
            self.publish(list, None, false);
        }
    }

    /// Publishes the list before the flags and the version: whoever sees
    /// `ready`, `healthy` or a new version must also see the list.
    pub(super) fn publish(
        &self,
        next: Option<Vec<ServiceMetaInfo>>,
        health: Option<bool>,
        first: bool,
    ) {
        let mut changed = false;
        if let Some(next) = next {
            metrics::gauge!(CLIENT_INSTANCES, SERVICE => self.key.clone()).set(next.len() as f64);
            self.list.store(Arc::new(next));
            changed = true;
        }
        if let Some(healthy) = health {
            if self.set_healthy(healthy) {
                changed = true;
                metrics::gauge!(REGISTRY_WATCH_CONNECTED, SERVICE => self.key.clone())
                    .set(if healthy { 1.0 } else { 0.0 });
            }
        }
        if first {
            self.ready.store(true, Ordering::Release);
            changed = true;
        }
        if changed {
            self.bump();
        }
    }

    pub(super) fn own(&self, mut list: Vec<ServiceMetaInfo>) -> Vec<ServiceMetaInfo> {
        list.retain(|m| m.service_key() == self.key);
        list
    }
}
