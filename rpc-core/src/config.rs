//! `rpc.toml`: loading, environment overrides, validation.
//!
//! Resolution order for the file: an explicit path (`--config`), else the
//! `RPC_CONFIG` environment variable, else `./rpc.toml` if it exists, else
//! built-in defaults. Then single keys are overridden from the environment:
//! `RPC_{SECTION}_{KEY}` (e.g. `RPC_REGISTRY_TYPE=etcd`,
//! `RPC_CLIENT_TIMEOUT_MS=500`). Unknown keys and bad values fail loudly,
//! naming the file (or variable) and the dotted key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Default maximum frame length: 8 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

/// Largest value of every `*_ms` duration key: 24 h. Bigger values are
/// refused at startup, naming the key; they are never meant, and unchecked
/// they overflow the arithmetic that turns them into deadlines and TTLs
/// (issue 12, fault 7: `registry.ttl_secs = 9223372036854775807` made the
/// Consul backend panic).
pub const MAX_DURATION_MS: u64 = 24 * 60 * 60 * 1000;

/// Largest `registry.ttl_secs`: 24 h, as [`MAX_DURATION_MS`].
pub const MAX_TTL_SECS: u64 = 24 * 60 * 60;

/// A duration key's value (ms) as a [`Duration`], capped at
/// [`MAX_DURATION_MS`] for configurations built in code, which skip
/// validation.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v.min(MAX_DURATION_MS))
}

const SECTIONS: [&str; 4] = ["server", "registry", "client", "metrics"];

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// `[server]`: where and how a provider listens.
    pub server: ServerConfig,
    /// `[registry]`: which registry and how to reach it.
    pub registry: RegistryConfig,
    /// `[client]`: how a consumer calls.
    pub client: ClientConfig,
    /// `[metrics]`: whether consumers and providers record metrics, and
    /// where a Prometheus endpoint listens.
    pub metrics: MetricsConfig,
}

/// `[metrics]`. Off by default: nothing is recorded and no port is opened.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where the Prometheus text endpoint (`GET /metrics`) listens, for
    /// example `"127.0.0.1:9464"` (9464 is the port OpenTelemetry's
    /// Prometheus exporter uses). Setting it also turns recording on.
    /// `RPC_METRICS_LISTEN` overrides it. Needs the `prometheus` cargo
    /// feature of `rpc` (the examples and the `rpc` tool enable it).
    pub listen: Option<std::net::SocketAddr>,
    /// Record metrics through the `metrics` facade even without `listen`,
    /// for a program that installs its own recorder (exporter).
    pub enabled: bool,
}

impl MetricsConfig {
    /// Whether consumers and providers record metrics: `enabled`, or a
    /// `listen` address is set.
    pub fn records(&self) -> bool {
        self.enabled || self.listen.is_some()
    }
}

/// `[server]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind; 0 picks a free port.
    pub port: u16,
    /// Host published in the registry, if not `host` (e.g. when binding 0.0.0.0).
    pub advertise_host: Option<String>,
    /// Connections served at once. A connection beyond it is accepted and
    /// refused at once with a go-away (request id 0: nothing was read), so
    /// its client tries another instance instead of waiting in the kernel's
    /// accept queue.
    pub max_connections: usize,
    /// Longest time, in ms, from accepting a connection to its first
    /// complete frame; a connection that sends nothing (or only part of a
    /// frame) is closed then. Default 5 000.
    pub first_frame_timeout_ms: u64,
    /// Longest time, in ms, that a frame may stay partly received (a
    /// header sent by halves, a body trickling in a byte at a time); the
    /// connection is closed then. Default 10 000.
    pub frame_timeout_ms: u64,
    /// Longest time, in ms, without a frame from the peer (heartbeats
    /// count), or without the peer taking any of the replies waiting for
    /// it; the connection is closed then, with a go-away when the peer is
    /// merely silent. Consumers heartbeat every 5 s, busy or idle, so a
    /// live consumer is never closed by this. Default 30 000.
    pub idle_timeout_ms: u64,
    /// Requests in flight per connection; the connection stops reading beyond it.
    pub max_in_flight_per_connection: usize,
    /// Requests in flight across the server; beyond it calls get `Overloaded`.
    pub max_in_flight: usize,
    /// Largest accepted frame (header + body), in bytes.
    pub max_frame_len: usize,
    /// How long graceful shutdown waits for in-flight calls.
    pub shutdown_timeout_ms: u64,
    /// After deregistering (and seeing the registry drop the instance), how
    /// long to keep serving before refusing new calls, so consumers' caches
    /// catch up first.
    pub shutdown_grace_ms: u64,
    /// Weight published for load balancing.
    pub weight: u32,
    /// Smallest reply body, in bytes, that is compressed, when the
    /// request was (with the request's algorithm). Default 1024.
    pub compression_threshold: usize,
    /// `[server.tls]`: serve TLS (and, with `client_ca_file`, mutual TLS)
    /// instead of plain TCP. Needs the `tls` cargo feature.
    pub tls: Option<ServerTlsConfig>,
}

/// `[server.tls]`: the provider's certificate, and optionally the CA its
/// consumers' certificates must be signed by. Files are PEM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// With it, mutual TLS: a consumer without a certificate signed by one
    /// of these CAs is refused during the handshake.
    pub client_ca_file: Option<PathBuf>,
}

