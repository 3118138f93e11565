//! Provider and consumer end to end over loopback TCP, discovering each
//! other through the `memory` and `local` registries.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rpc::registry::{AnyRegistry, LocalRegistry, MemoryRegistry};
use rpc::serde::{Deserialize, Serialize};
use rpc::{Consumer, Provider, RpcConfig, RpcError, StatusCode};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "rpc::serde")]
pub struct Item {
    pub id: u64,
    pub name: String,
    pub tags: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "rpc::serde")]
pub enum ShopError {
    NotFound(u64),
    Invalid { reason: String },
}

/// A small shop.
#[rpc::service(version = "2.1")]
pub trait Shop {
    /// Several arguments.
    async fn make(&self, id: u64, name: String, tags: Vec<String>) -> Item;
    /// A user error type, passed through.
    async fn find(&self, id: u64) -> Result<Item, ShopError>;
    /// Unit return, no arguments.
    async fn touch(&self);
    /// Which provider answered.
    async fn whoami(&self) -> u32;
    /// How many `touch` calls this provider saw.
    async fn touches(&self) -> u32;
}

struct ShopImpl {
    id: u32,
    touched: AtomicU32,
}

impl Shop for ShopImpl {
    async fn make(&self, id: u64, name: String, tags: Vec<String>) -> Item {
        Item { id, name, tags }
    }
    async fn find(&self, id: u64) -> Result<Item, ShopError> {
        match id {
            0 => Err(ShopError::Invalid {
                reason: "id 0".into(),
            }),
            1 => Ok(Item {
                id: 1,
                name: "one".into(),
                tags: vec![],
            }),
            other => Err(ShopError::NotFound(other)),
        }
    }
    async fn touch(&self) {
        self.touched.fetch_add(1, Ordering::Relaxed);
    }
    async fn whoami(&self) -> u32 {
        self.id
    }
    async fn touches(&self) -> u32 {
        self.touched.load(Ordering::Relaxed)
    }
}

struct RunningProvider {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), rpc::Error>>,
}

impl RunningProvider {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.done)
            .await
            .expect("provider did not stop")
            .unwrap()
            .unwrap();
    }
}

async fn provider(registry: AnyRegistry, id: u32, config: &RpcConfig) -> RunningProvider {
    let p = Provider::builder(config)
        .registry(registry)
        .service(ShopServer::new(ShopImpl {
            id,
            touched: AtomicU32::new(0),
        }))
        .bind()
        .await
        .unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(p.run(async {
        let _ = rx.await;
    }));
    RunningProvider { stop, done }
}

async fn wait_for(consumer: &Consumer, n: usize) {
    let handle = consumer
        .cache()
        .service(&rpc::ServiceMetaInfo::new("Shop", "2.1", "", 0).service_key())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == n))
        .await
        .unwrap_or_else(|_| panic!("never saw {n} providers"));
}

