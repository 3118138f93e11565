//! Providers: bind, register, serve, shut down in order.
//!
//! Shutdown sequence, started by the future passed to [`Provider::run`]:
//! 1. deregister every service, then release the registry's lease or
//!    session (one revoke clears anything a failed deregistration left);
//! 2. wait until the registry itself no longer lists the instances (a
//!    watch, bounded by `registry.timeout_ms`), then keep serving for
//!    `server.shutdown_grace_ms` so consumers' caches catch up;
//! 3. stop accepting connections and reading requests; every connection
//!    gets a go-away naming the last request read, so a consumer resends
//!    anything later to another provider;
//! 4. let in-flight calls finish, up to `server.shutdown_timeout_ms`;
//! 5. abort what is left and return.

use std::future::Future;
use std::net::SocketAddr;

use rpc_core::meta::keys;
use rpc_core::metric_names::{PROVIDER_REGISTRATION, PROVIDER_REREGISTRATIONS, REGISTRY, STATE};
use rpc_core::{
    Discover, Registration, RegistrationState, Registry, RpcConfig, SerializerKind,
    ServiceMetaInfo, WatchEvent,
};
use rpc_registry::AnyRegistry;
use rpc_transport::{Server, ServerBuilder, ServiceHandler};
use tracing::{info, warn};

use crate::error::Error;
use crate::observe::ServerObserve;

/// Collects services; [`ProviderBuilder::bind`] makes a [`Provider`].
#[derive(Debug)]
pub struct ProviderBuilder {
    config: RpcConfig,
    server: ServerBuilder,
    registry: Option<AnyRegistry>,
    metrics: Option<SocketAddr>,
}

impl ProviderBuilder {
    /// Adds a service (a generated `FooServer`).
    pub fn service(mut self, handler: impl ServiceHandler) -> Self {
        self.server = self.server.service(handler);
        self
    }

    /// Adds a layer around every call this provider serves
    /// ([`crate::server::ServerLayer`]: authentication, logging, metrics).
    /// The first layer added is the outermost.
    pub fn layer(mut self, layer: impl crate::server::ServerLayer) -> Self {
        self.server = self.server.layer(layer);
        self
    }

