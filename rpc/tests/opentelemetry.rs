//! OpenTelemetry export (feature `opentelemetry`): the consumer -> A -> B
//! chain under a `tracing-opentelemetry` layer with the SDK's in-memory
//! exporter. The exported spans form one trace with the right parent
//! links and kinds, and the `traceparent` B received names the exported
//! span of the call that reached it.
#![cfg(feature = "opentelemetry")]

#[path = "common/chain.rs"]
mod chain;

use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use rpc::CallOptions;
use rpc::observe::SpanIds;
use tracing_subscriber::layer::SubscriberExt;

async fn run(first: CallOptions) -> (Vec<SpanData>, SpanIds) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("rpc-test")));
    let seen_by_b = chain::run_chain(subscriber, first).await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let wire = SpanIds::parse(&seen_by_b).expect("B received a valid traceparent");
    (spans, wire)
}

fn check(spans: &[SpanData], wire: SpanIds) -> &SpanData {
    // Both sides of a call share the name `service/method`: tell them
    // apart by kind.
    let by_kind = |name: &str, kind: SpanKind| -> &SpanData {
        let found: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.name == name && s.span_kind == kind)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {kind:?} span {name}: {:?}",
            spans
                .iter()
                .map(|s| (&s.name, s.span_kind.clone()))
                .collect::<Vec<_>>()
        );
        found[0]
    };
    let client = by_kind("Front:1.0/relay", SpanKind::Client);
    let server_a = by_kind("Front:1.0/relay", SpanKind::Server);
    let nested = by_kind("Back:1.0/report", SpanKind::Client);
    let server_b = by_kind("Back:1.0/report", SpanKind::Server);
    let trace = client.span_context.trace_id();
    for s in [server_a, nested, server_b] {
        assert_eq!(s.span_context.trace_id(), trace, "one trace: {}", s.name);
    }
    assert_eq!(server_a.parent_span_id, client.span_context.span_id());
    assert_eq!(nested.parent_span_id, server_a.span_context.span_id());
    assert_eq!(server_b.parent_span_id, nested.span_context.span_id());
    assert_eq!(
        u64::from_be_bytes(nested.span_context.span_id().to_bytes()),
        wire.span_id,
        "what B received is the exported nested span"
    );
    assert_eq!(u128::from_be_bytes(trace.to_bytes()), wire.trace_id);
    let attr = |s: &SpanData, key: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    };
    assert_eq!(attr(client, "rpc.system").as_deref(), Some("ming_rpc"));
    assert_eq!(attr(server_b, "rpc.method").as_deref(), Some("report"));
    assert_eq!(
        attr(client, "rpc.response.status_code").as_deref(),
        Some("OK")
    );
    client
}

#[tokio::test]
async fn the_exported_spans_are_one_trace_linked_cause_to_effect() {
    let (spans, wire) = run(CallOptions::new()).await;
    let client = check(&spans, wire);
    assert!(
        !client.parent_span_id.to_bytes().iter().any(|b| *b != 0),
        "the first call is the root"
    );
}

#[tokio::test]
async fn an_incoming_traceparent_is_the_exported_root_s_remote_parent() {
    let upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (spans, wire) = run(CallOptions::new().metadata("traceparent", upstream)).await;
    let client = check(&spans, wire);
    assert_eq!(
        format!(
            "{:032x}",
            u128::from_be_bytes(client.span_context.trace_id().to_bytes())
        ),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        format!(
            "{:016x}",
            u64::from_be_bytes(client.parent_span_id.to_bytes())
        ),
        "00f067aa0ba902b7"
    );
}
