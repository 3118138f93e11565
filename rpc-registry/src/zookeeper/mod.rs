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
//! With `[registry.tls]` (a `ca_file`, and a client certificate for
//! servers that require one, ZooKeeper's default) every server is dialled
//! with TLS; ZooKeeper 3.5+ serves it on its `secureClientPort` (Netty).
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
use crate::support::tls::read_pem;
use rpc_core::config::TlsConfig;

mod follow;
mod registration;
mod session;

use follow::*;
use registration::*;
use session::*;

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

/// `registry.tls` as the client's TLS options: the CA (required: ZooKeeper
/// servers rarely use public roots), and a client certificate for servers
/// with `ssl.clientAuth=need` (ZooKeeper's default).
fn tls_options(tls: &TlsConfig) -> Result<zookeeper_client::TlsOptions, RegistryError> {
    // zookeeper-client builds its rustls config with the process's default
    // crypto provider; with more than one compiled in (ring here, aws-lc
    // from zookeeper-client itself) none is chosen and rustls would panic.
    // Installing ring, which the other backends use, is idempotent.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if tls.domain.is_some() {
        return Err(invalid(
            "tls.domain",
            "not supported by zookeeper: the server name checked is the host in registry.address",
        ));
    }
    let Some(ca) = &tls.ca_file else {
        return Err(invalid("tls.ca_file", "needed for zookeeper TLS"));
    };
    let pem = |path: &std::path::Path, key: &str| -> Result<String, RegistryError> {
        let bytes = read_pem(BACKEND, path, key)?;
        String::from_utf8(bytes).map_err(|_| invalid(&format!("tls.{key}"), "not a PEM file"))
    };
    let bad = |key: &str, e: ZkError| invalid(&format!("tls.{key}"), e.to_string());
    let mut options = zookeeper_client::TlsOptions::new()
        .with_pem_ca(&pem(ca, "ca_file")?)
        .map_err(|e| bad("ca_file", e))?;
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            options = options
                .with_pem_identity(&pem(cert, "cert_file")?, &pem(key, "key_file")?)
                .map_err(|e| bad("cert_file", e))?;
        }
        (None, None) => {}
        _ => {
            return Err(invalid(
                "tls.key_file",
                "registry.tls needs both cert_file and key_file for a client certificate",
            ));
        }
    }
    Ok(options)
}

crate::support::backend_errors!(BACKEND);

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
        let tls = match &config.tls {
            Some(tls) => Some(tls_options(tls)?),
            None => None,
        };
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
            tls,
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

    /// The children of the root: one persistent node per service, kept
    /// after its last instance left.
    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        let session = self.current().await?;
        let root = &self.inner.root;
        let t = self.inner.spec.timeout;
        let mut keys = match timeout(t, session.client.list_children(root)).await {
            Ok(Ok(children)) => children,
            Ok(Err(ZkError::NoNode)) => Vec::new(),
            Ok(Err(e)) => return Err(unavailable(format!("list {root}"), e)),
            Err(_) => return Err(timed_out(&format!("list {root}"), t)),
        };
        keys.sort();
        Ok(keys)
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
            emit: crate::support::follow::Emitter::new(tx),
        };
        match AbortOnDrop::spawn(follower.run(session, watcher)) {
            Some(task) => Ok(Watch::with_guard(rx, task)),
            None => Err(failed("watch needs a Tokio runtime")),
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
