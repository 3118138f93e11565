//! [`EtcdRegistry`]: etcd v3 as the registry (cargo feature `etcd`).
//!
//! # Key layout
//!
//! `/rpc/{name:version}/{host:port}` holds the instance's
//! [`ServiceMetaInfo`] as JSON (the Java original's layout and field names).
//! With `registry.namespace = "team-a"` the root becomes `/team-a/rpc/`, so
//! several tenants (or test runs) can share one etcd without seeing each
//! other.
//!
//! # Registering
//!
//! Every key a registry publishes hangs off ONE lease per registry (TTL =
//! `ttl_secs`), kept alive over etcd's keep-alive stream by a keeper task,
//! not by granting a lease per beat. A broken keep-alive stream (a member
//! died, a leader election) first resumes the SAME lease through whichever
//! member answers: no key is touched. Only when etcd says the lease is gone
//! — it expired during a partition, someone revoked it, or etcd came back
//! with an empty data dir — does the keeper grant a new one and put every
//! key again, with backoff, log it, and bump each registration's generation. Dropping the
//! last handle (or [`EtcdRegistry::shutdown`]) revokes the lease, removing
//! every key at once.
//!
//! # Discovering
//!
//! One prefix get of `/rpc/{name:version}/`, then a prefix watch starting at
//! the revision after it, so no event falls in between. Watches are per
//! service and end when their [`Watch`] is dropped.
//!
//! A broken watch is re-established with a fresh get (delivered as a
//! snapshot, which the consumer cache diffs into adds and removes) and a
//! watch from that get's revision. Resuming from the last revision seen
//! would replay the missed events one by one, but it is only sound while
//! etcd keeps its history: after compaction the revision is gone, and an
//! etcd restarted from an empty data dir reuses revision numbers, so a
//! resumed watch would silently skip whatever the new history wrote below
//! our old revision. One range read per reconnect buys correctness in all
//! three cases.

use crate::support::sleep_until_opt;
use rpc_core::RegistryErrorKind;
use rpc_core::backoff::Backoff;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use rpc_core::discover::WATCH_CHANNEL_CAPACITY;
use rpc_core::{
    Discover, Registration, RegistrationState, RegistryConfig, RegistryError, ServiceMetaInfo,
    Watch, WatchEvent,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};

use crate::support::keeper::{self, KeeperDeregister};
use crate::support::skip::SkipLog;
use crate::support::task::AbortOnDrop;

mod follow;
mod registration;

use follow::*;
use registration::*;

const BACKEND: &str = "etcd";
/// Root of every key this backend writes, without a namespace.
pub const PREFIX: &str = "/rpc/";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Quick retries within one operation's timeout (a member that just died).
const QUICK_RETRY_MIN: Duration = Duration::from_millis(20);
const QUICK_RETRY_MAX: Duration = Duration::from_millis(500);
const COMMAND_CAPACITY: usize = 64;

