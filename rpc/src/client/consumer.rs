//! Consumers: discovery cache, connection pool, and the layers every
//! service client they build gets.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rpc_core::{CallPolicy, ClientConfig, RpcConfig, RpcError};
use rpc_registry::{AnyRegistry, CacheOptions, ServiceCache};
use rpc_transport::{Connector, Endpoint, EndpointConfig};

use super::balance::{self, LoadBalance, LoadBalancer};
use super::discover::{Discover, Route};
use super::outlier::{Health, Outlier, OutlierPolicy};
use super::retry::{Retry, RetryBudget};
use super::service::{ClientInner, ServiceClient};
use super::{ClientStack, Deadline, Identity, Layer, MakeStack, Observe, Stack, Transport};

/// Shared consumer state: registry cache and connection pool. One per
/// process is typical; clients of several services share it.
///
/// `O` and `A` are the user layers around each call and around each
/// attempt ([`Consumer::layer`], [`Consumer::attempt_layer`]); a plain
/// consumer has none.
#[derive(Clone)]
pub struct Consumer<O = Identity, A = Identity> {
    inner: Arc<ConsumerInner>,
    outer: O,
    attempt: A,
    balancer: Option<Arc<dyn LoadBalancer>>,
    /// Whether its calls record metrics (`[metrics]`).
    metrics: bool,
}

pub(crate) struct ConsumerInner {
    pub(crate) config: ClientConfig,
    pub(crate) endpoint_config: EndpointConfig,
    pub(crate) outlier: OutlierPolicy,
    pub(crate) cache: ServiceCache<AnyRegistry>,
    /// Metadata keys propagated besides the standard ones.
    pub(crate) propagate: Arc<[String]>,
    /// Connections and breaker state by address. Pruned whenever a
    /// service's set is rebuilt, so it never holds more than the instances
    /// some service still lists.
    pub(crate) pool: Mutex<HashMap<String, Pooled>>,
}

impl ConsumerInner {
    /// How to reach the instance at `addr`, which serves TLS or not
    /// (`tls` from its registry record): this consumer's connector when
    /// they agree, else one that fails every call naming the mismatch.
    pub(crate) fn endpoint_config_for(&self, addr: &str, tls: bool) -> EndpointConfig {
        let ours = self.endpoint_config.connector.is_tls();
        if tls == ours || matches!(self.endpoint_config.connector, Connector::Refuse(_)) {
            return self.endpoint_config.clone();
        }
        let why = if tls {
            format!(
                "{addr} serves TLS (its registry record says tls = true) and this consumer has no [client.tls]"
            )
        } else {
            format!(
                "{addr} serves plain TCP (its registry record has no tls = true) and this consumer dials TLS ([client.tls])"
            )
        };
        EndpointConfig {
            connector: Connector::Refuse(why.into()),
            ..self.endpoint_config.clone()
        }
    }
}

#[derive(Clone)]
pub(crate) struct Pooled {
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) health: Arc<Health>,
}

/// What a consumer's attempt layers must be: a [`Layer`] around
/// `Outlier<Transport>`, shareable across the service clients it builds.
/// Implemented for every such type.
pub trait AttemptLayer: Layer<Outlier<Transport>> + Clone + Send + Sync + 'static {}

impl<A> AttemptLayer for A where A: Layer<Outlier<Transport>> + Clone + Send + Sync + 'static {}

/// What a consumer's call layers must be, given its attempt layers `A`: a
/// [`Layer`] around the stack from `Discover` down. Implemented for every
/// such type.
pub trait CallLayer<A: AttemptLayer>:
    Layer<Discover<Retry<LoadBalance<<A as Layer<Outlier<Transport>>>::Service>>>>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<A, O> CallLayer<A> for O
where
    A: AttemptLayer,
    O: Layer<Discover<Retry<LoadBalance<<A as Layer<Outlier<Transport>>>::Service>>>>
        + Clone
        + Send
        + Sync
        + 'static,
{
}