async fn exercise(registry: AnyRegistry, config: RpcConfig) {
    let p1 = provider(registry.clone(), 1, &config).await;
    let consumer = Consumer::with_registry(registry.clone(), config.client.clone(), WAIT);
    wait_for(&consumer, 1).await;
    let shop = ShopClient::new(&consumer);

    let item = shop
        .make(7, "seven".into(), vec!["a".into(), "b".into()])
        .await
        .unwrap();
    assert_eq!(
        item,
        Item {
            id: 7,
            name: "seven".into(),
            tags: vec!["a".into(), "b".into()]
        }
    );
    assert_eq!(shop.find(1).await.unwrap().unwrap().name, "one");
    assert_eq!(shop.find(5).await.unwrap(), Err(ShopError::NotFound(5)));
    assert_eq!(
        shop.find(0).await.unwrap(),
        Err(ShopError::Invalid {
            reason: "id 0".into()
        })
    );
    shop.touch().await.unwrap();

    // A second provider: round robin spreads calls over both.
    let p2 = provider(registry.clone(), 2, &config).await;
    wait_for(&consumer, 2).await;
    let mut seen = [0u32; 3];
    for _ in 0..20 {
        seen[shop.whoami().await.unwrap() as usize] += 1;
    }
    assert_eq!(seen[1], 10, "{seen:?}");
    assert_eq!(seen[2], 10, "{seen:?}");

    // Graceful shutdown deregisters first: the consumer drops it, and every
    // later call goes to the survivor.
    p1.stop().await;
    wait_for(&consumer, 1).await;
    for _ in 0..5 {
        assert_eq!(shop.whoami().await.unwrap(), 2);
    }
    p2.stop().await;
    wait_for(&consumer, 0).await;
    let err = shop.whoami().await.unwrap_err();
    assert!(matches!(err, RpcError::NoProvider { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_registry_end_to_end() {
    let registry = AnyRegistry::from(MemoryRegistry::new());
    exercise(registry, RpcConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_registry_end_to_end_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let registry =
        AnyRegistry::from(LocalRegistry::new(dir.path(), Duration::from_secs(5)).unwrap());
    let mut config = RpcConfig::default();
    config.client.serializer = rpc::SerializerKind::Json;
    exercise(registry, config).await;
}

#[tokio::test]
async fn unknown_method_of_a_newer_client_is_an_error_response() {
    let registry = AnyRegistry::from(MemoryRegistry::new());
    let config = RpcConfig::default();
    let p = provider(registry.clone(), 1, &config).await;
    let consumer = Consumer::with_registry(registry, config.client.clone(), WAIT);
    wait_for(&consumer, 1).await;
    let raw = consumer.service("Shop", "2.1");
    let err = raw.call::<_, ()>("restock", &(1u64,)).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::MethodNotFound), "{err}");
    // Wrong argument shape for a known method.
    let err = raw.call::<_, u32>("whoami", &("x", 1)).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Serialization), "{err}");
    // A different version is a different service: nobody provides it.
    let other = ShopClient::from_service_client(consumer.service("Shop", "9.9"));
    let err = other.whoami().await.unwrap_err();
    assert!(matches!(err, RpcError::NoProvider { .. }), "{err}");
    p.stop().await;
}

/// Consumers that chose different serializers call one provider: each
/// reply comes back in the serializer of its request.
#[tokio::test]
async fn every_serializer_interoperates_with_one_provider() {
    let registry = AnyRegistry::from(MemoryRegistry::new());
    let config = RpcConfig::default();
    let p = provider(registry.clone(), 1, &config).await;
    for kind in rpc::SerializerKind::ALL {
        let mut client_config = config.client.clone();
        client_config.serializer = kind;
        let consumer = Consumer::with_registry(registry.clone(), client_config, WAIT);
        wait_for(&consumer, 1).await;
        let shop = ShopClient::new(&consumer);
        let item = shop
            .make(3, "three".into(), vec!["t".into()])
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(item.name, "three", "{kind:?}");
        assert_eq!(
            shop.find(9).await.unwrap(),
            Err(ShopError::NotFound(9)),
            "{kind:?}"
        );
        shop.touch().await.unwrap();
    }
    p.stop().await;
}

/// Generic invocation: a method known only by name, JSON in and out, and
/// the provider's self-description in its registry record.
#[tokio::test]
async fn generic_invocation_calls_by_name_with_json() {
    use serde_json::json;
    let registry = AnyRegistry::from(MemoryRegistry::new());
    let config = RpcConfig::default();
    let p = provider(registry.clone(), 1, &config).await;
    let consumer = Consumer::with_registry(registry, config.client.clone(), WAIT);
    wait_for(&consumer, 1).await;
    let generic = consumer.generic_service("Shop", "2.1");
    let method = String::from("make");
    let item = generic
        .call_generic(&method, &[json!(7), json!("seven"), json!(["a"])])
        .await
        .unwrap();
    assert_eq!(item, json!({"id": 7, "name": "seven", "tags": ["a"]}));
    // A user error comes back as serde's form of the method's Result.
    let found = generic.call_generic("find", &[json!(5)]).await.unwrap();
    assert_eq!(found, json!({"Err": {"NotFound": 5}}));
    // No arguments.
    assert_eq!(
        generic.call_generic("touches", &[]).await.unwrap(),
        json!(0)
    );
    let err = generic
        .call_generic("restock", &[json!(1)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::MethodNotFound), "{err}");
    let err = generic
        .call_generic("find", &[json!("not a number")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Serialization), "{err}");
    // A bincode client cannot call generically: refused before sending.
    let err = consumer
        .service("Shop", "2.1")
        .call_generic("touches", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Config(_)), "{err}");

    // The record says which methods there are, and how to talk to it.
    let instances = consumer.service("Shop", "2.1").instances().await.unwrap();
    let meta = &instances[0].metadata;
    assert_eq!(meta["methods"], "make,find,touch,whoami,touches");
    assert_eq!(meta["serializers"], "bincode,json,postcard,msgpack");
    assert_eq!(meta["compressions"], "lz4,zstd");
    assert!(meta["framework"].starts_with("rpc/"), "{meta:?}");
    assert!(meta["since"].parse::<u64>().unwrap() > 1_700_000_000);
    p.stop().await;
}

