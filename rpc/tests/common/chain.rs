//! The consumer -> A -> B chain the tracing tests run: `Front.relay` on A
//! calls `Back.report` on B, which returns the `traceparent` it received.
//! Providers on loopback TCP, a memory registry.

use std::net::SocketAddr;
use std::time::Duration;

use rpc::registry::{AnyRegistry, MemoryRegistry};
use rpc::{CallOptions, ClientConfig, Consumer, Context, Provider, RpcConfig};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(10);

#[rpc::service(version = "1.0")]
pub trait Front {
    /// Calls `Back.report` and returns the `traceparent` B received.
    async fn relay(&self) -> String;
}

#[rpc::service(version = "1.0")]
pub trait Back {
    /// The `traceparent` this call arrived with.
    async fn report(&self) -> String;
}

fn incoming_traceparent() -> String {
    Context::with_current(|cx| cx.metadata().get_str("traceparent").map(str::to_owned))
        .flatten()
        .unwrap_or_default()
}

struct FrontImpl {
    back: BackClient,
}

impl Front for FrontImpl {
    async fn relay(&self) -> String {
        self.back
            .report()
            .await
            .unwrap_or_else(|e| format!("error: {e}"))
    }
}

struct BackImpl;

impl Back for BackImpl {
    async fn report(&self) -> String {
        incoming_traceparent()
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), rpc::Error>>,
}

async fn start(builder: rpc::ProviderBuilder, registry: &MemoryRegistry) -> (SocketAddr, Running) {
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
    (addr, Running { stop, done })
}

fn cfg() -> RpcConfig {
    let mut c = RpcConfig::default();
    c.server.host = "127.0.0.1".into();
    c.server.shutdown_grace_ms = 0;
    c
}

async fn consumer(registry: &MemoryRegistry, key: &str) -> Consumer {
    let consumer = Consumer::with_registry(
        AnyRegistry::from(registry.clone()),
        ClientConfig::default(),
        WAIT,
    );
    let handle = consumer.cache().service(key).await.unwrap();
    tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 1))
        .await
        .unwrap();
    consumer
}

/// Runs the chain once under `subscriber`, first call with `first`;
/// returns what B received. Call it on a current-thread runtime: the
/// subscriber is this thread's default, and every span of the chain must
/// be made on this thread.
pub async fn run_chain(
    subscriber: impl tracing::Subscriber + Send + Sync + 'static,
    first: CallOptions,
) -> String {
    let _guard = tracing::subscriber::set_default(subscriber);
    let registry = MemoryRegistry::new();
    let (_, b) = start(
        Provider::builder(&cfg()).service(BackServer::new(BackImpl)),
        &registry,
    )
    .await;
    let to_b = consumer(&registry, "Back:1.0").await;
    let (_, a) = start(
        Provider::builder(&cfg()).service(FrontServer::new(FrontImpl {
            back: BackClient::new(&to_b),
        })),
        &registry,
    )
    .await;
    let to_a = consumer(&registry, "Front:1.0").await;
    let seen_by_b = FrontClient::new(&to_a).with(first).relay().await.unwrap();
    for r in [a, b] {
        let _ = r.stop.send(());
        let _ = tokio::time::timeout(WAIT, r.done).await;
    }
    seen_by_b
}
