//! Server layers: code that runs around every call a server dispatches
//! (authentication, logging, metrics, tracing), before and around the
//! handler.
//!
//! A layer sees the call's [`Context`] — service, method, metadata, peer,
//! deadline — and can refuse the call with a status
//! ([`StatusCode::Unauthenticated`](rpc_core::StatusCode::Unauthenticated),
//! `PermissionDenied`, ...), which the client surfaces as
//! `RpcError::Remote { code, .. }`. Refused calls are answered at once: no
//! arguments are decoded and no task is started.
//!
//! Layers are trait objects (`Arc<dyn ServerLayer>`), not a generic stack.
//! Every call has a [`Context`] (the names are slices of the request
//! frame; the deadline is resolved only when asked for or when the handler
//! waits; metadata is decoded only when
//! sent) that is made current while its handler is polled (a thread-local
//! swap per poll), with or without layers. On top of that, a layer that
//! only implements [`ServerLayer::on_call`] costs a virtual call; only
//! [`ServerLayer::around`] costs an allocation (a boxed future), and only
//! for layers that override it. A panic in a layer fails its call
//! (`handler error`), not the connection.

use rpc_core::Context;

use super::handler::{CallError, HandlerFuture};

/// Code that runs around every call: implement [`on_call`](Self::on_call)
/// to admit or refuse, [`around`](Self::around) to wrap the handler's
/// future (time it, log its outcome). Added with `ServerBuilder::layer`
/// (or `Provider::builder(..).layer(..)`); the first layer added is the
/// outermost: its `on_call` runs first and its `around` wraps the others.
pub trait ServerLayer: Send + Sync + 'static {
    /// Decides whether the call may run, before its arguments are decoded
    /// (and before the service is looked up). An error is sent to the
    /// caller as the response (status and message; a status of `Ok` is sent
    /// as `Handler`).
    fn on_call(&self, cx: &Context) -> Result<(), CallError> {
        let _ = cx;
        Ok(())
    }

    /// Wraps the future that runs the handler and encodes its reply (or
    /// its error status). The returned future runs with `cx` current, so
    /// `Context::current()` works inside it; it must own what it uses
    /// (clone an `Arc` in). The default returns `next` unchanged.
    fn around(&self, cx: &Context, next: HandlerFuture) -> HandlerFuture {
        let _ = cx;
        next
    }
}

impl<L: ServerLayer + ?Sized> ServerLayer for std::sync::Arc<L> {
    fn on_call(&self, cx: &Context) -> Result<(), CallError> {
        (**self).on_call(cx)
    }

    fn around(&self, cx: &Context, next: HandlerFuture) -> HandlerFuture {
        (**self).around(cx, next)
    }
}
