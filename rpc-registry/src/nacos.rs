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
//! instance left); the guard is here instead: an empty list replaces a
//! non-empty one only when the server answers the direct query, and not
//! within [`EMPTY_GRACE`] after the connection came back from a break (a
//! restarted server is empty until its providers have re-registered). While
//! the connection is down the watch reports `Connected(false)` and keeps
//! the list; when it is back it subscribes again at once (the SDK's own
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
/// After the connection comes back from a break, an empty list does not
/// replace a non-empty one before this long: a restarted server is empty
/// until its providers have reconnected and registered again.
pub const EMPTY_GRACE: Duration = Duration::from_secs(10);
const CLUSTER: &str = "DEFAULT";
const APP_NAME: &str = "rpc";
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Shorter than the SDK's shortest reconnect pause (2 s), so a probe sent
/// during a break always times out and the break is seen.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often a watch holding its list against an empty one, or settling,
/// reads again.
const HOLD_RECHECK: Duration = Duration::from_secs(1);
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

fn unavailable(message: impl Into<String>, e: impl Into<rpc_core::BoxError>) -> RegistryError {
    RegistryError::unavailable(BACKEND, message, e)
}

/// A `[registry]` setting this backend cannot use: `registry.{key}`.
fn invalid(key: &str, message: impl Into<String>) -> RegistryError {
    RegistryError::invalid_config(BACKEND, key, message)
}

fn failed(message: impl Into<String>) -> RegistryError {
    RegistryError::unavailable_because(BACKEND, message)
}

fn timed_out(what: &str, t: Duration) -> RegistryError {
    RegistryError::timed_out(BACKEND, what, t)
}

/// The Nacos service name of a service key: the key itself (`Name:version`).
/// Nacos reserves `@@` (it separates group and service), so a key holding it
/// is refused.
pub fn service_name(service_key: &str) -> Result<String, RegistryError> {
    if service_key.is_empty() || service_key.contains("@@") {
        return Err(failed(format!(
            "service key `{service_key}` cannot be a Nacos service name (empty or contains `@@`)"
        )));
    }
    Ok(service_key.to_owned())
}

/// The Nacos instance published for `meta` (ephemeral, cluster `DEFAULT`).
pub fn to_instance(meta: &ServiceMetaInfo) -> ServiceInstance {
    let mut metadata = HashMap::new();
    metadata.insert(META_KEY.to_owned(), meta.to_json());
    metadata.insert(VERSION_KEY.to_owned(), meta.service_version.clone());
    ServiceInstance {
        instance_id: None,
        ip: meta.service_host.clone(),
        port: i32::from(meta.service_port),
        weight: f64::from(meta.weight),
        healthy: true,
        enabled: true,
        ephemeral: true,
        cluster_name: Some(CLUSTER.to_owned()),
        service_name: None,
        metadata,
    }
}

/// Nacos weights are `f64` (the console edits them): rounded, clamped.
fn weight_from(nacos: f64, fallback: u32) -> u32 {
    if nacos.is_finite() && nacos >= 0.0 {
        // In range after the clamp, so the cast cannot truncate.
        nacos.round().min(f64::from(u32::MAX)) as u32
    } else {
        fallback
    }
}

/// Reads an instance of `service_key` back. `None` for a record that is not
/// an instance of that key (logged).
pub fn from_instance(service_key: &str, instance: &ServiceInstance) -> Option<ServiceMetaInfo> {
    if let Some(json) = instance.metadata.get(META_KEY) {
        return match ServiceMetaInfo::from_json(json.as_bytes()) {
            Ok(mut meta) if meta.service_key() == service_key => {
                meta.weight = weight_from(instance.weight, meta.weight);
                Some(meta)
            }
            Ok(meta) => {
                warn!(service = service_key, found = %meta.service_key(), "skipping an instance record of another service");
                None
            }
            Err(e) => {
                warn!(service = service_key, instance = %instance.ip_and_port(), error = %e, "skipping a malformed instance record");
                None
            }
        };
    }
    // Registered by another Nacos client: build the record from the instance.
    let key = rpc_core::ServiceKey::parse(service_key);
    let (name, version) = (key.name(), key.version());
    let Ok(port) = u16::try_from(instance.port) else {
        warn!(
            service = service_key,
            port = instance.port,
            "skipping an instance with an invalid port"
        );
        return None;
    };
    let mut meta = ServiceMetaInfo::new(name, version, instance.ip.clone(), port);
    meta.weight = weight_from(instance.weight, meta.weight);
    meta.metadata = instance
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(meta)
}