/// An etcd client error as a registry error of the right kind: refused
/// credentials and missing rights are [`RegistryError::Denied`] (etcd
/// answers a bad password with `InvalidArgument`, "authentication failed"),
/// anything else an outage.
fn unavailable(message: impl Into<String>, e: impl Into<rpc_core::BoxError>) -> RegistryError {
    let e = e.into();
    if let Some(etcd_client::Error::GRpcStatus(status)) = e.downcast_ref::<etcd_client::Error>() {
        let kind = match status.code() {
            tonic::Code::Unauthenticated => Some(RegistryErrorKind::Unauthenticated),
            tonic::Code::InvalidArgument if status.message().contains("authentication failed") => {
                Some(RegistryErrorKind::Unauthenticated)
            }
            tonic::Code::PermissionDenied => Some(RegistryErrorKind::PermissionDenied),
            _ => None,
        };
        if let Some(kind) = kind {
            let reason = status.message().to_owned();
            return RegistryError::denied(BACKEND, kind, message, reason, Some(e));
        }
        // tonic's Display of a status ends in the Debug dump of its source
        // (`source: tonic::transport::Error(Transport, ConnectError(..))`),
        // which would be the one line an operator reads: say the code, the
        // message and the root cause instead.
        let mut root: Option<&(dyn std::error::Error + 'static)> =
            std::error::Error::source(status);
        while let Some(next) = root.and_then(std::error::Error::source) {
            root = Some(next);
        }
        let mut text = format!("{}: {}", status.code().description(), status.message());
        if let Some(root) = root {
            text.push_str(&format!(" ({root})"));
        }
        return RegistryError::unavailable(BACKEND, message, std::io::Error::other(text));
    }
    RegistryError::unavailable(BACKEND, message, e)
}

/// Whether an etcd call failed on its way (a member gone, a connection
/// reset) rather than being refused by etcd. The client balances over every
/// endpoint, so the same call again may well reach a live member.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Runs an idempotent etcd call (a put under the same lease, a delete, a
/// revoke), again after a transient failure, until `t` is spent. Without
/// this a call routed to a member that just died fails although two others
/// would answer.
async fn idempotent<T, Fut>(
    t: Duration,
    what: &str,
    mut call: impl FnMut() -> Fut,
) -> Result<T, RegistryError>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + t;
    let mut backoff = Backoff::new(QUICK_RETRY_MIN, QUICK_RETRY_MAX);
    loop {
        let pause = backoff.next_pause();
        match tokio::time::timeout_at(deadline, call()).await {
            Err(_) => return Err(timed_out(what, t)),
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if transient(&e) && tokio::time::Instant::now() + pause < deadline => {
                debug!(what, error = %e, "etcd call failed on its way; trying again");
                tokio::time::sleep(pause).await;
            }
            Ok(Err(e)) => return Err(unavailable(what.to_owned(), e)),
        }
    }
}

crate::support::backend_errors!(BACKEND);

/// The key root for a namespace: `/rpc/` or `/{namespace}/rpc/`.
pub fn root_for(namespace: Option<&str>) -> String {
    match namespace
        .map(|n| n.trim_matches('/'))
        .filter(|n| !n.is_empty())
    {
        Some(ns) => format!("/{ns}{PREFIX}"),
        None => PREFIX.to_owned(),
    }
}

/// etcd as a registry. Cheap to clone; clones share one client and one lease.
#[derive(Clone)]
pub struct EtcdRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    root: String,
    endpoints: Vec<String>,
    ttl: Duration,
    timeout: Duration,
    commands: mpsc::Sender<Command>,
    /// Entries discovery skipped, so each is logged once.
    skips: Arc<SkipLog>,
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.inner.endpoints)
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

type Command = keeper::Command<(String, String)>;