impl<O, A> fmt::Debug for Consumer<O, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("registry", &self.inner.cache.discover().kind())
            .field("services", &self.inner.cache.len())
            .field("layers", &std::any::type_name::<O>())
            .field("attempt_layers", &std::any::type_name::<A>())
            .field(
                "balancer",
                &self.balancer.as_ref().map(|b| b.name().to_owned()),
            )
            .finish()
    }
}

impl Consumer {
    /// Builds a consumer from configuration: connects the configured
    /// registry and applies `[client]`.
    pub async fn from_config(config: &RpcConfig) -> Result<Self, RpcError> {
        // Certificates first: a bad file fails startup, naming key and file.
        Connector::from_config(&config.client).map_err(RpcError::Config)?;
        let registry = AnyRegistry::from_config(&config.registry).await?;
        Ok(
            Self::with_registry(registry, config.client.clone(), config.registry.timeout())
                .metrics(config.metrics.records()),
        )
    }

    /// A consumer over an already built registry (tests, embedding).
    /// `ready_timeout` bounds the wait for a service's first instance list.
    /// If `[client.tls]` cannot be loaded, calls fail with the reason (see
    /// [`Consumer::from_config`], which refuses to start instead).
    pub fn with_registry(
        registry: AnyRegistry,
        config: ClientConfig,
        ready_timeout: Duration,
    ) -> Self {
        let connector = match Connector::from_config(&config) {
            Ok(c) => c,
            // Never a plaintext fallback: every call fails with the reason.
            Err(e) => {
                let why = rpc_core::error::report(&e);
                tracing::error!(error = %why, "[client.tls] is unusable: every call will fail");
                Connector::Refuse(format!("[client.tls] is unusable: {why}").into())
            }
        };
        Self::with_connector(registry, config, ready_timeout, connector)
    }

    /// [`Consumer::with_registry`] dialling through `connector` instead of
    /// the one `[client]` configures: for example
    /// [`Connector::Memory`](rpc_transport::Connector::Memory), so that
    /// tests of the client policies run with no sockets, on the paused
    /// clock.
    pub fn with_connector(
        registry: AnyRegistry,
        config: ClientConfig,
        ready_timeout: Duration,
        connector: Connector,
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
        let mut endpoint_config = EndpointConfig::from(&config);
        endpoint_config.connector = connector;
        Self {
            inner: Arc::new(ConsumerInner {
                endpoint_config,
                outlier: OutlierPolicy {
                    failures: config.outlier_failures,
                    cooldown: rpc_core::config::ms(config.outlier_cooldown_ms),
                    max_ejected_percent: config.outlier_max_ejected_percent,
                },
                propagate: config.propagate_metadata.clone().into(),
                config,
                cache,
                pool: Mutex::new(HashMap::new()),
            }),
            outer: Identity,
            attempt: Identity,
            balancer: None,
            metrics: false,
        }
    }
}

impl<O, A> Consumer<O, A> {
    /// The discovery cache (instances per service, change notifications).
    pub fn cache(&self) -> &ServiceCache<AnyRegistry> {
        &self.inner.cache
    }

    /// This consumer (sharing its cache and connections) with `layer`
    /// around every call its service clients make: after the deadline is
    /// fixed, before discovery and retries (`crate::client` docs). The
    /// first layer added is the outermost.
    pub fn layer<L>(self, layer: L) -> Consumer<Stack<L, O>, A> {
        Consumer {
            inner: self.inner,
            outer: Stack::new(layer, self.outer),
            attempt: self.attempt,
            balancer: self.balancer,
            metrics: self.metrics,
        }
    }

    /// This consumer with `layer` around every attempt: after the instance
    /// is picked (`ClientContext::instance`), before outlier detection
    /// records the outcome. The first layer added is the outermost.
    pub fn attempt_layer<L>(self, layer: L) -> Consumer<O, Stack<L, A>> {
        Consumer {
            inner: self.inner,
            outer: self.outer,
            attempt: Stack::new(layer, self.attempt),
            balancer: self.balancer,
            metrics: self.metrics,
        }
    }

