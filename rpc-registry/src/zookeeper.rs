//! [`ZookeeperRegistry`]: Apache ZooKeeper as the registry (cargo feature
//! `zookeeper`, ZooKeeper 3.6 or newer).
//!
//! # Node layout
//!
//! `/rpc/{name:version}` is a persistent node (created on demand, kept when
//! empty); each instance is an EPHEMERAL child `/rpc/{name:version}/{host:port}`
//! holding its [`ServiceMetaInfo`] as JSON, owned by this registry's session.
//! With `registry.namespace = "team-a"` the root becomes `/team-a/rpc`. A
//! chroot in the address (`127.0.0.1:2181/apps`, or
//! `a:2181,b:2181,c:2181/apps`) puts all of it below `/apps`; the chroot node
//! is created if missing.
//!
//! # Sessions
//!
//! One ZooKeeper session per registry, requested with a timeout of
//! `registry.ttl_secs` seconds. The server clamps it into
//! `[minSessionTimeout, maxSessionTimeout]`, by default `[2, 20] × tickTime`
//! (4 s to 40 s with the usual `tickTime=2000`); the negotiated value is logged
//! and returned by [`ZookeeperRegistry::session_timeout`]. It is how long a
//! crashed provider stays listed.
//!
//! A lost connection is not a lost session: the client reconnects (to any
//! listed server) within the session timeout, the server keeps the ephemeral
//! nodes and the watches, and nothing is registered again. Only when the
//! session ends — expired on the server, closed from elsewhere, or the client
//! could not reach any server for longer than the timeout — does a keeper
//! task open a new session, create every ephemeral node of this registry again
//! (deleting a node still owned by an older, dying session: otherwise the
//! server would delete it when that session finally expires, and the instance
//! would vanish — the classic stale-node failure), bump each registration's
//! generation, and log it, retrying with backoff until it succeeds.
//! [`ZookeeperRegistry::shutdown`] deletes the nodes and ends the session.
//!
//! With `username` and `password`, the session authenticates with the
//! `digest` scheme and creates nodes with the `CREATOR_ALL` ACL (only the same
//! credentials read or change them), as Dubbo and Curator do; without them,
//! nodes are open (`OPEN_ACL_UNSAFE`).
//!
//! # Discovering
//!
//! A watch arms one persistent recursive watch on `/rpc/{name:version}`
//! first, then reads the children and their data (one multi-read), so no
//! change falls between the read and the watch. Node created or data changed
//! becomes an upsert (after reading the node), node deleted a remove. A
//! disconnect is reported as `Connected(false)`. On reconnection the follower
//! arms a new persistent watch and reads a fresh snapshot: events that
//! happened in between are never replayed (ZOOKEEPER-4698), and
//! zookeeper-client 0.11.2 does not even carry persistent watches over a
//! reconnection (its `SetWatches` request leaves them out), so the old watch
//! would stay silent. After a session expiry it waits for the keeper's new
//! session, arms the watch again and reads a snapshot.

use crate::support::sleep_until_opt;
use rpc_core::backoff::Backoff;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rpc_core::discover::WATCH_CHANNEL_CAPACITY;
use rpc_core::{
    Discover, Registration, RegistrationState, RegistryConfig, RegistryError, ServiceMetaInfo,
    Watch, WatchEvent,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};
use zookeeper_client::{
    Acls, AddWatchMode, Client, CreateMode, CreateOptions, EventType, MultiReadResult,
    PersistentWatcher, SessionInfo, SessionState, StateWatcher,
};

use crate::support::keeper::{self, KeeperDeregister};
use crate::support::task::AbortOnDrop;

const BACKEND: &str = "zookeeper";
/// Root of every node this backend writes, without a namespace.
pub const ROOT: &str = "/rpc";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const COMMAND_CAPACITY: usize = 64;
/// Nodes read per multi-read request (keeps responses far below the
/// server's 1 MiB `jute.maxbuffer`).
const MULTI_READ_BATCH: usize = 256;

type ZkError = zookeeper_client::Error;

fn unavailable(message: impl Into<String>, e: ZkError) -> RegistryError {
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

/// Runs a ZooKeeper call with a deadline.
async fn bounded<T>(
    t: Duration,
    what: String,
    fut: impl Future<Output = Result<T, ZkError>>,
) -> Result<T, RegistryError> {
    match timeout(t, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(what, e)),
        Err(_) => Err(timed_out(&what, t)),
    }
}

/// The node root for a namespace: `/rpc` or `/{namespace}/rpc`.
pub fn root_for(namespace: Option<&str>) -> String {
    match namespace
        .map(|n| n.trim_matches('/'))
        .filter(|n| !n.is_empty())
    {
        Some(ns) => format!("/{ns}{ROOT}"),
        None => ROOT.to_owned(),
    }
}

