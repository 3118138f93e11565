//! The conformance suite against a real Consul agent: the one the test
//! command starts (`scripts/registry-servers.sh up consul`, dev mode on
//! 127.0.0.1:8500; override with `RPC_TEST_CONSUL`).
//!
//! Each case gets its own `registry.namespace`, which prefixes the Consul
//! service names and IDs, so cases run in parallel on one agent. Consumers
//! reach the agent through a [`FaultProxy`], which is how the outage case
//! partitions them while providers keep passing their checks. Losing a
//! registration is deregistering the service from the agent behind the
//! provider's back. The SIGKILL case kills a real child process whose
//! checks then go critical after the TTL.

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[cfg(feature = "consul")]
#[macro_use]
mod conformance;
#[cfg(feature = "consul")]
mod consul_support;

feature_stub!(
    consul_conformance_needs_the_consul_feature,
    "consul",
    "conformance suite"
);

#[cfg(feature = "consul")]
mod consul {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use rpc_core::config::Addresses;
    use rpc_core::{RegistryConfig, RegistryKind, ServiceMetaInfo};
    use rpc_registry::ConsulRegistry;

    use crate::conformance::proxy::FaultProxy;
    use crate::conformance::{Backend, Unsupported};
    use crate::consul_support;

    const TTL: Duration = Duration::from_secs(2);
    const ADDRESS_VAR: &str = "RPC_TEST_CONSUL";
    const NS_VAR: &str = "RPC_CONFORMANCE_CONSUL_NS";

    fn address() -> String {
        std::env::var(ADDRESS_VAR).unwrap_or_else(|_| "http://127.0.0.1:8500".into())
    }

    fn config(address: String, namespace: &str) -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Consul,
            address: Addresses(vec![address]),
            ttl_secs: TTL.as_secs(),
            timeout_ms: 2_000,
            namespace: Some(namespace.to_owned()),
            ..RegistryConfig::default()
        }
    }

    pub struct ConsulBackend {
        namespace: String,
        provider: ConsulRegistry,
        consumer: ConsulRegistry,
        proxy: FaultProxy,
    }

    impl Backend for ConsulBackend {
        type Provider = ConsulRegistry;
        type Consumer = ConsulRegistry;
        const NAME: &'static str = "consul";

        async fn available() -> Result<(), String> {
            let a = address();
            consul_support::leader(consul_support::socket_addr(&a))
                .await
                .map_err(|e| format!("consul at {a}: {e}"))
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
            let a = address();
            let proxy = FaultProxy::start(consul_support::socket_addr(&a)).await;
            let provider = ConsulRegistry::connect(&config(a, &namespace))
                .await
                .unwrap();
            let consumer =
                ConsulRegistry::connect(&config(format!("http://{}", proxy.addr()), &namespace))
                    .await
                    .unwrap();
            Self {
                namespace,
                provider,
                consumer,
                proxy,
            }
        }

        fn provider(&self) -> ConsulRegistry {
            self.provider.clone()
        }

        fn consumer(&self) -> ConsulRegistry {
            self.consumer.clone()
        }

        fn ttl(&self) -> Duration {
            TTL
        }

        fn propagation(&self) -> Duration {
            // A check pass or a TTL expiry wakes blocking queries in ~0.1 s;
            // the rest is headroom for a loaded CI machine.
            Duration::from_secs(1)
        }

        fn child_env(&self) -> Result<Vec<(String, String)>, Unsupported> {
            Ok(vec![
                (ADDRESS_VAR.into(), address()),
                (NS_VAR.into(), self.namespace.clone()),
            ])
        }

        async fn provider_from_env() -> ConsulRegistry {
            let ns = std::env::var(NS_VAR).unwrap();
            ConsulRegistry::connect(&config(address(), &ns))
                .await
                .unwrap()
        }

        async fn lose_registration(&self, meta: &ServiceMetaInfo) -> Result<(), Unsupported> {
            let id = self.provider.instance_id(meta);
            consul_support::deregister(consul_support::socket_addr(&address()), &id).await;
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

    conformance_suite!(ConsulBackend);
}
