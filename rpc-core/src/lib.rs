//! Core types of the RPC framework. No I/O lives here.
//!
//! # Layout
//!
//! * [`backoff`] — jittered exponential [`backoff::Backoff`] for every
//!   reconnect loop, and the cheap [`backoff::random_below`].
//! * [`meta`] — [`ServiceMetaInfo`], one provider instance, with the Java
//!   original's JSON field names and key layout (`name:version/host:port`).
//! * [`registry`] — the registering half of the registry seam: [`Registry`]
//!   and the [`Registration`] guard that deregisters on drop.
//! * [`discover`] — the discovering half: [`Discover`], [`Watch`] and
//!   [`WatchEvent`].
//! * [`config`] — [`RpcConfig`], loaded from `rpc.toml` with environment
//!   overrides; errors name the file and the key.
//! * [`host`] — [`Host`], a configured host string parsed once (every
//!   spelling of an address, the wildcard, loopback).
//! * [`context`] — [`Metadata`] sent with a call, and the [`Context`] of
//!   the incoming call a provider is serving (read with `Context::current`).
//! * [`status`] — [`StatusCode`], the response status carried on the wire.
//! * [`error`] — [`RpcError`] (what a call returns), [`RegistryError`],
//!   [`ConfigError`].
//!
//! Backends live in `rpc-registry`, the wire format in `rpc-codec`, sockets
//! in `rpc-transport`; the `rpc` facade ties them together.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod backoff;
pub mod config;
pub mod context;
pub mod discover;
pub mod error;
pub mod host;
pub mod meta;
pub mod metric_names;
pub mod registry;
pub mod status;

pub use config::{
    CallPolicy, ClientConfig, ClientTlsConfig, Compression, FaultTolerance, LoadBalancerKind,
    MetricsConfig, RegistryConfig, RegistryKind, RpcConfig, SerializerKind, ServerConfig,
    ServerTlsConfig, ServiceOverrides,
};
pub use context::{Context, MetaValue, Metadata};
pub use discover::{Discover, Watch, WatchEvent};
pub use error::{BoxError, ConfigError, RegistryError, RegistryErrorKind, RpcError};
pub use host::Host;
pub use meta::{ServiceKey, ServiceMetaInfo, service_key};
pub use registry::{BoxFuture, Deregister, Registration, RegistrationState, Registry};
pub use status::StatusCode;
