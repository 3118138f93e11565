//! Consumers: discovery cache, client policies, pooled multiplexed connections.
//!
//! # The call stack
//!
//! A call's arguments are encoded once, then go through these layers, outer
//! to inner (the order is [`ServiceClient::call_raw`], in one place):
//!
//! 1. **deadline** — fixed once per call (`timeout_ms`); every attempt gets
//!    what is left, and it travels to the provider with the request. A
//!    call that finds no instance listed waits for one until its deadline
//!    instead of failing at once (`Route::wait_for_instances` says why);
//! 2. **fault tolerance** ([`crate::retry`]) — fail-fast, fail-over (another
//!    instance, safe errors or idempotent methods only, backoff with jitter,
//!    retry budget) or fail-safe (a configured default, applied by
//!    [`ServiceClient::call`] where the return type is known);
//! 3. **load balancing** ([`crate::balance`]) — picks an instance from the
//!    current set, skipping ejected and already-tried ones;
//! 4. **outlier detection** ([`crate::outlier`]) — records each attempt's
//!    outcome against its instance, ejecting repeat offenders;
//! 5. **transport** — the instance's pooled, multiplexed connection.
//!
//! The instance set is rebuilt only when the discovery cache reports a
//! change; reading it, picking and counting take no lock and allocate
//! nothing.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rpc_core::{CallPolicy, ClientConfig, FaultTolerance, RpcConfig, RpcError, SerializerKind};
use rpc_registry::{AnyRegistry, CacheOptions, ServiceCache, ServiceHandle};
use rpc_transport::{CallOptions, Endpoint, EndpointConfig, RawReply, encode_args_sized};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::balance::{Balancer, Instance, InstanceSet, Tried, call_hash};
use crate::outlier::{Admission, Health, OutlierPolicy};
use crate::retry::{RetryBudget, backoff, should_retry};

/// Shared consumer state: registry cache and connection pool. One per
/// process is typical; clients of several services share it.
#[derive(Clone)]
pub struct Consumer {
    inner: Arc<ConsumerInner>,
}

struct ConsumerInner {
    config: ClientConfig,
    endpoint_config: EndpointConfig,
    outlier: OutlierPolicy,
    cache: ServiceCache<AnyRegistry>,
    /// Connections and breaker state by address. Pruned whenever a
    /// service's set is rebuilt, so it never holds more than the instances
    /// some service still lists.
    pool: Mutex<HashMap<String, Pooled>>,
}

