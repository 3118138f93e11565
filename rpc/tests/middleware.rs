//! The open call path end to end over loopback TCP: server and client
//! layers, metadata, the incoming call's context, deadline and metadata
//! propagation through a nested call, per-call options sharing one stack,
//! a user balancer, and per-method attributes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rpc::client::balance::{LoadBalancer, Pick};
use rpc::client::{Call, ClientContext, Layer};
use rpc::registry::{AnyRegistry, MemoryRegistry};
use rpc::server::{CallError, ServerLayer};
use rpc::transport::RawReply;
use rpc::{
    CallOptions, ClientConfig, Consumer, Context, Provider, RpcConfig, RpcError, StatusCode,
};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(10);

/// A service that reports what it saw of its call.
#[rpc::service(version = "1.0")]
pub trait Seen {
    /// The metadata of this call: `(key, bytes)` in order.
    async fn metadata(&self) -> Vec<(String, Vec<u8>)>;
    /// What is left of this call's deadline, in µs (0 without one).
    async fn left_us(&self) -> u64;
    /// Which instance answered.
    async fn who(&self) -> u32;
    /// Never answers.
    async fn hang(&self) -> u32;
    /// Calls `left_us` on the `Inner` service (nested call), returning
    /// `(own left before the call, inner's left, inner's metadata)`.
    async fn nested(&self) -> (u64, u64, Vec<(String, Vec<u8>)>);
}

/// The second hop of the nested call.
#[rpc::service(name = "Inner", version = "1.0")]
pub trait InnerSvc {
    /// What is left of this call's deadline (µs) and its metadata.
    async fn report(&self) -> (u64, Vec<(String, Vec<u8>)>);
}

fn seen_metadata() -> Vec<(String, Vec<u8>)> {
    Context::with_current(|cx| {
        cx.metadata()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
            .collect()
    })
    .unwrap_or_default()
}

fn left_us() -> u64 {
    Context::with_current(|cx| cx.remaining())
        .flatten()
        .map_or(0, |d| d.as_micros() as u64)
}

struct SeenImpl {
    id: u32,
    inner: Option<InnerSvcClient>,
}

impl Seen for SeenImpl {
    async fn metadata(&self) -> Vec<(String, Vec<u8>)> {
        seen_metadata()
    }
    async fn left_us(&self) -> u64 {
        left_us()
    }
    async fn who(&self) -> u32 {
        self.id
    }
    async fn hang(&self) -> u32 {
        std::future::pending::<()>().await;
        self.id
    }
    async fn nested(&self) -> (u64, u64, Vec<(String, Vec<u8>)>) {
        let Some(inner) = &self.inner else {
            return (0, 0, Vec::new());
        };
        let own = left_us();
        let (theirs, md) = inner.report().await.expect("nested call");
        (own, theirs, md)
    }
}

struct InnerImpl;

impl InnerSvc for InnerImpl {
    async fn report(&self) -> (u64, Vec<(String, Vec<u8>)>) {
        (left_us(), seen_metadata())
    }
}

/// Refuses calls without `authorization: Bearer s3cret`; counts what it sees.
#[derive(Default)]
struct Auth {
    seen: AtomicU32,
}

impl ServerLayer for Auth {
    fn on_call(&self, cx: &Context) -> Result<(), CallError> {
        self.seen.fetch_add(1, Ordering::Relaxed);
        match cx.metadata().get_str("authorization") {
            None => Err(CallError::new(
                StatusCode::Unauthenticated,
                "no authorization token",
            )),
            Some("Bearer s3cret") => Ok(()),
            Some(_) => Err(CallError::new(
                StatusCode::PermissionDenied,
                "this token may not call",
            )),
        }
    }
}

/// Counts calls and remembers their peers; wraps the handler to count
/// finished ones too.
#[derive(Default)]
struct Recorder {
    calls: AtomicU32,
    finished: Arc<AtomicU32>,
    peers: Mutex<Vec<SocketAddr>>,
}

impl ServerLayer for Recorder {
    fn on_call(&self, cx: &Context) -> Result<(), CallError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.peers.lock().unwrap().push(cx.peer());
        Ok(())
    }
    fn around(
        &self,
        _cx: &Context,
        next: rpc::server::HandlerFuture,
    ) -> rpc::server::HandlerFuture {
        let finished = self.finished.clone();
        Box::pin(async move {
            let reply = next.await;
            finished.fetch_add(1, Ordering::Relaxed);
            reply
        })
    }
}