/// `[client.tls]`: how a consumer checks providers, and optionally its own
/// certificate for mutual TLS. Files are PEM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// CAs that sign providers' certificates. Without it, the Mozilla root
    /// CAs compiled into the binary (webpki-roots); the platform's store
    /// is not read.
    pub ca_file: Option<PathBuf>,
    /// This consumer's certificate chain, for providers that require one.
    pub cert_file: Option<PathBuf>,
    /// Its private key; set with `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The name a provider's certificate must carry, instead of the host
    /// of the address it is dialled at.
    pub server_name: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            advertise_host: None,
            max_connections: 10_000,
            first_frame_timeout_ms: 5_000,
            frame_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            max_in_flight_per_connection: 1024,
            max_in_flight: 65_536,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            shutdown_timeout_ms: 10_000,
            shutdown_grace_ms: 500,
            weight: crate::meta::DEFAULT_WEIGHT,
            compression_threshold: DEFAULT_COMPRESSION_THRESHOLD,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// [`ServerConfig::shutdown_timeout_ms`] as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        ms(self.shutdown_timeout_ms)
    }
    /// [`ServerConfig::first_frame_timeout_ms`] as a duration.
    pub fn first_frame_timeout(&self) -> Duration {
        ms(self.first_frame_timeout_ms)
    }
    /// [`ServerConfig::frame_timeout_ms`] as a duration.
    pub fn frame_timeout(&self) -> Duration {
        ms(self.frame_timeout_ms)
    }
    /// [`ServerConfig::idle_timeout_ms`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        ms(self.idle_timeout_ms)
    }
}

/// Registry backends. Parsing does not depend on which are compiled in; the
/// factory reports a backend whose cargo feature is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryKind {
    /// Embedded, cross-process on one host, no server (the default).
    #[default]
    Local,
    /// In-process only, for tests.
    Memory,
    /// etcd v3.
    Etcd,
    /// Apache ZooKeeper.
    Zookeeper,
    /// HashiCorp Consul.
    Consul,
    /// Nacos.
    Nacos,
}

impl RegistryKind {
    /// The `[registry]` keys this backend takes (besides `type`). Any
    /// other key set in `rpc.toml` or the environment is refused when the
    /// configuration is loaded, so that a setting cannot look active when
    /// the backend ignores it (a Consul `token` given to etcd, TLS given to
    /// Nacos).
    pub fn registry_keys(self) -> &'static [&'static str] {
        match self {
            Self::Local => &["address", "timeout_ms", "ttl_secs"],
            // Meaningless in process, but accepted so that the stock
            // rpc.toml switches to `memory` by its `type` alone.
            Self::Memory => &["address", "timeout_ms", "ttl_secs"],
            Self::Etcd => &[
                "address",
                "timeout_ms",
                "ttl_secs",
                "username",
                "password",
                "namespace",
                "tls",
            ],
            Self::Zookeeper => &[
                "address",
                "timeout_ms",
                "ttl_secs",
                "username",
                "password",
                "namespace",
                "tls",
            ],
            Self::Consul => &[
                "address",
                "timeout_ms",
                "ttl_secs",
                "token",
                "datacenter",
                "namespace",
                "tls",
            ],
            Self::Nacos => &[
                "address",
                "timeout_ms",
                "ttl_secs",
                "username",
                "password",
                "namespace",
                "group",
            ],
        }
    }

    /// The name used in `rpc.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Memory => "memory",
            Self::Etcd => "etcd",
            Self::Zookeeper => "zookeeper",
            Self::Consul => "consul",
            Self::Nacos => "nacos",
        }
    }
}

impl fmt::Display for RegistryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[registry]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Backend: `local` (default), `memory`, `etcd`, `zookeeper`, `consul`, `nacos`.
    #[serde(rename = "type")]
    pub kind: RegistryKind,
    /// Endpoint(s): a string, a comma-separated string, or a list. For `local`,
    /// the directory holding instance records (default: a folder in the temp dir).
    pub address: Addresses,
    /// Per-request timeout against the registry.
    pub timeout_ms: u64,
    /// How long an instance outlives its last heartbeat (lease TTL, session timeout).
    pub ttl_secs: u64,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password.
    pub password: Option<String>,
    /// Optional namespace (Nacos) or chroot-like prefix.
    pub namespace: Option<String>,
    /// Optional group (Nacos).
    pub group: Option<String>,
    /// Optional ACL token (Consul).
    pub token: Option<String>,
    /// Optional datacenter (Consul).
    pub datacenter: Option<String>,
    /// Optional TLS material.
    pub tls: Option<TlsConfig>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            kind: RegistryKind::Local,
            address: Addresses::default(),
            timeout_ms: 10_000,
            ttl_secs: 30,
            username: None,
            password: None,
            namespace: None,
            group: None,
            token: None,
            datacenter: None,
            tls: None,
        }
    }
}

impl RegistryConfig {
    /// [`RegistryConfig::timeout_ms`] as a duration.
    pub fn timeout(&self) -> Duration {
        ms(self.timeout_ms)
    }
    /// [`RegistryConfig::ttl_secs`] as a duration.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs.min(MAX_TTL_SECS))
    }
}

/// `[registry.tls]`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM).
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM).
    pub key_file: Option<PathBuf>,
    /// Server name to verify, if not the host of the address.
    pub domain: Option<String>,
}

/// One or several endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Addresses(pub Vec<String>);

impl Addresses {
    /// The endpoints.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
    /// Whether none is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The first endpoint, if any.
    pub fn first(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }
}

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Addresses;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address string, comma-separated addresses, or a list of addresses")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Addresses, E> {
                Ok(Addresses(
                    s.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                ))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Addresses, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    let s = s.trim();
                    if !s.is_empty() {
                        out.push(s.to_owned());
                    }
                }
                Ok(Addresses(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Serializers a client can use; the server answers in the one the request used.
///
/// postcard is the default: measured side by side with `rpc-bench` (issue
/// 17; the README's performance section), it gave 1.02-1.17x bincode 2's
/// calls per second and a lower p99 on both runtimes, and it is
/// maintained, where bincode 2 is not (RUSTSEC-2025-0141).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerializerKind {
    /// bincode 2 (compact; unmaintained). The default before postcard:
    /// what providers older than postcard support decode.
    Bincode,
    /// JSON (readable, interoperable).
    Json,
    /// postcard 1 (compact varint encoding, maintained; serde data model).
    /// The default.
    #[default]
    Postcard,
    /// MessagePack (rmp-serde), structs as maps with field names: compact
    /// and self-describing, readable from other languages.
    #[serde(rename = "msgpack")]
    MsgPack,
}

impl SerializerKind {
    /// Every serializer, in wire-id order.
    pub const ALL: [SerializerKind; 4] = [
        SerializerKind::Bincode,
        SerializerKind::Json,
        SerializerKind::Postcard,
        SerializerKind::MsgPack,
    ];

    /// The name used in `rpc.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bincode => "bincode",
            Self::Json => "json",
            Self::Postcard => "postcard",
            Self::MsgPack => "msgpack",
        }
    }
}

