//! [`ConsulRegistry`]: a Consul agent as the registry (cargo feature `consul`).
//!
//! Written against Consul 1.8 (the version CI runs) and using only API that
//! 1.8 has: agent service registration with a TTL check, check passes,
//! agent deregistration, and blocking queries on the health endpoint. No
//! streaming backend (1.10+), no `ns`/partitions (Enterprise), no peering.
//!
//! # Names
//!
//! A service key `name:version` becomes the Consul service name
//! `[{namespace}-]{name}-{version}`, lowercased, with every run of
//! characters other than `a-z0-9` turned into one `-` (DNS-friendly):
//! `UserService:1.0` is `userservice-1-0`, and with
//! `registry.namespace = "team-a"` it is `team-a-userservice-1-0`. Versions
//! thus never share a Consul service. Each instance registers with the
//! service ID `[{namespace}/]{name:version}/{host:port}` (its node key), so
//! two keys that happen to map to one Consul name never mix: discovery keeps
//! only instances whose ID is the one their record implies.
//!
//! # Records
//!
//! The full [`ServiceMetaInfo`] travels as JSON in one tag,
//! `rpc-record={json}`: Consul tags have no length or character limits
//! (`Meta` allows 64 keys of `[A-Za-z0-9_-]`, values up to 512 bytes). The tags `rpc-version=` and `rpc-group=`
//! and the `Meta` keys `rpc_service_key`, `rpc_version`, `rpc_group`,
//! `rpc_weight` (plus every metadata entry that fits Consul's `Meta` rules)
//! are there for operators; the weight is also Consul's passing weight.
//!
//! # Registering
//!
//! Each instance is an agent service with a TTL check of `ttl_secs`,
//! registered passing, with `DeregisterCriticalServiceAfter` of the larger
//! of one minute (Consul's minimum) and three TTLs. A keeper task per
//! registry passes every check each `ttl / 3` (at most 10 s). A pass the
//! agent rejects (it answers 500 "does not have associated TTL" once it has
//! forgotten the service: agent restarted, or someone deregistered it)
//! re-registers the service, with backoff, and bumps its generation; an
//! unreachable agent is simply tried again on the next beat. Deregistering
//! (explicitly, on drop, or [`ConsulRegistry::shutdown`]) deregisters from
//! the agent.
//!
//! # Discovering
//!
//! `GET /v1/health/service/{name}?passing&stale`: only instances whose
//! checks all pass, answered by any server (Consul's stale mode), so a
//! consumer can start during a leader election; an answer from a server
//! that has not heard from a leader for [`MAX_STALE`] is refused. (With the
//! default mode a consumer started just after the leader died waited about
//! 10 s for its first list on the three-server cluster script.) Only
//! confirming a registration reads in the default mode. Consul keeps a killed provider critical
//! for at least a minute before reaping it, so hiding it within the TTL is
//! the `passing` filter's job. Watches are blocking queries (`index` +
//! `wait`), diffed into upserts and removes. Following the Consul docs, an
//! index that goes backwards is reset to 0 and an index of 0 is raised to 1;
//! queries are spaced by a minimum interval. Errors emit
//! `Connected(false)` and back off exponentially; the first good answer
//! after them is a snapshot followed by `Connected(true)`.
//!
//! All of it goes over one hyper client (rustls), not a Consul client
//! crate: `rs-consul`, used before, has neither the agent endpoints this
//! needs nor the stale mode and its `X-Consul-LastContact` header, and the
//! four endpoints used are small.

use crate::support::{diff, sleep_until_opt};
use rpc_core::RegistryErrorKind;
use rpc_core::backoff::Backoff;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_rustls::{FixedServerNameResolver, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rpc_core::config::TlsConfig;
use rpc_core::discover::WATCH_CHANNEL_CAPACITY;
use rpc_core::{
    BoxFuture, Deregister, Discover, Registration, RegistrationState, RegistryConfig,
    RegistryError, ServiceMetaInfo, Watch, WatchEvent,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};

use crate::support::keeper;
use crate::support::task::AbortOnDrop;

const BACKEND: &str = "consul";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const COMMAND_CAPACITY: usize = 64;
/// How long one blocking query waits for a change (Consul adds up to 1/16).
const WATCH_WAIT: Duration = Duration::from_secs(30);
/// Least time between two blocking queries of one watch.
const MIN_QUERY_INTERVAL: Duration = Duration::from_millis(50);
/// The oldest stale read discovery accepts: how long ago the answering
/// server last heard from a leader (`X-Consul-LastContact`). An election
/// takes a few seconds; a server cut off for longer than this is not
/// trusted with the list.
pub const MAX_STALE: Duration = Duration::from_secs(10);

/// One entry of `/v1/health/service/:name`: only what discovery reads.
#[derive(Deserialize)]
struct HealthEntry {
    #[serde(rename = "Service")]
    service: HealthService,
}

#[derive(Deserialize)]
struct HealthService {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Tags", default)]
    tags: Vec<String>,
}
/// Longest heartbeat interval, whatever the TTL.
const BEAT_MAX: Duration = Duration::from_secs(10);
/// Consul reaps critical services no sooner than this.
const DEREGISTER_CRITICAL_MIN: Duration = Duration::from_secs(60);
/// Tag carrying the instance record as JSON.
pub const RECORD_TAG: &str = "rpc-record=";

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

/// Appends `s` as lowercase `a-z0-9` runs joined by single dashes (and
/// separated from what `out` holds by one).
fn dns_part(s: &str, out: &mut String) {
    let mut dash = true;
    for c in s.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
    }
}

