//! [`NacosRegistry`]: Nacos 2.x as the registry (cargo feature `nacos`),
//! through the official `nacos-sdk` crate's naming client (gRPC).
//!
//! # Name mapping
//!
//! | ours | Nacos |
//! |---|---|
//! | service key `Name:version` | service name `Name:version` (versions stay apart) |
//! | `registry.group` (default `DEFAULT_GROUP`) | group |
//! | `registry.namespace` (default `public`) | namespace id |
//! | `host:port` | instance ip and port, cluster `DEFAULT` |
//! | `weight` | instance weight (`f64`), read back rounded |
//! | the whole [`ServiceMetaInfo`] | instance metadata [`META_KEY`] (JSON), plus a readable [`VERSION_KEY`] |
//!
//! `service_group` and the free-form metadata travel inside the JSON, so every
//! field round-trips exactly. Instances registered by other Nacos clients
//! (no [`META_KEY`]) are still discovered: name and version from the service
//! name, host, port and weight from the instance, its metadata as ours.
//!
//! # Registering
//!
//! Instances are ephemeral: the SDK keeps them alive over its gRPC
//! connection and the server drops them when that connection goes (a
//! SIGKILLed provider disappears about a second later). A Nacos 2.x client
//! holds ONE instance per service per connection (a second registration of
//! the same service replaces the first), so a registry opens one connection
//! ("lane") per instance of the same service it publishes at once: usually
//! just the first one, which discovery shares.
//!
//! A keeper task owns the lanes and the published instances. A probe per lane
//! (a cheap service-list request every second, answered or not within 1.5 s)
//! tells it when a connection breaks: the SDK needs at least 2 s to
//! reconnect, and the server has dropped the connection's instances by then.
//! The keeper marks them [`RegistrationState::Reregistering`] and, once the
//! lane answers again, registers them again itself (the SDK's own redo does
//! the same; registering twice is harmless) and bumps each generation. Every
//! 5 s it also checks that each instance is still listed, re-registering one
//! the server lost without a disconnect. The SDK has no shutdown and dropping
//! it does not close its connection: [`NacosRegistry::shutdown`] (and
//! dropping every handle) deregisters every instance explicitly. A
//! deregistration that fails (server unreachable) is retried when the lane
//! answers again, even after every handle is gone: the SDK would otherwise
//! register the instance again by itself after reconnecting.
//!
//! # Discovering
//!
//! One SDK subscription per service per registry (shared by every watch of
//! it); each push or SDK refresh pokes the watch, which then reads the
//! service with a direct query and turns the difference into upserts and
//! removals. Healthy, enabled instances only. The SDK's push-empty
//! protection is off (with it, a subscriber never hears that the last
//! instance left); the cache's empty-push protection is the guard instead
//! (its grace after a break covers a server restarted empty). The watch
//! reports what that policy needs: an empty list only when the server
//! answers the direct query over a connection not known to be broken, and
//! `Connected(false)` for every break, including one seen only as a higher
//! reconnect count. While the connection is down the watch keeps the list;
//! when it is back it subscribes again at once (the SDK's own
//! redo runs only every 3 s, and the server pushes nothing to a connection
//! without a subscription), resynchronises with a snapshot, and reads every
//! second for a few seconds.
//!
//! Recovery after a break is paced by the SDK's reconnects: 2 s after it
//! notices, then with doubling pauses (a failed attempt takes ~5 s), up to
//! a minute; a registry handle cannot make it reconnect sooner.
//!
//! `registry.ttl_secs` is not used: liveness is the connection's.
//! `registry.tls` is not supported (the SDK's `tls` feature is not enabled).

use crate::support::{diff, sleep_until_opt};
use rpc_core::backoff::Backoff;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nacos_sdk::api::naming::{
    NamingChangeEvent, NamingEventListener, NamingService, NamingServiceBuilder, ServiceInstance,
};
use nacos_sdk::api::props::ClientProps;
use rpc_core::discover::WATCH_CHANNEL_CAPACITY;
use rpc_core::{
    Discover, Registration, RegistrationState, RegistryConfig, RegistryError, ServiceMetaInfo,
    Watch, WatchEvent,
};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};

use crate::support::keeper::{self, KeeperDeregister};
use crate::support::task::AbortOnDrop;

mod follow;
mod lanes;
mod record;
mod registration;
mod subscription;

use follow::*;
use lanes::*;
pub use record::{from_instance, service_name, to_instance};
use registration::*;
use subscription::*;

