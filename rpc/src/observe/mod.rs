//! Observability: tracing spans with W3C trace context, and metrics.
//!
//! * Spans. Consumers open an `rpc.client` span per call (DEBUG) and an
//!   `rpc.attempt` span per attempt (TRACE), target `rpc::client`
//!   ([`crate::client::Observe`]; the attempt span is opened by
//!   [`crate::client::Outlier`]);
//!   providers open an `rpc.server` span per handled call (DEBUG, target
//!   `rpc::server`, [`ServerObserve`]). Their fields use the OpenTelemetry
//!   RPC semantic-convention names (`rpc.system`, `rpc.service`,
//!   `rpc.method`, `rpc.response.status_code`, `server.address`,
//!   `server.port`, `client.address`, `error`) and carry the W3C ids
//!   (`trace_id`, `span_id`, `parent_id`). The `traceparent` travels in the
//!   call's metadata ([`trace_context`]), so a provider that calls another
//!   service while handling a call continues the caller's trace. Spans
//!   exist only when a subscriber wants them (`RUST_LOG=rpc=debug`, or an
//!   OpenTelemetry layer; see the `opentelemetry` feature). DEBUG, not
//!   INFO: a program logging at INFO does not pay for a span per call.
//! * Metrics, through the `metrics` facade, when `[metrics]` turns them on
//!   ([`rpc_core::MetricsConfig::records`]): the names, labels and units
//!   are listed in [`rpc_core::metric_names`]. The per-call ones are
//!   recorded by the same layers, through per-method handles
//!   (`handles`, private); the rest where the event happens (retries,
//!   outliers, the discovery cache, connections, registrations).
//! * [`MetricsEndpoint`] (feature `prometheus`): installs a
//!   [`PrometheusRecorder`] (fixed-bucket histograms, counted at record
//!   time) and serves `GET /metrics` on `[metrics] listen`.

pub(crate) mod handles;
#[cfg(feature = "opentelemetry")]
mod otel;
#[cfg(feature = "prometheus")]
pub mod prometheus;
#[cfg(feature = "prometheus")]
mod recorder;
mod server;
pub mod trace_context;

#[cfg(feature = "prometheus")]
pub use prometheus::MetricsEndpoint;
#[cfg(feature = "prometheus")]
pub use recorder::{Buckets, DEFAULT_BUCKETS, PrometheusHandle, PrometheusRecorder};
pub use server::ServerObserve;
pub use trace_context::SpanIds;

/// The `rpc.system` attribute of every span: this framework's protocol.
pub const SYSTEM: &str = "ming_rpc";

/// Where a span's parent comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Parent {
    /// None: the span starts a trace.
    Root,
    /// A `traceparent` that arrived in metadata (another process's span).
    Remote(SpanIds),
    /// The handler's span this call is made in (entered, so the
    /// subscriber already knows it as the parent).
    Local(SpanIds),
}

impl Parent {
    fn ids(self) -> Option<SpanIds> {
        match self {
            Parent::Root => None,
            Parent::Remote(p) | Parent::Local(p) => Some(p),
        }
    }
}

/// Gives `span` its place in a trace: a child of `parent`, or a new root.
/// With the `opentelemetry` feature and an OpenTelemetry layer recording
/// the span, its ids are OpenTelemetry's; else they are made here.
/// Records `trace_id`, `span_id`, `parent_id` and `otel.name`
/// (`service/method`) on it and returns its ids.
pub(crate) fn start_span(
    span: &tracing::Span,
    parent: Parent,
    service: &str,
    method: &str,
) -> SpanIds {
    // Before `otel::link`: an OpenTelemetry span takes its name when built.
    span.record("otel.name", format_args!("{service}/{method}"));
    let linked = otel_ids(
        span,
        match parent {
            Parent::Remote(p) => Some(p),
            _ => None,
        },
    );
    let parent = parent.ids();
    let ids = linked.unwrap_or_else(|| match parent {
        Some(p) => p.child(),
        None => SpanIds::new_root(),
    });
    span.record("trace_id", format_args!("{:032x}", ids.trace_id));
    span.record("span_id", format_args!("{:016x}", ids.span_id));
    if let Some(p) = parent {
        span.record("parent_id", format_args!("{:016x}", p.span_id));
    }
    ids
}

/// The span's OpenTelemetry ids, linked to `remote_parent` (feature
/// `opentelemetry`, with an OpenTelemetry layer recording the span).
#[cfg(feature = "opentelemetry")]
fn otel_ids(span: &tracing::Span, remote_parent: Option<SpanIds>) -> Option<SpanIds> {
    otel::link(span, remote_parent)
}

/// Without the `opentelemetry` feature the ids are always made here.
#[cfg(not(feature = "opentelemetry"))]
fn otel_ids(_: &tracing::Span, _: Option<SpanIds>) -> Option<SpanIds> {
    None
}