impl EtcdRegistry {
    /// Connects to the endpoints in `config.address` (one or a cluster) with
    /// `timeout_ms`, optional `username`/`password` and optional `tls`.
    pub async fn connect(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let endpoints: Vec<String> = config.address.as_slice().to_vec();
        if endpoints.is_empty() {
            return Err(RegistryError::unavailable_because(
                BACKEND,
                "registry.address lists no endpoint",
            ));
        }
        let t = config.timeout();
        let ttl = config.ttl().max(Duration::from_secs(1));
        let mut options = ConnectOptions::new()
            .with_timeout(t)
            .with_connect_timeout(t)
            // HTTP/2 pings notice a dead server even on an idle watch.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &config.tls {
            let mut o = TlsOptions::new();
            if let Some(ca) = &tls.ca_file {
                o = o.ca_certificate(Certificate::from_pem(crate::support::tls::read_pem(
                    BACKEND, ca, "ca_file",
                )?));
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => {
                    o = o.identity(Identity::from_pem(
                        crate::support::tls::read_pem(BACKEND, cert, "cert_file")?,
                        crate::support::tls::read_pem(BACKEND, key, "key_file")?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(RegistryError::unavailable_because(
                        BACKEND,
                        "registry.tls needs both cert_file and key_file for a client certificate",
                    ));
                }
            }
            if let Some(domain) = &tls.domain {
                o = o.domain_name(domain.clone());
            }
            options = options.with_tls(o);
        }
        let client = timeout(t, Client::connect(&endpoints, Some(options)))
            .await
            .map_err(|_| timed_out("connecting", t))?
            .map_err(|e| unavailable(format!("cannot connect to {}", endpoints.join(",")), e))?;
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let keeper = Keeper {
            client: client.clone(),
            ttl,
            timeout: t,
            lease: None,
            stream: None,
            keys: HashMap::new(),
            displaced: HashMap::new(),
            conflicts: HashMap::new(),
            generation: 0,
            retry_at: None,
            gone: false,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        };
        // The keeper owns the lease. It ends when every handle is gone, after
        // revoking the lease (bounded by the timeout).
        tokio::spawn(keeper.run(rx));
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                root: root_for(config.namespace.as_deref()),
                endpoints,
                ttl,
                timeout: t,
                commands: tx,
                skips: Arc::new(SkipLog::default()),
            }),
        })
    }

    /// The etcd key of an instance.
    pub fn instance_key(&self, meta: &ServiceMetaInfo) -> String {
        format!("{}{}", self.inner.root, meta.node_key())
    }

    fn service_prefix(&self, service_key: &str) -> String {
        format!("{}{service_key}/", self.inner.root)
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// Revokes the lease now, removing every key this registry published,
    /// and stops keeping registrations alive.
    pub async fn shutdown(&self) {
        keeper::shutdown(&self.inner.commands, self.inner.timeout).await;
    }

    /// Reads every instance under `prefix`, at one revision, in pages.
    ///
    /// One unbounded range read fails once the list passes the gRPC
    /// client's receive limit (4 MiB, tonic's default, which etcd-client
    /// keeps): 3,000 records of 2 KB were never discovered (issue 12, fault
    /// 6). Pages of [`PAGE`] records are read at the first page's revision
    /// (a consistent snapshot); a page still too large is halved, down to
    /// one record, and a single record over the limit is an error that
    /// says so. A revision compacted between pages starts the read over.
    async fn get_prefix(
        client: &mut Client,
        prefix: &str,
        t: Duration,
        skips: &SkipLog,
    ) -> Result<(Vec<ServiceMetaInfo>, i64), RegistryError> {
        let end = prefix_end(prefix);
        let mut restarts = 0;
        'read: loop {
            let mut from = prefix.as_bytes().to_vec();
            let mut revision = 0;
            let mut page = PAGE;
            let mut list = Vec::new();
            loop {
                let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                let resp = match timeout(t, client.get(from.clone(), Some(options))).await {
                    Err(_) => return Err(timed_out(&format!("get {prefix}"), t)),
                    Ok(Ok(resp)) => resp,
                    Ok(Err(e)) if too_large(&e) && page > 1 => {
                        page = (page / 2).max(1);
                        debug!(
                            prefix,
                            page,
                            "etcd: a page of instances was over the receive limit; reading smaller pages"
                        );
                        continue;
                    }
                    Ok(Err(e)) if too_large(&e) => {
                        return Err(unavailable(
                            format!(
                                "get {prefix}: one instance record is larger than the client's receive limit (4 MiB, gRPC's default); retrying will not help"
                            ),
                            e,
                        ));
                    }
                    Ok(Err(e)) if compacted(&e) && restarts < 3 => {
                        restarts += 1;
                        continue 'read;
                    }
                    Ok(Err(e)) => return Err(unavailable(format!("get {prefix}"), e)),
                };
                if revision == 0 {
                    revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                }
                for kv in resp.kvs() {
                    let key = String::from_utf8_lossy(kv.key());
                    match ServiceMetaInfo::from_json(kv.value()) {
                        Ok(m) => {
                            skips.usable(&key);
                            list.push(m);
                        }
                        Err(e) => {
                            skips.skipped(BACKEND, &key, &format!("not an instance record: {e}"))
                        }
                    }
                }
                let last = resp.kvs().last().map(|kv| kv.key().to_vec());
                match last {
                    Some(mut key) if resp.more() => {
                        // The next page starts right after the last key.
                        key.push(0);
                        from = key;
                    }
                    _ => {
                        list.sort_by_key(|m| m.node_key());
                        return Ok((list, revision));
                    }
                }
            }
        }
    }
}