/// How to reach the server; shared by every lane.
struct Settings {
    addresses: Vec<String>,
    namespace: String,
    group: String,
    username: Option<String>,
    password: Option<String>,
    timeout: Duration,
    /// How often the keeper checks that the server lists its instances as
    /// registered: TTL / 3, at most [`RECONCILE_INTERVAL`].
    reconcile: Duration,
    cache_dir: PathBuf,
}

impl Settings {
    fn from_config(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let addresses: Vec<String> = config
            .address
            .as_slice()
            .iter()
            .map(|a| {
                let a = a.trim();
                let a = a
                    .strip_prefix("http://")
                    .or_else(|| a.strip_prefix("https://"))
                    .unwrap_or(a);
                a.trim_end_matches('/')
                    .trim_end_matches("/nacos")
                    .to_owned()
            })
            .filter(|a| !a.is_empty())
            .collect();
        if addresses.is_empty() {
            return Err(invalid(
                "address",
                "lists no server (e.g. \"127.0.0.1:8848\")",
            ));
        }
        if config.tls.is_some() {
            return Err(invalid("tls", "not supported by the nacos backend"));
        }
        let non_empty = |s: &Option<String>| {
            s.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Ok(Self {
            addresses,
            namespace: non_empty(&config.namespace).unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            group: non_empty(&config.group).unwrap_or_else(|| DEFAULT_GROUP.to_owned()),
            username: non_empty(&config.username),
            password: config.password.clone(),
            timeout: config.timeout().max(Duration::from_millis(100)),
            reconcile: (config.ttl() / 3).clamp(Duration::from_millis(500), RECONCILE_INTERVAL),
            // The SDK always writes its naming cache to disk (never read back
            // here: `naming_load_cache_at_start` stays off); keep it out of $HOME.
            cache_dir: std::env::temp_dir().join("rpc-nacos-cache"),
        })
    }

    /// One SDK client (one gRPC connection), configured from `[registry]`
    /// only: `env_first(false)` keeps NACOS_CLIENT_* variables out of it.
    async fn connect(&self) -> Result<NamingService, RegistryError> {
        let mut props = ClientProps::new()
            .server_addr(self.addresses.join(","))
            .namespace(self.namespace.clone())
            .app_name(APP_NAME)
            .naming_push_empty_protection(false)
            .naming_load_cache_at_start(false)
            .cache_dir(self.cache_dir.clone())
            .env_first(false);
        if self.addresses.len() > 1 {
            // The SDK tries ONE server (picked at random) when it starts and
            // gives up if that one is down; with a cluster, let it go round
            // the list (its only knob for this, deprecated without a
            // replacement).
            #[allow(deprecated)]
            {
                props = props.max_retries(u32::try_from(self.addresses.len()).unwrap_or(u32::MAX));
            }
        }
        let auth = self.username.is_some();
        if let Some(user) = &self.username {
            props = props
                .auth_username(user.clone())
                .auth_password(self.password.clone().unwrap_or_default());
        }
        let mut builder = NamingServiceBuilder::new(props);
        if auth {
            builder = builder.enable_auth_plugin_http();
        }
        let t = self.timeout;
        timeout(t, builder.build())
            .await
            .map_err(|_| timed_out("connecting", t))?
            .map_err(|e| unavailable(format!("cannot connect to {}", self.addresses.join(",")), e))
    }

    fn probe_timeout(&self) -> Duration {
        self.timeout.min(PROBE_TIMEOUT)
    }
}

/// What a lane's probe last saw.
#[derive(Clone, Copy, Debug)]
struct Health {
    up: bool,
    /// How many times the connection came back after a break.
    reconnects: u64,
    /// When `up` last changed.
    since: Instant,
}

/// Probes one connection until every receiver is gone.
async fn probe(naming: NamingService, group: String, t: Duration, tx: watch::Sender<Health>) {
    loop {
        let r = timeout(t, naming.get_service_list(1, 1, Some(group.clone()))).await;
        let up = matches!(r, Ok(Ok(_)));
        if !up {
            match r {
                Ok(Err(e)) => debug!(error = %e, "nacos probe failed"),
                _ => debug!(timeout = ?t, "nacos probe timed out"),
            }
        }
        tx.send_if_modified(|h| {
            if h.up == up {
                return false;
            }
            h.up = up;
            h.since = Instant::now();
            if up {
                h.reconnects += 1;
                info!(reconnects = h.reconnects, "nacos connection is back");
            } else {
                warn!("nacos connection lost");
            }
            true
        });
        tokio::select! {
            _ = sleep(PROBE_INTERVAL) => {}
            _ = tx.closed() => return,
        }
    }
}

/// A connection plus its probe.
struct Lane {
    naming: NamingService,
    health: watch::Receiver<Health>,
    probe: Arc<AbortOnDrop>,
}

impl Lane {
    fn start(naming: NamingService, settings: &Settings) -> Result<Self, RegistryError> {
        let (tx, rx) = watch::channel(Health {
            up: true,
            reconnects: 0,
            since: Instant::now(),
        });
        let task = AbortOnDrop::spawn(probe(
            naming.clone(),
            settings.group.clone(),
            settings.probe_timeout(),
            tx,
        ))
        .ok_or_else(|| failed("the nacos backend needs a Tokio runtime"))?;
        Ok(Self {
            naming,
            health: rx,
            probe: Arc::new(task),
        })
    }
}

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

/// One published instance.
struct Entry {
    service: String,
    instance: ServiceInstance,
    lane: usize,
    state: watch::Sender<RegistrationState>,
    generation: u64,
    /// The server has (or may have) lost it; re-register when the lane is up.
    lost: bool,
    /// Another record is registered at its address (logged once).
    conflict: bool,
}

/// An instance whose deregistration failed: the SDK still holds it for its
/// redo, so it is deregistered again once its lane answers.
struct Tombstone {
    service: String,
    instance: ServiceInstance,
    lane: usize,
}

struct KeeperLane {
    lane: Lane,
    /// `reconnects` as last handled.
    seen: u64,
    retry_at: Instant,
    backoff: Backoff,
}

impl KeeperLane {
    fn new(lane: Lane) -> Self {
        let seen = lane.health.borrow().reconnects;
        Self {
            lane,
            seen,
            retry_at: Instant::now(),
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        }
    }
}

/// Owns the lanes and the published instances.
struct Keeper {
    settings: Arc<Settings>,
    lanes: Vec<KeeperLane>,
    entries: HashMap<String, Entry>,
    tombstones: Vec<Tombstone>,
}

impl Keeper {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(KEEPER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconcile = tokio::time::interval(self.settings.reconcile);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every handle gone: nothing more to answer.
        let mut open = true;
        // Shut down: everything deregistered, new registrations refused.
        let mut shut = false;
        loop {
            if !open && self.tombstones.is_empty() {
                return;
            }
            tokio::select! {
                cmd = commands.recv(), if open => match cmd {
                    Some(Command::Register { done, .. }) if shut => {
                        let _ = done.send(Err(RegistryError::Shutdown));
                    }
                    Some(Command::Register { request: meta, state, done }) => {
                        let node = meta.node_key();
                        let r = self.register(meta, state).await;
                        if let Err(Ok(())) = done.send(r) {
                            // The caller stopped waiting: no handle owns it.
                            let _ = self.deregister(&node).await;
                        }
                    }
                    Some(Command::Deregister { key: node, done }) => {
                        let r = self.deregister(&node).await;
                        if let Some(done) = done {
                            let _ = done.send(r);
                        }
                    }
                    Some(Command::Shutdown { done }) => {
                        if !shut {
                            self.deregister_all().await;
                            shut = true;
                        }
                        let _ = done.send(());
                    }
                    None => {
                        if !shut {
                            self.deregister_all().await;
                            shut = true;
                        }
                        open = false;
                        if !self.tombstones.is_empty() {
                            // The SDK would register them again after
                            // reconnecting (its redo): stay until they are
                            // deregistered for good.
                            warn!(left = self.tombstones.len(), "nacos registry dropped with instances it could not deregister; retrying until the server answers");
                        }
                    }
                },
                _ = tick.tick() => self.check_lanes().await,
                _ = reconcile.tick(), if !shut => self.reconcile().await,
            }
        }
    }

