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

fn timed_out(what: &str, t: Duration) -> RegistryError {
    RegistryError::timed_out(BACKEND, what, t)
}

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

/// Owns the lease and the set of published keys.
struct Keeper {
    client: Client,
    ttl: Duration,
    timeout: Duration,
    lease: Option<i64>,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    keys: HashMap<String, (String, watch::Sender<RegistrationState>)>,
    /// Keys this keeper took over from another live lease at registration
    /// (two processes publishing one address): the value and lease it
    /// displaced, handed back when this keeper deregisters the key.
    displaced: HashMap<String, (Vec<u8>, i64)>,
    /// Keys held by another live lease that this keeper stands by for, with
    /// that lease: logged once per lease, not on every check.
    conflicts: HashMap<String, i64>,
    generation: u64,
    /// Set while the keep-alive is interrupted: when to try to restore it next.
    retry_at: Option<Instant>,
    /// etcd said the lease is gone (rather than the stream just breaking).
    gone: bool,
    backoff: Backoff,
}

impl keeper::Keeps<(String, String)> for Keeper {
    async fn keep(
        &mut self,
        (key, value): (String, String),
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        self.register(key, value, state).await
    }

    async fn release(&mut self, key: &str) -> Result<(), RegistryError> {
        self.deregister(key).await
    }

    async fn release_all(&mut self) {
        self.revoke().await;
    }
}