fn clean_namespace(namespace: Option<&str>) -> Option<&str> {
    namespace
        .map(|n| n.trim_matches('/'))
        .filter(|n| !n.is_empty())
}

/// The Consul service name for a service key (module docs, "Names").
pub fn service_name(namespace: Option<&str>, service_key: &str) -> String {
    let mut out = String::new();
    if let Some(ns) = clean_namespace(namespace) {
        dns_part(ns, &mut out);
    }
    let key = rpc_core::ServiceKey::parse(service_key);
    let (name, version) = (key.name(), key.version());
    dns_part(name, &mut out);
    dns_part(version, &mut out);
    if out.is_empty() {
        out.push_str("rpc-service");
    }
    out
}

/// The Consul service ID of an instance: `[{namespace}/]{node key}`.
pub fn service_id(namespace: Option<&str>, meta: &ServiceMetaInfo) -> String {
    match clean_namespace(namespace) {
        Some(ns) => format!("{ns}/{}", meta.node_key()),
        None => meta.node_key(),
    }
}

/// The ID of an instance's TTL check (Consul's default for a service's only
/// check).
fn check_id(service_id: &str) -> String {
    format!("service:{service_id}")
}

/// Percent-encodes a path segment (Consul decodes it, `/` included).
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Go duration syntax for whole milliseconds.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Whether a metadata entry may be copied into Consul's `Meta`.
fn fits_meta(key: &str, value: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && value.len() <= 512
        && !key.starts_with("consul-")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceDefinition<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    name: &'a str,
    tags: Vec<String>,
    address: &'a str,
    port: u16,
    meta: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weights: Option<Weights>,
    check: CheckDefinition<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    passing: u32,
    warning: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckDefinition<'a> {
    #[serde(rename = "CheckID")]
    check_id: &'a str,
    name: &'static str,
    #[serde(rename = "TTL")]
    ttl: String,
    status: &'static str,
    deregister_critical_service_after: String,
}

/// The agent registration body of an instance.
fn definition(
    namespace: Option<&str>,
    meta: &ServiceMetaInfo,
    ttl: Duration,
) -> (String, String, Vec<u8>) {
    let id = service_id(namespace, meta);
    let check = check_id(&id);
    let name = service_name(namespace, &meta.service_key());
    let mut m = BTreeMap::new();
    for (k, v) in &meta.metadata {
        if m.len() < 60 && fits_meta(k, v) {
            m.insert(k.clone(), v.clone());
        }
    }
    // Ours win over metadata of the same name.
    let mut put = |k: &str, v: String| {
        if fits_meta(k, &v) {
            m.insert(k.to_owned(), v);
        }
    };
    put("rpc_service_key", meta.service_key());
    put("rpc_version", meta.service_version.clone());
    put("rpc_group", meta.service_group.clone());
    put("rpc_weight", meta.weight.to_string());
    let def = ServiceDefinition {
        id: &id,
        name: &name,
        tags: vec![
            format!("rpc-version={}", meta.service_version),
            format!("rpc-group={}", meta.service_group),
            format!("{RECORD_TAG}{}", meta.to_json()),
        ],
        address: &meta.service_host,
        port: meta.service_port,
        meta: m,
        weights: (meta.weight > 0).then_some(Weights {
            passing: meta.weight,
            warning: 1,
        }),
        check: CheckDefinition {
            check_id: &check,
            name: "rpc heartbeat",
            ttl: go_duration(ttl),
            status: "passing",
            deregister_critical_service_after: go_duration(
                ttl.saturating_mul(3).max(DEREGISTER_CRITICAL_MIN),
            ),
        },
    };
    // Strings, integers and maps only: serialization cannot fail.
    let body = serde_json::to_vec(&def).unwrap_or_default();
    (id, check, body)
}

/// The agent's HTTP API.
#[derive(Clone)]
struct Agent {
    client: HttpsClient,
    base: String,
    token: Option<String>,
}

