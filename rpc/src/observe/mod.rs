//! Observability: tracing spans with W3C trace context, and metrics.
//!
//! * Spans. Consumers open an `rpc.client` span per call (INFO) and an
//!   `rpc.attempt` span per attempt (DEBUG), target `rpc::client`
//!   ([`crate::client::Observe`], [`crate::client::ObserveAttempt`]);
//!   providers open an `rpc.server` span per handled call (INFO, target
//!   `rpc::server`, [`ServerObserve`]). Their fields use the OpenTelemetry
//!   RPC semantic-convention names (`rpc.system`, `rpc.service`,
//!   `rpc.method`, `rpc.response.status_code`, `server.address`,
//!   `server.port`, `client.address`, `error`) and carry the W3C ids
//!   (`trace_id`, `span_id`, `parent_id`). The `traceparent` travels in the
//!   call's metadata ([`trace_context`]), so a provider that calls another
//!   service while handling a call continues the caller's trace. Spans
//!   exist only when a subscriber wants them (`RUST_LOG=rpc=info`, or an
//!   OpenTelemetry layer; see the `opentelemetry` feature).
//! * Metrics, through the `metrics` facade, when `[metrics]` turns them on
//!   ([`rpc_core::MetricsConfig::records`]): the names, labels and units
//!   are listed in [`rpc_core::metric_names`]. The per-call ones are
//!   recorded by the same layers, through per-method handles
//!   (`handles`, private); the rest where the event happens (retries,
//!   outliers, the discovery cache, connections, registrations).
//! * [`MetricsEndpoint`] (feature `prometheus`): installs a Prometheus
//!   recorder and serves `GET /metrics` on `[metrics] listen`.

pub(crate) mod handles;
#[cfg(feature = "prometheus")]
pub mod prometheus;
mod server;
pub mod trace_context;

#[cfg(feature = "prometheus")]
pub use prometheus::MetricsEndpoint;
pub use server::ServerObserve;
pub use trace_context::SpanIds;

/// The `rpc.system` attribute of every span: this framework's protocol.
pub const SYSTEM: &str = "ming_rpc";

/// Gives `span` its place in a trace: a child of `parent`, or a new root.
/// Records `trace_id`, `span_id`, `parent_id` and `otel.name`
/// (`service/method`) on it and returns its ids.
pub(crate) fn start_span(
    span: &tracing::Span,
    parent: Option<SpanIds>,
    service: &str,
    method: &str,
) -> SpanIds {
    let ids = match parent {
        Some(p) => p.child(),
        None => SpanIds::new_root(),
    };
    span.record("otel.name", format_args!("{service}/{method}"));
    span.record("trace_id", format_args!("{:032x}", ids.trace_id));
    span.record("span_id", format_args!("{:016x}", ids.span_id));
    if let Some(p) = parent {
        span.record("parent_id", format_args!("{:016x}", p.span_id));
    }
    ids
}
