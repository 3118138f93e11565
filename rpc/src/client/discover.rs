//! The discovery layer: the service's current instance set.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rpc_core::RpcError;
use rpc_registry::ServiceHandle;
use rpc_transport::RawReply;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::debug;

use super::balance::{Instance, InstanceSet, LoadBalancer};
use super::consumer::{ConsumerInner, Pooled};
use super::outlier::Health;
use super::{Call, ClientContext};
use rpc_transport::Endpoint;

/// The instance set of one service at one discovery version.
#[derive(Debug, Default)]
pub(crate) struct Versioned {
    version: Option<u64>,
    pub(crate) set: InstanceSet,
}

/// One service's view of discovery: its cache handle and the instance set
/// built from it, shared by the service's clients (and their `with(..)`
/// copies).
pub(crate) struct Route {
    consumer: Arc<ConsumerInner>,
    pub(crate) service_key: String,
    handle: OnceCell<ServiceHandle>,
    set: ArcSwap<Versioned>,
    rebuild: Mutex<()>,
    pub(crate) balancer: Arc<dyn LoadBalancer>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("service", &self.service_key)
            .field("balancer", &self.balancer.name())
            .finish()
    }
}

impl Route {
    pub(crate) fn new(
        consumer: Arc<ConsumerInner>,
        service_key: String,
        balancer: Arc<dyn LoadBalancer>,
    ) -> Self {
        Self {
            consumer,
            service_key,
            handle: OnceCell::new(),
            set: ArcSwap::from_pointee(Versioned::default()),
            rebuild: Mutex::new(()),
            balancer,
        }
    }

    pub(crate) async fn handle(&self) -> Result<&ServiceHandle, RpcError> {
        self.handle
            .get_or_try_init(|| async {
                self.consumer
                    .cache
                    .service(&self.service_key)
                    .await
                    .map_err(|e| RpcError::Registry(e.into()))
            })
            .await
    }

    /// The current instance set; rebuilt when discovery's version moved.
    /// Reading it takes no lock and allocates nothing.
    pub(crate) async fn instances(&self) -> Result<Arc<Versioned>, RpcError> {
        let handle = self.handle().await?;
        let version = handle.version();
        let current = self.set.load_full();
        if current.version == Some(version) {
            return Ok(current);
        }
        let _guard = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.set.load_full();
        if current.version == Some(version) {
            return Ok(current);
        }
        let metas = handle.instances();
        let inner = &self.consumer;
        let mut pool = inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        let instances: Vec<Instance> = metas
            .iter()
            .map(|m| {
                let addr = m.address();
                let tls = m
                    .metadata
                    .get(rpc_core::meta::keys::TLS)
                    .is_some_and(|v| v == "true");
                // Keyed by what the provider speaks too: one restarted with
                // TLS at the same address gets a new endpoint.
                let key = if tls {
                    format!("{addr}#tls")
                } else {
                    addr.clone()
                };
                let pooled = pool
                    .entry(key)
                    .or_insert_with(|| Pooled {
                        endpoint: Arc::new(Endpoint::new(
                            addr.clone(),
                            inner.endpoint_config_for(&addr, tls),
                        )),
                        health: Arc::new(Health::default()),
                    })
                    .clone();
                Instance {
                    meta: m.clone(),
                    endpoint: pooled.endpoint,
                    health: pooled.health,
                }
            })
            .collect();
        let fresh = Arc::new(Versioned {
            version: Some(version),
            set: InstanceSet::new(instances, &*self.balancer),
        });
        self.set.store(fresh.clone());
        // Addresses no service lists any more (only the pool holds them) go,
        // closing their connections.
        let before = pool.len();
        pool.retain(|_, p| Arc::strong_count(&p.endpoint) > 1);
        if pool.len() != before {
            debug!(service = %self.service_key, closed = before - pool.len(), "pruned endpoints");
        }
        Ok(fresh)
    }

    /// Waits, until `deadline` at the latest, for discovery to list an
    /// instance; the set then. An empty list is an ordinary state that a
    /// running consumer comes back from (every provider restarting, a
    /// deployment between two versions), so a call that finds it waits for
    /// the next provider instead of failing at once: failing at once never
    /// awaits anything, and a caller that loops on the error would then
    /// starve the watch task that brings the next provider in (on a
    /// `current_thread` runtime, for good). Fails with
    /// [`RpcError::NoProvider`] at the deadline.
    pub(crate) async fn wait_for_instances(
        &self,
        deadline: Instant,
    ) -> Result<Arc<Versioned>, RpcError> {
        let handle = self.handle().await?;
        let mut changes = handle.changes();
        debug!(service = %self.service_key, wait = ?deadline.saturating_duration_since(Instant::now()), "no provider listed: waiting for one until the call's deadline");
        let listed = async {
            // The watch's guard must not live across an await.
            changes
                .wait_for(|_| !handle.instances().is_empty())
                .await
                .is_ok()
        };
        match tokio::time::timeout_at(deadline, listed).await {
            Ok(true) => self.instances().await,
            // Timed out, or the cache was dropped.
            _ => Err(RpcError::NoProvider {
                service: self.service_key.clone(),
            }),
        }
    }
}

/// Puts the service's current instance set into the call's context, and
/// waits for a provider (until the deadline) when none is listed.
#[derive(Debug)]
pub struct Discover<S> {
    inner: S,
    route: Arc<Route>,
}

impl<S> Discover<S> {
    pub(crate) fn new(inner: S, route: Arc<Route>) -> Self {
        Self { inner, route }
    }
}

impl<S: Call> Call for Discover<S> {
    async fn call(&self, cx: &mut ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError> {
        let mut versioned = self.route.instances().await?;
        if versioned.set.is_empty() {
            versioned = self.route.wait_for_instances(cx.deadline).await?;
            // Its first attempt has only what is left of the deadline.
            cx.waited = true;
        }
        cx.set = Some(versioned);
        self.inner.call(cx, args).await
    }
}