/// Records per page of a prefix read; each is a few hundred bytes to a few
/// KiB, so a page stays far below the 4 MiB receive limit.
const PAGE: i64 = 500;

/// The end of the range holding every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the key space.
    vec![0]
}

/// A response over the gRPC receive limit (tonic's own check, or the
/// server's).
fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted)
            && s.message().contains("message"))
}

/// A read at a revision etcd has compacted away.
fn compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::OutOfRange && s.message().contains("compacted"))
}

impl rpc_core::Registry for EtcdRegistry {
    async fn register(&self, meta: ServiceMetaInfo) -> Result<Registration, RegistryError> {
        let key = self.instance_key(&meta);
        let t = self.inner.timeout;
        let state_rx = keeper::submit_registration(
            &self.inner.commands,
            (key.clone(), meta.to_json()),
            t * 2,
            BACKEND,
        )
        .await?;
        Ok(Registration::new(
            meta,
            state_rx,
            KeeperDeregister {
                key,
                commands: self.inner.commands.clone(),
                timeout: t,
                backend: BACKEND,
            },
        ))
    }
}

impl Discover for EtcdRegistry {
    async fn discover(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        let mut client = self.inner.client.clone();
        Ok(Self::get_prefix(
            &mut client,
            &self.service_prefix(service_key),
            self.inner.timeout,
            &self.inner.skips,
        )
        .await?
        .0)
    }

    /// One keys-only read per service: each read takes the first key after
    /// the previous service's range, so a service with many instances costs
    /// no more than one with a single instance.
    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        let root = self.inner.root.as_bytes();
        let end = prefix_end(&self.inner.root);
        let mut client = self.inner.client.clone();
        let t = self.inner.timeout;
        let what = format!("list the services under {}", self.inner.root);
        let mut from = root.to_vec();
        let mut keys = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(1)
                .with_keys_only();
            let resp = match timeout(t, client.get(from.clone(), Some(options))).await {
                Err(_) => return Err(timed_out(&what, t)),
                Ok(Err(e)) => return Err(unavailable(what, e)),
                Ok(Ok(resp)) => resp,
            };
            let Some(kv) = resp.kvs().first() else { break };
            let rest = kv.key().get(root.len()..).unwrap_or_default();
            match rest.iter().position(|b| *b == b'/') {
                Some(slash) => {
                    let service = &rest[..slash];
                    keys.push(String::from_utf8_lossy(service).into_owned());
                    // Past `{root}{service}/`: '0' is the byte after '/'.
                    from = [root, service, b"0"].concat();
                }
                None => {
                    // A key that is not an instance's: step past it.
                    from = kv.key().to_vec();
                    from.push(0);
                }
            }
        }
        Ok(keys)
    }

    async fn watch(&self, service_key: &str) -> Result<Watch, RegistryError> {
        let prefix = self.service_prefix(service_key);
        let mut client = self.inner.client.clone();
        let t = self.inner.timeout;
        // The first snapshot is read here so that an unreachable etcd is an
        // error to the caller, not a silent empty list.
        let (list, revision) = Self::get_prefix(&mut client, &prefix, t, &self.inner.skips).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        if tx.send(WatchEvent::Snapshot(list)).await.is_err() {
            return Err(RegistryError::Shutdown);
        }
        let follower = Follower {
            client,
            skips: Arc::clone(&self.inner.skips),
            root: self.inner.root.clone(),
            prefix,
            timeout: t,
            emit: crate::support::follow::Emitter::new(tx),
            revision,
        };
        match AbortOnDrop::spawn(follower.run()) {
            Some(task) => Ok(Watch::with_guard(rx, task)),
            None => Err(RegistryError::unavailable_because(
                BACKEND,
                "watch needs a Tokio runtime",
            )),
        }
    }
}