impl Keeper {
    fn beat_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(300))
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut beat = tokio::time::interval(self.beat_interval());
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                cmd = commands.recv() => {
                    if !keeper::serve(&mut self, cmd, &mut commands).await {
                        return;
                    }
                }
                _ = beat.tick(), if self.lease.is_some() && retry_at.is_none() => {
                    let sent = match &mut self.stream {
                        Some((keeper, _)) => timeout(self.timeout, keeper.keep_alive()).await,
                        None => Ok(Err(etcd_client::Error::WatchError("no keep-alive stream".into()))),
                    };
                    if !matches!(sent, Ok(Ok(()))) {
                        self.lost("keep-alive could not be sent");
                    } else {
                        self.verify().await;
                    }
                }
                reply = next_keep_alive(&mut self.stream), if self.stream.is_some() => match reply {
                    Ok(Some(ttl)) if ttl > 0 => {}
                    Ok(Some(_)) => {
                        // etcd itself says the lease is gone: re-grant.
                        self.gone = true;
                        self.lost("etcd reports the lease expired or unknown");
                    }
                    Ok(None) => self.lost("keep-alive stream closed"),
                    Err(e) => self.lost(&format!("keep-alive stream failed: {e}")),
                },
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => {
                    self.restore().await;
                }
            }
        }
    }

    /// The keep-alive broke. That alone does not mean the lease is lost: a
    /// member died (a leader election, a partition from one member) and the
    /// lease lives on in the cluster. `restore` first resumes keeping the
    /// SAME lease alive through whichever member answers; only when etcd
    /// says the lease is gone does it grant a new one and put every key
    /// again.
    fn lost(&mut self, why: &str) {
        if self.retry_at.is_some() {
            return;
        }
        warn!(lease = ?self.lease, keys = self.keys.len(), reason = why, "etcd keep-alive interrupted; resuming");
        self.stream = None;
        self.retry_at = Some(Instant::now());
    }

    /// Tries once to resume the lease, or else to get a new one and
    /// republish every key under it.
    async fn restore(&mut self) {
        if !self.gone {
            if let Some(lease) = self.lease {
                match self.resume(lease).await {
                    Ok(true) => {
                        info!(lease, "etcd keep-alive resumed; the lease survived");
                        self.retry_at = None;
                        self.backoff.reset();
                        return;
                    }
                    Ok(false) => {
                        warn!(
                            lease,
                            keys = self.keys.len(),
                            "etcd lease expired; re-registering"
                        );
                        self.gone = true;
                    }
                    Err(e) => {
                        let pause = self.backoff.next_pause();
                        debug!(error = %e, ?pause, "etcd unreachable; retrying");
                        self.retry_at = Some(Instant::now() + pause);
                        return;
                    }
                }
            }
        }
        for (_, state) in self.keys.values() {
            state.send_replace(RegistrationState::Reregistering);
        }
        match self.republish().await {
            Ok(()) => {
                self.retry_at = None;
                self.gone = false;
                self.backoff.reset();
            }
            Err(e) => {
                let pause = self.backoff.next_pause();
                debug!(error = %e, ?pause, "etcd re-registration failed; retrying");
                self.retry_at = Some(Instant::now() + pause);
            }
        }
    }

    /// Opens a keep-alive stream for `lease` and sends one beat: `Ok(true)`
    /// if etcd still holds the lease, `Ok(false)` if it does not, `Err` if
    /// etcd cannot be reached.
    async fn resume(&mut self, lease: i64) -> Result<bool, RegistryError> {
        let t = self.timeout;
        let (mut keeper, mut stream) = match timeout(t, self.client.lease_keep_alive(lease)).await {
            Ok(Ok(pair)) => pair,
            // etcd-client checks the first reply itself and reports a lease
            // etcd does not know as this error.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                return Ok(false);
            }
            Ok(Err(e)) => return Err(unavailable("lease keep-alive", e)),
            Err(_) => return Err(timed_out("lease keep-alive", t)),
        };
        timeout(t, keeper.keep_alive())
            .await
            .map_err(|_| timed_out("keep-alive", t))?
            .map_err(|e| unavailable("keep-alive", e))?;
        let ttl = match timeout(t, stream.message()).await {
            Ok(Ok(Some(reply))) => reply.ttl(),
            Ok(Ok(None)) => return Err(unavailable("keep-alive", "stream closed at once")),
            Ok(Err(e)) => return Err(unavailable("keep-alive", e)),
            Err(_) => return Err(timed_out("keep-alive reply", t)),
        };
        if ttl <= 0 {
            return Ok(false);
        }
        self.stream = Some((keeper, stream));
        Ok(true)
    }

    async fn republish(&mut self) -> Result<(), RegistryError> {
        self.lease = None;
        self.stream = None;
        if self.keys.is_empty() {
            // Nothing to keep alive: the next registration grants a lease.
            return Ok(());
        }
        let lease = self.grant().await?;
        self.generation += 1;
        let keys: Vec<(String, String)> = self
            .keys
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        for (key, value) in &keys {
            self.put(key, value, lease).await?;
        }
        for (_, state) in self.keys.values() {
            state.send_replace(RegistrationState::Registered {
                generation: self.generation,
            });
        }
        info!(
            lease,
            keys = keys.len(),
            generation = self.generation,
            "etcd registrations restored under a new lease"
        );
        Ok(())
    }

    async fn grant(&mut self) -> Result<i64, RegistryError> {
        let t = self.timeout;
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let lease = timeout(t, self.client.lease_grant(ttl, None))
            .await
            .map_err(|_| timed_out("lease grant", t))?
            .map_err(|e| unavailable("lease grant", e))?
            .id();
        let stream = timeout(t, self.client.lease_keep_alive(lease))
            .await
            .map_err(|_| timed_out("lease keep-alive", t))?
            .map_err(|e| unavailable("lease keep-alive", e))?;
        self.lease = Some(lease);
        self.stream = Some(stream);
        debug!(lease, ttl, "etcd lease granted");
        Ok(lease)
    }

    /// Puts `key` under `lease`; the value and lease it replaced, if any.
    async fn put(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Result<Option<(Vec<u8>, i64)>, RegistryError> {
        let client = &self.client;
        let resp = idempotent(self.timeout, &format!("put {key}"), || {
            let mut c = client.clone();
            async move {
                c.put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(lease).with_prev_key()),
                )
                .await
            }
        })
        .await?;
        Ok(resp.prev_key().map(|kv| (kv.value().to_vec(), kv.lease())))
    }

    /// Compares what etcd holds under every own key with what was
    /// registered, and repairs it (issue 12, faults 3 and 4): a key removed
    /// by someone else is put again, and a key rewritten without a lease
    /// (it would never expire after this process dies) or with another
    /// value is put again under the lease. A key held by another live lease
    /// (a second process publishing the same address) is left to it, logged
    /// once as a conflict, and taken back once it is gone. Runs on every
    /// keep-alive beat (TTL / 3).
    async fn verify(&mut self) {
        let Some(own) = self.lease else { return };
        let keys: Vec<(String, String)> = self
            .keys
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        // One read transaction per 64 keys, all bounded together by half a
        // beat: the check must never delay the next keep-alive.
        let budget = self.beat_interval() / 2;
        let checked_by = Instant::now() + budget;
        let mut held: HashMap<String, Option<etcd_client::KeyValue>> = HashMap::new();
        for chunk in keys.chunks(64) {
            let reads: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, _)| TxnOp::get(k.as_str(), None))
                .collect();
            let left = checked_by.saturating_duration_since(Instant::now());
            let resp = match timeout(left, self.client.txn(Txn::new().and_then(reads))).await {
                Ok(Ok(r)) => r,
                // A failed check is tried again at the next beat; the
                // keep-alive notices a registry that is really gone.
                Ok(Err(e)) => {
                    debug!(error = %e, "etcd: cannot check the own keys");
                    return;
                }
                Err(_) => {
                    debug!(?budget, "etcd: checking the own keys took too long");
                    return;
                }
            };
            for ((key, _), op) in chunk.iter().zip(resp.op_responses()) {
                if let etcd_client::TxnOpResponse::Get(get) = op {
                    held.insert(key.clone(), get.kvs().first().cloned());
                }
            }
        }
        for (key, value) in keys {
            let Some(kv) = held.remove(&key) else {
                continue;
            };
            let why = match &kv {
                None => "it was removed by someone else",
                Some(kv) if kv.lease() == 0 => {
                    "it was rewritten without a lease (it would outlive this process)"
                }
                Some(kv) if kv.lease() != own => {
                    let other = kv.lease();
                    if self.conflicts.insert(key.clone(), other) != Some(other) {
                        warn!(
                            key,
                            own_lease = own,
                            other_lease = other,
                            "etcd registration conflict: another live process publishes the same address; standing by until its key is gone"
                        );
                    }
                    continue;
                }
                Some(kv) if kv.value() != value.as_bytes() => "its value was changed",
                Some(_) => {
                    self.conflicts.remove(&key);
                    continue;
                }
            };
            let t = self.timeout.min(budget);
            // Only if nobody changed it since the check.
            let unchanged = match &kv {
                Some(kv) => {
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(
                key.as_str(),
                value.as_str(),
                Some(PutOptions::new().with_lease(own)),
            )]);
            match timeout(t, self.client.txn(txn)).await {
                Ok(Ok(r)) if r.succeeded() => {
                    self.conflicts.remove(&key);
                    self.generation += 1;
                    if let Some((_, state)) = self.keys.get(&key) {
                        state.send_replace(RegistrationState::Registered {
                            generation: self.generation,
                        });
                    }
                    warn!(
                        key,
                        reason = why,
                        "etcd registration drifted from what this provider registered; restored"
                    );
                }
                Ok(Ok(_)) => debug!(
                    key,
                    "etcd: an own key changed while it was repaired; checking again next beat"
                ),
                Ok(Err(e)) => debug!(key, error = %e, "etcd: cannot repair an own key"),
                Err(_) => debug!(key, "etcd: repairing an own key timed out"),
            }
        }
    }

    async fn register(
        &mut self,
        key: String,
        value: String,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        // A keep-alive that just broke is usually resumed at once through
        // another member (a member died): try that now, a few times within
        // the timeout (the client may route the first tries to the dead
        // member again), instead of refusing the registration until the
        // next scheduled attempt.
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Backoff::new(QUICK_RETRY_MIN, QUICK_RETRY_MAX);
        while self.retry_at.is_some() {
            self.restore().await;
            let pause = backoff.next_pause();
            if self.retry_at.is_none() || Instant::now() + pause >= deadline {
                break;
            }
            sleep(pause).await;
        }
        if self.retry_at.is_some() {
            return Err(RegistryError::unavailable_because(
                BACKEND,
                "the etcd lease is lost and being restored; try again",
            ));
        }
        let lease = match self.lease {
            Some(l) => l,
            None => self.grant().await?,
        };
        // Who holds the key now, read before the put: the put's own record
        // of it is lost when the put is sent again after a lost reply (the
        // retry then sees this keeper's lease).
        let before = match timeout(self.timeout, self.client.get(key.as_str(), None)).await {
            Ok(Ok(r)) => r.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())),
            _ => None,
        };
        let replaced = self.put(&key, &value, lease).await?;
        let foreign = |p: &Option<(Vec<u8>, i64)>| {
            p.as_ref()
                .is_some_and(|(_, other)| *other != 0 && *other != lease)
        };
        let displaced = if foreign(&replaced) {
            replaced
        } else if foreign(&before) {
            before
        } else {
            None
        };
        if let Some((prev, other)) = displaced {
            // A key under a lease etcd still holds: another live process
            // publishes the same address. Take it (the address is served
            // either way), and hand it back when deregistering.
            warn!(
                key,
                own_lease = lease,
                other_lease = other,
                "etcd registration conflict: another live process publishes the same address; taking the key over until this registration ends"
            );
            self.displaced.insert(key.clone(), (prev, other));
        }
        state.send_replace(RegistrationState::Registered {
            generation: self.generation,
        });
        self.keys.insert(key, (value, state));
        Ok(())
    }

    async fn deregister(&mut self, key: &str) -> Result<(), RegistryError> {
        let Some((_, state)) = self.keys.remove(key) else {
            return Ok(());
        };
        state.send_replace(RegistrationState::Deregistered);
        self.conflicts.remove(key);
        let displaced = self.displaced.remove(key);
        let Some(own) = self.lease else {
            // No lease: the key expired with it, or was never ours.
            return Ok(());
        };
        let ours = || Compare::lease(key, CompareOp::Equal, own);
        if let Some((value, other)) = displaced {
            // Handed back, or no longer ours: nothing to delete. Not done
            // (its lease is gone): delete as usual.
            if self.hand_back(key, value, other, own).await {
                return Ok(());
            }
        }
        // Only a key that is still ours: another process may have taken it.
        let client = &self.client;
        idempotent(self.timeout, &format!("delete {key}"), || {
            let mut c = client.clone();
            let txn = Txn::new()
                .when([ours()])
                .and_then([TxnOp::delete(key, None)]);
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(())
    }

    /// Puts `key` back under `other`, the live lease it was taken from, if
    /// it is still under `own`, so the other process's consumers see no gap.
    /// `true` if settled: handed back, or no longer ours and left alone;
    /// `false` if not done (the other lease is gone, or etcd did not answer).
    async fn hand_back(&self, key: &str, value: Vec<u8>, other: i64, own: i64) -> bool {
        let back = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, own)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(other)),
            )]);
        match timeout(self.timeout, self.client.clone().txn(back)).await {
            Ok(Ok(r)) if r.succeeded() => {
                info!(
                    key,
                    other_lease = other,
                    "etcd key handed back to the process it was taken from"
                );
                true
            }
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                debug!(key, error = %e, "etcd: cannot hand the key back");
                false
            }
            Err(_) => {
                debug!(key, "etcd: handing the key back timed out");
                false
            }
        }
    }

    async fn revoke(&mut self) {
        for (_, state) in self.keys.values() {
            state.send_replace(RegistrationState::Deregistered);
        }
        self.keys.clear();
        self.conflicts.clear();
        self.stream = None;
        if let Some(lease) = self.lease {
            // Keys taken over from another live process go back to it
            // before the revoke would delete them.
            for (key, (value, other)) in std::mem::take(&mut self.displaced) {
                self.hand_back(&key, value, other, lease).await;
            }
        }
        if let Some(lease) = self.lease.take() {
            let client = &self.client;
            let revoked = idempotent(self.timeout, "lease revoke", || {
                let mut c = client.clone();
                async move { c.lease_revoke(lease).await }
            })
            .await;
            match revoked {
                Ok(_) => info!(lease, "etcd lease revoked"),
                Err(e) => {
                    warn!(lease, error = %e, "etcd lease revoke failed; keys expire with the TTL")
                }
            }
        }
    }
}

