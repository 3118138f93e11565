//! Client policies end to end: fail-over, fail-fast, fail-safe,
//! idempotent retries, outlier ejection, the retry budget, p2c and
//! consistent hashing, through the real consumer stack, connections and
//! servers, joined by in-memory pipes (`rpc::transport::MemoryNetwork`)
//! instead of sockets, so every test runs on tokio's paused clock: the
//! timeouts, backoffs and latencies they depend on are virtual time, and
//! the outcome does not depend on the machine's load. (`end_to_end.rs` and
//! the chaos tests cover the same stack over real TCP.)
//!
//! Providers here are bare servers registered in a memory registry by
//! hand, so a test can kill a server while its registration stays: the
//! consumer then really calls a dead instance, as after a crash that the
//! registry has not noticed yet.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rpc::registry::{AnyRegistry, MemoryRegistry};
use rpc::transport::{Connector, MemoryNetwork, Server};
use rpc::{
    ClientConfig, Consumer, FaultTolerance, LoadBalancerKind, RpcError, ServerConfig,
    ServiceMetaInfo,
};
use rpc_core::{Registration, Registry};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(10);

/// Where instances run and register: a memory registry, and the
/// in-memory network their servers listen on.
#[derive(Clone, Default)]
struct Fleet {
    registry: MemoryRegistry,
    net: MemoryNetwork,
}

/// A service whose instances can be told apart and slowed down.
#[rpc::service(version = "1.0")]
pub trait Probe {
    /// Which instance answered.
    async fn who(&self) -> u32;
    /// Which instance answered, after `ms` milliseconds.
    async fn slow_who(&self, ms: u64) -> u32;
    /// Never answers (until the server dies).
    async fn hang(&self) -> u32;
    /// A key-dependent call, for consistent hashing.
    async fn lookup(&self, key: String) -> u32;
}

struct ProbeImpl {
    id: u32,
    served: Arc<AtomicU32>,
    hanging: Arc<tokio::sync::Notify>,
    delay: Duration,
}

impl Probe for ProbeImpl {
    async fn who(&self) -> u32 {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        self.id
    }
    async fn slow_who(&self, ms: u64) -> u32 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.served.fetch_add(1, Ordering::Relaxed);
        self.id
    }
    async fn hang(&self) -> u32 {
        self.hanging.notify_one();
        std::future::pending::<()>().await;
        self.id
    }
    async fn lookup(&self, _key: String) -> u32 {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.id
    }
}

/// A provider whose server can be killed while its registration stays.
struct Instance {
    id: u32,
    served: Arc<AtomicU32>,
    hanging: Arc<tokio::sync::Notify>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _registration: Registration,
}

impl Instance {
    async fn start(registry: &Fleet, id: u32) -> Self {
        Self::start_with_delay(registry, id, Duration::ZERO).await
    }

    async fn start_with_delay(registry: &Fleet, id: u32, delay: Duration) -> Self {
        let served = Arc::new(AtomicU32::new(0));
        let hanging = Arc::new(tokio::sync::Notify::new());
        let server = Server::builder(ServerConfig {
            shutdown_timeout_ms: 100,
            ..ServerConfig::default()
        })
        .service(ProbeServer::new(ProbeImpl {
            id,
            served: served.clone(),
            hanging: hanging.clone(),
            delay,
        }))
        .bind_memory(&registry.net)
        .unwrap();
        let port = server.local_addr().port();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server
                .run(async {
                    let _ = rx.await;
                })
                .await;
        });
        let registration = registry
            .registry
            .register(ServiceMetaInfo::new("Probe", "1.0", "127.0.0.1", port))
            .await
            .unwrap();
        Self {
            id,
            served,
            hanging,
            stop: Some(stop),
            task,
            _registration: registration,
        }
    }

    /// The server dies; the registry still lists the instance.
    async fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = tokio::time::timeout(WAIT, task).await;
    }

    fn served(&self) -> u32 {
        self.served.load(Ordering::Relaxed)
    }
}

async fn consumer(registry: &Fleet, config: ClientConfig, instances: usize) -> ProbeClient {
    let consumer = Consumer::with_connector(
        AnyRegistry::from(registry.registry.clone()),
        config,
        WAIT,
        Connector::Memory(registry.net.clone()),
    );
    let handle = consumer.cache().service("Probe:1.0").await.unwrap();
    tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == instances))
        .await
        .unwrap();
    ProbeClient::new(&consumer)
}

fn config(f: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
    let mut c = ClientConfig {
        timeout_ms: 2_000,
        ..ClientConfig::default()
    };
    f(&mut c);
    c
}

#[tokio::test(start_paused = true)]
async fn fail_over_hides_a_dead_instance_and_the_outlier_detector_ejects_it() {
    let registry = Fleet::default();
    let a = Instance::start(&registry, 1).await;
    let mut b = Instance::start(&registry, 2).await;
    let client = consumer(&registry, config(|_| {}), 2).await;
    for _ in 0..10 {
        client.who().await.unwrap();
    }
    b.kill().await;
    let before = a.served();
    // Every call succeeds: refused connections are retried on the live one.
    for i in 0..200 {
        let who = client
            .who()
            .await
            .unwrap_or_else(|e| panic!("call {i} failed: {e}"));
        assert_eq!(who, 1);
    }
    assert_eq!(a.served() - before, 200);
    assert_eq!(b.id, 2);
}