/// Compression of call bodies (`client.compression`). The provider
/// answers with the algorithm of the request, so a consumer that does not
/// compress never receives a compressed reply.
///
/// Both algorithms are pure Rust (no C toolchain): `lz4` is
/// [lz4_flex](https://docs.rs/lz4_flex)'s block format, fast and light;
/// `zstd` is [ruzstd](https://docs.rs/ruzstd) at its fastest level, which
/// compresses tighter at a higher CPU cost. Providers older than
/// compression answer a compressed request with `bad request: unknown
/// serializer id N` (see `docs/protocol.md`): upgrade providers first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Bodies travel as encoded. The default.
    #[default]
    None,
    /// LZ4 block format, uncompressed size prepended.
    Lz4,
    /// Zstandard frame (RFC 8878).
    Zstd,
}

impl Compression {
    /// Every algorithm, in wire-flag order.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

    /// The name used in `rpc.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

/// Default `compression_threshold`, in bytes: below about 1 KiB a body
/// rarely shrinks enough to pay for the work (an RPC body of a few hundred
/// bytes has little repetition for LZ4 to find), the same order as the
/// 1 KiB minimum that HTTP servers commonly apply to response compression.
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 1024;

/// Load-balancing policies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancerKind {
    /// Each call to the next instance in turn. The default.
    #[default]
    RoundRobin,
    /// A uniformly random instance per call.
    Random,
    /// Smooth weighted round robin by `ServiceMetaInfo.weight`.
    Weighted,
    /// A hash of the call's arguments picks the instance; a key keeps its
    /// instance when others join or leave (a ring of virtual nodes).
    ConsistentHash,
    /// Power of two choices: of two random instances, the one with fewer
    /// calls in flight (ties: lower latency EWMA). Best under load.
    P2c,
}

/// What a call does when its attempt fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTolerance {
    /// Return the first error.
    FailFast,
    /// Retry on ANOTHER instance, but only when that cannot run the call
    /// twice (not sent, refused, overloaded) or the method is listed as
    /// idempotent. Bounded by `retries`, the deadline and the retry budget.
    /// The default.
    #[default]
    FailOver,
    /// On failure, log and return the method's configured default
    /// (`fail_safe`, JSON); without one, the error.
    FailSafe,
}

/// Per-service overrides of `[client]` (`[client.services."Name:1.0"]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceOverrides {
    /// Per-call deadline.
    pub timeout_ms: Option<u64>,
    /// Load balancer.
    pub load_balancer: Option<LoadBalancerKind>,
    /// Fault tolerance.
    pub fault_tolerance: Option<FaultTolerance>,
    /// Extra attempts for `fail_over`.
    pub retries: Option<u32>,
    /// Methods that may be retried after any provider failure.
    pub idempotent: Option<Vec<String>>,
    /// `fail_safe` defaults: method name -> JSON value.
    pub fail_safe: Option<BTreeMap<String, String>>,
    /// Serializer.
    pub serializer: Option<SerializerKind>,
    /// Body compression.
    pub compression: Option<Compression>,
}

/// The policy one service is called with: `[client]` merged with its
/// `[client.services."key"]` overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct CallPolicy {
    /// The timeout of a call (covers every retry) when nothing more
    /// specific sets one: `[client].timeout_ms`, or the service's own.
    /// A method's `#[rpc(timeout_ms)]` wins over `[client].timeout_ms`;
    /// see [`CallPolicy::service_timeout`].
    pub timeout: Duration,
    /// `[client.services."S"].timeout_ms` when set: it wins over a method's
    /// `#[rpc(timeout_ms)]`, which wins over `[client].timeout_ms`.
    pub service_timeout: Option<Duration>,
    /// Load balancer.
    pub load_balancer: LoadBalancerKind,
    /// Fault tolerance.
    pub fault_tolerance: FaultTolerance,
    /// Extra attempts for `fail_over`.
    pub retries: u32,
    /// First retry backoff; doubles per attempt, full jitter.
    pub retry_backoff: Duration,
    /// Largest retry backoff.
    pub retry_backoff_max: Duration,
    /// Methods safe to retry after any provider failure.
    pub idempotent: Vec<String>,
    /// `fail_safe` defaults: method -> JSON.
    pub fail_safe: BTreeMap<String, String>,
    /// Serializer.
    pub serializer: SerializerKind,
    /// Body compression of requests (replies use the request's).
    pub compression: Compression,
    /// Request bodies smaller than this many bytes are sent uncompressed.
    pub compression_threshold: usize,
}

