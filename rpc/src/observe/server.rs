//! The provider's observe layer: a span per handled call, with the
//! caller's trace continued, and the per-call server metrics.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::BytesMut;
use rpc_core::Context;
use rpc_core::StatusCode;
use rpc_core::metric_names::status_label;
use rpc_transport::server::{CallError, HandlerFuture, ServerLayer};
use tracing::field::Empty;

use super::Parent;
use super::handles::{self, MethodHandles};
use super::trace_context::{self, SpanIds, TRACEPARENT};

/// A [`ServerLayer`] that opens an `rpc.server` span (DEBUG, target
/// `rpc::server`) around each handled call and records the server's
/// per-call metrics. Every [`Provider`](crate::Provider) adds it as its
/// outermost layer; when no subscriber wants the span and metrics are
/// off it hands the handler's future back untouched (no allocation).
///
/// The span is a child of the caller's `traceparent` (or a new root) and
/// is the current span while the handler runs, so calls the handler makes
/// continue the trace ([`trace_context::current`]). A call whose future is
/// dropped before it finishes is counted as `DEADLINE_EXCEEDED` when its
/// deadline has passed, else as `CANCELLED` (the caller cancelled it, its
/// connection closed, or the provider is shutting down).
#[derive(Clone, Debug, Default)]
pub struct ServerObserve {
    metrics: bool,
}

impl ServerObserve {
    /// The layer; `metrics` turns recording on.
    pub fn new(metrics: bool) -> Self {
        Self { metrics }
    }
}

impl ServerLayer for ServerObserve {
    fn around(&self, cx: &Context, next: HandlerFuture) -> HandlerFuture {
        // No subscriber at all: one atomic load, and `tracing`'s `log`
        // fallback does not format the span's fields.
        if !self.metrics && !tracing::dispatcher::has_been_set() {
            return next;
        }
        let span = tracing::debug_span!(
            target: "rpc::server",
            "rpc.server",
            otel.kind = "server",
            otel.name = Empty,
            rpc.system = super::SYSTEM,
            rpc.service = cx.service(),
            rpc.method = cx.method(),
            client.address = %cx.peer().ip(),
            client.port = cx.peer().port(),
            rpc.response.status_code = Empty,
            otel.status_code = Empty,
            error = Empty,
            trace_id = Empty,
            span_id = Empty,
            parent_id = Empty,
        );
        let traced = !span.is_disabled();
        if !traced && !self.metrics {
            return next;
        }
        let ids = traced.then(|| {
            let parent = cx
                .metadata()
                .get_str(TRACEPARENT)
                .and_then(SpanIds::parse)
                .map_or(Parent::Root, Parent::Remote);
            super::start_span(&span, parent, cx.service(), cx.method())
        });
        let handles = self
            .metrics
            .then(|| handles::server().get(cx.service(), cx.method()));
        if let Some(h) = handles {
            h.in_flight.increment(1.0);
        }
        Box::pin(Observed {
            inner: next,
            span,
            ids,
            handles,
            deadline: cx.deadline(),
            started: Instant::now(),
            done: false,
        })
    }
}

struct Observed {
    inner: HandlerFuture,
    span: tracing::Span,
    ids: Option<SpanIds>,
    handles: Option<&'static MethodHandles>,
    /// Tells a call dropped at its deadline from one the caller cancelled.
    deadline: Option<tokio::time::Instant>,
    started: Instant,
    done: bool,
}

impl Observed {
    fn finish(&mut self, status: &'static str, error: Option<&str>) {
        self.done = true;
        if let Some(h) = self.handles {
            h.in_flight.decrement(1.0);
            h.duration.record(self.started.elapsed().as_secs_f64());
            h.finished(status);
        }
        if self.ids.is_some() {
            self.span.record("rpc.response.status_code", status);
            if let Some(e) = error {
                self.span.record("otel.status_code", "ERROR");
                self.span.record("error", e);
            }
        }
    }
}

impl Future for Observed {
    type Output = Result<BytesMut, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let poll = match this.ids {
            Some(ids) => {
                let _entered = this.span.enter();
                trace_context::with_current(ids, || this.inner.as_mut().poll(cx))
            }
            None => this.inner.as_mut().poll(cx),
        };
        if let Poll::Ready(out) = &poll {
            match out {
                Ok(_) => this.finish("OK", None),
                Err(e) => {
                    let status = status_label(e.status);
                    this.finish(status, Some(e.message.as_str()));
                }
            }
        }
        poll
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if !self.done {
            let expired = self
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() >= d);
            if expired {
                self.finish(status_label(StatusCode::Timeout), Some("deadline exceeded"));
            } else {
                // The caller cancelled it, its connection closed, or the
                // provider is shutting down.
                self.finish("CANCELLED", Some("dropped before it finished"));
            }
        }
    }
}