impl Agent {
    /// One request; `Ok` carries any status the agent answered with.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        t: Duration,
    ) -> Result<(StatusCode, Bytes), RegistryError> {
        self.exchange(method, path, body, t)
            .await
            .map(|(status, _, bytes)| (status, bytes))
    }

    /// [`call`](Self::call), with the answer's headers.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        t: Duration,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), RegistryError> {
        let what = format!("{method} {path}");
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        let body = match body {
            Some(b) => Full::new(Bytes::from(b)).boxed(),
            None => Empty::<Bytes>::new().boxed(),
        };
        let req = req
            .body(body)
            .map_err(|e| unavailable(format!("{what}: bad request"), e))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unavailable(what.clone(), e))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unavailable(format!("{what}: reading the answer"), e))?
                .to_bytes();
            Ok((status, headers, bytes))
        };
        timeout(t, exchange)
            .await
            .map_err(|_| timed_out(&what, t))?
    }

    /// A request that must answer 200.
    async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        t: Duration,
    ) -> Result<Bytes, RegistryError> {
        let (status, bytes) = self.call(method.clone(), path, body, t).await?;
        if status == StatusCode::OK {
            Ok(bytes)
        } else {
            Err(rejected(&format!("{method} {path}"), status, &bytes))
        }
    }

    async fn register(&self, body: &[u8], t: Duration) -> Result<(), RegistryError> {
        self.ok(
            Method::PUT,
            "/v1/agent/service/register",
            Some(body.to_vec()),
            t,
        )
        .await
        .map(drop)
    }

    async fn deregister(&self, id: &str, t: Duration) -> Result<(), RegistryError> {
        let path = format!("/v1/agent/service/deregister/{}", encode_path(id));
        self.ok(Method::PUT, &path, None, t).await.map(drop)
    }

    async fn pass(&self, check: &str, t: Duration) -> Result<(StatusCode, Bytes), RegistryError> {
        let path = format!("/v1/agent/check/pass/{}", encode_path(check));
        self.call(Method::PUT, &path, None, t).await
    }
}

fn rejected(what: &str, status: StatusCode, body: &[u8]) -> RegistryError {
    let body = String::from_utf8_lossy(body);
    refused(what, status, &body)
        .unwrap_or_else(|| failed(format!("{what}: HTTP {status}: {}", body.trim())))
}

/// A 403 is Consul's ACL system refusing the request: "ACL not found" (a
/// token it does not know) is `Unauthenticated`, anything else ("Permission
/// denied": a token without the rights) `PermissionDenied`.
fn refused(what: &str, status: StatusCode, body: &str) -> Option<RegistryError> {
    if status != StatusCode::FORBIDDEN {
        return None;
    }
    let kind = if body.contains("ACL not found") {
        RegistryErrorKind::Unauthenticated
    } else {
        RegistryErrorKind::PermissionDenied
    };
    Some(RegistryError::denied(
        BACKEND,
        kind,
        what,
        body.trim(),
        None,
    ))
}

/// The HTTP(S) client: webpki roots by default; `registry.tls` gives a CA,
/// an optional client certificate and an optional server name.
/// The agent's HTTP(S) client (hyper, with rustls).
type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector>,
    http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
>;

fn http_client(tls: Option<&TlsConfig>, t: Duration) -> Result<HttpsClient, RegistryError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(t));
    http.set_nodelay(true);
    let builder = match tls {
        None => HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| unavailable("TLS set-up", e))?
            .https_or_http()
            .enable_http1(),
        Some(tls) => {
            let Some(ca) = &tls.ca_file else {
                return Err(invalid(
                    "tls.ca_file",
                    "needed for consul (without [registry.tls], https uses the public web roots)",
                ));
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&crate::support::tls::read_pem(
                BACKEND, ca, "ca_file",
            )?) {
                let cert = cert.map_err(|e| unavailable("registry.tls.ca_file", e))?;
                roots
                    .add(cert)
                    .map_err(|e| unavailable("registry.tls.ca_file", e))?;
            }
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| unavailable("TLS set-up", e))?
                .with_root_certificates(roots);
            let config = match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => {
                    let chain = CertificateDer::pem_slice_iter(&crate::support::tls::read_pem(
                        BACKEND,
                        cert,
                        "cert_file",
                    )?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| unavailable("registry.tls.cert_file", e))?;
                    let key = PrivateKeyDer::from_pem_slice(&crate::support::tls::read_pem(
                        BACKEND, key, "key_file",
                    )?)
                    .map_err(|e| unavailable("registry.tls.key_file", e))?;
                    config
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| unavailable("registry.tls client certificate", e))?
                }
                (None, None) => config.with_no_client_auth(),
                _ => {
                    return Err(invalid(
                        "tls.key_file",
                        "registry.tls needs both cert_file and key_file for a client certificate",
                    ));
                }
            };
            let mut b = HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_or_http();
            if let Some(domain) = &tls.domain {
                let name = ServerName::try_from(domain.clone())
                    .map_err(|e| unavailable("registry.tls.domain", e))?;
                b = b.with_server_name_resolver(FixedServerNameResolver::new(name));
            }
            b.enable_http1()
        }
    };
    let connector = builder.wrap_connector(http);
    // No pooled idle connections: a connection
    // the agent closed while idle cannot fail the next heartbeat.
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::ZERO)
        .pool_max_idle_per_host(0)
        .build(connector))
}

/// The agent's base URL: `http://` is assumed when no scheme is given.
fn base_url(address: &str) -> String {
    let a = address.trim().trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") {
        a.to_owned()
    } else {
        format!("http://{a}")
    }
}

/// A Consul agent as a registry. Cheap to clone; clones share one client and
/// one keeper task.
#[derive(Clone)]
pub struct ConsulRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    agent: Agent,
    /// Entries discovery skipped, so each is logged once.
    skips: crate::support::skip::SkipLog,
    namespace: Option<String>,
    datacenter: Option<String>,
    ttl: Duration,
    timeout: Duration,
    commands: mpsc::Sender<Command>,
}

