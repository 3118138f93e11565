//! The observe layers: a tracing span per call and per attempt, the W3C
//! `traceparent` the call carries, and the per-call metrics.
//!
//! Both are built in (inside [`Deadline`](super::Deadline), around the
//! user's call layers; and around the user's attempt layers) and cost
//! nothing to speak of when not configured: a span whose callsite no
//! subscriber wants is one cached check, and metrics are recorded only
//! when `[metrics]` turns them on (the handles are then per method, see
//! `crate::observe`).

use rpc_core::RpcError;
use rpc_core::metric_names::error_label;
use rpc_transport::RawReply;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::{Call, ClientContext};
use crate::observe::trace_context::{self, SpanIds, TRACEPARENT};
use crate::observe::{self, SYSTEM};

/// Around the whole call: its `rpc.client` span (INFO, target
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
        let span = tracing::info_span!(
            target: "rpc::client",
            "rpc.client",
            otel.kind = "client",
            otel.name = Empty,
            rpc.system = SYSTEM,
            rpc.service = cx.service,
            rpc.method = cx.method.name,
            rpc.response.status_code = Empty,
            error = Empty,
            trace_id = Empty,
            span_id = Empty,
            parent_id = Empty,
        );
        let traced = !span.is_disabled();
        if traced {
            let parent = trace_context::current()
                .or_else(|| cx.metadata.get_str(TRACEPARENT).and_then(SpanIds::parse));
            let ids = observe::start_span(&span, parent, cx.service, cx.method.name);
            cx.metadata_mut().insert(TRACEPARENT, ids.to_string());
        }
        let handles = self
            .metrics
            .then(|| observe::handles::client().get(cx.service, cx.method.name));
        if let Some(h) = &handles {
            h.in_flight.increment(1.0);
        }
        let result = if traced {
            self.inner.call(cx, args).instrument(span.clone()).await
        } else {
            self.inner.call(cx, args).await
        };
        let status = match &result {
            Ok(_) => "OK",
            Err(e) => error_label(e),
        };
        if let Some(h) = handles {
            h.in_flight.decrement(1.0);
            h.duration.record(cx.started.elapsed().as_secs_f64());
            h.finished(status);
        }
        if traced {
            span.record("rpc.response.status_code", status);
            if let Err(e) = &result {
                span.record("error", tracing::field::display(e));
                tracing::debug!(parent: &span, error = %e, "call failed");
            }
        }
        result
    }
}

/// Around each attempt, after the instance is picked: its `rpc.attempt`
/// span (DEBUG, target `rpc::client`) with `rpc.attempt` (0 for the first)
/// and the OpenTelemetry `server.address` / `server.port` of the instance.
#[derive(Debug)]
pub struct ObserveAttempt<S> {
    inner: S,
}

impl<S> ObserveAttempt<S> {
    /// Around `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: Call> Call for ObserveAttempt<S> {
    async fn call(&self, cx: &mut ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError> {
        let span = tracing::debug_span!(
            target: "rpc::client",
            "rpc.attempt",
            rpc.attempt = cx.attempt,
            server.address = Empty,
            server.port = Empty,
            error = Empty,
        );
        if span.is_disabled() {
            return self.inner.call(cx, args).await;
        }
        if let Some(i) = cx.instance() {
            span.record("server.address", i.meta.service_host.as_str());
            span.record("server.port", i.meta.service_port);
        }
        let result = self.inner.call(cx, args).instrument(span.clone()).await;
        if let Err(e) = &result {
            span.record("error", tracing::field::display(e));
        }
        result
    }
}