    fn group(&self) -> Option<String> {
        Some(self.settings.group.clone())
    }

    /// A lane with no instance of `service` (other than `node`), opening a
    /// new connection if every lane has one.
    async fn lane_for(&mut self, service: &str, node: &str) -> Result<usize, RegistryError> {
        if let Some(entry) = self.entries.get(node) {
            return Ok(entry.lane);
        }
        let busy: Vec<usize> = self
            .entries
            .values()
            .filter(|e| e.service == service)
            .map(|e| e.lane)
            .collect();
        if let Some(free) = (0..self.lanes.len()).find(|i| !busy.contains(i)) {
            return Ok(free);
        }
        let naming = self.settings.connect().await?;
        self.lanes
            .push(KeeperLane::new(Lane::start(naming, &self.settings)?));
        debug!(lanes = self.lanes.len(), service, "nacos lane opened");
        Ok(self.lanes.len() - 1)
    }

    async fn register_on(
        &self,
        lane: usize,
        service: &str,
        instance: &ServiceInstance,
    ) -> Result<(), RegistryError> {
        let Some(l) = self.lanes.get(lane) else {
            return Err(failed("no such lane"));
        };
        let t = self.settings.timeout;
        timeout(
            t,
            l.lane
                .naming
                .register_instance(service.to_owned(), self.group(), instance.clone()),
        )
        .await
        .map_err(|_| timed_out("register", t))?
        .map_err(|e| unavailable(format!("register {service} {}", instance.ip_and_port()), e))
    }

