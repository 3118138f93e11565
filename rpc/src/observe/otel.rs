//! OpenTelemetry (feature `opentelemetry`): when the program's subscriber
//! has a `tracing-opentelemetry` layer, the call spans are OpenTelemetry
//! spans, and the `traceparent` a call sends carries their ids, so the
//! exported trace and the one on the wire agree.
//!
//! A caller's `traceparent` becomes the span's remote parent
//! (`set_parent`, before the span is first entered); a call made inside a
//! handler needs none: its span's parent is the handler's span, which is
//! entered while the handler runs.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::SpanIds;

/// Links `span` to `remote_parent` and returns the span's OpenTelemetry
/// ids, or `None` when no OpenTelemetry layer records it.
pub(crate) fn link(span: &tracing::Span, remote_parent: Option<SpanIds>) -> Option<SpanIds> {
    if let Some(p) = remote_parent {
        let parent = SpanContext::new(
            TraceId::from_bytes(p.trace_id.to_be_bytes()),
            SpanId::from_bytes(p.span_id.to_be_bytes()),
            TraceFlags::new(p.flags),
            true,
            TraceState::default(),
        );
        // Fails only when no OpenTelemetry layer records the span, which
        // the context below then also says.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    Some(SpanIds {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        flags: sc.trace_flags().to_u8(),
    })
}
