//! A consumer -> provider A -> provider B chain, over loopback TCP, under a
//! test subscriber that records every span: one trace id throughout, and
//! each span's parent is the span that caused it (client call -> server
//! call -> nested client call -> server call), both in the W3C ids the
//! spans carry and in what travelled as `traceparent`.

#[path = "common/chain.rs"]
mod chain;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rpc::CallOptions;
use rpc::observe::SpanIds;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};

/// One closed span: its name and the fields recorded on it.
#[derive(Clone, Debug, Default)]
struct Recorded {
    name: &'static str,
    fields: HashMap<String, String>,
}

impl Recorded {
    fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// Records the `rpc.client` and `rpc.server` spans as they close.
#[derive(Clone, Default)]
struct SpanRecorder {
    open: Arc<Mutex<HashMap<u64, Recorded>>>,
    closed: Arc<Mutex<Vec<Recorded>>>,
}

impl<S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>> Layer<S>
    for SpanRecorder
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: LayerContext<'_, S>) {
        let mut r = Recorded {
            name: attrs.metadata().name(),
            fields: HashMap::new(),
        };
        attrs.record(&mut Fields(&mut r.fields));
        self.open.lock().unwrap().insert(id.into_u64(), r);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: LayerContext<'_, S>) {
        if let Some(r) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut r.fields));
        }
    }

    fn on_close(&self, id: Id, _: LayerContext<'_, S>) {
        if let Some(r) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(r);
        }
    }
}

/// Runs the chain under a fresh recorder; returns the closed spans and
/// what B received.
async fn run(first: CallOptions) -> (Vec<Recorded>, String) {
    let recorder = SpanRecorder::default();
    let seen_by_b =
        chain::run_chain(tracing_subscriber::registry().with(recorder.clone()), first).await;
    let spans = recorder.closed.lock().unwrap().clone();
    (spans, seen_by_b)
}

fn only<'a>(spans: &'a [Recorded], name: &str, service: &str) -> &'a Recorded {
    let found: Vec<&Recorded> = spans
        .iter()
        .filter(|s| s.name == name && s.get("rpc.service") == service)
        .collect();
    assert_eq!(found.len(), 1, "one {name} span of {service}: {spans:#?}");
    found[0]
}

fn check_chain(spans: &[Recorded], seen_by_b: &str) -> (String, String) {
    let client = only(spans, "rpc.client", "Front:1.0");
    let server_a = only(spans, "rpc.server", "Front:1.0");
    let nested = only(spans, "rpc.client", "Back:1.0");
    let server_b = only(spans, "rpc.server", "Back:1.0");
    let trace = client.get("trace_id");
    assert_eq!(trace.len(), 32, "{client:?}");
    for s in [server_a, nested, server_b] {
        assert_eq!(s.get("trace_id"), trace, "one trace id: {s:?}");
    }
    assert_eq!(server_a.get("parent_id"), client.get("span_id"));
    assert_eq!(nested.get("parent_id"), server_a.get("span_id"));
    assert_eq!(server_b.get("parent_id"), nested.get("span_id"));
    // The ids are distinct spans.
    let ids: std::collections::HashSet<&str> = [client, server_a, nested, server_b]
        .iter()
        .map(|s| s.get("span_id"))
        .collect();
    assert_eq!(ids.len(), 4, "{spans:#?}");
    // What B received on the wire is the nested call's span.
    let wire = SpanIds::parse(seen_by_b).expect("B received a valid traceparent");
    assert_eq!(format!("{:032x}", wire.trace_id), trace);
    assert_eq!(format!("{:016x}", wire.span_id), nested.get("span_id"));
    // Attributes with the OpenTelemetry names, and the outcome.
    for s in [client, server_a, nested, server_b] {
        assert_eq!(s.get("rpc.system"), "ming_rpc");
        assert_eq!(s.get("rpc.response.status_code"), "OK", "{s:?}");
    }
    assert_eq!(client.get("rpc.method"), "relay");
    assert_eq!(nested.get("rpc.method"), "report");
    (trace.to_owned(), client.get("parent_id").to_owned())
}

#[tokio::test]
async fn a_chain_of_calls_is_one_trace_with_each_span_the_child_of_its_cause() {
    let (spans, seen_by_b) = run(CallOptions::new()).await;
    let (_, root_parent) = check_chain(&spans, &seen_by_b);
    assert_eq!(root_parent, "", "the first call starts the trace");
    // An attempt span per attempt, at DEBUG, with the instance's address.
    let attempt = spans
        .iter()
        .find(|s| s.name == "rpc.attempt")
        .expect("an attempt span");
    assert_eq!(attempt.get("server.address"), "127.0.0.1");
    assert_eq!(attempt.get("rpc.attempt"), "0");
}

#[tokio::test]
async fn a_call_that_arrives_with_a_traceparent_continues_that_trace() {
    let upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (spans, seen_by_b) = run(CallOptions::new().metadata("traceparent", upstream)).await;
    let (trace, parent) = check_chain(&spans, &seen_by_b);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(parent, "00f067aa0ba902b7");
}