    async fn deregister_on(
        &self,
        lane: usize,
        service: &str,
        instance: &ServiceInstance,
    ) -> Result<(), RegistryError> {
        let Some(l) = self.lanes.get(lane) else {
            return Ok(());
        };
        let t = self.settings.timeout;
        timeout(
            t,
            l.lane
                .naming
                .deregister_instance(service.to_owned(), self.group(), instance.clone()),
        )
        .await
        .map_err(|_| timed_out("deregister", t))?
        .map_err(|e| {
            unavailable(
                format!("deregister {service} {}", instance.ip_and_port()),
                e,
            )
        })
    }

    async fn register(
        &mut self,
        meta: ServiceMetaInfo,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        let service = service_name(&meta.service_key())?;
        let node = meta.node_key();
        let instance = to_instance(&meta);
        let lane = self.lane_for(&service, &node).await?;
        // A pending deregistration of the same instance must not undo this one.
        self.tombstones.retain(|t| {
            !(t.service == service && t.instance.ip_and_port() == instance.ip_and_port())
        });
        if let Err(e) = self.register_on(lane, &service, &instance).await {
            // The SDK keeps a failed registration for its redo: make sure it
            // does not come alive later with no handle to remove it.
            if !self.entries.contains_key(&node) {
                self.tombstones.push(Tombstone {
                    service,
                    instance,
                    lane,
                });
            }
            return Err(e);
        }
        state.send_replace(RegistrationState::Registered { generation: 0 });
        debug!(%node, lane, "nacos instance registered");
        if let Some(old) = self.entries.insert(
            node,
            Entry {
                service,
                instance,
                lane,
                state,
                generation: 0,
                lost: false,
                conflict: false,
            },
        ) {
            // Registered again under the same node key: the new handle owns it.
            old.state.send_replace(RegistrationState::Deregistered);
        }
        Ok(())
    }

