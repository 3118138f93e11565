//! Tokio transport over TCP or TLS.
//!
//! # Layout
//!
//! * [`server`] — [`Server`]: bounded accept loop, one task per connection,
//!   concurrent handlers answered out of order, coalesced writes, graceful
//!   shutdown from a future. [`ServiceHandler`] is the seam generated
//!   dispatch implements.
//! * [`client`] — [`Endpoint`]: per-provider multiplexed connection(s)
//!   keyed by request id, bounded in-flight calls, per-call deadline,
//!   cancellation on drop, reconnect with backoff.
//! * [`connect`] — [`Connector`] and [`Acceptor`]: plain TCP or TLS,
//!   chosen once from the configuration; [`io`] — the stream seam the
//!   connection tasks are generic over (TCP keeps its non-blocking
//!   streamed write); [`tls`] (feature `tls`) — rustls set-up from PEM
//!   files; [`memory`] — in-process pipes for tests on the paused clock.
//! * [`error`] — [`TransportError`] (serving); calls report
//!   [`rpc_core::RpcError`].

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod client;
pub mod connect;
pub mod error;
mod ids;
pub mod io;
pub mod memory;
mod meter;
pub mod server;
mod stream_out;
#[cfg(feature = "tls")]
pub mod tls;

pub use client::{CallOptions, Endpoint, EndpointConfig, RawReply, encode_args, encode_args_sized};
pub use connect::{Acceptor, Connector};
pub use error::TransportError;
pub use memory::MemoryNetwork;
pub use server::{Server, ServerBuilder, ServiceHandler};