async fn next_keep_alive(
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<Option<i64>, etcd_client::Error> {
    match stream {
        Some((_, s)) => s.message().await.map(|m| m.map(|r| r.ttl())),
        None => std::future::pending().await,
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
            tx,
            revision,
            connected: true,
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

/// Follows one service prefix.
struct Follower {
    client: Client,
    skips: Arc<SkipLog>,
    root: String,
    prefix: String,
    timeout: Duration,
    tx: mpsc::Sender<WatchEvent>,
    /// Last revision whose events were delivered.
    revision: i64,
    connected: bool,
}

enum WatchEnd {
    /// The consumer is gone.
    Closed,
    /// The connection failed: back off, then resynchronise.
    Broken(String),
    /// Resynchronise with a fresh get first.
    Resync(String),
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            match self.follow().await {
                WatchEnd::Closed => return,
                WatchEnd::Resync(why) => {
                    info!(prefix = %self.prefix, reason = why, "etcd watch resynchronising");
                }
                WatchEnd::Broken(why) => {
                    debug!(prefix = %self.prefix, reason = why, "etcd watch broken");
                    if !self.set_connected(false).await || !self.pause(&mut backoff).await {
                        return;
                    }
                }
            }
            // Every re-established watch starts from a fresh get (module docs).
            loop {
                match self.snapshot().await {
                    Ok(true) => break,
                    Ok(false) => return,
                    Err(e) => {
                        debug!(prefix = %self.prefix, error = %rpc_core::error::report(&e), "etcd resync failed");
                        if !self.set_connected(false).await || !self.pause(&mut backoff).await {
                            return;
                        }
                    }
                }
            }
            backoff.reset();
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

    /// A fresh get, delivered as a snapshot. `Ok(false)`: consumer gone.
    async fn snapshot(&mut self) -> Result<bool, RegistryError> {
        let (list, revision) =
            EtcdRegistry::get_prefix(&mut self.client, &self.prefix, self.timeout, &self.skips)
                .await?;
        self.revision = revision;
        if self.tx.send(WatchEvent::Snapshot(list)).await.is_err() {
            return Ok(false);
        }
        Ok(self.set_connected(true).await)
    }

    async fn follow(&mut self) -> WatchEnd {
        // Fragmented: a burst of events (a catch-up after a break) comes in
        // several messages instead of one over the receive limit.
        let options = WatchOptions::new()
            .with_prefix()
            .with_fragment()
            .with_start_revision(self.revision + 1);
        let mut stream = tokio::select! {
            _ = self.tx.closed() => return WatchEnd::Closed,
            s = timeout(self.timeout, self.client.watch(self.prefix.as_str(), Some(options))) => match s {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return WatchEnd::Broken(e.to_string()),
                Err(_) => return WatchEnd::Broken("watch request timed out".into()),
            },
        };
        loop {
            let msg = tokio::select! {
                _ = self.tx.closed() => return WatchEnd::Closed,
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return WatchEnd::Broken("watch stream ended".into()),
                Err(e) => return WatchEnd::Broken(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                return WatchEnd::Resync(format!(
                    "revision {} was compacted (oldest kept: {})",
                    self.revision + 1,
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                return WatchEnd::Resync(format!("watch cancelled: {}", resp.cancel_reason()));
            }
            if resp.created() {
                let now = resp.header().map(|h| h.revision()).unwrap_or(0);
                if now < self.revision {
                    // etcd lost its history (restarted from an empty data dir):
                    // our revision means nothing there any more.
                    return WatchEnd::Resync(format!(
                        "cluster revision went back from {} to {now}",
                        self.revision
                    ));
                }
                if !self.set_connected(true).await {
                    return WatchEnd::Closed;
                }
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                self.revision = self.revision.max(kv.mod_revision());
                let key = String::from_utf8_lossy(kv.key());
                let event = match ev.event_type() {
                    EventType::Put => match ServiceMetaInfo::from_json(kv.value()) {
                        Ok(m) => {
                            self.skips.usable(&key);
                            WatchEvent::Upsert(m)
                        }
                        Err(e) => {
                            self.skips.skipped(
                                BACKEND,
                                &key,
                                &format!("not an instance record: {e}"),
                            );
                            continue;
                        }
                    },
                    EventType::Delete => match key.strip_prefix(self.root.as_str()) {
                        Some(node) => WatchEvent::Remove(node.to_owned()),
                        None => continue,
                    },
                };
                if self.tx.send(event).await.is_err() {
                    return WatchEnd::Closed;
                }
            }
        }
    }
}