    async fn deregister(&mut self, node: &str) -> Result<(), RegistryError> {
        let Some(entry) = self.entries.remove(node) else {
            return Ok(());
        };
        entry.state.send_replace(RegistrationState::Deregistered);
        match self
            .deregister_on(entry.lane, &entry.service, &entry.instance)
            .await
        {
            Ok(()) => {
                debug!(%node, "nacos instance deregistered");
                Ok(())
            }
            Err(e) => {
                warn!(%node, error = %e, "nacos deregistration failed; retrying when the server answers");
                self.tombstones.push(Tombstone {
                    service: entry.service,
                    instance: entry.instance,
                    lane: entry.lane,
                });
                Err(e)
            }
        }
    }

    async fn deregister_all(&mut self) {
        let nodes: Vec<String> = self.entries.keys().cloned().collect();
        for node in nodes {
            let _ = self.deregister(&node).await;
        }
        if self.tombstones.is_empty() {
            info!("nacos registry shut down; its instances are deregistered");
        } else {
            warn!(
                left = self.tombstones.len(),
                "nacos registry shut down; some instances could not be deregistered yet (retrying)"
            );
        }
    }

    fn mark_lost(&mut self, lane: usize, why: &str) {
        for (node, e) in self.entries.iter_mut().filter(|(_, e)| e.lane == lane) {
            if !e.lost {
                e.lost = true;
                e.state.send_replace(RegistrationState::Reregistering);
                warn!(%node, reason = why, "nacos registration lost; re-registering");
            }
        }
    }

    /// Follows each lane's health: a break loses its instances; a lane that
    /// answers gets its lost instances registered again.
    async fn check_lanes(&mut self) {
        for i in 0..self.lanes.len() {
            let h = *self.lanes[i].lane.health.borrow();
            let reconnected = h.reconnects != self.lanes[i].seen;
            self.lanes[i].seen = h.reconnects;
            if !h.up {
                self.mark_lost(i, "the connection broke");
                continue;
            }
            if reconnected {
                self.mark_lost(i, "the connection was re-established");
            }
            if Instant::now() < self.lanes[i].retry_at {
                continue;
            }
            if self.restore_lane(i).await {
                self.lanes[i].backoff.reset();
            } else {
                let lane = &mut self.lanes[i];
                lane.retry_at = Instant::now() + lane.backoff.next_pause();
            }
        }
    }

    /// Registers the lane's lost instances again and retries its pending
    /// deregistrations. `false` if something failed.
    async fn restore_lane(&mut self, lane: usize) -> bool {
        let mut ok = true;
        let tombstones: Vec<Tombstone> = {
            let (mine, others) = std::mem::take(&mut self.tombstones)
                .into_iter()
                .partition(|t| t.lane == lane);
            self.tombstones = others;
            mine
        };
        for t in tombstones {
            match self.deregister_on(lane, &t.service, &t.instance).await {
                Ok(()) => {
                    debug!(service = %t.service, instance = %t.instance.ip_and_port(), "nacos pending deregistration done")
                }
                Err(_) => {
                    ok = false;
                    self.tombstones.push(t);
                }
            }
        }
        let lost: Vec<(String, String, ServiceInstance)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.lane == lane && e.lost)
            .map(|(n, e)| (n.clone(), e.service.clone(), e.instance.clone()))
            .collect();
        for (node, service, instance) in lost {
            match self.register_on(lane, &service, &instance).await {
                Ok(()) => {
                    if let Some(e) = self.entries.get_mut(&node) {
                        e.lost = false;
                        e.generation += 1;
                        e.state.send_replace(RegistrationState::Registered {
                            generation: e.generation,
                        });
                        info!(%node, generation = e.generation, "nacos registration restored");
                    }
                }
                Err(e) => {
                    debug!(%node, error = %e, "nacos re-registration failed; retrying");
                    ok = false;
                }
            }
        }
        ok
    }

