//! [`MemoryRegistry`]: an in-process registry for tests and single-process
//! deployments.
//!
//! State lives behind an `Arc`, so clones (and [`MemoryRegistry::shared`]
//! instances of the same name) see each other. Each service key has a bounded
//! `broadcast` channel of changes; every [`Watch`] is fed by a small task that
//! forwards from it into the watch's own bounded channel. A watcher that falls
//! more than [`BROADCAST_CAPACITY`] events behind is resynchronised with a
//! fresh [`WatchEvent::Snapshot`] instead of growing a queue.
//!
//! Fault injection for tests: [`MemoryRegistry::evict`] makes the "backend"
//! lose a registration (a live [`Registration`] publishes itself again at
//! once, with the next generation), and [`MemoryRegistry::set_reachable`]
//! cuts discovery off (watches end, `discover`/`watch` fail) while providers
//! keep writing, like consumers partitioned away from a registry server.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use rpc_core::discover::WATCH_CHANNEL_CAPACITY;
use rpc_core::{
    BoxFuture, Deregister, Discover, Registration, RegistrationState, Registry, RegistryError,
    ServiceMetaInfo, Watch, WatchEvent,
};
use tokio::sync::{broadcast, mpsc, watch};

use crate::support::task::AbortOnDrop;

/// Changes buffered per service for watchers that are behind; a watcher
/// lagging further is resynchronised with a snapshot.
pub const BROADCAST_CAPACITY: usize = 256;

const BACKEND: &str = "memory";

/// An in-process registry. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    reachable: bool,
    next_id: u64,
    services: HashMap<String, Service>,
}

struct Service {
    instances: BTreeMap<String, Instance>,
    events: broadcast::Sender<WatchEvent>,
}

impl Service {
    fn new() -> Self {
        Self {
            instances: BTreeMap::new(),
            events: broadcast::channel(BROADCAST_CAPACITY).0,
        }
    }

    fn snapshot(&self) -> Vec<ServiceMetaInfo> {
        self.instances.values().map(|i| i.meta.clone()).collect()
    }

    fn publish(&self, event: WatchEvent) {
        // No receiver is not an error: nobody is watching right now.
        let _ = self.events.send(event);
    }
}

struct Instance {
    meta: ServiceMetaInfo,
    // Tells registrations apart when a node key is registered twice, so the
    // older handle's deregistration does not remove the newer record.
    id: u64,
    generation: u64,
    state: watch::Sender<RegistrationState>,
}

impl MemoryRegistry {
    /// A new, empty, private registry.
    pub fn new() -> Self {
        Self::named("private")
    }