/// `[client]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// `postcard` (default), `bincode`, `json` or `msgpack`.
    pub serializer: SerializerKind,
    /// `none` (default), `lz4` or `zstd`: compression of request bodies
    /// of at least `compression_threshold` bytes; the provider compresses
    /// its replies with the same algorithm.
    pub compression: Compression,
    /// Smallest request body, in bytes, that is compressed. Default 1024.
    pub compression_threshold: usize,
    /// `[client.tls]`: dial providers over TLS. Needs the `tls` cargo
    /// feature. A consumer with it calls only providers that publish
    /// `tls = true`, and one without it only those that do not.
    pub tls: Option<ClientTlsConfig>,
    /// `round_robin` (default), `random`, `weighted`, `consistent_hash`, `p2c`.
    pub load_balancer: LoadBalancerKind,
    /// `fail_over` (default), `fail_fast`, `fail_safe`.
    pub fault_tolerance: FaultTolerance,
    /// Extra attempts for `fail_over` (each on another instance when one exists).
    pub retries: u32,
    /// First retry backoff; doubles per attempt, with full jitter.
    pub retry_backoff_ms: u64,
    /// Largest retry backoff.
    pub retry_backoff_max_ms: u64,
    /// Retries allowed, as a fraction of calls over the last 10 s ...
    pub retry_budget_ratio: f64,
    /// ... plus this many retries per second regardless.
    pub retry_budget_min_per_sec: u32,
    /// Methods (by wire name, any service) safe to retry after any provider
    /// failure, besides those marked `#[rpc(idempotent)]`.
    pub idempotent: Vec<String>,
    /// Metadata keys a call made while serving another passes on, besides
    /// the W3C `traceparent` and `tracestate`.
    pub propagate_metadata: Vec<String>,
    /// `fail_safe` defaults: method name -> JSON value returned on failure.
    pub fail_safe: BTreeMap<String, String>,
    /// Consecutive provider failures that eject an instance.
    pub outlier_failures: u32,
    /// First ejection; doubles for an instance ejected again, up to 60 s.
    pub outlier_cooldown_ms: u64,
    /// Never eject more than this share of a service's instances (0-100).
    pub outlier_max_ejected_percent: u32,
    /// Empty-push protection: an update that would empty a non-empty
    /// instance list while the registry connection is unhealthy is held back.
    pub empty_protection: bool,
    /// With `empty_protection`: for this long after the registry comes back
    /// from a break, an empty instance list from it does not replace a
    /// non-empty one (a registry restarted empty lists nothing until its
    /// providers register again, at their next heartbeat: within TTL / 3).
    /// 0 turns this off.
    pub empty_grace_ms: u64,
    /// Optional file where the consumer keeps its last good instance lists,
    /// so it can start and call while the registry is down.
    pub snapshot_file: Option<PathBuf>,
    /// Per-service overrides, keyed by `name:version`.
    pub services: BTreeMap<String, ServiceOverrides>,
    /// Per-call deadline.
    pub timeout_ms: u64,
    /// Dial timeout.
    pub connect_timeout_ms: u64,
    /// Multiplexed connections per provider.
    pub connections_per_endpoint: usize,
    /// Calls in flight per connection; more wait for a slot until their deadline.
    pub max_in_flight_per_connection: usize,
    /// Largest accepted response frame, in bytes.
    pub max_frame_len: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            serializer: SerializerKind::Postcard,
            compression: Compression::None,
            compression_threshold: DEFAULT_COMPRESSION_THRESHOLD,
            tls: None,
            load_balancer: LoadBalancerKind::RoundRobin,
            fault_tolerance: FaultTolerance::FailOver,
            retries: 2,
            retry_backoff_ms: 5,
            retry_backoff_max_ms: 200,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_sec: 10,
            idempotent: Vec::new(),
            propagate_metadata: Vec::new(),
            fail_safe: BTreeMap::new(),
            outlier_failures: 5,
            outlier_cooldown_ms: 5_000,
            outlier_max_ejected_percent: 50,
            empty_protection: true,
            empty_grace_ms: 20_000,
            snapshot_file: None,
            services: BTreeMap::new(),
            timeout_ms: 3_000,
            connect_timeout_ms: 1_000,
            connections_per_endpoint: 1,
            max_in_flight_per_connection: 1024,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }
}

impl ClientConfig {
    /// [`ClientConfig::timeout_ms`] as a duration.
    pub fn timeout(&self) -> Duration {
        ms(self.timeout_ms)
    }
    /// [`ClientConfig::connect_timeout_ms`] as a duration.
    pub fn connect_timeout(&self) -> Duration {
        ms(self.connect_timeout_ms)
    }

    /// The policy for `service_key`: these settings with its overrides applied.
    pub fn policy_for(&self, service_key: &str) -> CallPolicy {
        let o = self.services.get(service_key).cloned().unwrap_or_default();
        let mut idempotent = self.idempotent.clone();
        idempotent.extend(o.idempotent.unwrap_or_default());
        let mut fail_safe = self.fail_safe.clone();
        fail_safe.extend(o.fail_safe.unwrap_or_default());
        CallPolicy {
            timeout: ms(o.timeout_ms.unwrap_or(self.timeout_ms)),
            service_timeout: o.timeout_ms.map(ms),
            load_balancer: o.load_balancer.unwrap_or(self.load_balancer),
            fault_tolerance: o.fault_tolerance.unwrap_or(self.fault_tolerance),
            retries: o.retries.unwrap_or(self.retries),
            retry_backoff: ms(self.retry_backoff_ms),
            retry_backoff_max: ms(self.retry_backoff_max_ms.max(self.retry_backoff_ms)),
            idempotent,
            fail_safe,
            serializer: o.serializer.unwrap_or(self.serializer),
            compression: o.compression.unwrap_or(self.compression),
            compression_threshold: self.compression_threshold,
        }
    }
}