    /// This consumer with its calls' metrics (`rpc_client_*` in
    /// [`rpc_core::metric_names`]) recorded through the `metrics` facade,
    /// or not. [`Consumer::from_config`] turns them on when `[metrics]`
    /// does; service clients made before the change keep theirs.
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// This consumer with `balancer` for every service, instead of the
    /// configured `load_balancer`. Each service client gets this same
    /// value (share state across services through it, or keep it per
    /// instance set with [`LoadBalancer::prepare`]).
    pub fn balancer(mut self, balancer: impl LoadBalancer) -> Self {
        self.balancer = Some(Arc::new(balancer));
        self
    }
}

impl<O, A> Consumer<O, A>
where
    O: CallLayer<A>,
    A: AttemptLayer,
{
    /// A proxy for one service, with the policy `[client]` (and its
    /// `[client.services."name:version"]` overrides) gives it.
    pub fn service(&self, name: &str, version: &str) -> ServiceClient<ClientStack<O, A>> {
        let key = rpc_core::service_key(name, version);
        let policy = self.inner.config.policy_for(&key);
        self.service_with_policy(name, version, policy)
    }

    /// A proxy for generic invocation of one service
    /// ([`ServiceClient::call_generic`]): the policy `[client]` gives it,
    /// with the JSON serializer, so that a method known only by its name
    /// can be called with JSON arguments and answers in JSON.
    pub fn generic_service(&self, name: &str, version: &str) -> ServiceClient<ClientStack<O, A>> {
        let key = rpc_core::service_key(name, version);
        let policy = CallPolicy {
            serializer: rpc_core::SerializerKind::Json,
            ..self.inner.config.policy_for(&key)
        };
        self.service_with_policy(name, version, policy)
    }

    /// A proxy for one service with an explicit policy (a stack of its own:
    /// instance set, balancer state, retry budget).
    pub fn service_with_policy(
        &self,
        name: &str,
        version: &str,
        policy: CallPolicy,
    ) -> ServiceClient<ClientStack<O, A>> {
        let inner = &self.inner;
        let c = &inner.config;
        let service_key = rpc_core::service_key(name, version);
        let balancer = self
            .balancer
            .clone()
            .unwrap_or_else(|| balance::built_in(policy.load_balancer));
        let route = Arc::new(Route::new(
            inner.clone(),
            service_key.clone(),
            balancer.clone(),
        ));
        let budget = Arc::new(RetryBudget::new(
            c.retry_budget_ratio,
            c.retry_budget_min_per_sec,
        ));
        let attempt = self
            .attempt
            .layer(Outlier::new(Transport::for_policy(&policy), inner.outlier));
        let balanced = LoadBalance::new(attempt, balancer, inner.outlier.cooldown);
        let retried = Retry::new(balanced, policy.clone(), budget.clone());
        let discovered = Discover::new(retried, route.clone());
        let stack = Deadline::new(
            Observe::new(self.outer.layer(discovered), self.metrics),
            policy.timeout,
            policy.service_timeout,
            inner.propagate.clone(),
        );
        let again = self.clone();
        ServiceClient::from_inner(ClientInner {
            stack,
            service_key,
            policy,
            args_hint: std::sync::atomic::AtomicUsize::new(128),
            route: Some(route),
            budget: Some(budget),
            rebuild: Some(Box::new(move |name, version, policy| {
                again.service_with_policy(name, version, policy)
            })),
        })
    }
}

impl<O, A> MakeStack for Consumer<O, A>
where
    O: CallLayer<A>,
    A: AttemptLayer,
{
    type Stack = ClientStack<O, A>;

    fn make_service(&self, name: &str, version: &str) -> ServiceClient<Self::Stack> {
        self.service(name, version)
    }
}