    fn named(name: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                state: Mutex::new(State {
                    reachable: true,
                    ..State::default()
                }),
            }),
        }
    }

    /// The process-wide instance called `name`, created on first use, so
    /// components built from the same configuration see each other.
    pub fn shared(name: &str) -> Self {
        static SHARED: OnceLock<Mutex<HashMap<String, MemoryRegistry>>> = OnceLock::new();
        let map = SHARED.get_or_init(Default::default);
        let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(name.to_owned())
            .or_insert_with(|| Self::named(name))
            .clone()
    }

    /// The name given to [`MemoryRegistry::shared`] (`private` otherwise).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether `self` and `other` share state.
    pub fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in another holder: every
        // critical section is a handful of map operations.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Simulates the backend losing the registration of `node_key`
    /// (`name:version/host:port`). Watchers see it removed; if its
    /// [`Registration`] is still alive, it publishes itself again at once
    /// (watchers then see it come back) and its state reports the next
    /// generation. Returns whether the node was registered.
    pub fn evict(&self, node_key: &str) -> bool {
        let Some((service_key, _)) = node_key.split_once('/') else {
            return false;
        };
        let mut state = self.lock();
        let Some(service) = state.services.get_mut(service_key) else {
            return false;
        };
        let Some(mut instance) = service.instances.remove(node_key) else {
            return false;
        };
        service.publish(WatchEvent::Remove(node_key.to_owned()));
        if instance.state.is_closed() {
            // Nobody holds the registration's state any more: nothing would
            // notice the loss, so nothing publishes it again.
            return true;
        }
        instance.generation += 1;
        tracing::warn!(
            registry = %self.inner.name,
            node = node_key,
            generation = instance.generation,
            "memory registry lost a registration; publishing it again"
        );
        instance.state.send_replace(RegistrationState::Registered {
            generation: instance.generation,
        });
        service.publish(WatchEvent::Upsert(instance.meta.clone()));
        service.instances.insert(node_key.to_owned(), instance);
        true
    }

    /// Cuts discovery off (`false`) or restores it (`true`). While cut off,
    /// `discover` and `watch` fail with [`RegistryError::Unavailable`] and
    /// open watches end; registrations keep being accepted and changed, as
    /// if consumers were partitioned away from a registry server.
    pub fn set_reachable(&self, reachable: bool) {
        let mut state = self.lock();
        if state.reachable == reachable {
            return;
        }
        state.reachable = reachable;
        if !reachable {
            for service in state.services.values_mut() {
                // Dropping the old sender ends every forwarding task, hence
                // every open watch.
                service.events = broadcast::channel(BROADCAST_CAPACITY).0;
            }
        }
        tracing::info!(registry = %self.inner.name, reachable, "memory registry reachability changed");
    }

    fn remove(&self, service_key: &str, node_key: &str, id: u64) {
        let mut state = self.lock();
        let Some(service) = state.services.get_mut(service_key) else {
            return;
        };
        let removed = match service.instances.get(node_key) {
            Some(instance) if instance.id == id => service.instances.remove(node_key),
            _ => None,
        };
        if let Some(instance) = removed {
            instance.state.send_replace(RegistrationState::Deregistered);
            service.publish(WatchEvent::Remove(node_key.to_owned()));
        }
        if service.instances.is_empty() && service.events.receiver_count() == 0 {
            state.services.remove(service_key);
        }
    }

    fn unavailable() -> RegistryError {
        RegistryError::unavailable_because(BACKEND, "discovery is cut off (fault injection)")
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryRegistry")
            .field("name", &self.inner.name)
            .field("reachable", &state.reachable)
            .field("services", &state.services.len())
            .finish()
    }
}

impl Registry for MemoryRegistry {
    async fn register(&self, meta: ServiceMetaInfo) -> Result<Registration, RegistryError> {
        let service_key = meta.service_key();
        let node_key = meta.node_key();
        let (state_tx, state_rx) = watch::channel(RegistrationState::Registered { generation: 0 });
        let id = {
            let mut state = self.lock();
            state.next_id += 1;
            let id = state.next_id;
            let service = state
                .services
                .entry(service_key.clone())
                .or_insert_with(Service::new);
            service.instances.insert(
                node_key.clone(),
                Instance {
                    meta: meta.clone(),
                    id,
                    generation: 0,
                    state: state_tx,
                },
            );
            service.publish(WatchEvent::Upsert(meta.clone()));
            id
        };
        tracing::debug!(registry = %self.inner.name, node = %node_key, "registered");
        let guard = MemoryDeregister {
            registry: self.clone(),
            service_key,
            node_key,
            id,
        };
        Ok(Registration::new(meta, state_rx, guard))
    }
}

struct MemoryDeregister {
    registry: MemoryRegistry,
    service_key: String,
    node_key: String,
    id: u64,
}

impl Deregister for MemoryDeregister {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        self.registry
            .remove(&self.service_key, &self.node_key, self.id);
        Box::pin(async { Ok(()) })
    }

    fn deregister_on_drop(self: Box<Self>) {
        self.registry
            .remove(&self.service_key, &self.node_key, self.id);
    }
}