/// Splits `registry.address` into the host list the client takes and the
/// chroot. Every entry may be `host:port` or `host:port/chroot` (a chroot on
/// several entries must be the same), and may itself list hosts separated by
/// commas.
pub fn parse_address(addresses: &[String]) -> Result<(String, Option<String>), RegistryError> {
    let mut hosts = Vec::new();
    let mut chroot: Option<String> = None;
    for entry in addresses.iter().flat_map(|a| a.split(',')) {
        let entry = entry.trim();
        let entry = entry.strip_prefix("zookeeper://").unwrap_or(entry);
        if entry.is_empty() {
            continue;
        }
        let (host, root) = match entry.split_once('/') {
            Some((host, root)) => (host, root.trim_matches('/')),
            None => (entry, ""),
        };
        if !root.is_empty() {
            let root = format!("/{root}");
            match &chroot {
                Some(c) if *c != root => {
                    return Err(invalid(
                        "address",
                        format!("names two chroots, {c} and {root}"),
                    ));
                }
                _ => chroot = Some(root),
            }
        }
        if host.is_empty() {
            return Err(invalid("address", format!("entry `{entry}` has no host")));
        }
        hosts.push(host.to_owned());
    }
    if hosts.is_empty() {
        return Err(invalid("address", "lists no ZooKeeper server"));
    }
    Ok((hosts.join(","), chroot))
}

/// How to open a session.
#[derive(Clone)]
struct Spec {
    hosts: String,
    chroot: Option<String>,
    session_timeout: Duration,
    timeout: Duration,
    /// `user:password` for the digest scheme.
    auth: Option<String>,
}

impl Spec {
    fn acls(&self) -> Acls<'static> {
        if self.auth.is_some() {
            Acls::creator_all()
        } else {
            Acls::anyone_all()
        }
    }

    fn persistent(&self) -> CreateOptions<'static> {
        CreateMode::Persistent.with_acls(self.acls())
    }

    fn ephemeral(&self) -> CreateOptions<'static> {
        CreateMode::Ephemeral.with_acls(self.acls())
    }

    /// Opens a new session (and creates the chroot if missing).
    async fn open(&self) -> Result<Client, RegistryError> {
        let t = self.timeout;
        // Not `with_fail_eagerly`: during a leader election every server
        // refuses clients for a moment; keep cycling through them until the
        // request timeout instead of failing at the first round.
        let mut connector = Client::connector().with_session_timeout(self.session_timeout);
        if let Some(auth) = &self.auth {
            connector = connector.with_auth("digest", auth.as_bytes());
        }
        let client = bounded(
            t,
            format!("connecting to {}", self.hosts),
            connector.connect(&self.hosts),
        )
        .await?;
        let Some(chroot) = &self.chroot else {
            return Ok(client);
        };
        let exists = bounded(t, format!("stat {chroot}"), client.check_stat(chroot)).await?;
        if exists.is_none() {
            bounded(
                t,
                format!("creating chroot {chroot}"),
                client.mkdir(chroot, &self.persistent()),
            )
            .await?;
        }
        client
            .chroot(chroot.as_str())
            .map_err(|_| invalid("address", format!("invalid chroot `{chroot}`")))
    }
}

/// The current session, as handed to discovery.
#[derive(Clone)]
struct Session {
    client: Client,
    /// Increments with every new session.
    epoch: u64,
}

/// ZooKeeper as a registry. Cheap to clone; clones share one session.
#[derive(Clone)]
pub struct ZookeeperRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    spec: Spec,
    root: String,
    session: watch::Receiver<Option<Session>>,
    commands: mpsc::Sender<Command>,
}

impl fmt::Debug for ZookeeperRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZookeeperRegistry")
            .field("hosts", &self.inner.spec.hosts)
            .field("chroot", &self.inner.spec.chroot)
            .field("root", &self.inner.root)
            .field("session_timeout", &self.session_timeout())
            .finish()
    }
}

type Command = keeper::Command<(String, Vec<u8>)>;