    /// Checks that every instance is still listed by the server; one that is
    /// not is marked lost (and registered again by the next check).
    async fn reconcile(&mut self) {
        let mut wanted: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
        for (node, e) in &self.entries {
            if !e.lost {
                wanted
                    .entry((e.lane, e.service.clone()))
                    .or_default()
                    .push(node.clone());
            }
        }
        let t = self.settings.timeout;
        for ((lane, service), nodes) in wanted {
            let Some(l) = self.lanes.get(lane) else {
                continue;
            };
            if !l.lane.health.borrow().up {
                continue;
            }
            let listed = match timeout(
                t,
                l.lane
                    .naming
                    .get_all_instances(service.clone(), self.group(), Vec::new(), false),
            )
            .await
            {
                Ok(Ok(list)) => list,
                _ => continue, // the probe reports broken connections
            };
            for node in nodes {
                let Some(e) = self.entries.get_mut(&node) else {
                    continue;
                };
                let at_address = listed
                    .iter()
                    .find(|i| i.ip == e.instance.ip && i.port == e.instance.port);
                // What consumers read is the record (issue 12, faults 3 and
                // 4). The weight and the enabled flag are left alone: the
                // Nacos console edits them on purpose.
                let ours = e.instance.metadata.get(META_KEY);
                let why = match at_address {
                    None => Some("nacos no longer lists this instance"),
                    Some(i) => match i.metadata.get(META_KEY) {
                        held if held == ours => {
                            e.conflict = false;
                            None
                        }
                        Some(_) => {
                            // Another record at this address: a second live
                            // writer. Registering ours again each check would
                            // only make the two take turns.
                            if !e.conflict {
                                warn!(%node, "nacos registration conflict: another process registered the same address with another record; leaving it");
                                e.conflict = true;
                            }
                            None
                        }
                        None => Some("nacos holds this instance without its record (it drifted)"),
                    },
                };
                if let Some(why) = why
                    && !e.lost
                {
                    e.lost = true;
                    e.state.send_replace(RegistrationState::Reregistering);
                    warn!(%node, reason = why, "re-registering");
                }
            }
        }
    }
}

/// Discovery state shared by every watch of a registry.
struct Discovery {
    naming: NamingService,
    health: watch::Receiver<Health>,
    /// Lane 0's probe, shared with the keeper: watches outlive neither.
    _probe: Arc<AbortOnDrop>,
    group: String,
    timeout: Duration,
    /// One SDK subscription per service, shared by its watches.
    hub: Mutex<HashMap<String, HubEntry>>,
}

struct HubEntry {
    pokes: watch::Sender<u64>,
    listener: Arc<dyn NamingEventListener>,
    watchers: usize,
}

/// The SDK's listener: pokes the watches of its service. The event's list is
/// not used (events are delivered from spawned tasks, so two can arrive out
/// of order); a poked watch reads the service itself.
struct Poke(watch::Sender<u64>);