impl fmt::Debug for ConsulRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulRegistry")
            .field("address", &self.inner.agent.base)
            .field("namespace", &self.inner.namespace)
            .field("datacenter", &self.inner.datacenter)
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

type Command = keeper::Command<(String, String, Vec<u8>)>;

impl ConsulRegistry {
    /// Talks to the agent at `config.address` (one address; `http://` is
    /// assumed without a scheme) with `timeout_ms`, the optional ACL `token`,
    /// `datacenter` (for discovery), `namespace` (a service-name prefix) and
    /// `tls`. Fails if the agent does not answer.
    pub async fn connect(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let address = match config.address.as_slice() {
            [one] => base_url(one),
            [] => return Err(invalid("address", "names no Consul agent")),
            many => {
                return Err(invalid(
                    "address",
                    format!(
                        "must name one Consul agent (services belong to the agent they register with), got {}",
                        many.join(",")
                    ),
                ));
            }
        };
        let t = config.timeout();
        let ttl = config.ttl().max(Duration::from_secs(1));
        let token = config.token.clone().filter(|s| !s.is_empty());
        let client = http_client(config.tls.as_ref(), t)?;
        let agent = Agent {
            client,
            base: address,
            token,
        };
        agent
            .ok(Method::GET, "/v1/status/leader", None, t)
            .await
            .map_err(|e| match e {
                RegistryError::Unavailable {
                    message, source, ..
                } => RegistryError::Unavailable {
                    backend: BACKEND,
                    message: format!("Consul agent at {} does not answer: {message}", agent.base),
                    source,
                },
                other => other,
            })?;
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let keeper = Keeper {
            agent: agent.clone(),
            timeout: t,
            beat: beat_interval(ttl),
            entries: HashMap::new(),
            retry_at: None,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
            unreachable: false,
        };
        // The keeper heartbeats every registration. It ends when every
        // handle is gone, after deregistering what is left.
        tokio::spawn(keeper.run(rx));
        Ok(Self {
            inner: Arc::new(Inner {
                agent,
                skips: crate::support::skip::SkipLog::default(),
                namespace: clean_namespace(config.namespace.as_deref()).map(str::to_owned),
                datacenter: config.datacenter.clone().filter(|s| !s.is_empty()),
                ttl,
                timeout: t,
                commands: tx,
            }),
        })
    }

    /// The Consul service name `service_key` maps to.
    pub fn consul_name(&self, service_key: &str) -> String {
        service_name(self.inner.namespace.as_deref(), service_key)
    }

    /// The Consul service ID an instance registers with.
    pub fn instance_id(&self, meta: &ServiceMetaInfo) -> String {
        service_id(self.inner.namespace.as_deref(), meta)
    }

    /// The TTL of the instances' checks.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The agent's base URL.
    pub fn address(&self) -> &str {
        &self.inner.agent.base
    }

    /// Deregisters every instance this registry published and stops
    /// heartbeating.
    pub async fn shutdown(&self) {
        keeper::shutdown(&self.inner.commands, self.inner.timeout * 2).await;
    }

