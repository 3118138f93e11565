//! The conformance suite against a real ZooKeeper: the one the test command
//! starts (`scripts/registry-servers.sh up zookeeper`, 127.0.0.1:2181;
//! override with `RPC_TEST_ZOOKEEPER`).
//!
//! Each case gets its own chroot (`127.0.0.1:2181/conformance-...`), so cases
//! run in parallel on one server. Consumers reach ZooKeeper through a
//! [`FaultProxy`], which is how the outage case partitions them while
//! providers keep their session. Losing a registration is expiring the
//! provider's session behind its back: a second client attaches to the same
//! session (id and password) and closes it, and the server deletes the
//! session's ephemeral nodes. The SIGKILL case kills a real child process
//! holding a session.

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[cfg(feature = "zookeeper")]
#[macro_use]
mod conformance;

feature_stub!(
    zookeeper_conformance_needs_the_zookeeper_feature,
    "zookeeper",
    "conformance suite"
);

#[cfg(feature = "zookeeper")]
mod zookeeper {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use rpc_core::config::Addresses;
    use rpc_core::{RegistryConfig, RegistryKind, ServiceMetaInfo};
    use rpc_registry::ZookeeperRegistry;
    use zookeeper_client::Client;

    use crate::conformance::proxy::FaultProxy;
    use crate::conformance::{Backend, Unsupported};

    /// Requested session timeout (`ttl_secs`). The test server's tickTime of
    /// 500 ms allows it (the minimum is two ticks).
    const TTL: Duration = Duration::from_secs(2);
    const SERVER_VAR: &str = "RPC_TEST_ZOOKEEPER";
    const CHROOT_VAR: &str = "RPC_CONFORMANCE_ZOOKEEPER_CHROOT";

    fn server() -> String {
        std::env::var(SERVER_VAR).unwrap_or_else(|_| "127.0.0.1:2181".into())
    }

    fn config(address: String) -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Zookeeper,
            address: Addresses(vec![address]),
            ttl_secs: TTL.as_secs(),
            timeout_ms: 2_000,
            ..RegistryConfig::default()
        }
    }

    /// Ends the session of `registry`, which reaches the server through
    /// `proxy`: cut it off (so its own reconnection cannot win the session
    /// back), attach a second client to the session and close it, until the
    /// server reports the session expired; then let it reconnect.
    pub async fn expire_session(registry: &ZookeeperRegistry, proxy: &FaultProxy) {
        let info = registry.session().expect("a session is open");
        let id = info.id();
        let addr = server();
        proxy.cut();
        let mut closed = false;
        for _ in 0..50 {
            let attach = Client::connector()
                .with_session(info.clone())
                .connect(&addr);
            match tokio::time::timeout(Duration::from_secs(3), attach).await {
                Ok(Err(zookeeper_client::Error::SessionExpired)) => {
                    closed = true;
                    break;
                }
                // Dropping the last handle sends CloseSession.
                Ok(Ok(thief)) => drop(thief),
                Ok(Err(_)) | Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        proxy.restore();
        assert!(closed, "the session {id} did not end");
    }

    pub struct ZookeeperBackend {
        chroot: String,
        provider: ZookeeperRegistry,
        consumer: ZookeeperRegistry,
        proxy: FaultProxy,
        /// The provider's way to the server, cut while its session is
        /// being expired.
        provider_proxy: FaultProxy,
    }

    impl Backend for ZookeeperBackend {
        type Provider = ZookeeperRegistry;
        type Consumer = ZookeeperRegistry;
        const NAME: &'static str = "zookeeper";

        async fn available() -> Result<(), String> {
            let addr = server();
            let probe = Client::connector()
                .with_session_timeout(Duration::from_secs(4))
                .with_fail_eagerly()
                .connect(&addr);
            match tokio::time::timeout(Duration::from_secs(3), probe).await {
                Ok(Ok(client)) => match client.check_stat("/").await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(format!("zookeeper at {addr}: {e}")),
                },
                Ok(Err(e)) => Err(format!("zookeeper at {addr}: {e}")),
                Err(_) => Err(format!("zookeeper at {addr} did not answer in 3 s")),
            }
        }

        async fn setup() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let chroot = format!(
                "/conformance-{}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            let addr = server();
            let upstream: SocketAddr = addr.parse().unwrap();
            let proxy = FaultProxy::start(upstream).await;
            let provider_proxy = FaultProxy::start(upstream).await;
            let provider =
                ZookeeperRegistry::connect(&config(format!("{}{chroot}", provider_proxy.addr())))
                    .await
                    .unwrap();
            let consumer = ZookeeperRegistry::connect(&config(format!("{}{chroot}", proxy.addr())))
                .await
                .unwrap();
            Self {
                chroot,
                provider,
                consumer,
                proxy,
                provider_proxy,
            }
        }

        fn provider(&self) -> ZookeeperRegistry {
            self.provider.clone()
        }

        fn consumer(&self) -> ZookeeperRegistry {
            self.consumer.clone()
        }

        /// The negotiated session timeout, plus the server's reaping
        /// granularity: it checks expiries once per tick, and a tick is at
        /// most half the session timeout (the minimum is two ticks).
        fn ttl(&self) -> Duration {
            let t = self.provider.session_timeout();
            t + t / 2
        }

        fn propagation(&self) -> Duration {
            Duration::from_millis(300)
        }

        fn child_env(&self) -> Result<Vec<(String, String)>, Unsupported> {
            Ok(vec![
                (SERVER_VAR.into(), server()),
                (CHROOT_VAR.into(), self.chroot.clone()),
            ])
        }

        async fn provider_from_env() -> ZookeeperRegistry {
            let chroot = std::env::var(CHROOT_VAR).unwrap();
            ZookeeperRegistry::connect(&config(format!("{}{chroot}", server())))
                .await
                .unwrap()
        }

        async fn lose_registration(&self, meta: &ServiceMetaInfo) -> Result<(), Unsupported> {
            let session = self.provider.session().expect("a session is open").id();
            let admin = Client::connect(&format!("{}{}", server(), self.chroot))
                .await
                .unwrap();
            let (_, stat) = admin
                .get_data(&self.provider.instance_path(meta))
                .await
                .unwrap();
            assert_eq!(
                stat.ephemeral_owner, session.0,
                "instances are ephemeral nodes of the provider's session"
            );
            expire_session(&self.provider, &self.provider_proxy).await;
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

    conformance_suite!(ZookeeperBackend);
}