    /// Publishes `addr` as this provider's metrics endpoint
    /// ([`keys::METRICS`]) instead of `[metrics] listen` (which names no
    /// usable port when it asks for port 0): pass
    /// [`MetricsEndpoint::local_addr`](crate::observe::MetricsEndpoint::local_addr).
    pub fn metrics_endpoint(mut self, addr: SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Uses this registry instead of the configured one.
    pub fn registry(mut self, registry: AnyRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Binds the port and connects the registry. Nothing is registered until
    /// [`Provider::run`].
    pub async fn bind(self) -> Result<Provider, Error> {
        // First: a provider that would publish an address nobody can dial
        // fails before it connects or binds anything.
        let advertise = crate::advertise::advertised_host(&self.config).await?;
        let registry = match self.registry {
            Some(r) => r,
            None => AnyRegistry::from_config(&self.config.registry).await?,
        };
        let server = self.server.bind().await?;
        // A clock before 1970 is a broken clock, not a reason to refuse to start.
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // A wildcard listen address is reachable at the advertised host.
        let metrics = self.metrics.map(|a| {
            let host = if a.ip().is_unspecified() {
                advertise.clone()
            } else {
                a.ip().to_string()
            };
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host
            };
            format!("http://{host}:{}/metrics", a.port())
        });
        Ok(Provider {
            config: self.config,
            server,
            registry,
            advertise,
            since,
            metrics,
        })
    }
}

/// A bound provider, ready to register and serve.
#[derive(Debug)]
pub struct Provider {
    config: RpcConfig,
    server: Server,
    registry: AnyRegistry,
    /// The host published for every service (`crate::advertise`).
    advertise: String,
    /// When it was bound, in seconds since the Unix epoch ([`keys::SINCE`]).
    since: u64,
    /// Its metrics endpoint's URL ([`keys::METRICS`]), if it has one.
    metrics: Option<String>,
}

impl Provider {
    /// Starts a provider from configuration (`[server]`, `[registry]`,
    /// `[metrics]`). Its outermost layer is [`ServerObserve`]
    /// (`crate::observe`): spans, and metrics when `[metrics]` records.
    /// The layer is added only when it has something to do: `[metrics]`
    /// records, or a `tracing` subscriber is installed by now (install it
    /// before building the provider, as `main` usually does). With neither,
    /// calls go through no layer at all.
    pub fn builder(config: &RpcConfig) -> ProviderBuilder {
        let mut server = Server::builder(config.server.clone());
        let metrics = config.metrics.records();
        if metrics || tracing::dispatcher::has_been_set() {
            server = server.layer(ServerObserve::new(metrics));
        }
        ProviderBuilder {
            config: config.clone(),
            server,
            registry: None,
            metrics: config.metrics.listen.filter(|a| a.port() != 0),
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The instance records [`Provider::run`] publishes.
    pub fn instances(&self) -> Vec<ServiceMetaInfo> {
        let host = &self.advertise;
        let port = self.local_addr().port();
        let mut keys = self.server.service_keys();
        keys.sort();
        keys.iter()
            .map(|key| {
                let key = rpc_core::ServiceKey::parse(key);
                let mut m = ServiceMetaInfo::new(key.name(), key.version(), host.clone(), port);
                m.weight = self.config.server.weight;
                let methods = self.server.methods(key.as_str()).unwrap_or_default();
                let serializers: Vec<&str> =
                    SerializerKind::ALL.iter().map(|s| s.as_str()).collect();
                for (k, v) in [
                    (keys::PROTOCOL, format!("mr/{}", rpc_codec::VERSION)),
                    (keys::METHODS, methods.join(",")),
                    (
                        keys::FRAMEWORK,
                        format!("rpc/{}", env!("CARGO_PKG_VERSION")),
                    ),
                    (keys::SERIALIZERS, serializers.join(",")),
                    (keys::COMPRESSIONS, "lz4,zstd".to_owned()),
                    (keys::SINCE, self.since.to_string()),
                ] {
                    m.metadata.insert(k.to_owned(), v);
                }
                if self.server.is_tls() {
                    m.metadata.insert(keys::TLS.to_owned(), "true".to_owned());
                }
                if let Some(url) = &self.metrics {
                    m.metadata.insert(keys::METRICS.to_owned(), url.clone());
                }
                m
            })
            .collect()
    }

    /// Registers every service, serves until `shutdown` completes, then
    /// shuts down in the order described in the module docs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let mut registrations: Vec<Registration> = Vec::new();
        for meta in self.instances() {
            let reg = self.registry.register(meta.clone()).await?;
            info!(node = %meta.node_key(), registry = %self.registry.kind(), "registered");
            registrations.push(reg);
        }
        let timeout = self.config.registry.timeout();
        let grace = rpc_core::config::ms(self.config.server.shutdown_grace_ms);
        let registry = self.registry.clone();
        let nodes: Vec<ServiceMetaInfo> = registrations.iter().map(|r| r.meta().clone()).collect();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let states: Vec<_> = registrations.iter().map(Registration::state).collect();
        let kind = self.registry.kind().as_str();
        let control = async move {
            // The registrations' states feed their gauges until shutdown.
            let mut shutdown = std::pin::pin!(shutdown);
            tokio::select! {
                () = &mut shutdown => {}
                () = track_registrations(states, kind) => shutdown.await,
            }
            info!("shutdown requested: deregistering");
            for reg in registrations {
                let node = reg.meta().node_key();
                match tokio::time::timeout(timeout, reg.deregister()).await {
                    Ok(Ok(())) => info!(%node, "deregistered"),
                    Ok(Err(e)) => {
                        warn!(%node, error = %e, "deregistration failed; the registry's TTL will remove it")
                    }
                    Err(_) => {
                        warn!(%node, ?timeout, "deregistration timed out; the registry's TTL will remove it")
                    }
                }
            }
            // Leases and sessions go last: one revoke clears anything a
            // failed deregistration left behind.
            registry.shutdown().await;
            let started = tokio::time::Instant::now();
            if tokio::time::timeout(timeout, wait_removed(&registry, &nodes))
                .await
                .is_err()
            {
                warn!(
                    ?timeout,
                    "the registry still lists this provider; stopping anyway"
                );
            } else {
                info!(took = ?started.elapsed(), "the registry no longer lists this provider");
            }
            tokio::time::sleep(grace).await;
            let _ = stop_tx.send(());
        };
        let serve = self.server.run(async {
            let _ = stop_rx.await;
        });
        let ((), served) = tokio::join!(control, serve);
        served?;
        Ok(())
    }
}

/// Keeps `rpc_provider_registration_state` (registrations per state) and
/// `rpc_provider_reregistrations_total` up to date from the registrations'
/// state channels; ends when every channel has closed.
async fn track_registrations(
    states: Vec<tokio::sync::watch::Receiver<RegistrationState>>,
    registry: &'static str,
) {
    fn label(s: RegistrationState) -> &'static str {
        match s {
            RegistrationState::Registered { .. } => "registered",
            RegistrationState::Reregistering => "re_registering",
            RegistrationState::Deregistered => "deregistered",
        }
    }
    let gauge = |s: RegistrationState| metrics::gauge!(PROVIDER_REGISTRATION, REGISTRY => registry, STATE => label(s));
    let follow = |mut rx: tokio::sync::watch::Receiver<RegistrationState>| async move {
        let mut last = *rx.borrow_and_update();
        // Counted in its state until it changes, or until this future is
        // dropped at shutdown.
        let mut _held = InState::new(gauge(last));
        while rx.changed().await.is_ok() {
            let now = *rx.borrow_and_update();
            if let RegistrationState::Registered { generation } = now {
                let previous = match last {
                    RegistrationState::Registered { generation } => generation,
                    _ => generation.saturating_sub(1),
                };
                if generation > previous {
                    metrics::counter!(PROVIDER_REREGISTRATIONS, REGISTRY => registry)
                        .increment(generation - previous);
                }
            }
            if label(now) != label(last) {
                _held = InState::new(gauge(now));
            }
            last = now;
        }
    };
    futures_util::future::join_all(states.into_iter().map(follow)).await;
}

/// One registration counted in a state's gauge while it lives.
struct InState(metrics::Gauge);

impl InState {
    fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InState {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Waits until no service of `nodes` lists its node any more, following
/// each service with a watch (events, not polling).
async fn wait_removed(registry: &AnyRegistry, nodes: &[ServiceMetaInfo]) {
    for node in nodes {
        let key = node.node_key();
        let Ok(mut watch) = registry.watch(&node.service_key()).await else {
            // Cannot watch: nothing to wait on; the grace period still applies.
            continue;
        };
        let mut present = true;
        while present {
            match watch.next().await {
                Some(WatchEvent::Snapshot(list)) => {
                    present = list.iter().any(|m| m.node_key() == key)
                }
                Some(WatchEvent::Remove(k)) if k == key => present = false,
                Some(_) => {}
                None => break,
            }
        }
    }
}

/// Completes on Ctrl-C or, on Unix, SIGTERM: the usual provider shutdown
/// trigger.
///
/// The signal handlers are installed when this is called, not when the
/// future is first polled: `Provider::run` polls it only after registering,
/// and a SIGTERM in between (an orchestrator stopping a provider that just
/// started) would otherwise kill the process with the default action,
/// without deregistering. Call it inside a Tokio runtime; outside one the
/// handlers are installed at the first poll instead.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let installed = tokio::runtime::Handle::try_current().ok().map(|_| {
            (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            )
        });
        async move {
            let (term, int) = match installed {
                Some(pair) => pair,
                None => (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ),
            };
            let wait = |s: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(e) => {
                        warn!(error = %e, signal = name, "cannot listen for the signal");
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                _ = wait(term, "SIGTERM") => {}
                _ = wait(int, "SIGINT") => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(all(test, feature = "prometheus"))]
mod tests {
    use super::*;

    /// Drives the tracker until `render` shows `want` (every line of it),
    /// yielding to it between looks: no timer, bounded by a count.
    async fn until(handle: &crate::observe::PrometheusHandle, want: &[&str]) -> String {
        for _ in 0..10_000 {
            let text = handle.render();
            if want.iter().all(|w| text.lines().any(|l| l == *w)) {
                return text;
            }
            tokio::task::yield_now().await;
        }
        panic!("never rendered {want:?}: {}", handle.render());
    }

    #[tokio::test]
    async fn registration_states_and_reregistrations_are_counted() {
        let recorder = crate::observe::PrometheusRecorder::new();
        let handle = recorder.handle();
        // A current-thread runtime: the thread's local recorder sees all.
        let _guard = metrics::set_default_local_recorder(&recorder);
        let (tx, rx) = tokio::sync::watch::channel(RegistrationState::Registered { generation: 0 });
        let (other_tx, other_rx) =
            tokio::sync::watch::channel(RegistrationState::Registered { generation: 0 });
        let tracker = tokio::spawn(track_registrations(vec![rx, other_rx], "etcd"));
        let g = |state: &str, v: u32| {
            format!(r#"rpc_provider_registration_state{{rpc_registry="etcd",state="{state}"}} {v}"#)
        };
        until(&handle, &[&g("registered", 2)]).await;
        tx.send(RegistrationState::Reregistering).unwrap();
        until(&handle, &[&g("registered", 1), &g("re_registering", 1)]).await;
        tx.send(RegistrationState::Registered { generation: 1 })
            .unwrap();
        let text = until(&handle, &[&g("registered", 2), &g("re_registering", 0)]).await;
        assert!(
            text.contains(r#"rpc_provider_reregistrations_total{rpc_registry="etcd"} 1"#),
            "{text}"
        );
        // A backend that skips the intermediate state still counts each.
        other_tx
            .send(RegistrationState::Registered { generation: 3 })
            .unwrap();
        until(
            &handle,
            &[r#"rpc_provider_reregistrations_total{rpc_registry="etcd"} 4"#],
        )
        .await;
        tx.send(RegistrationState::Deregistered).unwrap();
        until(&handle, &[&g("registered", 1), &g("deregistered", 1)]).await;
        // Channels closed: nothing is counted in any state any more.
        drop((tx, other_tx));
        until(&handle, &[&g("registered", 0), &g("deregistered", 0)]).await;
        tracker.await.unwrap();
    }
}