impl NamingEventListener for Poke {
    fn event(&self, _event: Arc<NamingChangeEvent>) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Discovery {
    /// The healthy, enabled instances of `service_key`, straight from the
    /// server, sorted by node key.
    async fn query(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        let service = service_name(service_key)?;
        let t = self.timeout;
        let instances = timeout(
            t,
            self.naming.get_all_instances(
                service.clone(),
                Some(self.group.clone()),
                Vec::new(),
                false,
            ),
        )
        .await
        .map_err(|_| timed_out("query", t))?
        .map_err(|e| {
            let chain = rpc_core::error::report(&e);
            if chain.contains("message length too large") {
                // nacos-sdk 0.8 builds its gRPC clients with tonic's 4 MiB
                // receive limit and offers no setting; Nacos 2.x has no
                // paged instance query (issue 12, fault 6).
                unavailable(
                    format!("query {service}: the instance list is larger than the Nacos client's gRPC receive limit (4 MiB, not configurable in nacos-sdk 0.8); retrying will not help"),
                    e,
                )
            } else {
                unavailable(format!("query {service}"), e)
            }
        })?;
        let mut list: Vec<ServiceMetaInfo> = instances
            .iter()
            .filter(|i| i.healthy && i.enabled)
            .filter_map(|i| from_instance(service_key, i))
            .collect();
        list.sort_by_key(ServiceMetaInfo::node_key);
        list.dedup_by(|a, b| a.node_key() == b.node_key());
        Ok(list)
    }

    async fn subscribe(&self, service: &str) -> watch::Receiver<u64> {
        let mut hub = self.hub.lock().await;
        if let Some(e) = hub.get_mut(service) {
            e.watchers += 1;
            return e.pokes.subscribe();
        }
        let (tx, rx) = watch::channel(0u64);
        let listener: Arc<dyn NamingEventListener> = Arc::new(Poke(tx.clone()));
        // The SDK keeps (and re-sends after reconnecting) the subscription
        // even when this request fails or times out.
        match timeout(
            self.timeout,
            self.naming.subscribe(
                service.to_owned(),
                Some(self.group.clone()),
                Vec::new(),
                listener.clone(),
            ),
        )
        .await
        {
            Ok(Ok(())) => debug!(service, "nacos subscription opened"),
            Ok(Err(e)) => debug!(service, error = %e, "nacos subscribe failed; the SDK retries"),
            Err(_) => debug!(service, "nacos subscribe timed out; the SDK retries"),
        }
        hub.insert(
            service.to_owned(),
            HubEntry {
                pokes: tx,
                listener,
                watchers: 1,
            },
        );
        rx
    }

    /// Sends the subscription of `service` again (after a reconnect).
    async fn resubscribe(&self, service: &str) {
        let hub = self.hub.lock().await;
        let Some(listener) = hub.get(service).map(|e| e.listener.clone()) else {
            return;
        };
        if timeout(
            self.timeout,
            self.naming.subscribe(
                service.to_owned(),
                Some(self.group.clone()),
                Vec::new(),
                listener,
            ),
        )
        .await
        .is_err()
        {
            debug!(service, "nacos re-subscribe timed out; the SDK retries");
        }
    }

    async fn unsubscribe(&self, service: &str) {
        let mut hub = self.hub.lock().await;
        let Some(e) = hub.get_mut(service) else {
            return;
        };
        e.watchers = e.watchers.saturating_sub(1);
        if e.watchers > 0 {
            return;
        }
        let Some(e) = hub.remove(service) else {
            return;
        };
        match timeout(
            self.timeout,
            self.naming.unsubscribe(
                service.to_owned(),
                Some(self.group.clone()),
                Vec::new(),
                e.listener,
            ),
        )
        .await
        {
            Ok(Ok(())) => debug!(service, "nacos subscription closed"),
            _ => debug!(service, "nacos unsubscribe failed"),
        }
    }
}

/// Releases a watch's share of its subscription when the watch task ends.
struct SubscriptionGuard {
    discovery: Arc<Discovery>,
    service: String,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let discovery = self.discovery.clone();
            let service = std::mem::take(&mut self.service);
            rt.spawn(async move { discovery.unsubscribe(&service).await });
        }
    }
}