/// Adds the token to every call.
#[derive(Clone)]
struct AddToken(&'static str);

struct WithToken<S>(S, &'static str);

impl<S: Call> Layer<S> for AddToken {
    type Service = WithToken<S>;
    fn layer(&self, inner: S) -> WithToken<S> {
        WithToken(inner, self.0)
    }
}

impl<S: Call> Call for WithToken<S> {
    async fn call(&self, cx: &mut ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError> {
        cx.metadata_mut().insert("authorization", self.1);
        self.0.call(cx, args).await
    }
}

/// Counts what passes (calls or attempts, by where it is added).
#[derive(Clone, Default)]
struct Count(Arc<AtomicU64>);

struct Counted<S>(S, Arc<AtomicU64>);

impl<S: Call> Layer<S> for Count {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner, self.0.clone())
    }
}

impl<S: Call> Call for Counted<S> {
    async fn call(&self, cx: &mut ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.call(cx, args).await
    }
}

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), rpc::Error>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(WAIT, self.done).await;
    }
}

async fn start(builder: rpc::ProviderBuilder, registry: &MemoryRegistry) -> Running {
    let p = builder
        .registry(AnyRegistry::from(registry.clone()))
        .bind()
        .await
        .unwrap();
    let addr = p.local_addr();
    let (stop, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(p.run(async {
        let _ = rx.await;
    }));
    Running { addr, stop, done }
}

fn cfg() -> RpcConfig {
    let mut c = RpcConfig::default();
    c.server.host = "127.0.0.1".into();
    c.server.port = 0;
    c.server.shutdown_grace_ms = 0;
    c.client.timeout_ms = 5_000;
    c
}

async fn consumer(
    registry: &MemoryRegistry,
    config: ClientConfig,
    key: &str,
    n: usize,
) -> Consumer {
    let consumer = Consumer::with_registry(AnyRegistry::from(registry.clone()), config, WAIT);
    let handle = consumer.cache().service(key).await.unwrap();
    tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == n))
        .await
        .unwrap();
    consumer
}

/// Providers 1 and 2 of `Seen`, both behind one `Recorder` layer.
async fn two_recorded_providers(registry: &MemoryRegistry) -> (Arc<Recorder>, Running, Running) {
    let rec = Arc::new(Recorder::default());
    let mut started = Vec::new();
    for id in [1, 2] {
        let builder = Provider::builder(&cfg())
            .service(seen(id))
            .layer(rec.clone());
        started.push(start(builder, registry).await);
    }
    let p2 = started.pop().expect("two providers");
    let p1 = started.pop().expect("two providers");
    (rec, p1, p2)
}

