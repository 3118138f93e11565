//! The conformance suite against a real Nacos 2.x server: the one the test
//! command starts (`scripts/registry-servers.sh up nacos`: rnacos on
//! 127.0.0.1:8848, gRPC 9848; override with `RPC_TEST_NACOS=host:port`).
//! Only the documented Nacos client API is used, so the suite runs against
//! an official Nacos 2.x server the same way.
//!
//! Each case gets its own Nacos group, so cases run in parallel on one
//! server. The Nacos 2.x client derives its gRPC port from the address
//! (HTTP port + 1000), so each side reaches the server through a PAIR of
//! [`FaultProxy`]s on ports P and P + 1000. Consumers' pair is how the
//! outage case partitions them while providers stay connected; providers'
//! pair is how a registration is lost: cutting the provider's connection
//! makes the server drop its ephemeral instances, then the provider
//! reconnects and must publish them again by itself. The SIGKILL case kills
//! a real child process connected straight to the server.

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[cfg(feature = "nacos")]
#[macro_use]
mod conformance;

feature_stub!(
    nacos_conformance_needs_the_nacos_feature,
    "nacos",
    "conformance suite"
);

#[cfg(feature = "nacos")]
mod nacos {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use rpc_core::config::Addresses;
    use rpc_core::{Discover, RegistryConfig, RegistryKind, ServiceMetaInfo};
    use rpc_registry::NacosRegistry;

    use crate::conformance::proxy::FaultProxy;
    use crate::conformance::{Backend, Unsupported};

    /// rnacos drops a closed connection's instances about a second after
    /// the close; Nacos 2.x at once.
    const TTL: Duration = Duration::from_secs(3);
    const ENDPOINT_VAR: &str = "RPC_TEST_NACOS";
    const GROUP_VAR: &str = "RPC_CONFORMANCE_NACOS_GROUP";
    /// The Nacos 2.x client's gRPC port offset.
    const GRPC_OFFSET: u16 = 1000;

    fn endpoint() -> String {
        std::env::var(ENDPOINT_VAR).unwrap_or_else(|_| "127.0.0.1:8848".into())
    }

    fn socket_addr(endpoint: &str) -> SocketAddr {
        endpoint.parse().unwrap()
    }

    fn config(endpoint: String, group: &str) -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Nacos,
            address: Addresses(vec![endpoint]),
            timeout_ms: 2_000,
            group: Some(group.to_owned()),
            ..RegistryConfig::default()
        }
    }

    /// Two proxies, on P and P + 1000, to the server's HTTP and gRPC ports.
    struct ProxyPair {
        http: FaultProxy,
        grpc: FaultProxy,
    }

    impl ProxyPair {
        async fn start(server: SocketAddr) -> Self {
            let grpc_upstream = SocketAddr::new(server.ip(), server.port() + GRPC_OFFSET);
            for _ in 0..100 {
                let http = FaultProxy::start(server).await;
                let Some(port) = http.addr().port().checked_add(GRPC_OFFSET) else {
                    continue;
                };
                let at = SocketAddr::new(http.addr().ip(), port);
                if let Ok(grpc) = FaultProxy::start_at(at, grpc_upstream).await {
                    return Self { http, grpc };
                }
            }
            panic!("no free port pair P, P + {GRPC_OFFSET} for the proxies");
        }

        fn endpoint(&self) -> String {
            self.http.addr().to_string()
        }

        fn cut(&self) {
            self.http.cut();
            self.grpc.cut();
        }

        fn restore(&self) {
            self.http.restore();
            self.grpc.restore();
        }
    }

    pub struct NacosBackend {
        group: String,
        provider: NacosRegistry,
        consumer: NacosRegistry,
        provider_proxy: ProxyPair,
        consumer_proxy: ProxyPair,
        admin: NacosRegistry,
    }

    impl Backend for NacosBackend {
        type Provider = NacosRegistry;
        type Consumer = NacosRegistry;
        const NAME: &'static str = "nacos";

        async fn available() -> Result<(), String> {
            let ep = endpoint();
            let probe = async {
                let r = NacosRegistry::connect(&config(ep.clone(), "conformance-probe")).await?;
                r.discover("Conf.Probe:0").await
            };
            match tokio::time::timeout(Duration::from_secs(5), probe).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("nacos at {ep}: {e}")),
                Err(_) => Err(format!("nacos at {ep} did not answer in 5 s")),
            }
        }

        async fn setup() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let group = format!(
                "conformance-{}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            let ep = endpoint();
            let server = socket_addr(&ep);
            let provider_proxy = ProxyPair::start(server).await;
            let consumer_proxy = ProxyPair::start(server).await;
            let provider = NacosRegistry::connect(&config(provider_proxy.endpoint(), &group))
                .await
                .unwrap();
            let consumer = NacosRegistry::connect(&config(consumer_proxy.endpoint(), &group))
                .await
                .unwrap();
            let admin = NacosRegistry::connect(&config(ep, &group)).await.unwrap();
            Self {
                group,
                provider,
                consumer,
                provider_proxy,
                consumer_proxy,
                admin,
            }
        }

        fn provider(&self) -> NacosRegistry {
            self.provider.clone()
        }

        fn consumer(&self) -> NacosRegistry {
            self.consumer.clone()
        }

        fn ttl(&self) -> Duration {
            TTL
        }

        /// rnacos delays its pushes by 0.5-1 s. The outage case's recovery
        /// also depends on this: while cut off, the SDK retries its
        /// connection 2 s and then about 9 s after noticing the break
        /// (a failed attempt takes ~5 s); 2 s here puts the restore (3
        /// propagations after the outage is noticed) well before the second
        /// retry.
        fn propagation(&self) -> Duration {
            Duration::from_secs(2)
        }

        fn child_env(&self) -> Result<Vec<(String, String)>, Unsupported> {
            Ok(vec![
                (ENDPOINT_VAR.into(), endpoint()),
                (GROUP_VAR.into(), self.group.clone()),
            ])
        }

        async fn provider_from_env() -> NacosRegistry {
            let group = std::env::var(GROUP_VAR).unwrap();
            NacosRegistry::connect(&config(endpoint(), &group))
                .await
                .unwrap()
        }

        async fn lose_registration(&self, meta: &ServiceMetaInfo) -> Result<(), Unsupported> {
            // The server drops a closed connection's ephemeral instances.
            self.provider_proxy.cut();
            let key = meta.service_key();
            let gone = async {
                loop {
                    if let Ok(list) = self.admin.discover(&key).await
                        && !list.contains(meta)
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(15), gone)
                .await
                .expect("the server drops the instance of a closed connection");
            self.provider_proxy.restore();
            Ok(())
        }

        async fn cut_consumers(&self) -> Result<(), Unsupported> {
            self.consumer_proxy.cut();
            Ok(())
        }

        async fn restore_consumers(&self) {
            self.consumer_proxy.restore();
        }
    }

    conformance_suite!(NacosBackend);
}
