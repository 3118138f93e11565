//! One followed service: its published list, health, version, and the empty-
//! push protection (Held, Entry::apply, Entry::release).

use super::*;

/// An update that empty-push protection keeps from the published list.
pub(super) enum Held {
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
pub(super) struct Protection {
    pub(super) held: Option<Held>,
    /// When the registry last came back from a break.
    pub(super) recovered_at: Option<Instant>,
}

/// One service's cached state, shared by its watch task and its handles.
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) empty_protection: bool,
    pub(super) empty_grace: Duration,
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
    pub(super) fn apply(&self, event: WatchEvent, trusted: bool) -> Option<Instant> {
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
    pub(super) fn release(&self) {
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
    pub(super) fn publish(
        &self,
        next: Option<Vec<ServiceMetaInfo>>,
        health: Option<bool>,
        first: bool,
    ) {
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

    pub(super) fn own(&self, mut list: Vec<ServiceMetaInfo>) -> Vec<ServiceMetaInfo> {
        list.retain(|m| m.service_key() == self.key);
        list
    }
}
