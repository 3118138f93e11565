//! TLS between a provider and consumers configured from `rpc.toml`
//! text, discovering each other through the memory registry: the
//! provider publishes `tls = true`, a TLS consumer calls it, and a
//! consumer on the other side of a mismatch fails with a clear error.
#![cfg(feature = "tls")]

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rpc::registry::{AnyRegistry, MemoryRegistry};
use rpc::{Consumer, Provider, RpcConfig, RpcError};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(10);

#[rpc::service]
pub trait Greeter {
    async fn greet(&self, name: String) -> String;
}

struct Hello;

impl Greeter for Hello {
    async fn greet(&self, name: String) -> String {
        format!("hello, {name}")
    }
}

/// A CA and a provider certificate for 127.0.0.1, as PEM files.
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    dir
}

fn config(text: &str) -> RpcConfig {
    RpcConfig::from_toml_str(text, "rpc.toml").unwrap()
}

async fn provider(
    registry: AnyRegistry,
    config: &RpcConfig,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), rpc::Error>>,
) {
    let p = Provider::builder(config)
        .registry(registry)
        .service(GreeterServer::new(Hello))
        .bind()
        .await
        .unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(p.run(async {
        let _ = rx.await;
    }));
    (stop, done)
}

async fn wait_for_one(consumer: &Consumer) -> rpc::ServiceMetaInfo {
    let handle = consumer.cache().service("Greeter:1.0").await.unwrap();
    tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 1))
        .await
        .expect("the provider registers");
    handle.instances()[0].clone()
}

#[tokio::test]
async fn tls_provider_and_consumers_from_config() {
    let dir = pki();
    let d = dir.path().display();
    let registry = AnyRegistry::from(MemoryRegistry::new());
    let server = config(&format!(
        "[server.tls]\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\n"
    ));
    let (stop, done) = provider(registry.clone(), &server).await;

    let tls_client = config(&format!("[client.tls]\nca_file = \"{d}/ca.pem\"\n"));
    let consumer = Consumer::with_registry(registry.clone(), tls_client.client, WAIT);
    let meta = wait_for_one(&consumer).await;
    assert_eq!(meta.metadata.get("tls").map(String::as_str), Some("true"));
    let greeter = GreeterClient::new(&consumer);
    assert_eq!(greeter.greet("tls".into()).await.unwrap(), "hello, tls");

    // A consumer without [client.tls] does not dial in plaintext: the call
    // fails naming the address and the mismatch.
    let plain = Consumer::with_registry(registry.clone(), RpcConfig::default().client, WAIT);
    wait_for_one(&plain).await;
    let e = GreeterClient::new(&plain)
        .greet("plain".into())
        .await
        .unwrap_err();
    let text = rpc_core::error::report(&e);
    assert!(text.contains(&meta.address()), "{text}");
    assert!(
        text.contains("serves TLS") && text.contains("no [client.tls]"),
        "{text}"
    );
    let _ = stop.send(());
    done.await.unwrap().unwrap();

    // And the other way round: a TLS consumer, a plaintext provider.
    let (stop, done) = provider(registry.clone(), &RpcConfig::default()).await;
    let tls_client = config(&format!("[client.tls]\nca_file = \"{d}/ca.pem\"\n"));
    let consumer = Consumer::with_registry(registry, tls_client.client, WAIT);
    wait_for_one(&consumer).await;
    let e = GreeterClient::new(&consumer)
        .greet("x".into())
        .await
        .unwrap_err();
    let text = rpc_core::error::report(&e);
    assert!(text.contains("serves plain TCP"), "{text}");
    let _ = stop.send(());
    done.await.unwrap().unwrap();
}

#[tokio::test]
async fn unreadable_tls_files_fail_startup_naming_the_key() {
    let cfg = config("[client.tls]\nca_file = \"/nonexistent/ca.pem\"\n");
    match Consumer::from_config(&cfg).await {
        Err(RpcError::Config(e)) => {
            assert_eq!(e.key, "client.tls.ca_file");
            assert!(e.message.contains("/nonexistent/ca.pem"), "{}", e.message);
        }
        Err(other) => panic!("not a config error: {other}"),
        Ok(_) => panic!("started with an unreadable CA file"),
    }
    let cfg = config(
        "[server.tls]\ncert_file = \"/nonexistent/s.pem\"\nkey_file = \"/nonexistent/s.key\"\n",
    );
    let Err(err) = Provider::builder(&cfg)
        .registry(AnyRegistry::from(MemoryRegistry::new()))
        .service(GreeterServer::new(Hello))
        .bind()
        .await
    else {
        panic!("bound with an unreadable certificate");
    };
    let text = err.to_string() + &format!("{err:?}");
    assert!(text.contains("server.tls.cert_file"), "{text}");
}