    /// One health query for `name` (passing instances only). `index` makes
    /// it a blocking query. `stale` lets any server answer, not only the
    /// leader: discovery then works during a leader election (Consul's
    /// "stale" consistency mode). An answer from a server that has not
    /// heard from a leader for more than [`MAX_STALE`] is refused, so a
    /// partitioned server cannot serve an old list for long.
    async fn health(
        &self,
        service_key: &str,
        index: Option<u64>,
        stale: bool,
    ) -> Result<(Vec<ServiceMetaInfo>, u64), RegistryError> {
        let name = self.consul_name(service_key);
        let wait = index.map(|_| WATCH_WAIT);
        // Consul adds up to wait/16 of jitter.
        let t = self.inner.timeout + wait.map_or(Duration::ZERO, |w| w + w / 16);
        let mut path = format!("/v1/health/service/{}?passing=1", encode_path(&name));
        if stale {
            path.push_str("&stale");
        }
        if let Some(dc) = &self.inner.datacenter {
            path.push_str(&format!("&dc={}", encode_path(dc)));
        }
        if let (Some(index), Some(wait)) = (index, wait) {
            path.push_str(&format!("&index={index}&wait={}ms", wait.as_millis()));
        }
        let what = format!("health query for {name}");
        let (status, headers, body) = self
            .inner
            .agent
            .exchange(Method::GET, &path, None, t + Duration::from_secs(1))
            .await?;
        if status != StatusCode::OK {
            return Err(rejected(&what, status, &body));
        }
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let returned = header("X-Consul-Index")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if stale {
            let last_contact = header("X-Consul-LastContact")
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis)
                .unwrap_or_default();
            let known_leader = header("X-Consul-KnownLeader") == Some("true");
            if last_contact > MAX_STALE {
                return Err(RegistryError::unavailable_because(
                    BACKEND,
                    format!(
                        "{what}: the answering server last heard from a leader {last_contact:?} ago (more than {MAX_STALE:?})"
                    ),
                ));
            }
            if !known_leader {
                debug!(service = %name, ?last_contact, "consul answered without a known leader (stale read)");
            }
        }
        let entries: Vec<HealthEntry> = serde_json::from_slice(&body)
            .map_err(|e| unavailable(format!("{what}: unreadable answer"), e))?;
        let mut found = BTreeMap::new();
        for node in entries {
            let Some(json) = node
                .service
                .tags
                .iter()
                .find_map(|t| t.strip_prefix(RECORD_TAG))
            else {
                self.inner.skips.skipped(
                    BACKEND,
                    &node.service.id,
                    "it carries no rpc-record tag (registered by something else, or rewritten)",
                );
                continue;
            };
            match ServiceMetaInfo::from_json(json.as_bytes()) {
                Ok(m)
                    if m.service_key() == service_key
                        && self.instance_id(&m) == node.service.id =>
                {
                    self.inner.skips.usable(&node.service.id);
                    found.insert(m.node_key(), m);
                }
                Ok(m) => self.inner.skips.skipped(
                    BACKEND,
                    &node.service.id,
                    &format!("its rpc record names another instance ({})", m.node_key()),
                ),
                Err(e) => self.inner.skips.skipped(
                    BACKEND,
                    &node.service.id,
                    &format!("its rpc record is malformed: {e}"),
                ),
            }
        }
        Ok((found.into_values().collect(), returned))
    }

    /// Waits (bounded by the timeout) until discovery shows `id` present or
    /// absent: on a cluster the agent syncs to the servers asynchronously.
    async fn settle(&self, meta: &ServiceMetaInfo, present: bool) {
        let key = meta.service_key();
        let node = meta.node_key();
        let deadline = Instant::now() + self.inner.timeout;
        let mut index = None;
        while Instant::now() < deadline {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                // The catalog the leader has, not a follower's copy.
                self.health(&key, index, false),
            )
            .await
            {
                Ok(Ok((list, i))) => {
                    if list.iter().any(|m| m.node_key() == node) == present {
                        return;
                    }
                    index = Some(i.max(1));
                }
                Ok(Err(e)) => {
                    debug!(%node, error = %e, "consul: cannot confirm the catalog");
                    return;
                }
                Err(_) => break,
            }
        }
        debug!(%node, present, "consul: the catalog did not confirm in time");
    }
}

fn beat_interval(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(100), BEAT_MAX)
}

impl rpc_core::Registry for ConsulRegistry {
    async fn register(&self, meta: ServiceMetaInfo) -> Result<Registration, RegistryError> {
        let (id, check, body) = definition(self.inner.namespace.as_deref(), &meta, self.inner.ttl);
        let t = self.inner.timeout;
        let state_rx = keeper::submit_registration(
            &self.inner.commands,
            (id.clone(), check, body),
            t * 2,
            BACKEND,
        )
        .await?;
        self.settle(&meta, true).await;
        let meta_for_settle = meta.clone();
        Ok(Registration::new(
            meta,
            state_rx,
            ConsulDeregister {
                id,
                meta: meta_for_settle,
                registry: self.clone(),
            },
        ))
    }
}

struct ConsulDeregister {
    id: String,
    meta: ServiceMetaInfo,
    registry: ConsulRegistry,
}

impl Deregister for ConsulDeregister {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        Box::pin(async move {
            let inner = &self.registry.inner;
            let (done, rx) = oneshot::channel();
            let cmd = Command::Deregister {
                key: self.id.clone(),
                done: Some(done),
            };
            if inner.commands.send(cmd).await.is_err() {
                // The keeper is gone: it deregistered everything on its way out.
                return Ok(());
            }
            timeout(inner.timeout * 2, rx)
                .await
                .map_err(|_| timed_out("deregister", inner.timeout * 2))?
                .unwrap_or(Ok(()))?;
            self.registry.settle(&self.meta, false).await;
            Ok(())
        })
    }

    fn deregister_on_drop(self: Box<Self>) {
        let commands = self.registry.inner.commands.clone();
        let cmd = Command::Deregister {
            key: self.id,
            done: None,
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = commands.try_send(cmd) {
            // A burst of drops: hand the send to the runtime rather than lose it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = commands.send(cmd).await;
                });
            }
        }
    }
}

/// One registered instance, as the keeper holds it.
struct Entry {
    check: String,
    body: Vec<u8>,
    /// What the agent must hold for it: address, port and record tag.
    expected: Expected,
    /// Another process holds this ID with another record (logged once),
    /// since when.
    conflict: Option<Instant>,
    state: watch::Sender<RegistrationState>,
    generation: u64,
    /// The agent forgot it: re-register at the next retry.
    lost: bool,
}

/// The parts of a registration that consumers depend on.
#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    address: String,
    port: u64,
    record: Option<String>,
}