#[tokio::test(start_paused = true)]
async fn fail_fast_surfaces_the_dead_instance() {
    let registry = Fleet::default();
    let _a = Instance::start(&registry, 1).await;
    let mut b = Instance::start(&registry, 2).await;
    let client = consumer(
        &registry,
        config(|c| {
            c.fault_tolerance = FaultTolerance::FailFast;
            c.outlier_failures = 0; // keep calling it: nothing hides the failures
        }),
        2,
    )
    .await;
    b.kill().await;
    let failed = futures_count(&client, 20).await;
    assert_eq!(
        failed, 10,
        "round robin sends every other call to the dead instance"
    );
}

async fn futures_count(client: &ProbeClient, calls: usize) -> usize {
    let mut failed = 0;
    for _ in 0..calls {
        if client.who().await.is_err() {
            failed += 1;
        }
    }
    failed
}

#[tokio::test(start_paused = true)]
async fn fail_safe_returns_the_configured_default() {
    let registry = Fleet::default();
    let mut a = Instance::start(&registry, 1).await;
    let client = consumer(
        &registry,
        config(|c| {
            c.fault_tolerance = FaultTolerance::FailSafe;
            c.fail_safe.insert("who".into(), "0".into());
        }),
        1,
    )
    .await;
    assert_eq!(client.who().await.unwrap(), 1);
    a.kill().await;
    assert_eq!(client.who().await.unwrap(), 0, "the fail-safe default");
    // A method without a default still fails.
    let err = client.lookup("k".into()).await.unwrap_err();
    assert!(err.is_safe_to_retry(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_call_lost_mid_flight_is_retried_only_when_idempotent() {
    // One instance; its server dies while a call is in flight. The first
    // attempt then fails as "closed after the request was written" (it may
    // have run). Only an idempotent method is retried; with the instance
    // gone, the retry fails differently: refused, not closed.
    for idempotent in [false, true] {
        let registry = Fleet::default();
        let mut a = Instance::start(&registry, 1).await;
        let client = consumer(
            &registry,
            config(|c| {
                c.outlier_failures = 0;
                if idempotent {
                    c.idempotent = vec!["hang".into()];
                }
            }),
            1,
        )
        .await;
        let call = {
            let client = client.clone();
            tokio::spawn(async move { client.hang().await })
        };
        tokio::time::timeout(WAIT, a.hanging.notified())
            .await
            .unwrap();
        a.kill().await;
        let err = tokio::time::timeout(WAIT, call)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        if idempotent {
            assert!(
                matches!(err, RpcError::Connect { .. } | RpcError::Unsent { .. }),
                "idempotent: expected the retry's refusal, got {err}"
            );
        } else {
            assert!(
                matches!(err, RpcError::ConnectionClosed { .. }),
                "not idempotent: expected the first attempt's error, got {err}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_never_answers_is_ejected_and_calls_go_elsewhere() {
    let registry = Fleet::default();
    let a = Instance::start(&registry, 1).await;
    let b = Instance::start(&registry, 2).await;
    let client = consumer(
        &registry,
        config(|c| {
            c.timeout_ms = 200;
            c.outlier_failures = 2;
            c.outlier_cooldown_ms = 60_000;
        }),
        2,
    )
    .await;
    // `slow_who(1000)` times out everywhere: both instances collect
    // failures, but the cap keeps one of the two in rotation.
    for _ in 0..4 {
        let _ = client.slow_who(1000).await;
    }
    let (a0, b0) = (a.served(), b.served());
    for _ in 0..20 {
        client.who().await.unwrap();
    }
    let (da, db) = (a.served() - a0, b.served() - b0);
    assert_eq!(da + db, 20);
    assert!(
        da == 0 || db == 0,
        "one instance should be ejected: {da} / {db}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_retry_budget_stops_retries() {
    let registry = Fleet::default();
    let _a = Instance::start(&registry, 1).await;
    let mut b = Instance::start(&registry, 2).await;
    let client = consumer(
        &registry,
        config(|c| {
            c.retry_budget_ratio = 0.0;
            c.retry_budget_min_per_sec = 0;
            c.outlier_failures = 0;
        }),
        2,
    )
    .await;
    b.kill().await;
    let failed = futures_count(&client, 20).await;
    assert_eq!(failed, 10, "no budget, no retries");
}

#[tokio::test(start_paused = true)]
async fn p2c_steers_load_away_from_a_slow_instance() {
    let registry = Fleet::default();
    let fast = Instance::start(&registry, 1).await;
    let slow = Instance::start_with_delay(&registry, 2, Duration::from_millis(20)).await;
    let client = consumer(
        &registry,
        config(|c| c.load_balancer = LoadBalancerKind::P2c),
        2,
    )
    .await;
    // Calls to the slow instance stay in flight 20 ms and raise its latency
    // EWMA: with 8 callers, p2c sees it busier and slower almost always.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.spawn(async move {
            for _ in 0..25 {
                client.who().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(fast.served() + slow.served(), 200);
    assert!(
        fast.served() > 3 * slow.served(),
        "fast {} vs slow {}",
        fast.served(),
        slow.served()
    );
}

#[tokio::test(start_paused = true)]
async fn consistent_hashing_keeps_a_key_on_one_instance() {
    let registry = Fleet::default();
    let _a = Instance::start(&registry, 1).await;
    let _b = Instance::start(&registry, 2).await;
    let _c = Instance::start(&registry, 3).await;
    let client = consumer(
        &registry,
        config(|c| c.load_balancer = LoadBalancerKind::ConsistentHash),
        3,
    )
    .await;
    let mut owners = std::collections::BTreeSet::new();
    for k in 0..30 {
        let key = format!("user-{k}");
        let first = client.lookup(key.clone()).await.unwrap();
        for _ in 0..5 {
            assert_eq!(
                client.lookup(key.clone()).await.unwrap(),
                first,
                "{key} moved"
            );
        }
        owners.insert(first);
    }
    assert_eq!(owners.len(), 3, "keys spread over every instance");
}