impl RpcConfig {
    /// Loads the configuration as described in the module docs, with the
    /// process environment.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(explicit, std::env::vars())
    }

    /// [`RpcConfig::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        explicit: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let from_env = env
            .iter()
            .find(|(k, _)| k == "RPC_CONFIG")
            .map(|(_, v)| PathBuf::from(v));
        let path = match (explicit, from_env) {
            (Some(p), _) => Some(p.to_path_buf()),
            (None, Some(p)) => Some(p),
            (None, None) => {
                let p = PathBuf::from("rpc.toml");
                p.exists().then_some(p)
            }
        };
        let (text, origin) = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                    origin: p.display().to_string(),
                    key: "(file)".into(),
                    message: format!("cannot read the file: {e}"),
                    source: Some(Box::new(e)),
                })?;
                (text, p.display().to_string())
            }
            None => (String::new(), "built-in defaults".to_owned()),
        };
        Self::parse(&text, &origin, env)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse(text, origin, std::iter::empty())
    }

    fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            origin: origin.to_owned(),
            key: "(syntax)".into(),
            message: e.to_string().trim().replace('\n', " "),
            source: Some(Box::new(e)),
        })?;
        let mut overridden: Vec<(String, String)> = Vec::new();
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("RPC_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            if !SECTIONS.contains(&section) || key.is_empty() {
                continue;
            }
            let section_table = table
                .entry(section.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(section_table) = section_table.as_table_mut() else {
                return Err(ConfigError::new(origin, section, "must be a table"));
            };
            section_table.insert(key.to_owned(), env_value(&value));
            overridden.push((format!("{section}.{key}"), var));
        }
        // Which `[registry]` keys were given (file or environment): checked
        // against the chosen backend once it is known.
        let registry_keys: Vec<String> = table
            .get("registry")
            .and_then(toml::Value::as_table)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let de = toml::Value::Table(table);
        let cfg: RpcConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let origin = overridden
                .iter()
                .find(|(k, _)| key.starts_with(k.as_str()))
                .map(|(_, var)| format!("environment variable {var}"))
                .unwrap_or_else(|| origin.to_owned());
            let inner = e.into_inner();
            ConfigError {
                origin,
                key: if key == "." { "(root)".into() } else { key },
                message: inner.to_string().trim().replace('\n', " "),
                source: Some(Box::new(inner)),
            }
        })?;
        cfg.validate(origin)?;
        let kind = cfg.registry.kind;
        let allowed = kind.registry_keys();
        if let Some(key) = registry_keys
            .iter()
            .find(|k| *k != "type" && !allowed.contains(&k.as_str()))
        {
            let dotted = format!("registry.{key}");
            let origin = overridden
                .iter()
                .find(|(k, _)| *k == dotted)
                .map(|(_, var)| format!("environment variable {var}"))
                .unwrap_or_else(|| origin.to_owned());
            return Err(ConfigError::new(
                &origin,
                &dotted,
                format!(
                    "not used by the {} registry backend (it takes: {})",
                    kind.as_str(),
                    allowed.join(", ")
                ),
            ));
        }
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let positive = |v: u64, key: &str| {
            if v == 0 {
                Err(ConfigError::new(origin, key, "must be greater than 0"))
            } else {
                Ok(())
            }
        };
        let at_most = |v: u64, max: u64, key: &str, unit: &str| {
            if v > max {
                Err(ConfigError::new(
                    origin,
                    key,
                    format!("must be at most {max} {unit} (24 h), got {v}"),
                ))
            } else {
                Ok(())
            }
        };
        let c = &self.client;
        let durations = [
            (
                self.server.shutdown_timeout_ms,
                "server.shutdown_timeout_ms",
            ),
            (self.server.shutdown_grace_ms, "server.shutdown_grace_ms"),
            (
                self.server.first_frame_timeout_ms,
                "server.first_frame_timeout_ms",
            ),
            (self.server.frame_timeout_ms, "server.frame_timeout_ms"),
            (self.server.idle_timeout_ms, "server.idle_timeout_ms"),
            (self.registry.timeout_ms, "registry.timeout_ms"),
            (c.retry_backoff_ms, "client.retry_backoff_ms"),
            (c.retry_backoff_max_ms, "client.retry_backoff_max_ms"),
            (c.outlier_cooldown_ms, "client.outlier_cooldown_ms"),
            (c.empty_grace_ms, "client.empty_grace_ms"),
            (c.timeout_ms, "client.timeout_ms"),
            (c.connect_timeout_ms, "client.connect_timeout_ms"),
        ];
        for (v, key) in durations {
            at_most(v, MAX_DURATION_MS, key, "ms")?;
        }
        for (name, o) in &c.services {
            if let Some(v) = o.timeout_ms {
                at_most(
                    v,
                    MAX_DURATION_MS,
                    &format!("client.services.\"{name}\".timeout_ms"),
                    "ms",
                )?;
            }
        }
        at_most(
            self.registry.ttl_secs,
            MAX_TTL_SECS,
            "registry.ttl_secs",
            "s",
        )?;
        positive(self.server.max_connections as u64, "server.max_connections")?;
        positive(
            self.server.max_in_flight_per_connection as u64,
            "server.max_in_flight_per_connection",
        )?;
        positive(self.server.max_in_flight as u64, "server.max_in_flight")?;
        positive(
            self.server.first_frame_timeout_ms,
            "server.first_frame_timeout_ms",
        )?;
        positive(self.server.frame_timeout_ms, "server.frame_timeout_ms")?;
        // Consumers heartbeat every 5 s: below twice that, a live but quiet
        // consumer's connection would be closed over and over.
        if self.server.idle_timeout_ms < 10_000 {
            return Err(ConfigError::new(
                origin,
                "server.idle_timeout_ms",
                format!(
                    "must be at least 10000 ms (twice the consumers' 5 s heartbeat), got {}",
                    self.server.idle_timeout_ms
                ),
            ));
        }
        positive(self.registry.timeout_ms, "registry.timeout_ms")?;
        positive(self.registry.ttl_secs, "registry.ttl_secs")?;
        positive(self.client.timeout_ms, "client.timeout_ms")?;
        positive(self.client.connect_timeout_ms, "client.connect_timeout_ms")?;
        positive(
            self.client.connections_per_endpoint as u64,
            "client.connections_per_endpoint",
        )?;
        positive(
            self.client.max_in_flight_per_connection as u64,
            "client.max_in_flight_per_connection",
        )?;
        // A frame must at least hold the fixed header; the length field is a u32.
        for (v, key) in [
            (self.server.max_frame_len, "server.max_frame_len"),
            (self.client.max_frame_len, "client.max_frame_len"),
        ] {
            if !(64..=u32::MAX as usize).contains(&v) {
                return Err(ConfigError::new(
                    origin,
                    key,
                    format!("must be between 64 and {} bytes, got {v}", u32::MAX),
                ));
            }
        }
        if !(0.0..=10.0).contains(&self.client.retry_budget_ratio) {
            return Err(ConfigError::new(
                origin,
                "client.retry_budget_ratio",
                "must be between 0 and 10 (retries per call)",
            ));
        }
        if self.client.outlier_max_ejected_percent > 100 {
            return Err(ConfigError::new(
                origin,
                "client.outlier_max_ejected_percent",
                "must be between 0 and 100",
            ));
        }
        for (key, o) in &self.client.services {
            if !key.contains(':') {
                return Err(ConfigError::new(
                    origin,
                    format!("client.services.{key}"),
                    "service keys are `name:version`",
                ));
            }
            if o.timeout_ms == Some(0) {
                return Err(ConfigError::new(
                    origin,
                    format!("client.services.\"{key}\".timeout_ms"),
                    "must be greater than 0",
                ));
            }
        }
        let all_fail_safe = self
            .client
            .fail_safe
            .iter()
            .map(|(m, v)| (String::from("client.fail_safe"), m, v))
            .chain(self.client.services.iter().flat_map(|(k, o)| {
                o.fail_safe
                    .iter()
                    .flatten()
                    .map(move |(m, v)| (format!("client.services.\"{k}\".fail_safe"), m, v))
            }));
        for (section, method, json) in all_fail_safe {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(json) {
                return Err(ConfigError::new(
                    origin,
                    format!("{section}.{method}"),
                    format!("is not valid JSON: {e}"),
                ));
            }
        }
        if self.server.host.trim().is_empty() {
            return Err(ConfigError::new(origin, "server.host", "must not be empty"));
        }
        if let Some(advertise) = &self.server.advertise_host {
            check_advertise_host(advertise)
                .map_err(|why| ConfigError::new(origin, "server.advertise_host", why))?;
        }
        let needs_address = !matches!(
            self.registry.kind,
            RegistryKind::Local | RegistryKind::Memory
        );
        if needs_address && self.registry.address.is_empty() {
            return Err(ConfigError::new(
                origin,
                "registry.address",
                format!("is required for registry type `{}`", self.registry.kind),
            ));
        }
        Ok(())
    }
}