impl Discover for NacosRegistry {
    async fn discover(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        self.inner.discovery.query(service_key).await
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
        let follower = Follower {
            health: discovery.health.clone(),
            discovery,
            key: service_key.to_owned(),
            service,
            tx,
            pokes,
            current: list.into_iter().map(|m| (m.node_key(), m)).collect(),
            connected: true,
            recheck_at: Some(Instant::now() + HOLD_RECHECK),
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

/// Follows one service for one watch.
struct Follower {
    discovery: Arc<Discovery>,
    health: watch::Receiver<Health>,
    key: String,
    /// The Nacos service name.
    service: String,
    tx: mpsc::Sender<WatchEvent>,
    pokes: watch::Receiver<u64>,
    /// What the consumer holds, by node key.
    current: BTreeMap<String, ServiceMetaInfo>,
    connected: bool,
    /// When to read the service again (after a failure or a held empty list).
    recheck_at: Option<Instant>,
    backoff: Backoff,
    /// Until when to read the service every second whatever happens: after
    /// (re)subscribing, until the server surely pushes to this client again.
    settle_until: Instant,
    _guard: SubscriptionGuard,
}

impl Follower {
    async fn run(mut self) {
        self.pokes.mark_unchanged();
        self.health.mark_unchanged();
        loop {
            let recheck_at = self.recheck_at;
            let open = tokio::select! {
                _ = self.tx.closed() => return,
                r = self.pokes.changed() => match r {
                    Ok(()) => self.refresh().await,
                    Err(_) => return,
                },
                r = self.health.changed() => match r {
                    Ok(()) => {
                        let up = self.health.borrow_and_update().up;
                        if up {
                            // A new connection has no subscription on the
                            // server until the SDK's redo (up to 3 s): send
                            // it now, and read every second meanwhile.
                            self.discovery.resubscribe(&self.service).await;
                            self.settle_until = Instant::now() + SETTLE;
                            self.refresh().await
                        } else {
                            self.set_connected(false).await
                        }
                    }
                    Err(_) => return,
                },
                _ = sleep_until_opt(recheck_at), if recheck_at.is_some() => {
                    self.recheck_at = None;
                    self.refresh().await
                }
            };
            if !open {
                return;
            }
        }
    }

    async fn set_connected(&mut self, up: bool) -> bool {
        if self.connected == up {
            return true;
        }
        self.connected = up;
        if !up {
            debug!(service = %self.key, "nacos watch lost its connection; keeping the list");
        }
        self.tx.send(WatchEvent::Connected(up)).await.is_ok()
    }

    fn retry_later(&mut self) {
        self.recheck_at = Some(Instant::now() + self.backoff.next_pause());
    }

    /// Reads the service and delivers the difference. `false`: consumer gone.
    async fn refresh(&mut self) -> bool {
        let open = self.read_and_deliver().await;
        let now = Instant::now();
        if self.settle_until > now {
            let soon = now + HOLD_RECHECK;
            self.recheck_at = Some(self.recheck_at.map_or(soon, |at| at.min(soon)));
        }
        open
    }

    async fn read_and_deliver(&mut self) -> bool {
        let list = match self.discovery.query(&self.key).await {
            Ok(list) => list,
            Err(e) => {
                debug!(service = %self.key, error = %e, "nacos watch cannot read the service");
                self.retry_later();
                return self.set_connected(false).await;
            }
        };
        if list.is_empty() && !self.current.is_empty() {
            // The empty-push guard (module docs).
            let h = *self.health.borrow();
            if !h.up {
                self.retry_later();
                return self.set_connected(false).await;
            }
            if h.reconnects > 0 && h.since.elapsed() < EMPTY_GRACE {
                let until = h.since + EMPTY_GRACE;
                info!(service = %self.key, held = self.current.len(), left = ?until.saturating_duration_since(Instant::now()), "nacos lists no instance right after reconnecting; keeping the list for now");
                // Look again soon: a provider registering again is the
                // common end of this, and its push waits for the SDK to
                // subscribe again (up to 3 s after reconnecting).
                self.recheck_at = Some(until.min(Instant::now() + HOLD_RECHECK));
                return true;
            }
        }
        self.backoff.reset();
        self.recheck_at = None;
        let next = diff::nodes(list);
        if !self.connected {
            // Back from a break: resynchronise with a snapshot.
            self.current = next;
            let snapshot: Vec<ServiceMetaInfo> = self.current.values().cloned().collect();
            if self.tx.send(WatchEvent::Snapshot(snapshot)).await.is_err() {
                return false;
            }
            return self.set_connected(true).await;
        }
        let events = diff::diff(&self.current, &next);
        self.current = next;
        for event in events {
            if self.tx.send(event).await.is_err() {
                return false;
            }
        }
        true
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
