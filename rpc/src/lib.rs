//! The RPC framework: one dependency for providers and consumers.
//!
//! A service is an ordinary trait annotated with [`service`]:
//!
//! ```ignore
//! #[rpc::service(version = "1.0")]
//! pub trait Greeter {
//!     async fn hello(&self, name: String) -> String;
//! }
//! ```
//!
//! The macro generates `GreeterServer<S>` (server-side dispatch, handed to a
//! [`Provider`]) and `GreeterClient` (a consumer proxy whose methods return
//! `Result<_, RpcError>`, generic over its call stack). Methods take
//! `#[rpc(idempotent, timeout_ms = N, name = "..")]`.
//!
//! # Layout
//!
//! * [`client`] — the consumer's call path as a stack of layers, one file
//!   each, in the order its docs give: [`client::Deadline`],
//!   [`client::Discover`], [`client::Retry`], [`client::LoadBalance`],
//!   [`client::Outlier`], [`client::Transport`]; the [`client::Call`] and
//!   [`client::Layer`] traits users implement; [`client::ClientContext`];
//!   [`CallOptions`] (per-call timeout, metadata, hash key).
//!   * [`consumer`] — [`Consumer`] (registry, discovery cache, connection
//!     pool, user layers) builds a stack per service.
//!   * [`client::service`] — [`ServiceClient`], the untyped proxy generated
//!     clients wrap, generic over its stack.
//!   * [`balance`] — the [`balance::LoadBalancer`] trait and the built-in
//!     policies, one file each: round robin, random, weighted, consistent
//!     hash, power of two choices.
//!   * [`retry`] — fault tolerance: fail-fast, fail-over with backoff and a
//!     retry budget, fail-safe defaults.
//!   * [`outlier`] — a circuit breaker per provider address.
//! * [`server`] — the provider side's seam: [`server::ServerLayer`], code
//!   around every call (auth, logging), and the [`Context`] a handler reads
//!   with [`Context::current`].
//! * [`provider`] — [`Provider`]: bind, register, serve, shut down in order;
//!   [`shutdown_signal`] (Ctrl-C / SIGTERM). `advertise` (private) decides
//!   the host a provider publishes.
//! * [`observe`] — tracing spans per call and attempt with W3C trace
//!   context in the metadata, metrics through the `metrics` facade
//!   (names in [`rpc_core::metric_names`]), and the Prometheus
//!   [`observe::MetricsEndpoint`] (feature `prometheus`).
//! * [`error`] — [`Error`], what starting or running a provider reports.
//! * Re-exports: `rpc_core` types (config, [`Metadata`], [`Context`],
//!   errors), the registry factory, the transport.
//!
//! # Features
//!
//! * `etcd`, `zookeeper`, `consul`, `nacos` — compile that registry backend in.
//! * `tls` — TLS and mutual TLS between consumers and providers.
//! * `prometheus` — [`observe::MetricsEndpoint`], serving `[metrics] listen`.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

mod advertise;
pub mod client;
pub mod error;
pub mod observe;
pub mod provider;

pub use client::consumer::{self, Consumer};
pub use client::service::ServiceClient;
pub use client::{CallOptions, balance, outlier, retry};
pub use error::Error;
pub use provider::{Provider, ProviderBuilder, shutdown_signal};
pub use rpc_core::config::Addresses;
pub use rpc_core::context::{self, Context, MetaValue, Metadata};
pub use rpc_core::{
    CallPolicy, ClientConfig, ClientTlsConfig, Compression, FaultTolerance, LoadBalancerKind,
    MetricsConfig, RegistryConfig, RegistryError, RegistryKind, RpcConfig, RpcError,
    SerializerKind, ServerConfig, ServerTlsConfig, ServiceMetaInfo, ServiceOverrides, StatusCode,
};
pub use rpc_macros::service;

/// The provider side's seams: [`server::ServerLayer`] (code around every
/// call) and what it works with.
pub mod server {
    pub use rpc_core::Context;
    pub use rpc_transport::server::{CallError, HandlerFuture, ServerLayer};
}
pub use rpc_registry as registry;
pub use rpc_transport as transport;
pub use serde;

/// Items generated code names. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use rpc_transport::server::{Call, CallError, HandlerFuture, Replier, ServiceHandler};
    pub use serde;
    pub use std::boxed::Box;
    pub use std::sync::Arc;
}
