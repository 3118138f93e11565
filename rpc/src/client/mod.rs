//! The consumer's call path: a stack of layers, each one file.
//!
//! A call's arguments are encoded once; then the call goes down this
//! stack, outer to inner, each layer a [`Call`] wrapping the next:
//!
//! ```text
//! fail-safe (typed: ServiceClient::call)
//!   -> Deadline          deadline.rs   timeout precedence, the incoming call's
//!                                      deadline and propagated metadata
//!   -> Observe           observe.rs    the call's span, traceparent, metrics
//!   -> [Consumer::layer]               user layers around the whole call
//!   -> Discover          discover.rs   the instance set (waits for one if empty)
//!   -> Retry             retry.rs      fail-fast / fail-over, backoff, budget
//!   -> LoadBalance       balance/      picks an instance (outlier admission)
//!   -> [Consumer::attempt_layer]       user layers around each attempt
//!   -> Outlier           outlier.rs    records the attempt against its instance;
//!                                      the attempt's span (observe.rs)
//!   -> Transport         transport.rs  the instance's pooled connection
//! ```
//!
//! (volo documents the same shape as "outer -> LoadBalance -> \[inner\] ->
//! transport".) User layers at the first point see the call once, with
//! its deadline fixed and its metadata (add a token there); at the second
//! they see each attempt with its instance picked ([`ClientContext::instance`]),
//! and their own errors do not count against the instance's health.
//!
//! * [`Call`] — one small trait (`call(&self, cx, args) -> impl Future`):
//!   no `poll_ready`, no boxing per call; implementations may write
//!   `async fn`. [`Layer`] wraps one `Call` in another (tower's shape).
//! * [`ClientContext`] — what a call carries down the stack: service,
//!   method, deadline, metadata, attempt number; the built-in layers keep
//!   their per-call state in it (the instance set, the pick, tried instances).
//! * [`CallOptions`] — per-call timeout, metadata and hash key
//!   (`client.with(..)`), sharing everything else.
//! * [`consumer`] — [`Consumer`](consumer::Consumer): registry, discovery
//!   cache, connection pool; builds a stack per service.
//! * [`service`] — [`ServiceClient`](service::ServiceClient), the untyped
//!   proxy generated clients wrap; generic over the stack.
//!
//! The stack is a concrete nested type ([`DefaultStack`]), so the compiler
//! sees through it; only the balancer is a trait object.

pub mod balance;
pub mod consumer;
mod context;
mod deadline;
mod discover;
pub(crate) mod observe;
mod options;
pub mod outlier;
pub mod retry;
pub mod service;
mod transport;

use std::future::Future;

use rpc_core::RpcError;
use rpc_transport::RawReply;

pub use balance::LoadBalance;
pub use context::{ClientContext, MethodInfo};
pub use deadline::Deadline;
pub use discover::Discover;
pub use observe::Observe;
pub use options::CallOptions;
pub use outlier::Outlier;
pub use retry::Retry;
pub use transport::Transport;

/// One step of the call path: takes the call's context and its encoded
/// arguments, returns the encoded reply.
///
/// Implementations may write `async fn call(&self, cx: &mut
/// ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError>`.
pub trait Call: Send + Sync + 'static {
    /// Runs the call (or passes it on to the layer inside).
    fn call(
        &self,
        cx: &mut ClientContext<'_>,
        args: &[u8],
    ) -> impl Future<Output = Result<RawReply, RpcError>> + Send;
}

/// Wraps a [`Call`] in another: how a layer joins the stack. Built once
/// per service client (`&self`, so a consumer keeps its layers and applies
/// them to every service).
pub trait Layer<S> {
    /// The wrapped call.
    type Service: Call;
    /// Wraps `inner`.
    fn layer(&self, inner: S) -> Self::Service;
}

/// The layer that adds nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Identity;

impl<S: Call> Layer<S> for Identity {
    type Service = S;
    fn layer(&self, inner: S) -> S {
        inner
    }
}

/// Two layers: `outer` around `inner`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stack<Inner, Outer> {
    inner: Inner,
    outer: Outer,
}

impl<Inner, Outer> Stack<Inner, Outer> {
    /// `outer` around `inner`.
    pub fn new(inner: Inner, outer: Outer) -> Self {
        Self { inner, outer }
    }
}

impl<S, Inner, Outer> Layer<S> for Stack<Inner, Outer>
where
    Inner: Layer<S>,
    Outer: Layer<Inner::Service>,
{
    type Service = Outer::Service;
    fn layer(&self, inner: S) -> Self::Service {
        self.outer.layer(self.inner.layer(inner))
    }
}

/// The stack a consumer with user layers `O` (around the call) and `A`
/// (around each attempt) builds; see the module docs for the order.
pub type ClientStack<O, A> = Deadline<
    Observe<
        <O as Layer<
            Discover<Retry<LoadBalance<<A as Layer<Outlier<Transport>>>::Service>>>,
        >>::Service,
    >,
>;

/// The stack of a consumer without user layers.
pub type DefaultStack = Deadline<Observe<Discover<Retry<LoadBalance<Outlier<Transport>>>>>>;

/// Something that builds service clients: a [`Consumer`](consumer::Consumer)
/// with whatever layers it has. Generated clients' `new` takes any.
pub trait MakeStack {
    /// The stack its service clients use.
    type Stack: Call;
    /// A service client for `name:version`.
    fn make_service(&self, name: &str, version: &str) -> service::ServiceClient<Self::Stack>;
}
