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

mod agent;
mod follow;
mod record;
mod registration;

use agent::*;
use follow::*;
use record::*;
pub use record::{service_id, service_name};
use registration::*;

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

crate::support::backend_errors!(BACKEND);

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

    /// The catalog's service names (a stale read, like discovery's), each
    /// mapped back to its key through an `rpc-record=` tag; names of other
    /// namespaces and services registered by something else are left out.
    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        let mut path = "/v1/catalog/services?stale".to_owned();
        if let Some(dc) = &self.inner.datacenter {
            path.push_str(&format!("&dc={}", encode_path(dc)));
        }
        let body = self
            .inner
            .agent
            .ok(Method::GET, &path, None, self.inner.timeout)
            .await?;
        let catalog: BTreeMap<String, Vec<String>> = serde_json::from_slice(&body)
            .map_err(|e| unavailable("list services: unreadable answer", e))?;
        let mut keys = std::collections::BTreeSet::new();
        for (name, tags) in catalog {
            let key = tags
                .iter()
                .filter_map(|t| t.strip_prefix(RECORD_TAG))
                .filter_map(|json| ServiceMetaInfo::from_json(json.as_bytes()).ok())
                .map(|m| m.service_key())
                .find(|key| self.consul_name(key) == name);
            keys.extend(key);
        }
        Ok(keys.into_iter().collect())
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
            emit: crate::support::follow::Emitter::new(tx),
            index: next_index(0, index),
            current: list.into_iter().map(|m| (m.node_key(), m)).collect(),
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