impl ZookeeperRegistry {
    /// Opens a session with the servers in `config.address` (one or an
    /// ensemble, optional chroot), requesting `ttl_secs` as the session
    /// timeout, with `timeout_ms` per request and optional digest
    /// `username`/`password`.
    pub async fn connect(config: &RegistryConfig) -> Result<Self, RegistryError> {
        // Refused rather than ignored: a user who set it would believe the
        // session is encrypted. (zookeeper-client has a `tls` feature; it
        // brings a second rustls crypto provider, not taken on yet.)
        if config.tls.is_some() {
            return Err(invalid(
                "tls",
                "not supported by the zookeeper backend yet; remove [registry.tls] (the connection would not be encrypted)",
            ));
        }
        let (hosts, chroot) = parse_address(config.address.as_slice())?;
        let auth = match (&config.username, &config.password) {
            (Some(user), Some(password)) => Some(format!("{user}:{password}")),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "password",
                    "registry.username and registry.password go together (digest auth)",
                ));
            }
        };
        let spec = Spec {
            hosts,
            chroot,
            session_timeout: config.ttl().max(Duration::from_secs(1)),
            timeout: config.timeout(),
            auth,
        };
        let client = spec.open().await?;
        let negotiated = client.session_timeout();
        if negotiated != spec.session_timeout {
            info!(
                requested = ?spec.session_timeout,
                negotiated = ?negotiated,
                "zookeeper server clamped the session timeout (bounds are 2 and 20 ticks by default)"
            );
        }
        info!(session = %client.session_id(), hosts = %spec.hosts, chroot = ?spec.chroot, timeout = ?negotiated, "zookeeper session opened");
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(failed("the zookeeper registry needs a Tokio runtime"));
        };
        let (session_tx, session_rx) = watch::channel(Some(Session {
            client: client.clone(),
            epoch: 0,
        }));
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let keeper = Keeper {
            spec: spec.clone(),
            states: Some(client.state_watcher()),
            client: Some(client),
            epoch: 0,
            session: session_tx,
            nodes: HashMap::new(),
            watches: FuturesUnordered::new(),
            armed: HashSet::new(),
            conflicts: HashMap::new(),
            generation: 0,
            retry_at: None,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        };
        // The keeper owns the session. It ends when every handle is gone,
        // after deleting the nodes it still holds.
        runtime.spawn(keeper.run(rx));
        Ok(Self {
            inner: Arc::new(Inner {
                spec,
                root: root_for(config.namespace.as_deref()),
                session: session_rx,
                commands: tx,
            }),
        })
    }

    /// The node path of an instance (below the chroot, if any).
    pub fn instance_path(&self, meta: &ServiceMetaInfo) -> String {
        format!("{}/{}", self.inner.root, meta.node_key())
    }

    fn service_path(&self, service_key: &str) -> String {
        format!("{}/{service_key}", self.inner.root)
    }

    /// The negotiated session timeout (the requested one while no session
    /// is open): how long a crashed provider stays listed.
    pub fn session_timeout(&self) -> Duration {
        self.inner
            .session
            .borrow()
            .as_ref()
            .map_or(self.inner.spec.session_timeout, |s| {
                s.client.session_timeout()
            })
    }

    /// The current session's id and password, if one is open: for tools
    /// that inspect ephemeral owners, or to expire the session on purpose
    /// (a second client that attaches to it and closes it).
    pub fn session(&self) -> Option<SessionInfo> {
        self.inner
            .session
            .borrow()
            .as_ref()
            .map(|s| s.client.session().clone())
    }

    /// The configured servers (`host:port,...`) and chroot.
    pub fn hosts(&self) -> (&str, Option<&str>) {
        (&self.inner.spec.hosts, self.inner.spec.chroot.as_deref())
    }

    /// Deletes every node this registry published and ends its session
    /// (once the watches that still use it are dropped). Registrations are
    /// not kept alive any more.
    pub async fn shutdown(&self) {
        keeper::shutdown(&self.inner.commands, self.inner.spec.timeout * 2).await;
    }

    /// The current session, waiting up to the request timeout while the
    /// keeper opens a new one.
    async fn current(&self) -> Result<Session, RegistryError> {
        let mut rx = self.inner.session.clone();
        let t = self.inner.spec.timeout;
        match timeout(t, rx.wait_for(Option::is_some)).await {
            Ok(Ok(s)) => s.clone().ok_or(RegistryError::Shutdown),
            Ok(Err(_)) => Err(RegistryError::Shutdown),
            Err(_) => Err(failed(format!(
                "no zookeeper session (lost, or shut down) after {t:?}"
            ))),
        }
    }
}

/// Reads every instance below `service_path`: the children, then their
/// data in multi-reads. A missing service node is an empty list.
async fn read_service(
    client: &Client,
    service_path: &str,
    t: Duration,
) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
    let children = match timeout(t, client.list_children(service_path)).await {
        Ok(Ok(c)) => c,
        Ok(Err(ZkError::NoNode)) => return Ok(Vec::new()),
        Ok(Err(e)) => return Err(unavailable(format!("list {service_path}"), e)),
        Err(_) => return Err(timed_out(&format!("list {service_path}"), t)),
    };
    let mut list = Vec::with_capacity(children.len());
    for batch in children.chunks(MULTI_READ_BATCH) {
        let mut reader = client.new_multi_reader();
        for child in batch {
            let path = format!("{service_path}/{child}");
            reader
                .add_get_data(&path)
                .map_err(|e| unavailable(format!("read {path}"), e))?;
        }
        let results = bounded(t, format!("read {service_path}/*"), reader.commit()).await?;
        for (child, result) in batch.iter().zip(results) {
            match result {
                MultiReadResult::Data { data, .. } => match ServiceMetaInfo::from_json(&data) {
                    Ok(m) => list.push(m),
                    Err(e) => {
                        warn!(path = %format!("{service_path}/{child}"), error = %e, "skipping malformed instance record");
                    }
                },
                // Deleted between the listing and the read.
                MultiReadResult::Error {
                    err: ZkError::NoNode,
                } => {}
                MultiReadResult::Error { err } => {
                    return Err(unavailable(format!("read {service_path}/{child}"), err));
                }
                other => {
                    debug!(?other, "unexpected multi-read result");
                }
            }
        }
    }
    list.sort_by_key(ServiceMetaInfo::node_key);
    Ok(list)
}

impl rpc_core::Registry for ZookeeperRegistry {
    async fn register(&self, meta: ServiceMetaInfo) -> Result<Registration, RegistryError> {
        if meta.service_key().contains('/') || meta.address().contains('/') {
            return Err(failed(format!(
                "`{}` cannot be a ZooKeeper node: service key and address must not contain '/'",
                meta.node_key()
            )));
        }
        let path = self.instance_path(&meta);
        let t = self.inner.spec.timeout * 2;
        let state_rx = keeper::submit_registration(
            &self.inner.commands,
            (path.clone(), meta.to_json().into_bytes()),
            t,
            BACKEND,
        )
        .await?;
        Ok(Registration::new(
            meta,
            state_rx,
            KeeperDeregister {
                key: path,
                commands: self.inner.commands.clone(),
                timeout: t,
                backend: BACKEND,
            },
        ))
    }
}

