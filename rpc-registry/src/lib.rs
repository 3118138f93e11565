//! Registry backends and the consumer-side instance cache.
//!
//! Providers publish themselves through [`rpc_core::Registry`]; consumers
//! find them through [`rpc_core::Discover`]. This crate implements both for
//! each backend, picks one from `[registry]` ([`AnyRegistry::from_config`]),
//! and keeps consumers' instance lists current ([`ServiceCache`]).
//!
//! # Layout
//!
//! Each backend is a folder: `mod.rs` has the registry type, `connect`, the
//! `Registry` and `Discover` impls and the module docs (what it writes,
//! how it recovers; `docs/registry-layouts.md` sums them up);
//! `registration.rs` is its keeper task (or heartbeat) and `follow.rs` its
//! watch, plus what only that backend needs.
//!
//! * [`local`]: [`LocalRegistry`], the default: a directory of JSON records
//!   with heartbeats; cross-process on one host, no server (`scan.rs`
//!   reads a service directory).
//! * [`memory`]: [`MemoryRegistry`], in-process, with fault injection for
//!   tests ([`MemoryRegistry::evict`], [`MemoryRegistry::set_reachable`]).
//! * `etcd/`, `zookeeper/` (`session.rs`), `consul/` (`agent.rs`: the HTTP
//!   API; `record.rs`: names), `nacos/` (`lanes.rs`: connections;
//!   `record.rs`; `subscription.rs`): behind cargo features, below.
//! * [`cache`]: [`ServiceCache`], one watch per service key, lock-free reads
//!   of `Arc<Vec<ServiceMetaInfo>>`, a version counter per service, keeps
//!   its last list through registry outages and empty restarts
//!   (`entry.rs`: a service's list, health and version;
//!   `protection.rs`: the empty-push protection, the only place that
//!   policy lives, as a plain state machine; `merge.rs`: applying events;
//!   `snapshot.rs`: the snapshot file).
//! * [`factory`]: [`AnyRegistry`], the configured backend as one type.
//! * `support` (private): what the backends share: the keeper-task
//!   protocol and shutdown, the follower's emitter (events, connection
//!   state, pauses), the list diff, atomic file writes, task ownership,
//!   TLS file reading, the skipped-entry log. Reconnect backoff is
//!   [`rpc_core::backoff`], jittered, shared with the transport.
//!
//! # Cargo features
//!
//! * `etcd` — `etcd::EtcdRegistry`: one lease per registry kept alive over
//!   the keep-alive stream; prefix watches that resume from the last
//!   revision. Needs `protoc` at build time.
//! * `zookeeper` — `zookeeper::ZookeeperRegistry`: one session per
//!   registry with ephemeral nodes, re-created in a new session after an
//!   expiry; persistent recursive watches (ZooKeeper 3.6+).
//! * `consul` — `consul::ConsulRegistry`: agent service registration with
//!   a TTL check passed by one keeper task, re-registered when the agent
//!   forgets it; passing-only discovery in stale mode (any server answers,
//!   so it works during a leader election), watched with blocking queries
//!   (Consul 1.8+).
//! * `nacos` — `nacos::NacosRegistry`: ephemeral instances kept alive by
//!   the official SDK's gRPC connection, re-registered by a keeper task
//!   after a break; discovery through the SDK's subscription, with a guard
//!   against empty lists pushed while the server restarts (Nacos 2.x).
//!
//! Every backend passes the conformance suite in `tests/conformance/`, which
//! also says which cases a backend cannot run and why.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod cache;
#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod factory;
pub mod local;
pub mod memory;
#[cfg(feature = "nacos")]
pub mod nacos;
mod support;
#[cfg(feature = "zookeeper")]
pub mod zookeeper;

pub use cache::{CacheError, CacheOptions, ServiceCache, ServiceHandle};
#[cfg(feature = "consul")]
pub use consul::ConsulRegistry;
#[cfg(feature = "etcd")]
pub use etcd::EtcdRegistry;
pub use factory::AnyRegistry;
pub use local::{LocalOptions, LocalRegistry};
pub use memory::MemoryRegistry;
#[cfg(feature = "nacos")]
pub use nacos::NacosRegistry;
#[cfg(feature = "zookeeper")]
pub use zookeeper::ZookeeperRegistry;