#[derive(Clone)]
struct Pooled {
    endpoint: Arc<Endpoint>,
    health: Arc<Health>,
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
                empty_protection: config.empty_protection,
                empty_grace: rpc_core::config::ms(config.empty_grace_ms),
                snapshot_file: config.snapshot_file.clone(),
                ..CacheOptions::default()
            },
        );
        Self {
            inner: Arc::new(ConsumerInner {
                endpoint_config: EndpointConfig::from(&config),
                outlier: OutlierPolicy {
                    failures: config.outlier_failures,
                    cooldown: rpc_core::config::ms(config.outlier_cooldown_ms),
                    max_ejected_percent: config.outlier_max_ejected_percent,
                },
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

    /// A proxy for one service, with the policy `[client]` (and its
    /// `[client.services."name:version"]` overrides) gives it.
    pub fn service(&self, name: &str, version: &str) -> ServiceClient {
        let key = rpc_core::service_key(name, version);
        let policy = self.inner.config.policy_for(&key);
        self.service_with_policy(name, version, policy)
    }

    /// A proxy for one service with an explicit policy.
    pub fn service_with_policy(
        &self,
        name: &str,
        version: &str,
        policy: CallPolicy,
    ) -> ServiceClient {
        let c = &self.inner.config;
        ServiceClient {
            route: Arc::new(Route {
                consumer: self.clone(),
                service_key: rpc_core::service_key(name, version),
                handle: OnceCell::new(),
                set: ArcSwap::from_pointee(Versioned::default()),
                rebuild: Mutex::new(()),
                balancer: Balancer::new(policy.load_balancer),
                budget: RetryBudget::new(c.retry_budget_ratio, c.retry_budget_min_per_sec),
                policy,
                args_hint: std::sync::atomic::AtomicUsize::new(128),
            }),
        }
    }
}

/// The instance set of one service at one discovery version.
#[derive(Default)]
struct Versioned {
    version: Option<u64>,
    set: InstanceSet,
}

struct Route {
    consumer: Consumer,
    service_key: String,
    handle: OnceCell<ServiceHandle>,
    set: ArcSwap<Versioned>,
    rebuild: Mutex<()>,
    balancer: Balancer,
    budget: RetryBudget,
    policy: CallPolicy,
    /// Typical encoded argument size (a power of two), to size buffers.
    args_hint: std::sync::atomic::AtomicUsize,
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

    /// The current instance set; rebuilt when discovery's version moved.
    async fn instances(&self) -> Result<Arc<Versioned>, RpcError> {
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
        let inner = &self.consumer.inner;
        let mut pool = inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        let instances: Vec<Instance> = metas
            .iter()
            .map(|m| {
                let addr = m.address();
                let pooled = pool
                    .entry(addr.clone())
                    .or_insert_with(|| Pooled {
                        endpoint: Arc::new(Endpoint::new(addr, inner.endpoint_config.clone())),
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
            set: InstanceSet::new(instances, self.balancer.kind()),
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
}

impl Route {
    /// Waits, until `deadline` at the latest, for discovery to list an
    /// instance; the set then. An empty list is an ordinary state that a
    /// running consumer comes back from (every provider restarting, a
    /// deployment between two versions), so a call that finds it waits for
    /// the next provider instead of failing at once: failing at once never
    /// awaits anything, and a caller that loops on the error would then
    /// starve the watch task that brings the next provider in (on a
    /// `current_thread` runtime, for good). Fails with
    /// [`RpcError::NoProvider`] at the deadline.
    async fn wait_for_instances(&self, deadline: Instant) -> Result<Arc<Versioned>, RpcError> {
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

/// A proxy for one service; generated clients wrap it.
#[derive(Clone)]
pub struct ServiceClient {
    route: Arc<Route>,
}

impl fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClient")
            .field("service", &self.route.service_key)
            .field("policy", &self.route.policy)
            .finish()
    }
}

impl ServiceClient {
    /// `name:version` of the service.
    pub fn service_key(&self) -> &str {
        &self.route.service_key
    }

    /// The policy calls use.
    pub fn policy(&self) -> &CallPolicy {
        &self.route.policy
    }

    /// A proxy with another policy (a fresh balancer and retry budget).
    pub fn with_policy(&self, policy: CallPolicy) -> Self {
        let (name, version) = self.route.service_key.rsplit_once(':').unwrap_or((
            self.route.service_key.as_str(),
            rpc_core::meta::DEFAULT_VERSION,
        ));
        self.route
            .consumer
            .service_with_policy(name, version, policy)
    }

    /// A proxy whose calls have another deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        self.with_policy(CallPolicy {
            timeout,
            ..self.route.policy.clone()
        })
    }

    /// A proxy that encodes with another serializer.
    pub fn with_serializer(&self, serializer: SerializerKind) -> Self {
        self.with_policy(CallPolicy {
            serializer,
            ..self.route.policy.clone()
        })
    }

    /// The providers currently known for this service, in node-key order.
    pub async fn instances(&self) -> Result<Arc<Vec<rpc_core::ServiceMetaInfo>>, RpcError> {
        Ok(self.route.handle().await?.instances())
    }

    /// The endpoint the next call would go to: discovery lookup and load
    /// balancing exactly as a call does them (ejected instances skipped),
    /// without the call. It does not take an ejected instance's single probe
    /// slot, since it reports no outcome. For debugging, and for measuring
    /// that hot path (it takes no lock and allocates nothing).
    pub async fn next_endpoint(&self) -> Result<Arc<Endpoint>, RpcError> {
        let route = &*self.route;
        let versioned = route.instances().await?;
        let set = &versioned.set;
        let idx = route
            .balancer
            .pick(set, 0, Tried::default())
            .ok_or_else(|| RpcError::NoProvider {
                service: route.service_key.clone(),
            })?;
        Ok(Arc::clone(&set.instances[idx].endpoint))
    }

    /// Calls `method` with the argument tuple `args` through the whole stack
    /// (module docs), decoding the reply. Under `fail_safe`, a failure
    /// returns the method's configured default instead, if it has one.
    pub async fn call<A, R>(&self, method: &'static str, args: &A) -> Result<R, RpcError>
    where
        A: Serialize + Sync + ?Sized,
        R: DeserializeOwned,
    {
        let policy = &self.route.policy;
        let key = &self.route.service_key;
        // Size the buffer for what this service's calls usually take.
        let hint = self
            .route
            .args_hint
            .load(std::sync::atomic::Ordering::Relaxed);
        let outcome = match encode_args_sized(policy.serializer, args, key, method, hint) {
            Ok(encoded) => {
                if encoded.len() > hint || encoded.len() * 4 < hint {
                    self.route.args_hint.store(
                        encoded.len().next_power_of_two(),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                self.call_raw(method, &encoded).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(reply) => reply.decode(key, method),
            Err(e) if policy.fault_tolerance == FaultTolerance::FailSafe => {
                let Some(json) = policy.fail_safe.get(method) else {
                    return Err(e);
                };
                match serde_json::from_str::<R>(json) {
                    Ok(v) => {
                        warn!(service = %key, method, error = %crate::error::report(&e), "call failed: returning the fail-safe default");
                        Ok(v)
                    }
                    Err(de) => {
                        warn!(service = %key, method, error = %de, "fail-safe default does not fit the return type");
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The stack below encoding: deadline, fault tolerance, load balancing,
    /// outlier detection, transport (module docs). `args` is the argument
    /// tuple encoded with the policy's serializer.
    pub async fn call_raw(&self, method: &'static str, args: &[u8]) -> Result<RawReply, RpcError> {
        let route = &*self.route;
        let policy = &route.policy;
        // 1. deadline
        // The one clock read of a call that succeeds at once: the deadline,
        // the retry budget's window and the transport's latency sample all
        // start from it.
        let started = Instant::now();
        let deadline = started + policy.timeout;
        let mut versioned = route.instances().await?;
        // Whether the call waited for a provider: then its first attempt
        // has only what is left of the deadline, and starts now.
        let mut waited = false;
        if versioned.set.is_empty() {
            versioned = route.wait_for_instances(deadline).await?;
            waited = true;
        }
        let set = &versioned.set;
        let hash = if route.balancer.needs_hash() {
            call_hash(method, args)
        } else {
            0
        };
        route
            .budget
            .record_call_at(crate::outlier::nanos_at(started.into_std()));
        let mut tried = Tried::default();
        let mut attempt = 0u32;
        loop {
            // The first attempt has the whole budget: no need to read the clock.
            let (attempt_start, remaining) = if attempt == 0 && !waited {
                (started, policy.timeout)
            } else {
                let now = Instant::now();
                (now, deadline.saturating_duration_since(now))
            };
            if remaining.is_zero() {
                return Err(RpcError::Timeout {
                    service: route.service_key.clone(),
                    method: method.to_owned(),
                    timeout: policy.timeout,
                });
            }
            // 3. load balancing
            let Some(idx) = route.balancer.pick(set, hash, tried) else {
                return Err(RpcError::NoProvider {
                    service: route.service_key.clone(),
                });
            };
            // 4. outlier detection: after a cool-down, one call probes. The
            // others keep away until its outcome is recorded, which comes
            // just after its deadline at the latest (or, if it is cancelled,
            // until a cool-down after its deadline).
            let hold = remaining + route.consumer.inner.outlier.cooldown;
            let admission = if set.instances[idx].health.is_closed() {
                // The common case: nothing ejected, no clock to read.
                Admission::Normal
            } else {
                set.instances[idx]
                    .health
                    .admit(crate::outlier::now_nanos(), hold)
            };
            let now = || crate::outlier::now_nanos();
            let (idx, probe) = match admission {
                Admission::Normal => (idx, false),
                Admission::Probe => (idx, true),
                // Another call took the probe a moment ago, which made the
                // instance unavailable again: pick again.
                Admission::Taken => {
                    let again = route.balancer.pick(set, hash, tried).unwrap_or(idx);
                    let probe = again != idx
                        && set.instances[again].health.admit(now(), hold) == Admission::Probe;
                    (again, probe)
                }
            };
            let instance = &set.instances[idx];
            let opts = CallOptions {
                service: &route.service_key,
                method,
                serializer: policy.serializer,
                timeout: remaining,
                metadata: rpc_core::Metadata::empty(),
            };
            // 5. transport; 4. its outcome, for outlier detection
            let err = match instance
                .endpoint
                .call_raw_from(attempt_start, &opts, args)
                .await
            {
                Ok(reply) => {
                    instance.health.success(instance.endpoint.addr());
                    return Ok(reply);
                }
                Err(e) => {
                    let ejected = set
                        .instances
                        .iter()
                        .filter(|i| i.health.is_ejected())
                        .count();
                    instance.health.failure(
                        &e,
                        instance.endpoint.addr(),
                        &route.consumer.inner.outlier,
                        ejected,
                        set.len(),
                        probe,
                    );
                    e
                }
            };
            // 2. fault tolerance
            if !should_retry(policy, method, &err, attempt) {
                return Err(err);
            }
            if !route.budget.try_retry() {
                debug!(service = %route.service_key, method, "retry budget exhausted");
                return Err(err);
            }
            tried.add(idx);
            attempt += 1;
            let pause =
                backoff(policy, attempt).min(deadline.saturating_duration_since(Instant::now()));
            debug!(service = %route.service_key, method, attempt, ?pause, error = %err, "retrying on another instance");
            tokio::time::sleep(pause).await;
        }
    }
}
