//! Consumers: discovery cache, load balancing, pooled multiplexed connections.
//!
//! The call path: [`ServiceClient::call`] reads the service's endpoint list
//! (rebuilt only when the discovery cache reports a change), lets the load
//! balancer pick one, and calls it through the transport. Nothing on that
//! path locks or allocates besides encoding the request.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rpc_core::{ClientConfig, RpcConfig, RpcError, SerializerKind};
use rpc_registry::{AnyRegistry, CacheOptions, ServiceCache, ServiceHandle};
use rpc_transport::{CallOptions, Endpoint, EndpointConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use tracing::debug;

use crate::balance::{self, LoadBalancer};

/// Shared consumer state: registry cache and connection pool. One per
/// process is typical; clients of several services share it.
#[derive(Clone)]
pub struct Consumer {
    inner: Arc<ConsumerInner>,
}

struct ConsumerInner {
    config: ClientConfig,
    endpoint_config: EndpointConfig,
    cache: ServiceCache<AnyRegistry>,
    /// Endpoints by address. Pruned whenever a service's list is rebuilt, so
    /// it never holds more than the instances some service still lists.
    pool: Mutex<HashMap<String, Arc<Endpoint>>>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("registry", &self.inner.cache.discover().kind())
            .field("services", &self.inner.cache.len())
            .finish()
    }
}

impl Consumer {
    /// Builds a consumer from configuration: connects the configured
    /// registry and applies `[client]`.
    pub async fn from_config(config: &RpcConfig) -> Result<Self, RpcError> {
        let registry = AnyRegistry::from_config(&config.registry).await?;
        Ok(Self::with_registry(
            registry,
            config.client.clone(),
            config.registry.timeout(),
        ))
    }

    /// A consumer over an already built registry (tests, embedding).
    /// `ready_timeout` bounds the wait for a service's first instance list.
    pub fn with_registry(
        registry: AnyRegistry,
        config: ClientConfig,
        ready_timeout: Duration,
    ) -> Self {
        let cache = ServiceCache::with_options(
            registry,
            CacheOptions {
                ready_timeout,
                ..CacheOptions::default()
            },
        );
        Self {
            inner: Arc::new(ConsumerInner {
                endpoint_config: EndpointConfig::from(&config),
                config,
                cache,
                pool: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The discovery cache (instances per service, change notifications).
    pub fn cache(&self) -> &ServiceCache<AnyRegistry> {
        &self.inner.cache
    }

    /// A proxy for one service, with the configured load balancer.
    pub fn service(&self, name: &str, version: &str) -> ServiceClient {
        self.service_with(
            name,
            version,
            balance::from_kind(self.inner.config.load_balancer),
        )
    }

    /// A proxy for one service with a given load balancer.
    pub fn service_with(
        &self,
        name: &str,
        version: &str,
        balancer: Arc<dyn LoadBalancer>,
    ) -> ServiceClient {
        ServiceClient {
            route: Arc::new(Route {
                consumer: self.clone(),
                service_key: rpc_core::service_key(name, version),
                handle: OnceCell::new(),
                endpoints: ArcSwap::from_pointee(Endpoints::default()),
                rebuild: Mutex::new(()),
                balancer,
            }),
            serializer: self.inner.config.serializer,
            timeout: self.inner.config.timeout(),
        }
    }
}

/// The endpoint list of one service at one discovery version.
#[derive(Default)]
struct Endpoints {
    version: Option<u64>,
    list: Vec<Arc<Endpoint>>,
}

struct Route {
    consumer: Consumer,
    service_key: String,
    handle: OnceCell<ServiceHandle>,
    endpoints: ArcSwap<Endpoints>,
    rebuild: Mutex<()>,
    balancer: Arc<dyn LoadBalancer>,
}

impl Route {
    async fn handle(&self) -> Result<&ServiceHandle, RpcError> {
        self.handle
            .get_or_try_init(|| async {
                self.consumer
                    .inner
                    .cache
                    .service(&self.service_key)
                    .await
                    .map_err(|e| RpcError::Registry(e.into()))
            })
            .await
    }

    /// The current endpoint list; rebuilt when discovery's version moved.
    fn endpoints(&self, handle: &ServiceHandle) -> Arc<Endpoints> {
        let version = handle.version();
        let current = self.endpoints.load_full();
        if current.version == Some(version) {
            return current;
        }
        let _guard = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.endpoints.load_full();
        if current.version == Some(version) {
            return current;
        }
        let instances = handle.instances();
        let inner = &self.consumer.inner;
        let mut pool = inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        let list: Vec<Arc<Endpoint>> = instances
            .iter()
            .map(|m| {
                let addr = m.address();
                pool.entry(addr.clone())
                    .or_insert_with(|| Arc::new(Endpoint::new(addr, inner.endpoint_config.clone())))
                    .clone()
            })
            .collect();
        let fresh = Arc::new(Endpoints {
            version: Some(version),
            list,
        });
        self.endpoints.store(fresh.clone());
        // Endpoints no route lists any more (only the pool holds them) go,
        // closing their connections.
        let before = pool.len();
        pool.retain(|_, ep| Arc::strong_count(ep) > 1);
        if pool.len() != before {
            debug!(service = %self.service_key, closed = before - pool.len(), "pruned endpoints");
        }
        fresh
    }
}

/// An untyped proxy for one service; generated clients wrap it.
#[derive(Clone)]
pub struct ServiceClient {
    route: Arc<Route>,
    serializer: SerializerKind,
    timeout: Duration,
}

impl fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClient")
            .field("service", &self.route.service_key)
            .field("serializer", &self.serializer)
            .field("timeout", &self.timeout)
            .field("balancer", &self.route.balancer)
            .finish()
    }
}

impl ServiceClient {
    /// `name:version` of the service.
    pub fn service_key(&self) -> &str {
        &self.route.service_key
    }

    /// A copy that calls with another per-call deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            ..self.clone()
        }
    }

    /// A copy that encodes with another serializer.
    pub fn with_serializer(&self, serializer: SerializerKind) -> Self {
        Self {
            serializer,
            ..self.clone()
        }
    }

    /// The providers currently known for this service, in node-key order.
    pub async fn instances(&self) -> Result<Arc<Vec<rpc_core::ServiceMetaInfo>>, RpcError> {
        Ok(self.route.handle().await?.instances())
    }

    /// Calls `method` with the argument tuple `args`.
    pub async fn call<A, R>(&self, method: &'static str, args: &A) -> Result<R, RpcError>
    where
        A: Serialize + Sync + ?Sized,
        R: DeserializeOwned,
    {
        let route = &self.route;
        let handle = route.handle().await?;
        let endpoints = route.endpoints(handle);
        if endpoints.list.is_empty() {
            return Err(RpcError::NoProvider {
                service: route.service_key.clone(),
            });
        }
        let i = route.balancer.pick(&endpoints.list);
        let endpoint = &endpoints.list[i % endpoints.list.len()];
        let opts = CallOptions {
            service: &route.service_key,
            method,
            serializer: self.serializer,
            timeout: self.timeout,
            metadata: &[],
        };
        endpoint.call(&opts, args).await
    }
}