/// Owns the session and the ephemeral nodes published through it.
struct Keeper {
    spec: Spec,
    client: Option<Client>,
    states: Option<StateWatcher>,
    epoch: u64,
    session: watch::Sender<Option<Session>>,
    nodes: HashMap<String, (Vec<u8>, watch::Sender<RegistrationState>)>,
    /// One exists-watch per own node: fires when the node is deleted,
    /// changed or created, and the keeper then checks it (`verify`).
    watches: FuturesUnordered<futures_util::future::BoxFuture<'static, (u64, String)>>,
    /// Paths with a watch armed in the current session.
    armed: HashSet<String>,
    /// Own paths held by another live session, with that session: logged
    /// once per session.
    conflicts: HashMap<String, i64>,
    generation: u64,
    /// Set while the session is lost: when to try to open a new one next.
    retry_at: Option<Instant>,
    backoff: Backoff,
}

impl keeper::Keeps<(String, Vec<u8>)> for Keeper {
    async fn keep(
        &mut self,
        (path, data): (String, Vec<u8>),
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        self.register(path, data, state).await
    }

    async fn release(&mut self, key: &str) -> Result<(), RegistryError> {
        self.deregister(key).await
    }

    async fn release_all(&mut self) {
        self.close().await;
    }
}

impl Keeper {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        // A safety net under the watches: every own node is checked each
        // session timeout / 3 as well.
        let mut check =
            tokio::time::interval((self.spec.session_timeout / 3).max(Duration::from_millis(300)));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                cmd = commands.recv() => {
                    if !keeper::serve(&mut self, cmd, &mut commands).await {
                        return;
                    }
                }
                state = next_state(&mut self.states) => self.on_state(state),
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => self.restore().await,
                Some((epoch, path)) = self.watches.next(), if !self.watches.is_empty() => {
                    // A watch of an older session says nothing about the
                    // one armed in this session.
                    if epoch == self.epoch {
                        self.armed.remove(&path);
                    }
                    self.verify(&path).await;
                }
                _ = check.tick(), if retry_at.is_none() => {
                    let paths: Vec<String> = self.nodes.keys().cloned().collect();
                    for path in paths {
                        self.verify(&path).await;
                    }
                }
            }
        }
    }

    /// Compares the node at `path` with what was registered, re-arming its
    /// watch, and repairs it (issue 12, faults 3 and 4): a node deleted by
    /// someone else is created again, a changed one is set back, and a
    /// persistent node put in its place (it would outlive this process) is
    /// replaced by an ephemeral one. A node of another live session (a
    /// second process publishing the same address) is left to it, logged
    /// once as a conflict; the watch then brings this keeper back when it
    /// is gone.
    async fn verify(&mut self, path: &str) {
        if self.retry_at.is_some() {
            return;
        }
        let (Some(client), Some((data, _))) = (self.client.clone(), self.nodes.get(path)) else {
            return;
        };
        let data = data.clone();
        let t = self.spec.timeout;
        let stat = match timeout(t, client.check_and_watch_stat(path)).await {
            Ok(Ok((stat, watcher))) => {
                if self.armed.insert(path.to_owned()) {
                    let owned = path.to_owned();
                    let epoch = self.epoch;
                    self.watches.push(Box::pin(async move {
                        watcher.changed().await;
                        (epoch, owned)
                    }));
                }
                stat
            }
            Ok(Err(e)) => {
                debug!(%path, error = %e, "zookeeper: cannot check an own node");
                return;
            }
            Err(_) => return,
        };
        let own = client.session_id().0;
        let repaired = match stat {
            None => match claim(&self.spec, &client, path, &data).await {
                Ok(true) => Some("it was deleted by someone else"),
                Ok(false) => None,
                Err(e) => {
                    debug!(%path, error = %e, "zookeeper: cannot re-create an own node");
                    None
                }
            },
            Some(stat) if stat.ephemeral_owner == own => {
                self.conflicts.remove(path);
                match timeout(t, client.get_data(path)).await {
                    Ok(Ok((held, stat))) if held != data => {
                        match timeout(t, client.set_data(path, &data, Some(stat.version))).await {
                            Ok(Ok(_)) => Some("its data was changed"),
                            _ => None,
                        }
                    }
                    _ => None,
                }
            }
            Some(stat) if stat.ephemeral_owner == 0 => {
                // A persistent node at our path never goes away on its own.
                match timeout(t, client.delete(path, Some(stat.version))).await {
                    Ok(Ok(())) => match claim(&self.spec, &client, path, &data).await {
                        Ok(true) => Some("a persistent node had replaced it"),
                        _ => None,
                    },
                    _ => None,
                }
            }
            Some(stat) => {
                let other = stat.ephemeral_owner;
                if self.conflicts.insert(path.to_owned(), other) != Some(other) {
                    warn!(%path, own_session = %format!("{own:#x}"), other_session = %format!("{other:#x}"), "zookeeper registration conflict: another live session publishes the same address; standing by until its node is gone");
                }
                None
            }
        };
        if let Some(why) = repaired {
            self.conflicts.remove(path);
            self.generation += 1;
            if let Some((_, state)) = self.nodes.get(path) {
                state.send_replace(RegistrationState::Registered {
                    generation: self.generation,
                });
            }
            warn!(%path, reason = why, "zookeeper registration drifted from what this provider registered; restored");
        }
    }

    fn session_id(&self) -> String {
        self.client
            .as_ref()
            .map_or_else(|| "none".to_owned(), |c| c.session_id().to_string())
    }

    fn on_state(&mut self, state: SessionState) {
        match state {
            SessionState::Disconnected => info!(
                session = %self.session_id(),
                "zookeeper connection lost; the session and its nodes live on while the client reconnects"
            ),
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => info!(
                session = %self.session_id(),
                "zookeeper reconnected within the session; nothing to re-register"
            ),
            SessionState::Expired | SessionState::Closed | SessionState::AuthFailed => {
                self.lost(&format!("session {state}"));
            }
        }
    }

    /// Drops the dead session: the next `restore` opens a new one.
    fn lost(&mut self, why: &str) {
        let session = self.session_id();
        self.client = None;
        self.states = None;
        self.session.send_replace(None);
        if self.retry_at.is_some() {
            return;
        }
        warn!(%session, nodes = self.nodes.len(), reason = why, "zookeeper session lost; opening a new session and re-registering");
        for (_, state) in self.nodes.values() {
            state.send_replace(RegistrationState::Reregistering);
        }
        self.retry_at = Some(Instant::now());
    }

    /// Tries once to get a live session and republish every node in it.
    async fn restore(&mut self) {
        match self.republish().await {
            Ok(()) => {
                self.retry_at = None;
                self.backoff.reset();
                // Watch the nodes in the new session (the old session's
                // watches ended with it).
                let paths: Vec<String> = self.nodes.keys().cloned().collect();
                for path in paths {
                    self.verify(&path).await;
                }
            }
            Err(e) => {
                if self
                    .client
                    .as_ref()
                    .is_some_and(|c| c.state().is_terminated())
                {
                    self.client = None;
                    self.states = None;
                    self.session.send_replace(None);
                }
                let pause = self.backoff.next_pause();
                warn!(error = %e, ?pause, "zookeeper re-registration failed; retrying");
                self.retry_at = Some(Instant::now() + pause);
            }
        }
    }

    async fn republish(&mut self) -> Result<(), RegistryError> {
        let client = match &self.client {
            Some(c) => c.clone(),
            None => {
                let c = self.spec.open().await?;
                self.epoch += 1;
                info!(session = %c.session_id(), timeout = ?c.session_timeout(), epoch = self.epoch, "zookeeper session opened");
                self.states = Some(c.state_watcher());
                self.client = Some(c.clone());
                self.session.send_replace(Some(Session {
                    client: c.clone(),
                    epoch: self.epoch,
                }));
                c
            }
        };
        // Watches of the old session ended with it.
        self.armed.clear();
        if self.nodes.is_empty() {
            return Ok(());
        }
        let nodes: Vec<(String, Vec<u8>)> = self
            .nodes
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        for (path, data) in &nodes {
            publish(&self.spec, &client, path, data).await?;
        }
        self.generation += 1;
        for (_, state) in self.nodes.values() {
            state.send_replace(RegistrationState::Registered {
                generation: self.generation,
            });
        }
        info!(
            session = %client.session_id(),
            nodes = nodes.len(),
            generation = self.generation,
            "zookeeper registrations restored in a new session"
        );
        Ok(())
    }

    async fn register(
        &mut self,
        path: String,
        data: Vec<u8>,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        let Some(client) = self.client.clone().filter(|_| self.retry_at.is_none()) else {
            return Err(failed(
                "the zookeeper session is lost and being restored; try again",
            ));
        };
        publish(&self.spec, &client, &path, &data).await?;
        state.send_replace(RegistrationState::Registered {
            generation: self.generation,
        });
        self.nodes.insert(path.clone(), (data, state));
        self.verify(&path).await;
        Ok(())
    }

    async fn deregister(&mut self, path: &str) -> Result<(), RegistryError> {
        let Some((_, state)) = self.nodes.remove(path) else {
            return Ok(());
        };
        state.send_replace(RegistrationState::Deregistered);
        self.conflicts.remove(path);
        match &self.client {
            // Without a session the node is already gone with the old one.
            Some(client) => remove_own(&self.spec, client, path).await,
            None => Ok(()),
        }
    }

    /// Deletes every node and ends the session.
    async fn close(&mut self) {
        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
        for (_, state) in self.nodes.values() {
            state.send_replace(RegistrationState::Deregistered);
        }
        self.nodes.clear();
        self.retry_at = None;
        if let Some(client) = self.client.take() {
            for path in &nodes {
                if let Err(e) = remove_own(&self.spec, &client, path).await {
                    warn!(%path, error = %e, "zookeeper delete failed; the node goes with the session");
                }
            }
            info!(session = %client.session_id(), nodes = nodes.len(), "zookeeper registry shut down; closing the session");
        }
        self.states = None;
        // Dropping the last client closes the session; discovery tasks drop
        // theirs when they see it gone.
        self.session.send_replace(None);
    }
}

