//! Tokio TCP transport.
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
//! * [`error`] — [`TransportError`] (serving); calls report
//!   [`rpc_core::RpcError`].

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod client;
pub mod error;
mod ids;
pub mod server;
mod stream_out;

pub use client::{CallOptions, Endpoint, EndpointConfig, RawReply, encode_args, encode_args_sized};
pub use error::TransportError;
pub use server::{Server, ServerBuilder, ServiceHandler};