const BACKEND: &str = "nacos";
/// Namespace used when `registry.namespace` is not set.
pub const DEFAULT_NAMESPACE: &str = "public";
/// Group used when `registry.group` is not set.
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
/// Instance metadata entry holding the whole [`ServiceMetaInfo`] as JSON.
pub const META_KEY: &str = "rpc.meta";
/// Instance metadata entry holding the service version (for people and
/// other tools; discovery reads [`META_KEY`]).
pub const VERSION_KEY: &str = "version";
const CLUSTER: &str = "DEFAULT";
const APP_NAME: &str = "rpc";
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Shorter than the SDK's shortest reconnect pause (2 s), so a probe sent
/// during a break always times out and the break is seen.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often a watch reads again while settling, and the first read after
/// a watch starts.
const SETTLE_RECHECK: Duration = Duration::from_secs(1);
/// How long a watch keeps reading every second after (re)subscribing: the
/// subscription may reach the server a moment after the read, and the SDK
/// re-sends its own after reconnecting only at its next redo (every 3 s).
const SETTLE: Duration = Duration::from_secs(4);
const KEEPER_TICK: Duration = Duration::from_millis(250);
/// Longest pause between two checks that the server lists the instances as
/// registered (a second writer of the same address deregistering it, a
/// record changed behind the provider's back: issue 12, faults 3 and 4).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const COMMAND_CAPACITY: usize = 64;
/// Service names per page of a service listing.
const SERVICE_PAGE: i32 = 200;
/// Bound on the pages of one service listing (200,000 names).
const MAX_SERVICE_PAGES: i32 = 1000;

/// A Nacos client error as a registry error of the right kind: an answer
/// with error code 403 is the server refusing our login ("unknown user!":
/// no valid token, so a wrong user or password) and becomes
/// `Denied(Unauthenticated)`; anything else is an outage.
fn unavailable(message: impl Into<String>, e: impl Into<rpc_core::BoxError>) -> RegistryError {
    let e = e.into();
    if let Some(nacos_sdk::api::error::Error::ErrResponse(_, _, 403, reason)) =
        e.downcast_ref::<nacos_sdk::api::error::Error>()
    {
        let reason = reason.clone().unwrap_or_default();
        return RegistryError::denied(
            BACKEND,
            rpc_core::RegistryErrorKind::Unauthenticated,
            message,
            reason,
            Some(e),
        );
    }
    RegistryError::unavailable(BACKEND, message, e)
}

crate::support::backend_errors!(BACKEND);

/// Nacos as a registry. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct NacosRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<Settings>,
    discovery: Arc<Discovery>,
    commands: mpsc::Sender<Command>,
}

impl fmt::Debug for NacosRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner.settings;
        f.debug_struct("NacosRegistry")
            .field("addresses", &s.addresses)
            .field("namespace", &s.namespace)
            .field("group", &s.group)
            .finish()
    }
}

impl NacosRegistry {
    /// Connects to the server(s) in `config.address` (`host:port`, several
    /// for a cluster), in `namespace` (default `public`) and `group` (default
    /// `DEFAULT_GROUP`), with optional `username`/`password`. Fails when no
    /// server answers within `timeout_ms`.
    pub async fn connect(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let settings = Arc::new(Settings::from_config(config)?);
        let naming = settings.connect().await?;
        let lane = Lane::start(naming, &settings)?;
        let discovery = Arc::new(Discovery {
            naming: lane.naming.clone(),
            health: lane.health.clone(),
            _probe: lane.probe.clone(),
            group: settings.group.clone(),
            timeout: settings.timeout,
            hub: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let keeper = Keeper {
            settings: settings.clone(),
            lanes: vec![KeeperLane::new(lane)],
            entries: HashMap::new(),
            tombstones: Vec::new(),
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| failed("the nacos backend needs a Tokio runtime"))?;
        // The keeper owns the lanes; it ends when every handle is gone, after
        // deregistering what it published.
        runtime.spawn(keeper.run(rx));
        info!(servers = %settings.addresses.join(","), namespace = %settings.namespace, group = %settings.group, "nacos registry connected");
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                discovery,
                commands: tx,
            }),
        })
    }

    /// The namespace instances are published in.
    pub fn namespace(&self) -> &str {
        &self.inner.settings.namespace
    }

    /// The group instances are published in.
    pub fn group(&self) -> &str {
        &self.inner.settings.group
    }

    /// The configured servers.
    pub fn addresses(&self) -> &[String] {
        &self.inner.settings.addresses
    }

    /// Deregisters every instance this registry published and stops keeping
    /// registrations alive (the SDK has no shutdown of its own).
    pub async fn shutdown(&self) {
        keeper::shutdown(&self.inner.commands, self.inner.settings.timeout * 2).await;
    }
}

type Command = keeper::Command<ServiceMetaInfo>;

impl rpc_core::Registry for NacosRegistry {
    async fn register(&self, meta: ServiceMetaInfo) -> Result<Registration, RegistryError> {
        service_name(&meta.service_key())?;
        let node = meta.node_key();
        // Room for opening a lane and registering on it.
        let state_rx = keeper::submit_registration(
            &self.inner.commands,
            meta.clone(),
            self.inner.settings.timeout * 3,
            BACKEND,
        )
        .await?;
        Ok(Registration::new(
            meta,
            state_rx,
            KeeperDeregister {
                key: node,
                commands: self.inner.commands.clone(),
                timeout: self.inner.settings.timeout * 2,
                backend: BACKEND,
            },
        ))
    }
}

