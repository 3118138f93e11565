//! Metrics end to end: a provider and a consumer with `[metrics]` on, the
//! Prometheus recorder installed, and the endpoint scraped over HTTP; and
//! the endpoint against hostile HTTP input. (A real Prometheus scraping the
//! examples is `scripts/prometheus-check.sh`, a step of the test command.)
#![cfg(feature = "prometheus")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rpc::observe::MetricsEndpoint;
use rpc::registry::{AnyRegistry, MemoryRegistry};
use rpc::{CallOptions, ClientConfig, Consumer, MetricsConfig, Provider, RpcConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

const WAIT: Duration = Duration::from_secs(10);

#[rpc::service(version = "1.0")]
pub trait Probe {
    async fn ok(&self) -> u32;
    /// Answers after 10 s: past any deadline these tests give it.
    async fn slow(&self) -> u32;
}

struct ProbeImpl;

/// `slow` calls the provider has started, and a wake-up for each.
static SLOW_STARTED: AtomicUsize = AtomicUsize::new(0);
static SLOW_NOTIFY: Notify = Notify::const_new();

impl Probe for ProbeImpl {
    async fn ok(&self) -> u32 {
        1
    }
    async fn slow(&self) -> u32 {
        SLOW_STARTED.fetch_add(1, Ordering::SeqCst);
        SLOW_NOTIFY.notify_waiters();
        tokio::time::sleep(Duration::from_secs(10)).await;
        2
    }
}

/// Waits until the provider has started `n` `slow` calls.
async fn slow_started(n: usize) {
    loop {
        let mut woken = pin!(SLOW_NOTIFY.notified());
        woken.as_mut().enable();
        if SLOW_STARTED.load(Ordering::SeqCst) >= n {
            return;
        }
        woken.await;
    }
}

/// Sends `request` bytes, reads until the server closes (bounded).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may close before reading all of a hostile request.
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the endpoint answers and closes in time");
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(addr: SocketAddr, path: &str) -> String {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// The samples of a text-format exposition, keyed by `name{labels}` as
/// written; panics on a line that is not a comment, blank or a sample.
fn samples(body: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in body.lines() {
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.rsplit(' ').next().unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "labels in {line}");
            for pair in series[name_end + 1..series.len() - 1].split("\",") {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("label in {line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(!v.contains('\n'), "{line}");
            }
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
        };
        out.insert(series.to_owned(), v);
    }
    out
}

fn value(s: &HashMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no sample {series}; have: {:#?}", s.keys()))
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// The whole path, with the process's one global recorder: a provider and
/// a consumer record, and the endpoint serves exactly what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_show_up_in_the_scraped_metrics() {
    let metrics = MetricsConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        enabled: true,
    };
    let endpoint = MetricsEndpoint::start(&metrics).await.unwrap().unwrap();
    let addr = endpoint.local_addr();
    // A second recorder cannot be installed: a clear error, not a panic.
    let second = MetricsEndpoint::start(&metrics).await.unwrap_err();
    assert!(second.to_string().contains("already installed"), "{second}");

    let registry = MemoryRegistry::new();
    let mut cfg = RpcConfig::default();
    cfg.server.host = "127.0.0.1".into();
    cfg.server.shutdown_grace_ms = 0;
    cfg.metrics = metrics.clone();
    let provider = Provider::builder(&cfg)
        .service(ProbeServer::new(ProbeImpl))
        .registry(AnyRegistry::from(registry.clone()))
        .metrics_endpoint(addr)
        .bind()
        .await
        .unwrap();
    // Consoles find the endpoint in the registry.
    assert_eq!(
        provider.instances()[0]
            .metadata
            .get("metrics")
            .map(String::as_str),
        Some(format!("http://{addr}/metrics").as_str())
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(provider.run(async {
        let _ = stopped.await;
    }));
    let consumer = Consumer::with_registry(
        AnyRegistry::from(registry.clone()),
        ClientConfig::default(),
        WAIT,
    )
    .metrics(true);
    let client = ProbeClient::new(&consumer);
    for _ in 0..10 {
        assert_eq!(client.ok().await.unwrap(), 1);
    }
    let err = client
        .with(CallOptions::new().timeout(Duration::from_millis(500)))
        .slow()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");

    // A call whose future the caller drops once the provider runs it:
    // cancelled on both sides (the client tells the provider, which drops
    // the handler). Dropped any earlier, the request may never leave.
    tokio::select! {
        r = client.slow() => panic!("slow answered: {r:?}"),
        r = tokio::time::timeout(WAIT, slow_started(2)) => {
            r.expect("the provider started the second slow call");
        }
    }

    let ok = r#"rpc_service="Probe:1.0",rpc_method="ok""#;
    let slow = r#"rpc_service="Probe:1.0",rpc_method="slow""#;
    // The server counts the slow call when its deadline drops it: wait
    // for that (bounded), then check everything at once.
    let deadline = tokio::time::Instant::now() + WAIT;
    let s = loop {
        let s = samples(body(&get(addr, "/metrics").await));
        let keys = ["DEADLINE_EXCEEDED", "CANCELLED"].map(|status| {
            format!("rpc_server_calls_total{{{slow},rpc_response_status_code=\"{status}\"}}")
        });
        if keys.iter().all(|k| s.contains_key(k)) {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never counted the dropped call"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for side in ["client", "server"] {
        assert_eq!(
            value(
                &s,
                &format!("rpc_{side}_calls_total{{{ok},rpc_response_status_code=\"OK\"}}")
            ),
            10.0,
            "{side}"
        );
        assert_eq!(
            value(
                &s,
                &format!(
                    "rpc_{side}_calls_total{{{slow},rpc_response_status_code=\"DEADLINE_EXCEEDED\"}}"
                )
            ),
            1.0,
            "{side}"
        );
        assert_eq!(
            value(
                &s,
                &format!("rpc_{side}_calls_total{{{slow},rpc_response_status_code=\"CANCELLED\"}}")
            ),
            1.0,
            "{side}"
        );
        assert_eq!(
            value(&s, &format!("rpc_{side}_calls_in_flight{{{slow}}}")),
            0.0
        );
        assert_eq!(
            value(
                &s,
                &format!("rpc_{side}_call_duration_seconds_count{{{ok}}}")
            ),
            10.0
        );
        assert!(value(&s, &format!("rpc_{side}_call_duration_seconds_sum{{{ok}}}")) > 0.0);
        assert_eq!(
            value(
                &s,
                &format!("rpc_{side}_call_duration_seconds_bucket{{{ok},le=\"+Inf\"}}")
            ),
            10.0
        );
        assert_eq!(
            value(&s, &format!("rpc_{side}_calls_in_flight{{{ok}}}")),
            0.0
        );
        assert_eq!(value(&s, &format!("rpc_{side}_connections")), 1.0);
    }
    assert_eq!(
        value(&s, r#"rpc_client_instances{rpc_service="Probe:1.0"}"#),
        1.0
    );
    assert_eq!(
        value(
            &s,
            r#"rpc_registry_watch_connected{rpc_service="Probe:1.0"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            r#"rpc_provider_registration_state{rpc_registry="memory",state="registered"}"#
        ),
        1.0
    );

    // Bytes are reported on the connections' periodic tick (at most 500 ms).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = samples(body(&get(addr, "/metrics").await));
        let all = [
            "rpc_client_sent_bytes_total",
            "rpc_client_received_bytes_total",
            "rpc_server_sent_bytes_total",
            "rpc_server_received_bytes_total",
        ];
        if all.iter().all(|k| s.get(*k).is_some_and(|v| *v > 0.0)) {
            // What one side sent, the other received (heartbeats included,
            // both counted the same frames): equal once both ticked.
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bytes never reported: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, running).await;
    let s = samples(body(&get(addr, "/metrics").await));
    assert_eq!(
        value(
            &s,
            r#"rpc_provider_registration_state{rpc_registry="memory",state="registered"}"#
        ),
        0.0,
        "a stopped provider has no registration left"
    );
    endpoint.shutdown().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the endpoint stopped listening"
    );
}

/// An endpoint with a recorder of its own (not the global one).
async fn private_endpoint() -> MetricsEndpoint {
    let recorder = rpc::observe::PrometheusRecorder::new();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        metrics::counter!("probe_total").increment(3);
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    MetricsEndpoint::serve(listener, handle)
}

#[tokio::test]
async fn the_endpoint_answers_only_get_metrics_with_the_text_format() {
    let ep = private_endpoint().await;
    let addr = ep.local_addr();
    let r = get(addr, "/metrics").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{r}"
    );
    assert_eq!(value(&samples(body(&r)), "probe_total"), 3.0);

    for path in [
        "/",
        "/metric",
        "/metrics/",
        "/metrics/../x",
        "/%00",
        "//metrics",
    ] {
        let r = get(addr, path).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
        assert!(r.contains("the metrics are at /metrics"), "{r}");
    }
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let r = exchange(
            addr,
            format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{method}: {r}");
        assert!(r.to_ascii_lowercase().contains("allow: get, head"), "{r}");
    }
    let r = exchange(
        addr,
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200") && body(&r).is_empty(), "{r}");
    ep.shutdown().await;
}

#[tokio::test]
async fn hostile_requests_close_their_connection_and_harm_nothing() {
    let ep = private_endpoint().await;
    let addr = ep.local_addr();
    // Garbage instead of HTTP.
    let r = exchange(addr, b"\x00\x01\x02 hello\r\n\r\n").await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r:?}");
    // A request line of 1 MiB.
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(1 << 20));
    let r = exchange(addr, long.as_bytes()).await;
    assert!(
        r.is_empty()
            || r.starts_with("HTTP/1.1 414")
            || r.starts_with("HTTP/1.1 431")
            || r.starts_with("HTTP/1.1 400"),
        "{}",
        &r[..r.len().min(200)]
    );
    // Headers of 1 MiB.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..20_000 {
        big.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(40)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let r = exchange(addr, &big).await;
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"),
        "{}",
        &r[..r.len().min(200)]
    );
    // A GET with a large body: answered, the body ignored.
    let mut with_body =
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1048576\r\n\r\n"
            .to_vec();
    with_body.extend(std::iter::repeat_n(b'z', 1 << 20));
    let r = exchange(addr, &with_body).await;
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 200"),
        "{}",
        &r[..r.len().min(200)]
    );

    // More connections than it serves at once: the extra ones are closed
    // at once; the others stay usable.
    let n = rpc::observe::prometheus::MAX_CONNECTIONS;
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // Let the endpoint accept them all before the extra one arrives.
    let probe = get(addr, "/metrics").await;
    assert!(probe.is_empty(), "connection {} was served: {probe}", n + 1);
    let first = held.first_mut().unwrap();
    first
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, first.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"));
    drop(held);
    // After all that, it still serves (retry while the closed connections'
    // slots are given back).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = get(addr, "/metrics").await;
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served again: {r}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ep.shutdown().await;
}