/// `server.advertise_host` is published for consumers to dial as the
/// provider's host: an IP address (bracketed or not) or a DNS name (RFC
/// 1123 labels; `_` allowed, as some internal zones use it), without port
/// or scheme, and not the wildcard. Checked when a configuration is
/// loaded, and by the provider for one built in code.
///
/// # Errors
/// What is wrong with `raw`, in words (the caller names the key).
pub fn check_advertise_host(raw: &str) -> Result<(), String> {
    match crate::Host::parse(raw) {
        crate::Host::Ip(ip) if ip.is_unspecified() => Err(format!(
            "`{raw}` is the wildcard address, which nobody can dial: set the address consumers reach this provider at"
        )),
        crate::Host::Ip(_) => Ok(()),
        crate::Host::Name(name) => {
            let name = name.strip_suffix('.').unwrap_or(&name);
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            };
            if name.is_empty() {
                Err("must not be empty (leave it out to publish server.host)".into())
            } else if name.len() > 253 || !name.split('.').all(label_ok) {
                Err(format!(
                    "`{raw}` is neither an IP address nor a host name (give the host alone: no port, scheme or path)"
                ))
            } else {
                Ok(())
            }
        }
    }
}

/// Environment values are TOML literals when they parse as one (`500`,
/// `true`, `["a","b"]`), else plain strings (`etcd`, `127.0.0.1:2379`).
fn env_value(raw: &str) -> toml::Value {
    let probe = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&probe) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = RpcConfig::from_toml_str("", "t").unwrap();
        assert_eq!(c.server.host, "127.0.0.1");
        assert_eq!(c.server.port, 0);
        assert_eq!(c.registry.kind, RegistryKind::Local);
        assert_eq!(c.registry.timeout_ms, 10_000);
        assert_eq!(c.registry.ttl_secs, 30);
        assert_eq!(c.client.serializer, SerializerKind::Postcard);
        assert_eq!(c.client.load_balancer, LoadBalancerKind::RoundRobin);
        assert_eq!(c.client.timeout_ms, 3_000);
        assert_eq!(c.server.max_frame_len, 8 * 1024 * 1024);
    }

    /// Found by a reviewer: an empty advertise host, or one with a port,
    /// was published as the provider's address, which nobody could dial.
    #[test]
    fn advertise_host_is_a_dialable_host_or_startup_fails() {
        let load = |a: &str| {
            RpcConfig::from_toml_str(&format!("[server]\nadvertise_host = \"{a}\"\n"), "a.toml")
        };
        for good in [
            "10.1.2.3",
            "fd00::7",
            "[fd00::7]",
            "provider-1.svc.example",
            "host_a.internal.",
            "localhost",
        ] {
            let c = load(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
            assert_eq!(c.server.advertise_host.as_deref(), Some(good));
        }
        for (bad, says) in [
            ("", "must not be empty"),
            ("  ", "must not be empty"),
            ("1.2.3.4:80", "neither an IP address nor a host name"),
            ("http://h", "neither"),
            ("a..b", "neither"),
            ("h/x", "neither"),
            ("0.0.0.0", "wildcard"),
            ("[::]", "wildcard"),
        ] {
            let e = load(bad).unwrap_err();
            assert_eq!(e.key, "server.advertise_host", "{bad:?}: {e}");
            assert!(e.to_string().contains("a.toml"), "{e}");
            assert!(e.message.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn full_file_parses() {
        let c = RpcConfig::from_toml_str(
            r#"
            [server]
            host = "0.0.0.0"
            port = 8080
            [registry]
            type = "etcd"
            address = ["http://a:2379", "http://b:2379"]
            ttl_secs = 10
            [client]
            serializer = "json"
            load_balancer = "random"
            timeout_ms = 500
            "#,
            "rpc.toml",
        )
        .unwrap();
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.registry.kind, RegistryKind::Etcd);
        assert_eq!(c.registry.address.0, vec!["http://a:2379", "http://b:2379"]);
        assert_eq!(c.client.serializer, SerializerKind::Json);
        assert_eq!(c.client.timeout(), Duration::from_millis(500));
    }

    #[test]
    fn every_serializer_is_named_in_rpc_toml_as_its_as_str() {
        for kind in SerializerKind::ALL {
            let text = format!("[client]\nserializer = \"{}\"\n", kind.as_str());
            let c = RpcConfig::from_toml_str(&text, "t").unwrap();
            assert_eq!(c.client.serializer, kind);
        }
        let e = RpcConfig::from_toml_str("[client]\nserializer = \"cbor\"\n", "t").unwrap_err();
        assert_eq!(e.key, "client.serializer");
    }

    #[test]
    fn every_compression_is_named_in_rpc_toml_as_its_as_str() {
        for c in Compression::ALL {
            let text = format!(
                "[client]\ncompression = \"{}\"\ncompression_threshold = 64\n\
                 [client.services.\"S:1\"]\ncompression = \"zstd\"\n",
                c.as_str()
            );
            let cfg = RpcConfig::from_toml_str(&text, "t").unwrap();
            assert_eq!(cfg.client.compression, c);
            let policy = cfg.client.policy_for("S:1");
            assert_eq!(policy.compression, Compression::Zstd, "the override wins");
            assert_eq!(policy.compression_threshold, 64);
            assert_eq!(cfg.client.policy_for("T:1").compression, c);
        }
        let e = RpcConfig::from_toml_str("[client]\ncompression = \"gzip\"\n", "t").unwrap_err();
        assert_eq!(e.key, "client.compression");
        let e =
            RpcConfig::from_toml_str("[server]\ncompression_threshold = -1\n", "t").unwrap_err();
        assert_eq!(e.key, "server.compression_threshold");
        let d = RpcConfig::default();
        assert_eq!(d.client.compression, Compression::None);
        assert_eq!(
            d.client.compression_threshold,
            DEFAULT_COMPRESSION_THRESHOLD
        );
        assert_eq!(
            d.server.compression_threshold,
            DEFAULT_COMPRESSION_THRESHOLD
        );
    }

    #[test]
    fn comma_separated_addresses_split() {
        let c = RpcConfig::from_toml_str(
            "[registry]\ntype=\"etcd\"\naddress = \"http://a:1, http://b:2\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.registry.address.0, vec!["http://a:1", "http://b:2"]);
    }

    #[test]
    fn unknown_registry_type_names_the_key_and_accepted_values() {
        let e = RpcConfig::from_toml_str("[registry]\ntype = \"redis\"\n", "my.toml").unwrap_err();
        assert_eq!(e.key, "registry.type");
        assert_eq!(e.origin, "my.toml");
        let msg = e.to_string();
        assert!(msg.contains("my.toml"), "{msg}");
        assert!(msg.contains("registry.type"), "{msg}");
        assert!(msg.contains("redis"), "{msg}");
        for accepted in ["local", "memory", "etcd", "zookeeper", "consul", "nacos"] {
            assert!(msg.contains(accepted), "{msg} lacks {accepted}");
        }
    }

    #[test]
    fn misspelt_key_is_rejected_by_name() {
        let e = RpcConfig::from_toml_str("[client]\ntimeout = 5\n", "t").unwrap_err();
        assert_eq!(e.key, "client.timeout");
        assert!(e.message.contains("timeout"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = RpcConfig::from_toml_str("[server]\nport = \"eighty\"\n", "t").unwrap_err();
        assert_eq!(e.key, "server.port");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let e = RpcConfig::from_toml_str("[server\n", "bad.toml").unwrap_err();
        assert_eq!(e.key, "(syntax)");
        assert!(e.to_string().contains("bad.toml"));
    }

    #[test]
    fn zero_ttl_is_rejected() {
        let e = RpcConfig::from_toml_str("[registry]\nttl_secs = 0\n", "t").unwrap_err();
        assert_eq!(e.key, "registry.ttl_secs");
    }

    #[test]
    fn durations_above_their_maximum_fail_naming_the_key_and_the_maximum() {
        // Issue 12, fault 7: this TTL made the Consul backend panic.
        let e = RpcConfig::from_toml_str(
            "[registry]\ntype = \"consul\"\naddress = \"127.0.0.1:8500\"\nttl_secs = 9223372036854775807\n",
            "rpc.toml",
        )
        .unwrap_err();
        assert_eq!(e.key, "registry.ttl_secs");
        assert!(e.message.contains("at most 86400 s"), "{e}");
        assert!(e.to_string().contains("rpc.toml"), "{e}");
        for key in [
            "server.shutdown_timeout_ms",
            "server.shutdown_grace_ms",
            "server.first_frame_timeout_ms",
            "server.frame_timeout_ms",
            "registry.timeout_ms",
            "client.retry_backoff_ms",
            "client.retry_backoff_max_ms",
            "client.outlier_cooldown_ms",
            "client.empty_grace_ms",
            "client.timeout_ms",
            "client.connect_timeout_ms",
        ] {
            let (section, name) = key.split_once('.').unwrap();
            let over = format!("[{section}]\n{name} = {}\n", MAX_DURATION_MS + 1);
            let e = RpcConfig::from_toml_str(&over, "t").unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.message.contains("at most 86400000 ms"), "{e}");
            let at = format!("[{section}]\n{name} = {MAX_DURATION_MS}\n");
            RpcConfig::from_toml_str(&at, "t").unwrap();
        }
        let e = RpcConfig::from_toml_str(
            "[client.services.\"A:1\"]\ntimeout_ms = 9223372036854775807\n",
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "client.services.\"A:1\".timeout_ms");
        // Built in code, validation is skipped: the accessors cap instead
        // of overflowing.
        let r = RegistryConfig {
            ttl_secs: u64::MAX,
            timeout_ms: u64::MAX,
            ..RegistryConfig::default()
        };
        assert_eq!(r.ttl(), Duration::from_secs(MAX_TTL_SECS));
        assert_eq!(r.timeout(), Duration::from_millis(MAX_DURATION_MS));
    }

    #[test]
    fn remote_backends_need_an_address() {
        let e = RpcConfig::from_toml_str("[registry]\ntype = \"consul\"\n", "t").unwrap_err();
        assert_eq!(e.key, "registry.address");
    }

    #[test]
    fn per_service_overrides_merge_with_client_defaults() {
        let c = RpcConfig::from_toml_str(
            r#"
            [client]
            timeout_ms = 900
            load_balancer = "p2c"
            idempotent = ["ping"]
            fail_safe = { list = "[]" }
            [client.services."UserService:1.0"]
            timeout_ms = 200
            fault_tolerance = "fail_safe"
            idempotent = ["get_user"]
            fail_safe = { get_user = "null" }
            "#,
            "t",
        )
        .unwrap();
        let p = c.client.policy_for("UserService:1.0");
        assert_eq!(p.timeout, Duration::from_millis(200));
        assert_eq!(p.load_balancer, LoadBalancerKind::P2c);
        assert_eq!(p.fault_tolerance, FaultTolerance::FailSafe);
        assert_eq!(p.idempotent, vec!["ping".to_owned(), "get_user".to_owned()]);
        assert_eq!(p.fail_safe.len(), 2);
        let other = c.client.policy_for("Other:1.0");
        assert_eq!(other.timeout, Duration::from_millis(900));
        assert_eq!(other.fault_tolerance, FaultTolerance::FailOver);
    }

    #[test]
    fn bad_fail_safe_json_names_the_method() {
        let e = RpcConfig::from_toml_str(
            "[client.services.\"S:1.0\"]\nfail_safe = { get = \"{nope\" }\n",
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "client.services.\"S:1.0\".fail_safe.get");
    }

    #[test]
    fn a_registry_key_the_backend_does_not_use_is_refused() {
        // (backend, the extra lines, the key refused)
        for (kind, extra, key) in [
            ("etcd", "token = \"t\"", "registry.token"),
            ("zookeeper", "token = \"t\"", "registry.token"),
            (
                "nacos",
                "[registry.tls]\nca_file = \"ca.pem\"",
                "registry.tls",
            ),
            ("local", "group = \"g\"", "registry.group"),
        ] {
            let text = format!("[registry]\ntype = \"{kind}\"\naddress = \"a:1\"\n{extra}\n");
            let e = RpcConfig::from_toml_str(&text, "rpc.toml").unwrap_err();
            assert_eq!((e.origin.as_str(), e.key.as_str()), ("rpc.toml", key));
            assert!(e.message.contains(kind), "{e}");
        }
        // From the environment: the variable is named.
        let e = RpcConfig::load_with_env(
            None,
            env(&[
                ("RPC_REGISTRY_TYPE", "consul"),
                ("RPC_REGISTRY_ADDRESS", "a:1"),
                ("RPC_REGISTRY_GROUP", "g"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.key, "registry.group");
        assert!(e.origin.contains("RPC_REGISTRY_GROUP"), "{e}");
        // What each backend takes passes.
        for (kind, extra) in [
            (
                "etcd",
                "username = \"u\"\npassword = \"p\"\nnamespace = \"n\"",
            ),
            (
                "zookeeper",
                "username = \"u\"\npassword = \"p\"\nnamespace = \"n\"",
            ),
            (
                "consul",
                "token = \"t\"\ndatacenter = \"d\"\nnamespace = \"n\"",
            ),
            ("nacos", "username = \"u\"\npassword = \"p\"\ngroup = \"g\""),
            ("local", "ttl_secs = 5"),
        ] {
            let text = format!(
                "[registry]\ntype = \"{kind}\"\naddress = \"a:1\"\ntimeout_ms = 100\n{extra}\n"
            );
            RpcConfig::from_toml_str(&text, "t").unwrap_or_else(|e| panic!("{kind}: {e}"));
        }
    }

    #[test]
    fn unknown_policy_names_are_rejected() {
        let e =
            RpcConfig::from_toml_str("[client]\nfault_tolerance = \"pray\"\n", "t").unwrap_err();
        assert_eq!(e.key, "client.fault_tolerance");
        assert!(e.message.contains("fail_over"), "{e}");
    }

    #[test]
    fn environment_overrides_single_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rpc.toml");
        std::fs::write(&path, "[registry]\ntype = \"local\"\nttl_secs = 7\n").unwrap();
        let c = RpcConfig::load_with_env(
            Some(&path),
            env(&[
                ("RPC_REGISTRY_TYPE", "etcd"),
                ("RPC_REGISTRY_ADDRESS", "http://127.0.0.1:2379"),
                ("RPC_CLIENT_TIMEOUT_MS", "250"),
                ("RPC_REQUIRE_SERVERS", "1"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.registry.kind, RegistryKind::Etcd);
        assert_eq!(c.registry.address.0, vec!["http://127.0.0.1:2379"]);
        assert_eq!(c.registry.ttl_secs, 7);
        assert_eq!(c.client.timeout_ms, 250);
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        let e = RpcConfig::load_with_env(None, env(&[("RPC_REGISTRY_TYPE", "mysql")])).unwrap_err();
        assert_eq!(e.key, "registry.type");
        assert!(e.origin.contains("RPC_REGISTRY_TYPE"), "{e}");
    }

    #[test]
    fn rpc_config_variable_selects_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "[server]\nport = 9\n").unwrap();
        let c =
            RpcConfig::load_with_env(None, env(&[("RPC_CONFIG", path.to_str().unwrap())])).unwrap();
        assert_eq!(c.server.port, 9);
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let e = RpcConfig::load_with_env(Some(Path::new("/nonexistent/rpc.toml")), env(&[]))
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/rpc.toml"));
    }
}