impl Expected {
    /// From an agent registration body or an agent service entry (the same
    /// field names).
    fn of(v: &serde_json::Value) -> Self {
        Self {
            address: v["Address"].as_str().unwrap_or_default().to_owned(),
            port: v["Port"].as_u64().unwrap_or(0),
            record: v["Tags"].as_array().and_then(|tags| {
                tags.iter()
                    .filter_map(|t| t.as_str())
                    .find(|t| t.starts_with(RECORD_TAG))
                    .map(str::to_owned)
            }),
        }
    }

    fn from_body(body: &[u8]) -> Self {
        serde_json::from_slice(body)
            .map(|v| Self::of(&v))
            .unwrap_or_default()
    }
}

/// Heartbeats every registration of one registry and restores lost ones.
struct Keeper {
    agent: Agent,
    timeout: Duration,
    beat: Duration,
    entries: HashMap<String, Entry>,
    /// Set while some entry is lost: when to re-register next.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// The agent did not answer the last beat (logged once per outage).
    unreachable: bool,
}

impl keeper::Keeps<(String, String, Vec<u8>)> for Keeper {
    async fn keep(
        &mut self,
        (id, check, body): (String, String, Vec<u8>),
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        self.register(id, check, body, state).await
    }

    async fn release(&mut self, key: &str) -> Result<(), RegistryError> {
        self.deregister(key).await
    }

    async fn release_all(&mut self) {
        self.deregister_all().await;
    }
}

impl Keeper {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut beat = tokio::time::interval(self.beat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                cmd = commands.recv() => {
                    if !keeper::serve(&mut self, cmd, &mut commands).await {
                        return;
                    }
                }
                _ = beat.tick(), if !self.entries.is_empty() => self.beat_all().await,
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => self.restore().await,
            }
        }
    }

    /// Passes every live check once, concurrently.
    async fn beat_all(&mut self) {
        // A pass must not outlive the beat: the other checks wait for it.
        let t = self.timeout.min(self.beat);
        let agent = &self.agent;
        let passes = self
            .entries
            .iter()
            .filter(|(_, e)| !e.lost)
            .map(|(id, e)| async move { (id.clone(), agent.pass(&e.check, t).await) });
        let results = futures_util::future::join_all(passes).await;
        let mut reached = false;
        let mut unreachable = None;
        for (id, result) in results {
            match result {
                Ok((StatusCode::OK, _)) => reached = true,
                Ok((status, body)) => {
                    reached = true;
                    let why = rejected("check pass", status, &body);
                    self.lost(&id, &why.to_string());
                }
                Err(e) => unreachable = Some(e),
            }
        }
        if reached {
            self.compare(t).await;
        }
        match unreachable {
            Some(e) if !self.unreachable => {
                warn!(error = %e, "consul agent unreachable; heartbeats go on");
                self.unreachable = true;
            }
            None if reached && self.unreachable => {
                info!("consul agent reachable again");
                self.unreachable = false;
            }
            _ => {}
        }
    }

    /// Compares what the agent holds with what was registered (issue 12,
    /// fault 4): a passing TTL check says nothing about the service it
    /// belongs to, which someone may have re-registered with another
    /// address or port, or without the record tag consumers read. Such an
    /// entry is registered again. One agent call per beat for all entries.
    async fn compare(&mut self, t: Duration) {
        let held: serde_json::Value = match self
            .agent
            .ok(Method::GET, "/v1/agent/services", None, t)
            .await
        {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(e) => {
                debug!(error = %e, "consul: cannot read the agent's services");
                return;
            }
        };
        let drifted: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.lost)
            .filter_map(|(id, e)| {
                let there = held.get(id.as_str())?;
                let got = Expected::of(there);
                if got.address == e.expected.address
                    && got.port == e.expected.port
                    && got.record.is_some()
                    && got.record != e.expected.record
                {
                    // The same address with another record: a second live
                    // process publishing this address. Rewriting it each
                    // beat would only make the two take turns.
                    match e.conflict {
                        None => {
                            warn!(%id, "consul registration conflict: another process registered the same address with another record; leaving it");
                        }
                        // Both share one TTL check, which this keeper keeps
                        // passing: a second writer that died (SIGKILL)
                        // would stay listed for good. After three TTLs,
                        // register ours again; a live second writer then
                        // answers in kind, a few TTLs apart, not each beat.
                        Some(since) if since.elapsed() >= self.beat * 9 => {
                            return Some((
                                id.clone(),
                                "another record has held this address for three TTLs (its writer may be gone)".to_owned(),
                            ));
                        }
                        Some(_) => {}
                    }
                    return Some((id.clone(), String::new()));
                }
                (got != e.expected).then(|| {
                    (
                        id.clone(),
                        format!(
                            "the agent holds {}:{} ({}), registered {}:{} ({})",
                            got.address,
                            got.port,
                            if got.record.is_some() { "with a record" } else { "no record tag" },
                            e.expected.address,
                            e.expected.port,
                            if got.record == e.expected.record || got.record.is_none() {
                                "the record"
                            } else {
                                "another record"
                            }
                        ),
                    )
                })
            })
            .collect();
        let now = Instant::now();
        let in_conflict: std::collections::HashSet<&str> = drifted
            .iter()
            .filter(|(_, why)| why.is_empty())
            .map(|(id, _)| id.as_str())
            .collect();
        for (id, entry) in self.entries.iter_mut() {
            if in_conflict.contains(id.as_str()) {
                entry.conflict.get_or_insert(now);
            } else {
                entry.conflict = None;
            }
        }
        for (id, why) in drifted {
            if why.is_empty() {
                continue;
            }
            if let Some(e) = self.entries.get_mut(&id) {
                e.conflict = None;
            }
            self.lost(&id, &format!("the registration drifted: {why}"));
        }
    }

    fn lost(&mut self, id: &str, why: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if entry.lost {
            return;
        }
        warn!(%id, reason = why, "consul agent lost the registration; re-registering");
        entry.lost = true;
        entry.state.send_replace(RegistrationState::Reregistering);
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now());
        }
    }

    /// Re-registers every lost entry once; backs off if any fails.
    async fn restore(&mut self) {
        let t = self.timeout;
        let mut failure = None;
        for (id, entry) in self.entries.iter_mut().filter(|(_, e)| e.lost) {
            match self.agent.register(&entry.body, t).await {
                Ok(()) => {
                    entry.lost = false;
                    entry.generation += 1;
                    entry.state.send_replace(RegistrationState::Registered {
                        generation: entry.generation,
                    });
                    info!(%id, generation = entry.generation, "consul registration restored");
                }
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            None => {
                self.retry_at = None;
                self.backoff.reset();
            }
            Some(e) => {
                let pause = self.backoff.next_pause();
                debug!(error = %e, ?pause, "consul re-registration failed; retrying");
                self.retry_at = Some(Instant::now() + pause);
            }
        }
    }

    async fn register(
        &mut self,
        id: String,
        check: String,
        body: Vec<u8>,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        self.agent.register(&body, self.timeout).await?;
        state.send_replace(RegistrationState::Registered { generation: 0 });
        debug!(%id, "consul service registered");
        self.entries.insert(
            id,
            Entry {
                check,
                expected: Expected::from_body(&body),
                conflict: None,
                body,
                state,
                generation: 0,
                lost: false,
            },
        );
        Ok(())
    }

    async fn deregister(&mut self, id: &str) -> Result<(), RegistryError> {
        let Some(entry) = self.entries.remove(id) else {
            return Ok(());
        };
        entry.state.send_replace(RegistrationState::Deregistered);
        self.agent.deregister(id, self.timeout).await
    }

    async fn deregister_all(&mut self) {
        let entries: Vec<(String, Entry)> = self.entries.drain().collect();
        let agent = &self.agent;
        let t = self.timeout;
        let calls = entries.iter().map(|(id, e)| async move {
            e.state.send_replace(RegistrationState::Deregistered);
            (id, agent.deregister(id, t).await)
        });
        for (id, r) in futures_util::future::join_all(calls).await {
            match r {
                Ok(()) => debug!(%id, "consul service deregistered"),
                Err(e) => {
                    warn!(%id, error = %e, "consul deregistration failed; the check expires with the TTL")
                }
            }
        }
    }
}

