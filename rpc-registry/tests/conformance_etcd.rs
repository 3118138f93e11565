//! The conformance suite against a real etcd: the one the test command
//! starts (`scripts/registry-servers.sh up etcd`, 127.0.0.1:2379; override
//! with `RPC_TEST_ETCD`).
//!
//! Each case gets its own key namespace, so cases run in parallel on one
//! server. Consumers reach etcd through a [`FaultProxy`], which is how the
//! outage case partitions them while providers keep their lease. Losing a
//! registration is revoking its lease behind the provider's back. The
//! SIGKILL case kills a real child process holding the lease.

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[cfg(feature = "etcd")]
#[macro_use]
mod conformance;

feature_stub!(
    etcd_conformance_needs_the_etcd_feature,
    "etcd",
    "conformance suite"
);

#[cfg(feature = "etcd")]
mod etcd {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use etcd_client::Client;
    use rpc_core::config::Addresses;
    use rpc_core::{RegistryConfig, RegistryKind, ServiceMetaInfo};
    use rpc_registry::EtcdRegistry;

    use crate::conformance::proxy::FaultProxy;
    use crate::conformance::{Backend, Unsupported};

    const TTL: Duration = Duration::from_secs(2);
    const ENDPOINT_VAR: &str = "RPC_TEST_ETCD";
    const NS_VAR: &str = "RPC_CONFORMANCE_ETCD_NS";

    fn endpoint() -> String {
        std::env::var(ENDPOINT_VAR).unwrap_or_else(|_| "http://127.0.0.1:2379".into())
    }

    fn socket_addr(endpoint: &str) -> SocketAddr {
        let hostport = endpoint.rsplit("//").next().unwrap_or(endpoint);
        hostport.parse().unwrap()
    }

    fn config(endpoint: String, namespace: &str) -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Etcd,
            address: Addresses(vec![endpoint]),
            ttl_secs: TTL.as_secs(),
            timeout_ms: 2_000,
            namespace: Some(namespace.to_owned()),
            ..RegistryConfig::default()
        }
    }

    pub struct EtcdBackend {
        namespace: String,
        provider: EtcdRegistry,
        consumer: EtcdRegistry,
        proxy: FaultProxy,
        admin: Client,
    }

    impl Backend for EtcdBackend {
        type Provider = EtcdRegistry;
        type Consumer = EtcdRegistry;
        const NAME: &'static str = "etcd";

        async fn available() -> Result<(), String> {
            let ep = endpoint();
            let probe = async {
                let mut c = Client::connect([ep.as_str()], None).await?;
                c.status().await
            };
            match tokio::time::timeout(Duration::from_secs(3), probe).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("etcd at {ep}: {e}")),
                Err(_) => Err(format!("etcd at {ep} did not answer in 3 s")),
            }
        }

        async fn setup() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let namespace = format!(
                "conformance-{}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            let ep = endpoint();
            let proxy = FaultProxy::start(socket_addr(&ep)).await;
            let provider = EtcdRegistry::connect(&config(ep.clone(), &namespace))
                .await
                .unwrap();
            let consumer =
                EtcdRegistry::connect(&config(format!("http://{}", proxy.addr()), &namespace))
                    .await
                    .unwrap();
            let admin = Client::connect([ep.as_str()], None).await.unwrap();
            Self {
                namespace,
                provider,
                consumer,
                proxy,
                admin,
            }
        }

        fn provider(&self) -> EtcdRegistry {
            self.provider.clone()
        }

        fn consumer(&self) -> EtcdRegistry {
            self.consumer.clone()
        }

        fn ttl(&self) -> Duration {
            TTL
        }

        fn propagation(&self) -> Duration {
            Duration::from_millis(200)
        }

        fn child_env(&self) -> Result<Vec<(String, String)>, Unsupported> {
            Ok(vec![
                (ENDPOINT_VAR.into(), endpoint()),
                (NS_VAR.into(), self.namespace.clone()),
            ])
        }

        async fn provider_from_env() -> EtcdRegistry {
            let ns = std::env::var(NS_VAR).unwrap();
            EtcdRegistry::connect(&config(endpoint(), &ns))
                .await
                .unwrap()
        }

        async fn lose_registration(&self, meta: &ServiceMetaInfo) -> Result<(), Unsupported> {
            let key = self.provider.instance_key(meta);
            let mut admin = self.admin.clone();
            let resp = admin.get(key.as_str(), None).await.unwrap();
            let lease = resp.kvs().first().expect("the key exists").lease();
            assert_ne!(lease, 0, "instance keys hang off a lease");
            admin.lease_revoke(lease).await.unwrap();
            Ok(())
        }

        async fn cut_consumers(&self) -> Result<(), Unsupported> {
            self.proxy.cut();
            Ok(())
        }

        async fn restore_consumers(&self) {
            self.proxy.restore();
        }
    }

    conformance_suite!(EtcdBackend);
}