/// Creates the ephemeral node `path` in `client`'s session, creating the
/// parents if needed. A node left by another session (an older session of
/// this process, or of a previous process at the same address, not expired
/// yet) is deleted and created again: left alone it would vanish when that
/// session expires.
async fn publish(
    spec: &Spec,
    client: &Client,
    path: &str,
    data: &[u8],
) -> Result<(), RegistryError> {
    let t = spec.timeout;
    let deadline = Instant::now() + t;
    let own = client.session_id().0;
    let mut last = None;
    let mut replaced = false;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let created = match timeout(left, client.create(path, data, &spec.ephemeral())).await {
            Ok(r) => r,
            Err(_) => break,
        };
        match created {
            Ok(_) => return Ok(()),
            Err(ZkError::NoNode) => {
                let parent = path.rsplit_once('/').map_or(path, |(p, _)| p);
                bounded(
                    left,
                    format!("creating {parent}"),
                    client.mkdir(parent, &spec.persistent()),
                )
                .await?;
            }
            Err(ZkError::NodeExists) => {
                let (old, stat) = match timeout(left, client.get_data(path)).await {
                    Ok(Ok(v)) => v,
                    Ok(Err(ZkError::NoNode)) => continue,
                    Ok(Err(e)) => return Err(unavailable(format!("read {path}"), e)),
                    Err(_) => break,
                };
                if stat.ephemeral_owner == own {
                    // Ours already (a retried create, or registered twice).
                    if old != data {
                        bounded(
                            left,
                            format!("update {path}"),
                            client.set_data(path, data, Some(stat.version)),
                        )
                        .await?;
                    }
                    return Ok(());
                }
                if replaced {
                    // Replaced once and taken again at once: another live
                    // process publishes this address. Leave it; the
                    // keeper's watch takes the node back when it is gone.
                    warn!(
                        %path,
                        owner = %format!("{:#x}", stat.ephemeral_owner),
                        session = %client.session_id(),
                        "zookeeper registration conflict: another live session publishes the same address; standing by"
                    );
                    return Ok(());
                }
                replaced = true;
                // Usually an older session of a process that restarted on
                // this address, not expired yet: left alone, the node would
                // vanish when that session expires. If it is a live second
                // process instead, this is a conflict it will log.
                warn!(
                    %path,
                    owner = %format!("{:#x}", stat.ephemeral_owner),
                    session = %client.session_id(),
                    "replacing a node of another session (a conflict if that session is a live process)"
                );
                match timeout(left, client.delete(path, Some(stat.version))).await {
                    Ok(Ok(()) | Err(ZkError::NoNode | ZkError::BadVersion)) => {}
                    Ok(Err(e)) => return Err(unavailable(format!("delete stale {path}"), e)),
                    Err(_) => break,
                }
            }
            // Ambiguous: the create may have been applied. Retry; a node of
            // ours then shows as NodeExists with our session as owner.
            Err(ZkError::ConnectionLoss) => {
                last = Some(ZkError::ConnectionLoss);
                sleep(BACKOFF_MIN.min(left)).await;
            }
            Err(e) => return Err(unavailable(format!("create {path}"), e)),
        }
    }
    match last {
        Some(e) => Err(unavailable(format!("create {path}"), e)),
        None => Err(timed_out(&format!("create {path}"), t)),
    }
}