#[tokio::test]
async fn from_config_uses_the_configured_registry() {
    let dir = tempfile::tempdir().unwrap();
    let config = RpcConfig::from_toml_str(
        &format!(
            "[registry]\ntype = \"local\"\naddress = \"{}\"\nttl_secs = 5\n",
            dir.path().display()
        ),
        "test",
    )
    .unwrap();
    let registry = AnyRegistry::from_config(&config.registry).await.unwrap();
    let p = provider(registry, 3, &config).await;
    let shop = ShopClient::from_config(&config).await.unwrap();
    let answered_by = tokio::time::timeout(WAIT, async {
        loop {
            match shop.whoami().await {
                Ok(id) => return id,
                // The provider registers after it starts serving: until the
                // local registry's poll sees it, there is nobody to call.
                Err(RpcError::NoProvider { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(answered_by, 3);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_call() {
    let registry = AnyRegistry::from(MemoryRegistry::new());
    let mut config = RpcConfig::default();
    config.server.shutdown_grace_ms = 100;
    let mut p1 = provider(registry.clone(), 1, &config).await;
    let mut p2 = provider(registry.clone(), 2, &config).await;
    let consumer = Consumer::with_registry(registry.clone(), config.client.clone(), WAIT);
    wait_for(&consumer, 2).await;
    let shop = ShopClient::new(&consumer);

    // Callers hammer `touch` (not idempotent: only provably unsent calls may
    // be retried) for the whole restart.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let shop = shop.clone();
        let stop = stop.clone();
        callers.spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match shop.touch().await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        });
    }
    for (slot, id) in [(&mut p1, 11), (&mut p2, 12)] {
        let old = std::mem::replace(slot, provider(registry.clone(), id, &config).await);
        old.stop().await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    while let Some(done) = callers.join_next().await {
        let (ok, failed) = done.unwrap();
        assert!(
            failed.is_empty(),
            "calls failed during the rolling restart: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 100, "only {total} calls were made");
    p1.stop().await;
    p2.stop().await;
}

/// Every compression with two serializers against one provider with the
/// default config: the provider decompresses and answers in kind.
#[tokio::test]
async fn every_compression_interoperates_with_one_provider() {
    let registry = AnyRegistry::from(MemoryRegistry::new());
    let config = RpcConfig::default();
    let p = provider(registry.clone(), 1, &config).await;
    let tags: Vec<String> = (0..300).map(|i| format!("tag-{}", i % 7)).collect();
    for c in rpc::Compression::ALL {
        for kind in [rpc::SerializerKind::Postcard, rpc::SerializerKind::Json] {
            let mut client_config = config.client.clone();
            client_config.serializer = kind;
            client_config.compression = c;
            client_config.compression_threshold = 0;
            let consumer = Consumer::with_registry(registry.clone(), client_config, WAIT);
            wait_for(&consumer, 1).await;
            let shop = ShopClient::new(&consumer);
            let item = shop
                .make(3, "three".into(), tags.clone())
                .await
                .unwrap_or_else(|e| panic!("{c:?} {kind:?}: {e}"));
            assert_eq!(item.tags, tags, "{c:?} {kind:?}");
            assert_eq!(
                shop.find(9).await.unwrap(),
                Err(ShopError::NotFound(9)),
                "{c:?} {kind:?}"
            );
        }
    }
    p.stop().await;
}

/// `client.compression`, its threshold and the per-service override reach
/// the wire: a listener posing as the provider records the serializer
/// byte of each request it reads.
#[tokio::test]
async fn the_compression_setting_reaches_the_wire() {
    use rpc_core::Registry;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel::<u8>(8);
    // Each consumer dials its own connection: serve every one.
    let fake = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen_tx = seen_tx.clone();
            conns.spawn(async move {
                let mut buf = bytes::BytesMut::new();
                loop {
                    while buf.len() >= 18 {
                        let len = u32::from_be_bytes([buf[14], buf[15], buf[16], buf[17]]);
                        if buf.len() < 18 + len as usize {
                            break;
                        }
                        let frame = buf.split_to(18 + len as usize);
                        if frame[4] != 1 {
                            continue; // heartbeats and the like
                        }
                        let _ = seen_tx.send(frame[3]).await;
                        let id = u64::from_be_bytes(frame[6..14].try_into().unwrap());
                        let reply =
                            rpc_codec::encode_error(id, frame[3], StatusCode::BadRequest, "seen");
                        if sock.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                    if !matches!(sock.read_buf(&mut buf).await, Ok(n) if n > 0) {
                        return;
                    }
                }
            });
        }
    });
    let registry = AnyRegistry::from(MemoryRegistry::new());
    let _registration = registry
        .register(rpc::ServiceMetaInfo::new("Shop", "2.1", "127.0.0.1", port))
        .await
        .unwrap();
    let tags: Vec<String> = (0..300).map(|i| format!("tag-{}", i % 7)).collect();
    let postcard = 2u8;
    // (compression, threshold, per-service override, expected byte)
    for (c, threshold, service, want) in [
        (rpc::Compression::Zstd, 64, None, 0x80 | postcard),
        (rpc::Compression::Lz4, 64, None, 0x40 | postcard),
        (rpc::Compression::Zstd, 1 << 20, None, postcard),
        (rpc::Compression::None, 0, None, postcard),
        (
            rpc::Compression::None,
            64,
            Some(rpc::Compression::Lz4),
            0x40 | postcard,
        ),
    ] {
        let mut client = rpc::ClientConfig {
            compression: c,
            compression_threshold: threshold,
            ..Default::default()
        };
        if let Some(o) = service {
            client.services.insert(
                "Shop:2.1".into(),
                rpc::ServiceOverrides {
                    compression: Some(o),
                    ..Default::default()
                },
            );
        }
        let consumer = Consumer::with_registry(registry.clone(), client, WAIT);
        wait_for(&consumer, 1).await;
        let err = ShopClient::new(&consumer)
            .make(3, "three".into(), tags.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(StatusCode::BadRequest), "{err}");
        let byte = tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            byte, want,
            "{c:?} over {threshold} bytes, override {service:?}: byte {byte:#04x}"
        );
    }
    fake.abort();
}
