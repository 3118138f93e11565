//! The observe layer: a tracing span per call, the W3C `traceparent` the
//! call carries, and the per-call metrics; and the span of each attempt,
//! which [`Outlier`](super::Outlier) opens.
//!
//! The layer is built in (inside [`Deadline`](super::Deadline), around the
//! user's call layers). When nothing is configured it costs a check: no subscriber at all is one
//! atomic load (`dispatcher::has_been_set`, which also keeps `tracing`'s
//! `log` fallback from formatting span fields), a subscriber that does not
//! want the span is its callsite's cached interest, and metrics are off
//! unless `[metrics]` turns them on. The observed path runs the inner call
//! as a boxed future, so the unobserved path's future is no bigger than
//! the stack below it (measured: `README.md`, "What it costs").

use std::future::Future;

use rpc_core::RpcError;
use rpc_core::metric_names::error_label;
use rpc_transport::RawReply;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::{Call, ClientContext};
use crate::observe::handles::MethodHandles;
use crate::observe::trace_context::{self, SpanIds, TRACEPARENT};
use crate::observe::{self, Parent, SYSTEM};

/// Around the whole call: its `rpc.client` span (DEBUG, target
/// `rpc::client`), its `traceparent`, its metrics. The span carries the
/// OpenTelemetry RPC attribute names: `rpc.system`, `rpc.service`,
/// `rpc.method`, `rpc.response.status_code`, `error`, and the W3C ids
/// `trace_id`, `span_id`, `parent_id`.
///
/// The call's trace: inside a handler, the handler's span (a child of the
/// caller's); else a `traceparent` the call already has (set by a user
/// layer or per-call metadata); else a new trace. The call gets a new span
/// id in that trace and sends it as its `traceparent`. Without a
/// subscriber that wants the span, the metadata is left as it is (an
/// incoming `traceparent` is still passed on by `Deadline`).
#[derive(Debug)]
pub struct Observe<S> {
    inner: S,
    metrics: bool,
}

impl<S> Observe<S> {
    /// Around `inner`; `metrics` turns recording on.
    pub fn new(inner: S, metrics: bool) -> Self {
        Self { inner, metrics }
    }
}

impl<S: Call> Call for Observe<S> {
    async fn call(&self, cx: &mut ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError> {
        let span = if tracing::dispatcher::has_been_set() {
            tracing::debug_span!(
                target: "rpc::client",
                "rpc.client",
                otel.kind = "client",
                otel.name = Empty,
                rpc.system = SYSTEM,
                rpc.service = cx.service,
                rpc.method = cx.method.name,
                rpc.response.status_code = Empty,
                otel.status_code = Empty,
                error = Empty,
                trace_id = Empty,
                span_id = Empty,
                parent_id = Empty,
            )
        } else {
            tracing::Span::none()
        };
        if !span.is_disabled() {
            return observed(&self.inner, self.metrics, span, cx, args).await;
        }
        // Not traced: metrics or nothing, inline, through one await point
        // (a second one would grow every call's future).
        let mut finish = if self.metrics {
            Finish::start(cx)
        } else {
            Finish(None)
        };
        let result = self.inner.call(cx, args).await;
        finish.done(&result, cx);
        result
    }
}

/// The observed call: boxed, so that its state (span, handles) does not
/// grow the future of every call.
fn observed<'a, 'b: 'a, S: Call>(
    inner: &'a S,
    metrics: bool,
    span: tracing::Span,
    cx: &'a mut ClientContext<'b>,
    args: &'a [u8],
) -> std::pin::Pin<Box<dyn Future<Output = Result<RawReply, RpcError>> + Send + 'a>> {
    Box::pin(async move {
        let traced = !span.is_disabled();
        if traced {
            let parent = match trace_context::current() {
                Some(handler) => Parent::Local(handler),
                None => cx
                    .metadata
                    .get_str(TRACEPARENT)
                    .and_then(SpanIds::parse)
                    .map_or(Parent::Root, Parent::Remote),
            };
            let ids = observe::start_span(&span, parent, cx.service, cx.method.name);
            cx.metadata_mut().insert(TRACEPARENT, ids.to_string());
        }
        let mut finish = if metrics {
            Finish::start(cx)
        } else {
            Finish(None)
        };
        let result = if traced {
            inner.call(cx, args).instrument(span.clone()).await
        } else {
            inner.call(cx, args).await
        };
        finish.done(&result, cx);
        let status = match &result {
            Ok(_) => "OK",
            Err(e) => error_label(e),
        };
        if traced {
            span.record("rpc.response.status_code", status);
            if let Err(e) = &result {
                span.record("otel.status_code", "ERROR");
                span.record("error", tracing::field::display(e));
                tracing::debug!(parent: &span, error = %e, "call failed");
            }
        }
        result
    })
}

/// The metrics of a call still running: if its future is dropped (the
/// caller gave up on it, as in a `select!`), it leaves the in-flight gauge
/// and is counted as `CANCELLED`.
struct Finish(Option<&'static MethodHandles>);

impl Finish {
    /// Counts the call in flight.
    fn start(cx: &ClientContext<'_>) -> Self {
        let h = observe::handles::client().get(cx.service, cx.method.name);
        h.in_flight.increment(1.0);
        Self(Some(h))
    }

    /// Records the call's outcome and duration.
    fn done(&mut self, result: &Result<RawReply, RpcError>, cx: &ClientContext<'_>) {
        if let Some(h) = self.0.take() {
            h.in_flight.decrement(1.0);
            h.duration.record(cx.started.elapsed().as_secs_f64());
            h.finished(match result {
                Ok(_) => "OK",
                Err(e) => error_label(e),
            });
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.in_flight.decrement(1.0);
            h.finished("CANCELLED");
        }
    }
}

/// The attempt's `rpc.attempt` span (TRACE, target `rpc::client`), if a
/// subscriber wants it: `rpc.attempt` (0 for the first) and the
/// OpenTelemetry `server.address` / `server.port` of the instance picked.
/// [`Outlier`](super::Outlier) opens it around each attempt, inside the
/// user's attempt layers.
pub(crate) fn attempt_span(cx: &ClientContext<'_>) -> Option<tracing::Span> {
    if !tracing::dispatcher::has_been_set() {
        return None;
    }
    let span = tracing::trace_span!(
        target: "rpc::client",
        "rpc.attempt",
        rpc.attempt = cx.attempt,
        server.address = Empty,
        server.port = Empty,
        error = Empty,
    );
    if span.is_disabled() {
        return None;
    }
    if let Some(i) = cx.instance() {
        span.record("server.address", i.meta.service_host.as_str());
        span.record("server.port", i.meta.service_port);
    }
    Some(span)
}

/// Type of the boxed attempt future [`traced_attempt`] runs.
pub(crate) type AttemptFuture<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<RawReply, RpcError>> + Send + 'a>>;

/// Runs the attempt `run` makes inside `span`, recording its error.
pub(crate) async fn traced_attempt<'a, 'b: 'a>(
    span: tracing::Span,
    cx: &'a mut ClientContext<'b>,
    run: impl FnOnce(&'a mut ClientContext<'b>) -> AttemptFuture<'a>,
) -> Result<RawReply, RpcError> {
    let result = run(cx).instrument(span.clone()).await;
    if let Err(e) = &result {
        span.record("error", tracing::field::display(e));
    }
    result
}