/// Creates the ephemeral node `path` only if nobody holds it: `Ok(true)` if
/// this call created it, `Ok(false)` if a node was there (someone was
/// faster; the caller's watch says what happens next).
async fn claim(
    spec: &Spec,
    client: &Client,
    path: &str,
    data: &[u8],
) -> Result<bool, RegistryError> {
    let t = spec.timeout;
    for _ in 0..2 {
        match timeout(t, client.create(path, data, &spec.ephemeral())).await {
            Ok(Ok(_)) => return Ok(true),
            Ok(Err(ZkError::NodeExists)) => return Ok(false),
            Ok(Err(ZkError::NoNode)) => {
                let parent = path.rsplit_once('/').map_or(path, |(p, _)| p);
                bounded(
                    t,
                    format!("creating {parent}"),
                    client.mkdir(parent, &spec.persistent()),
                )
                .await?;
            }
            Ok(Err(e)) => return Err(unavailable(format!("create {path}"), e)),
            Err(_) => return Err(timed_out(&format!("create {path}"), t)),
        }
    }
    Ok(false)
}

/// Deletes `path` if this session owns it (a node that replaced ours is
/// left alone).
async fn remove_own(spec: &Spec, client: &Client, path: &str) -> Result<(), RegistryError> {
    let t = spec.timeout;
    let stat = match timeout(t, client.check_stat(path)).await {
        Ok(Ok(Some(stat))) => stat,
        Ok(Ok(None)) | Ok(Err(ZkError::NoNode)) => return Ok(()),
        Ok(Err(e)) => return Err(unavailable(format!("stat {path}"), e)),
        Err(_) => return Err(timed_out(&format!("stat {path}"), t)),
    };
    if stat.ephemeral_owner != client.session_id().0 {
        debug!(%path, "not deleting a node owned by another session");
        return Ok(());
    }
    match timeout(t, client.delete(path, Some(stat.version))).await {
        Ok(Ok(()) | Err(ZkError::NoNode)) => Ok(()),
        Ok(Err(e)) => Err(unavailable(format!("delete {path}"), e)),
        Err(_) => Err(timed_out(&format!("delete {path}"), t)),
    }
}