impl Discover for NacosRegistry {
    async fn discover(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        self.inner.discovery.query(service_key).await
    }

    /// The group's service names (a Nacos service name is the service key;
    /// other clients' services are listed by their own names).
    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        self.inner.discovery.service_names().await
    }

    async fn watch(&self, service_key: &str) -> Result<Watch, RegistryError> {
        let service = service_name(service_key)?;
        let discovery = self.inner.discovery.clone();
        // Subscribe first, then read: a change in between pokes the watch.
        let pokes = discovery.subscribe(&service).await;
        let guard = SubscriptionGuard {
            discovery: discovery.clone(),
            service: service.clone(),
        };
        // An unreachable server is an error to the caller, not an empty list.
        let list = discovery.query(service_key).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        if tx.send(WatchEvent::Snapshot(list.clone())).await.is_err() {
            return Err(RegistryError::Shutdown);
        }
        let reconnects = discovery.health.borrow().reconnects;
        let follower = Follower {
            reconnects,
            health: discovery.health.clone(),
            discovery,
            key: service_key.to_owned(),
            service,
            emit: crate::support::follow::Emitter::new(tx),
            pokes,
            current: list.into_iter().map(|m| (m.node_key(), m)).collect(),
            recheck_at: Some(Instant::now() + SETTLE_RECHECK),
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
            settle_until: Instant::now() + SETTLE,
            _guard: guard,
        };
        match AbortOnDrop::spawn(follower.run()) {
            Some(task) => Ok(Watch::with_guard(rx, task)),
            None => Err(failed("watch needs a Tokio runtime")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_round_trip_every_field() {
        let mut meta = ServiceMetaInfo::new("S", "2.1-beta", "10.0.0.1", 65_000);
        meta.service_group = "blue/green".into();
        meta.weight = 7;
        meta.metadata.insert("note".into(), "ünïcödé, \"q\"".into());
        meta.metadata.insert("empty".into(), String::new());
        let instance = to_instance(&meta);
        assert_eq!(instance.port, 65_000);
        assert!((instance.weight - 7.0).abs() < f64::EPSILON);
        assert_eq!(instance.metadata[VERSION_KEY], "2.1-beta");
        assert_eq!(from_instance("S:2.1-beta", &instance), Some(meta));
        // Another service's record is not taken for this one.
        assert_eq!(from_instance("S:3.0", &instance), None);
    }

    #[test]
    fn console_weights_are_read_back() {
        let meta = ServiceMetaInfo::new("S", "1.0", "h", 1);
        let mut instance = to_instance(&meta);
        instance.weight = 2.6;
        assert_eq!(from_instance("S:1.0", &instance).map(|m| m.weight), Some(3));
        instance.weight = f64::NAN;
        assert_eq!(
            from_instance("S:1.0", &instance).map(|m| m.weight),
            Some(rpc_core::meta::DEFAULT_WEIGHT)
        );
    }

    #[test]
    fn foreign_instances_are_discovered() {
        let mut instance = ServiceInstance {
            ip: "10.0.0.2".into(),
            port: 8080,
            weight: 3.0,
            ..ServiceInstance::default()
        };
        instance.metadata.insert("zone".into(), "a".into());
        let meta = from_instance("Java.Service:1.2", &instance).unwrap();
        assert_eq!(meta.service_name, "Java.Service");
        assert_eq!(meta.service_version, "1.2");
        assert_eq!(meta.address(), "10.0.0.2:8080");
        assert_eq!(meta.weight, 3);
        assert_eq!(meta.metadata["zone"], "a");
        instance.port = -1;
        assert_eq!(from_instance("Java.Service:1.2", &instance), None);
    }

    #[test]
    fn service_names_refuse_the_group_separator() {
        assert_eq!(service_name("UserService:1.0").unwrap(), "UserService:1.0");
        assert!(service_name("a@@b:1.0").is_err());
        assert!(service_name("").is_err());
    }

    #[test]
    fn settings_take_defaults_and_strip_schemes() {
        let config = RegistryConfig {
            kind: rpc_core::RegistryKind::Nacos,
            address: rpc_core::config::Addresses(vec![
                "http://10.0.0.1:8848/nacos".into(),
                "10.0.0.2:8848".into(),
            ]),
            ..RegistryConfig::default()
        };
        let s = Settings::from_config(&config).unwrap();
        assert_eq!(s.addresses, vec!["10.0.0.1:8848", "10.0.0.2:8848"]);
        assert_eq!(s.namespace, DEFAULT_NAMESPACE);
        assert_eq!(s.group, DEFAULT_GROUP);
        let empty = RegistryConfig {
            address: rpc_core::config::Addresses(Vec::new()),
            ..config.clone()
        };
        assert!(Settings::from_config(&empty).is_err());
        let tls = RegistryConfig {
            tls: Some(rpc_core::config::TlsConfig::default()),
            ..config
        };
        assert!(Settings::from_config(&tls).is_err());
    }
}