impl Discover for MemoryRegistry {
    async fn discover(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        let state = self.lock();
        if !state.reachable {
            return Err(Self::unavailable());
        }
        Ok(state
            .services
            .get(service_key)
            .map(Service::snapshot)
            .unwrap_or_default())
    }

    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        let state = self.lock();
        if !state.reachable {
            return Err(Self::unavailable());
        }
        // A watch leaves an entry behind; only services with instances count.
        let mut keys: Vec<String> = state
            .services
            .iter()
            .filter(|(_, s)| !s.instances.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn watch(&self, service_key: &str) -> Result<Watch, RegistryError> {
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let events = {
            let mut state = self.lock();
            if !state.reachable {
                return Err(Self::unavailable());
            }
            let service = state
                .services
                .entry(service_key.to_owned())
                .or_insert_with(Service::new);
            // Subscribing and snapshotting under one lock: no change can fall
            // between the snapshot and the first forwarded event.
            let events = service.events.subscribe();
            if tx
                .try_send(WatchEvent::Snapshot(service.snapshot()))
                .is_err()
            {
                return Err(RegistryError::Shutdown);
            }
            events
        };
        let task = AbortOnDrop::spawn(forward(
            Subscription {
                registry: self.clone(),
                service_key: service_key.to_owned(),
                events: Some(events),
            },
            tx,
        ))
        .ok_or_else(|| {
            RegistryError::unavailable_because(BACKEND, "must be used within a Tokio runtime")
        })?;
        Ok(Watch::with_guard(rx, task))
    }
}

/// A watcher's subscription to one service's changes. Dropping it (the
/// forwarding task ended or was aborted with its [`Watch`]) forgets the
/// service once it has neither instances nor watchers, so watching many
/// unknown keys does not grow the registry.
struct Subscription {
    registry: MemoryRegistry,
    service_key: String,
    // An `Option` only so `Drop` can release it before counting receivers.
    events: Option<broadcast::Receiver<WatchEvent>>,
}

impl Subscription {
    async fn recv(&mut self) -> Result<WatchEvent, broadcast::error::RecvError> {
        match self.events.as_mut() {
            Some(events) => events.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.events.take());
        let mut state = self.registry.lock();
        let idle = state
            .services
            .get(&self.service_key)
            .is_some_and(|s| s.instances.is_empty() && s.events.receiver_count() == 0);
        if idle {
            state.services.remove(&self.service_key);
        }
    }
}

async fn forward(mut sub: Subscription, tx: mpsc::Sender<WatchEvent>) {
    loop {
        let event = tokio::select! {
            _ = tx.closed() => return,
            event = sub.recv() => event,
        };
        let event = match event {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Closed) => return,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(service = %sub.service_key, missed, "watcher lagged; resynchronising");
                let state = sub.registry.lock();
                if !state.reachable {
                    return;
                }
                let Some(service) = state.services.get(&sub.service_key) else {
                    return;
                };
                let events = service.events.subscribe();
                let snapshot = WatchEvent::Snapshot(service.snapshot());
                drop(state);
                sub.events = Some(events);
                snapshot
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    async fn next(w: &mut Watch) -> WatchEvent {
        tokio::time::timeout(WAIT, w.next())
            .await
            .expect("timed out waiting for a watch event")
            .expect("watch ended")
    }

    fn meta(port: u16) -> ServiceMetaInfo {
        ServiceMetaInfo::new("Echo", "1.0", "127.0.0.1", port)
    }

    #[tokio::test]
    async fn watch_starts_with_a_snapshot_then_follows_in_order() {
        let reg = MemoryRegistry::new();
        let a = reg.register(meta(1)).await.unwrap();
        let mut w = reg.watch("Echo:1.0").await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Snapshot(vec![meta(1)]));
        let b = reg.register(meta(2)).await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Upsert(meta(2)));
        a.deregister().await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Remove(meta(1).node_key()));
        drop(b);
        assert_eq!(next(&mut w).await, WatchEvent::Remove(meta(2).node_key()));
    }

    #[tokio::test]
    async fn shared_instances_with_one_name_see_each_other() {
        let a = MemoryRegistry::shared("memory-unit-shared");
        let b = MemoryRegistry::shared("memory-unit-shared");
        let c = MemoryRegistry::shared("memory-unit-other");
        assert!(a.same_as(&b));
        assert!(!a.same_as(&c));
        let _r = a.register(meta(3)).await.unwrap();
        assert_eq!(b.discover("Echo:1.0").await.unwrap(), vec![meta(3)]);
        assert!(c.discover("Echo:1.0").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn evicting_a_live_registration_publishes_it_again() {
        let reg = MemoryRegistry::new();
        let r = reg.register(meta(4)).await.unwrap();
        let mut w = reg.watch("Echo:1.0").await.unwrap();
        let _ = next(&mut w).await;
        assert!(reg.evict(&meta(4).node_key()));
        assert_eq!(next(&mut w).await, WatchEvent::Remove(meta(4).node_key()));
        assert_eq!(next(&mut w).await, WatchEvent::Upsert(meta(4)));
        assert_eq!(
            *r.state().borrow(),
            RegistrationState::Registered { generation: 1 }
        );
        assert!(!reg.evict("Echo:1.0/127.0.0.1:9"));
        assert!(!reg.evict("garbage"));
    }

    #[tokio::test]
    async fn an_older_duplicate_registration_does_not_remove_the_newer() {
        let reg = MemoryRegistry::new();
        let old = reg.register(meta(5)).await.unwrap();
        let new = reg.register(meta(5)).await.unwrap();
        drop(old);
        assert_eq!(reg.discover("Echo:1.0").await.unwrap(), vec![meta(5)]);
        drop(new);
        assert!(reg.discover("Echo:1.0").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn cutting_discovery_off_ends_watches_and_fails_lookups() {
        let reg = MemoryRegistry::new();
        let _r = reg.register(meta(6)).await.unwrap();
        let mut w = reg.watch("Echo:1.0").await.unwrap();
        let _ = next(&mut w).await;
        reg.set_reachable(false);
        let end = tokio::time::timeout(WAIT, w.next()).await.unwrap();
        assert_eq!(end, None);
        assert!(reg.discover("Echo:1.0").await.is_err());
        assert!(reg.watch("Echo:1.0").await.is_err());
        reg.set_reachable(true);
        assert_eq!(reg.discover("Echo:1.0").await.unwrap(), vec![meta(6)]);
    }

    #[tokio::test]
    async fn watching_unknown_services_leaves_nothing_behind() {
        let reg = MemoryRegistry::new();
        for i in 0..10 {
            let mut w = reg.watch(&format!("Nobody{i}:1.0")).await.unwrap();
            assert_eq!(next(&mut w).await, WatchEvent::Snapshot(vec![]));
        }
        let r = reg.register(meta(1)).await.unwrap();
        let w = reg.watch("Echo:1.0").await.unwrap();
        // Aborted forwarding tasks release their subscriptions when the
        // runtime next polls them; there is no event to await.
        tokio::time::timeout(WAIT, async {
            while reg.lock().services.len() > 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        drop(r);
        assert_eq!(reg.lock().services.len(), 1, "watched: kept");
        drop(w);
        tokio::time::timeout(WAIT, async {
            while !reg.lock().services.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_lagging_watcher_is_resynchronised_with_a_snapshot() {
        let reg = MemoryRegistry::new();
        let mut w = reg.watch("Echo:1.0").await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Snapshot(vec![]));
        // Far more changes than the watch channel and the broadcast buffer
        // hold together, without reading.
        let mut regs = Vec::new();
        for port in 0..(BROADCAST_CAPACITY + WATCH_CHANNEL_CAPACITY + 10) as u16 {
            regs.push(reg.register(meta(1000 + port)).await.unwrap());
        }
        let mut seen_snapshot = None;
        while seen_snapshot.is_none() {
            if let WatchEvent::Snapshot(list) = next(&mut w).await {
                seen_snapshot = Some(list);
            }
        }
        assert_eq!(seen_snapshot.map(|l| l.len()), Some(regs.len()));
    }
}