async fn next_state(states: &mut Option<StateWatcher>) -> SessionState {
    match states {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

impl Discover for ZookeeperRegistry {
    async fn discover(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        let session = self.current().await?;
        read_service(
            &session.client,
            &self.service_path(service_key),
            self.inner.spec.timeout,
        )
        .await
    }

    async fn watch(&self, service_key: &str) -> Result<Watch, RegistryError> {
        let path = self.service_path(service_key);
        let t = self.inner.spec.timeout;
        let session = self.current().await?;
        // Watch first, then read: nothing falls in between. The first
        // snapshot is read here so that an unreachable server is an error
        // to the caller, not a silent empty list.
        let watcher = bounded(
            t,
            format!("watch {path}"),
            session
                .client
                .watch(&path, AddWatchMode::PersistentRecursive),
        )
        .await?;
        let list = read_service(&session.client, &path, t).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        if tx.send(WatchEvent::Snapshot(list)).await.is_err() {
            return Err(RegistryError::Shutdown);
        }
        let follower = Follower {
            sessions: self.inner.session.clone(),
            _registry: self.clone(),
            prefix: format!("{}/", self.inner.root),
            path,
            timeout: t,
            tx,
            connected: true,
        };
        match AbortOnDrop::spawn(follower.run(session, watcher)) {
            Some(task) => Ok(Watch::with_guard(rx, task)),
            None => Err(failed("watch needs a Tokio runtime")),
        }
    }
}

/// Follows one service node.
struct Follower {
    sessions: watch::Receiver<Option<Session>>,
    /// Keeps the keeper (and so new sessions) alive while the watch is.
    _registry: ZookeeperRegistry,
    /// `{root}/`, stripped from paths to get node keys.
    prefix: String,
    /// `{root}/{service_key}`.
    path: String,
    timeout: Duration,
    tx: mpsc::Sender<WatchEvent>,
    connected: bool,
}

enum FollowEnd {
    /// The consumer (or the keeper) is gone.
    Closed,
    /// The session ended: follow the next one.
    SessionGone,
}

impl Follower {
    async fn run(mut self, session: Session, watcher: PersistentWatcher) {
        let mut current = Some((session, watcher));
        let mut dead_epoch = None;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            let (session, mut watcher) = match current.take() {
                Some(c) => c,
                None => match self.establish(dead_epoch, &mut backoff).await {
                    Some(c) => c,
                    None => return,
                },
            };
            backoff.reset();
            match self.follow(&session, &mut watcher).await {
                FollowEnd::Closed => return,
                FollowEnd::SessionGone => {
                    // Never poll a watcher past its session's end.
                    drop(watcher);
                    dead_epoch = Some(session.epoch);
                    debug!(path = %self.path, "zookeeper session gone; waiting for the next one");
                    if !self.set_connected(false).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits for a session newer than `dead_epoch`, arms the watch and sends
    /// a fresh snapshot. `None`: the consumer is gone.
    async fn establish(
        &mut self,
        dead_epoch: Option<u64>,
        backoff: &mut Backoff,
    ) -> Option<(Session, PersistentWatcher)> {
        loop {
            let session = {
                let newer = |s: &Option<Session>| {
                    s.as_ref()
                        .is_some_and(|s| dead_epoch.is_none_or(|d| s.epoch > d))
                };
                let tx = self.tx.clone();
                tokio::select! {
                    _ = tx.closed() => return None,
                    s = self.sessions.wait_for(newer) => match s {
                        Ok(s) => s.clone()?,
                        Err(_) => return None,
                    },
                }
            };
            let armed = bounded(
                self.timeout,
                format!("watch {}", self.path),
                session
                    .client
                    .watch(&self.path, AddWatchMode::PersistentRecursive),
            )
            .await;
            match armed {
                Ok(watcher) => match self.snapshot(&session.client).await {
                    Ok(true) => return Some((session, watcher)),
                    Ok(false) => return None,
                    Err(e) => debug!(path = %self.path, error = %e, "zookeeper resync failed"),
                },
                Err(e) => debug!(path = %self.path, error = %e, "zookeeper watch failed"),
            }
            if !self.set_connected(false).await || !self.pause(backoff).await {
                return None;
            }
        }
    }

    /// Waits the next pause of `backoff` unless the consumer goes away first.
    async fn pause(&self, backoff: &mut Backoff) -> bool {
        let d = backoff.next_pause();
        tokio::select! {
            _ = sleep(d) => true,
            _ = self.tx.closed() => false,
        }
    }

    async fn set_connected(&mut self, up: bool) -> bool {
        if self.connected == up {
            return true;
        }
        self.connected = up;
        self.tx.send(WatchEvent::Connected(up)).await.is_ok()
    }

    /// A fresh read, delivered as a snapshot. `Ok(false)`: consumer gone.
    async fn snapshot(&mut self, client: &Client) -> Result<bool, RegistryError> {
        let list = read_service(client, &self.path, self.timeout).await?;
        if self.tx.send(WatchEvent::Snapshot(list)).await.is_err() {
            return Ok(false);
        }
        Ok(self.set_connected(true).await)
    }

    /// The node key of a direct child's path, if it is one.
    fn child_key<'a>(&self, path: &'a str) -> Option<&'a str> {
        let name = path.strip_prefix(self.path.as_str())?.strip_prefix('/')?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        path.strip_prefix(self.prefix.as_str())
    }

    async fn follow(&mut self, session: &Session, watcher: &mut PersistentWatcher) -> FollowEnd {
        let client = &session.client;
        let mut resync_at: Option<Instant> = None;
        // Whether the server still has our watch (not after a reconnection).
        let mut armed = true;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut sessions = self.sessions.clone();
        loop {
            let tx = self.tx.clone();
            let event = tokio::select! {
                _ = tx.closed() => return FollowEnd::Closed,
                changed = sessions.changed() => {
                    if changed.is_err() {
                        return FollowEnd::Closed;
                    }
                    let same = sessions
                        .borrow_and_update()
                        .as_ref()
                        .is_some_and(|s| s.epoch == session.epoch);
                    if !same {
                        return FollowEnd::SessionGone;
                    }
                    continue;
                }
                _ = sleep_until_opt(resync_at), if resync_at.is_some() => {
                    resync_at = None;
                    let rearmed = if armed {
                        Ok(())
                    } else {
                        // The new watcher goes in before the old one is
                        // dropped, so the client keeps the path watched.
                        bounded(
                            self.timeout,
                            format!("watch {}", self.path),
                            client.watch(&self.path, AddWatchMode::PersistentRecursive),
                        )
                        .await
                        .map(|w| {
                            *watcher = w;
                            armed = true;
                        })
                    };
                    let outcome = match rearmed {
                        Ok(()) => self.snapshot(client).await,
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Ok(true) => {
                            backoff.reset();
                            continue;
                        }
                        Ok(false) => return FollowEnd::Closed,
                        Err(e) => debug!(path = %self.path, error = %e, "zookeeper resync failed"),
                    }
                    if client.state().is_terminated() {
                        return FollowEnd::SessionGone;
                    }
                    if !self.set_connected(false).await {
                        return FollowEnd::Closed;
                    }
                    resync_at = Some(Instant::now() + backoff.next_pause());
                    continue;
                }
                e = watcher.changed() => e,
            };
            let change = match event.event_type {
                EventType::Session => {
                    match event.session_state {
                        SessionState::Disconnected => {
                            debug!(path = %self.path, "zookeeper disconnected; resynchronising on reconnection");
                            resync_at = None;
                            if !self.set_connected(false).await {
                                return FollowEnd::Closed;
                            }
                        }
                        // Events during the disconnect are not replayed:
                        // read what is there now.
                        SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                            armed = false;
                            resync_at = Some(Instant::now());
                        }
                        SessionState::Expired | SessionState::Closed | SessionState::AuthFailed => {
                            return FollowEnd::SessionGone;
                        }
                    }
                    continue;
                }
                EventType::NodeCreated | EventType::NodeDataChanged => {
                    let Some(key) = self.child_key(&event.path) else {
                        continue;
                    };
                    match timeout(self.timeout, client.get_data(&event.path)).await {
                        Ok(Ok((data, _))) => match ServiceMetaInfo::from_json(&data) {
                            Ok(m) => WatchEvent::Upsert(m),
                            Err(e) => {
                                warn!(path = %event.path, error = %e, "skipping malformed instance record");
                                continue;
                            }
                        },
                        // Gone again: its delete event follows.
                        Ok(Err(ZkError::NoNode)) => continue,
                        Ok(Err(e)) => {
                            debug!(%key, error = %e, "zookeeper read failed; resynchronising");
                            resync_at.get_or_insert_with(|| Instant::now() + backoff.next_pause());
                            continue;
                        }
                        Err(_) => {
                            debug!(%key, "zookeeper read timed out; resynchronising");
                            resync_at.get_or_insert_with(|| Instant::now() + backoff.next_pause());
                            continue;
                        }
                    }
                }
                EventType::NodeDeleted => match self.child_key(&event.path) {
                    Some(key) => WatchEvent::Remove(key.to_owned()),
                    None => continue,
                },
                EventType::NodeChildrenChanged => continue,
            };
            if self.tx.send(change).await.is_err() {
                return FollowEnd::Closed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn addresses_split_into_hosts_and_chroot() {
        assert_eq!(
            parse_address(&addrs(&["127.0.0.1:2181"])).unwrap(),
            ("127.0.0.1:2181".to_owned(), None)
        );
        assert_eq!(
            parse_address(&addrs(&["127.0.0.1:2181/rpc-root"])).unwrap(),
            ("127.0.0.1:2181".to_owned(), Some("/rpc-root".to_owned()))
        );
        // "a:1,b:2/x" arrives split at the commas.
        assert_eq!(
            parse_address(&addrs(&["a:1", "b:2", "c:3/x/y/"])).unwrap(),
            ("a:1,b:2,c:3".to_owned(), Some("/x/y".to_owned()))
        );
        assert_eq!(
            parse_address(&addrs(&["zookeeper://a:1,b:2/x", "c:3/x"])).unwrap(),
            ("a:1,b:2,c:3".to_owned(), Some("/x".to_owned()))
        );
        assert!(parse_address(&addrs(&["a:1/x", "b:2/y"])).is_err());
        assert!(parse_address(&addrs(&[])).is_err());
        assert!(parse_address(&addrs(&["/x"])).is_err());
    }

    #[test]
    fn namespaces_prefix_the_root() {
        assert_eq!(root_for(None), "/rpc");
        assert_eq!(root_for(Some("")), "/rpc");
        assert_eq!(root_for(Some("/team-a/")), "/team-a/rpc");
    }
}