fn seen(id: u32) -> SeenServer<SeenImpl> {
    SeenServer::new(SeenImpl { id, inner: None })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_layer_refuses_calls_without_a_valid_token_and_a_client_layer_adds_it() {
    let registry = MemoryRegistry::new();
    let auth = Arc::new(Auth::default());
    let p = start(
        Provider::builder(&cfg())
            .service(seen(1))
            .layer(auth.clone()),
        &registry,
    )
    .await;
    let plain = consumer(&registry, cfg().client, "Seen:1.0", 1).await;

    let client = SeenClient::new(&plain);
    let err = client.who().await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    assert_eq!(err.code(), Some(StatusCode::Unauthenticated));
    assert!(err.to_string().contains("no authorization token"), "{err}");
    assert_eq!(auth.seen.load(Ordering::Relaxed), 1, "refused, not retried");

    let wrong = client
        .with(CallOptions::new().metadata("authorization", "Bearer nope"))
        .who()
        .await
        .unwrap_err();
    assert!(wrong.is_permission_denied(), "{wrong}");
    assert_eq!(auth.seen.load(Ordering::Relaxed), 2);

    let with_token = SeenClient::new(&plain.clone().layer(AddToken("Bearer s3cret")));
    assert_eq!(with_token.who().await.unwrap(), 1);

    // A refused caller cannot tell which services exist.
    let ghost = plain.service("Ghost", "1.0");
    let _ = plain.cache().service("Ghost:1.0").await;
    let direct = rpc::transport::Endpoint::new(p.addr.to_string(), Default::default());
    let opts = rpc::transport::CallOptions {
        service: "Ghost:1.0",
        method: "who",
        serializer: rpc::SerializerKind::Bincode,
        timeout: WAIT,
        metadata: rpc::Metadata::empty(),
        compression: rpc::Compression::None,
        compression_threshold: 0,
    };
    let err = direct.call::<_, u32>(&opts, &()).await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    drop(ghost);

    // fail_safe does not paper over a refusal.
    let mut safe_cfg = cfg().client;
    safe_cfg.fault_tolerance = rpc::FaultTolerance::FailSafe;
    safe_cfg.fail_safe.insert("who".into(), "7".into());
    let safe = SeenClient::new(&consumer(&registry, safe_cfg, "Seen:1.0", 1).await);
    let err = safe.who().await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    p.stop().await;
}

/// Panics on calls of `who`; refuses `left_us` with status `Ok` (a bug a
/// layer could have).
struct Faulty;

impl ServerLayer for Faulty {
    fn on_call(&self, cx: &Context) -> Result<(), CallError> {
        match cx.method() {
            "who" => panic!("a layer bug"),
            "left_us" => Err(CallError::new(StatusCode::Ok, "oops")),
            _ => Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_layer_fails_its_call_only_and_hostile_metadata_is_refused() {
    let registry = MemoryRegistry::new();
    let p = start(
        Provider::builder(&cfg()).service(seen(1)).layer(Faulty),
        &registry,
    )
    .await;
    let c = consumer(&registry, cfg().client, "Seen:1.0", 1).await;
    let client = SeenClient::new(&c);
    // A call in flight on the same connection while the layer panics.
    let hanging = {
        let client = client.with(CallOptions::new().timeout(Duration::from_millis(1500)));
        tokio::spawn(async move { client.hang().await })
    };
    let err = client.who().await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Handler), "{err}");
    // A refusal with status Ok is not mistaken for a reply.
    let err = client.left_us().await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Handler), "{err}");
    // The connection survived: the hanging call ends by its own deadline,
    // not by a closed connection.
    let hung = tokio::time::timeout(WAIT, hanging)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(hung.is_timeout(), "{hung}");
    // Metadata past the bound: bad request, not seconds of work.
    let mut many = rpc::Metadata::new();
    for i in 0..=rpc::context::MAX_ENTRIES {
        many.insert(format!("k{i}"), "v");
    }
    let err = client
        .with(CallOptions::new().with_metadata(many))
        .metadata()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::BadRequest), "{err}");
    assert!(err.to_string().contains("metadata entries"), "{err}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_policy_changes_the_timeout_even_over_a_service_override() {
    let registry = MemoryRegistry::new();
    let p = start(Provider::builder(&cfg()).service(seen(1)), &registry).await;
    let mut client_cfg = cfg().client;
    client_cfg.services.insert(
        "Seen:1.0".into(),
        rpc::ServiceOverrides {
            timeout_ms: Some(3_000),
            ..Default::default()
        },
    );
    let c = consumer(&registry, client_cfg, "Seen:1.0", 1).await;
    let raw = c.service("Seen", "1.0");
    let left: u64 = raw.call("left_us", &()).await.unwrap();
    assert!(left > 2_000_000, "service override: {left} µs");
    let shorter = raw
        .with_policy(rpc::CallPolicy {
            timeout: Duration::from_millis(400),
            ..raw.policy().clone()
        })
        .unwrap();
    let left: u64 = shorter.call("left_us", &()).await.unwrap();
    assert!(left <= 400_000, "with_policy's timeout: {left} µs");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_round_trips_text_bytes_and_nothing() {
    let registry = MemoryRegistry::new();
    let p = start(Provider::builder(&cfg()).service(seen(1)), &registry).await;
    let c = consumer(&registry, cfg().client, "Seen:1.0", 1).await;
    let client = SeenClient::new(&c);

    assert_eq!(client.metadata().await.unwrap(), Vec::new(), "empty map");

    let got = client
        .with(
            CallOptions::new()
                .metadata("Name", "值-ü")
                .metadata_bin("blob", vec![0u8, 0xff, 0x7f]),
        )
        .metadata()
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            ("name".to_owned(), "值-ü".as_bytes().to_vec()),
            ("blob-bin".to_owned(), vec![0u8, 0xff, 0x7f]),
        ]
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_call_inherits_the_smaller_deadline_and_the_trace_metadata() {
    let registry = MemoryRegistry::new();
    // B: the inner service.
    let b = start(
        Provider::builder(&cfg()).service(InnerSvcServer::new(InnerImpl)),
        &registry,
    )
    .await;
    // A: calls B with a long timeout of its own (60 s).
    let mut a_client_cfg = cfg().client;
    a_client_cfg.timeout_ms = 60_000;
    let a_consumer = consumer(&registry, a_client_cfg, "Inner:1.0", 1).await;
    let a = start(
        Provider::builder(&cfg()).service(SeenServer::new(SeenImpl {
            id: 1,
            inner: Some(InnerSvcClient::new(&a_consumer)),
        })),
        &registry,
    )
    .await;
    // The consumer gives the whole chain 2 s.
    let c = consumer(&registry, cfg().client, "Seen:1.0", 1).await;
    let client = SeenClient::new(&c).with(
        CallOptions::new()
            .timeout(Duration::from_secs(2))
            .metadata(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .metadata("x-other", "not passed on"),
    );
    let (a_left, b_left, b_md) = client.nested().await.unwrap();
    assert!(
        a_left > 0 && a_left <= 2_000_000,
        "A's own deadline: {a_left} µs"
    );
    assert!(b_left > 0, "B got a deadline");
    assert!(
        b_left <= a_left,
        "B's deadline ({b_left} µs) is later than what A had left ({a_left} µs)"
    );
    let keys: Vec<&str> = b_md.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["traceparent"], "{b_md:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_options_share_the_connection_balancer_and_retry_budget() {
    let registry = MemoryRegistry::new();
    let (rec, p1, p2) = two_recorded_providers(&registry).await;
    let c = consumer(&registry, cfg().client, "Seen:1.0", 2).await;
    let client = SeenClient::new(&c);
    // 1 s: short of the configured 5 s, and long enough for the first call
    // to dial and reach its provider on a loaded machine (the provider's
    // count of calls below includes it).
    let short = client.with(CallOptions::new().timeout(Duration::from_millis(1000)));
    assert!(
        short
            .service_client()
            .shares_stack_with(client.service_client()),
        "`with` shares the stack"
    );

    // The timeout applies to that call only: the client gives up at
    // 1 s, or the provider, which got the same deadline, answers
    // "deadline exceeded" a moment before (a race of two timers). Either
    // way long before the configured 5 s.
    let started = std::time::Instant::now();
    let err = short.hang().await.unwrap_err();
    match &err {
        RpcError::Timeout { timeout, .. } => assert_eq!(*timeout, Duration::from_millis(1000)),
        e if e.code() == Some(StatusCode::Timeout) => {}
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // One round robin across both proxies: calls alternate however they
    // are made.
    let mut order = Vec::new();
    for i in 0..8 {
        let who = if i % 2 == 0 {
            client.who()
        } else {
            short.who()
        };
        order.push(who.await.unwrap());
    }
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "one balancer: {order:?}"
    );
    // One retry budget: it counted every call of both.
    let budget = client.service_client().retry_budget().unwrap();
    assert!(
        budget.calls_in_window() >= 9,
        "{}",
        budget.calls_in_window()
    );
    // One connection per provider: each provider saw one peer address.
    let peers = rec.peers.lock().unwrap().clone();
    let mut distinct = peers.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        2,
        "two providers, one connection each: {peers:?}"
    );
    assert_eq!(rec.calls.load(Ordering::Relaxed), 9);
    assert_eq!(
        rec.finished.load(Ordering::Relaxed),
        8,
        "the hung call never finished"
    );
    let _ = (p1.addr, p2.addr);
    p1.stop().await;
    p2.stop().await;
}

/// Always the last instance in node-key order.
#[derive(Debug)]
struct AlwaysLast;

impl LoadBalancer for AlwaysLast {
    fn name(&self) -> &str {
        "always_last"
    }
    fn pick(&self, pick: &Pick<'_>) -> usize {
        pick.len() - 1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_balancer_and_user_layers_count_calls_and_attempts() {
    let registry = MemoryRegistry::new();
    let (rec, p1, p2) = two_recorded_providers(&registry).await;
    let (calls, attempts) = (Count::default(), Count::default());
    let c = consumer(&registry, cfg().client, "Seen:1.0", 2)
        .await
        .balancer(AlwaysLast)
        .layer(calls.clone())
        .attempt_layer(attempts.clone());
    let client = SeenClient::new(&c);
    let instances = client.service_client().instances().await.unwrap();
    let last_port = instances.last().unwrap().service_port;
    let last_id = if p1.addr.port() == last_port { 1 } else { 2 };
    for _ in 0..10 {
        assert_eq!(client.who().await.unwrap(), last_id);
    }
    assert_eq!(calls.0.load(Ordering::Relaxed), 10);
    assert_eq!(attempts.0.load(Ordering::Relaxed), 10);
    assert_eq!(rec.calls.load(Ordering::Relaxed), 10);

    p1.stop().await;
    p2.stop().await;
}