/// The blocking-query index to send next, per the Consul docs: reset to 0
/// when it went backwards, never 0 after a first answer.
fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        0
    } else {
        returned.max(1)
    }
}

impl Discover for ConsulRegistry {
    async fn discover(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        Ok(self.health(service_key, None, true).await?.0)
    }

    async fn watch(&self, service_key: &str) -> Result<Watch, RegistryError> {
        // The first snapshot is read here so that an unreachable agent is an
        // error to the caller, not a silent empty list.
        let (list, index) = self.health(service_key, None, true).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        if tx.send(WatchEvent::Snapshot(list.clone())).await.is_err() {
            return Err(RegistryError::Shutdown);
        }
        let follower = Follower {
            registry: self.clone(),
            service_key: service_key.to_owned(),
            tx,
            index: next_index(0, index),
            current: list.into_iter().map(|m| (m.node_key(), m)).collect(),
            connected: true,
        };
        match AbortOnDrop::spawn(follower.run()) {
            Some(task) => Ok(Watch::with_guard(rx, task)),
            None => Err(failed("watch needs a Tokio runtime")),
        }
    }
}

/// Follows one service with blocking queries.
struct Follower {
    registry: ConsulRegistry,
    service_key: String,
    tx: mpsc::Sender<WatchEvent>,
    /// Index for the next blocking query (0: answer at once).
    index: u64,
    /// What the consumer was last told, by node key.
    current: BTreeMap<String, ServiceMetaInfo>,
    connected: bool,
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut last_query: Option<Instant> = None;
        loop {
            if let Some(at) = last_query {
                let next = at + MIN_QUERY_INTERVAL;
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = self.tx.closed() => return,
                }
            }
            last_query = Some(Instant::now());
            let index = (self.index > 0).then_some(self.index);
            let answer = tokio::select! {
                a = self.registry.health(&self.service_key, index, true) => a,
                _ = self.tx.closed() => return,
            };
            match answer {
                Ok((list, returned)) => {
                    if returned < self.index {
                        info!(service = %self.service_key, from = self.index, to = returned, "consul index went backwards; resetting");
                    }
                    self.index = next_index(self.index, returned);
                    backoff.reset();
                    if !self.deliver(list).await {
                        return;
                    }
                }
                Err(e) => {
                    debug!(service = %self.service_key, error = %e, "consul watch query failed");
                    // Resynchronise from scratch once the agent answers again.
                    self.index = 0;
                    if self.connected {
                        self.connected = false;
                        if self.tx.send(WatchEvent::Connected(false)).await.is_err() {
                            return;
                        }
                    }
                    let d = backoff.next_pause();
                    tokio::select! {
                        _ = sleep(d) => {}
                        _ = self.tx.closed() => return,
                    }
                }
            }
        }
    }

    /// Tells the consumer about `list`: a snapshot after an outage, else
    /// the differences. `false`: the consumer is gone.
    async fn deliver(&mut self, list: Vec<ServiceMetaInfo>) -> bool {
        let next = diff::nodes(list);
        if !self.connected {
            let snapshot = next.values().cloned().collect();
            self.current = next;
            if self.tx.send(WatchEvent::Snapshot(snapshot)).await.is_err() {
                return false;
            }
            self.connected = true;
            return self.tx.send(WatchEvent::Connected(true)).await.is_ok();
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
    fn service_names_are_dns_friendly_and_keep_versions_apart() {
        assert_eq!(service_name(None, "UserService:1.0"), "userservice-1-0");
        assert_eq!(
            service_name(Some("team-a"), "UserService:1.0"),
            "team-a-userservice-1-0"
        );
        assert_eq!(
            service_name(None, "Conf.Fields:2.1-beta"),
            "conf-fields-2-1-beta"
        );
        assert_ne!(
            service_name(None, "Conf.Apart:1.0"),
            service_name(None, "Conf.Apart:2.0")
        );
        assert_eq!(service_name(Some("/"), "::"), "rpc-service");
        assert_eq!(service_name(None, "__A__b:--1"), "a-b-1");
    }

    #[test]
    fn ids_are_node_keys_under_the_namespace() {
        let m = ServiceMetaInfo::new("S", "1.0", "127.0.0.1", 9);
        assert_eq!(service_id(None, &m), "S:1.0/127.0.0.1:9");
        assert_eq!(service_id(Some("/ns/"), &m), "ns/S:1.0/127.0.0.1:9");
        assert_eq!(check_id("S:1.0/h:1"), "service:S:1.0/h:1");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(
            encode_path("service:ns/S:1.0/[::1]:9"),
            "service:ns%2FS:1.0%2F%5B::1%5D:9"
        );
        assert_eq!(encode_path("ü x"), "%C3%BC%20x");
    }

    #[test]
    fn the_index_resets_when_it_goes_backwards_and_is_never_zero() {
        assert_eq!(next_index(0, 17), 17);
        assert_eq!(next_index(17, 17), 17);
        assert_eq!(next_index(17, 30), 30);
        assert_eq!(next_index(30, 5), 0);
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(12, 0), 0);
    }

    #[test]
    fn heartbeats_stay_well_inside_the_ttl() {
        assert_eq!(
            beat_interval(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(beat_interval(Duration::from_secs(300)), BEAT_MAX);
        assert_eq!(
            beat_interval(Duration::from_millis(150)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn the_definition_carries_the_record_and_a_ttl_check() {
        let mut m = ServiceMetaInfo::new("Conf.Fields", "2.1", "10.0.0.1", 80);
        m.weight = 7;
        m.metadata.insert("zone".into(), "a".into());
        m.metadata.insert("bad key".into(), "x".into());
        m.metadata.insert("note".into(), "\"ü\"".into());
        let (id, check, body) = definition(Some("ns"), &m, Duration::from_secs(3));
        assert_eq!(id, "ns/Conf.Fields:2.1/10.0.0.1:80");
        assert_eq!(check, "service:ns/Conf.Fields:2.1/10.0.0.1:80");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["ID"], id.as_str());
        assert_eq!(v["Name"], "ns-conf-fields-2-1");
        assert_eq!(v["Address"], "10.0.0.1");
        assert_eq!(v["Port"], 80);
        assert_eq!(v["Weights"]["Passing"], 7);
        assert_eq!(v["Meta"]["zone"], "a");
        assert_eq!(v["Meta"]["rpc_version"], "2.1");
        assert!(v["Meta"].get("bad key").is_none());
        assert_eq!(v["Check"]["TTL"], "3000ms");
        assert_eq!(v["Check"]["Status"], "passing");
        assert_eq!(v["Check"]["DeregisterCriticalServiceAfter"], "60000ms");
        let tags: Vec<&str> = v["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t.as_str())
            .collect();
        let record = tags
            .iter()
            .find_map(|t| t.strip_prefix(RECORD_TAG))
            .unwrap();
        assert_eq!(ServiceMetaInfo::from_json(record.as_bytes()).unwrap(), m);
        assert!(tags.contains(&"rpc-version=2.1"));
    }

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(base_url("127.0.0.1:8500"), "http://127.0.0.1:8500");
        assert_eq!(base_url("https://c:8501/"), "https://c:8501");
    }
}
