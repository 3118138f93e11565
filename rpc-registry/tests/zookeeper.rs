//! ZooKeeper behaviour beyond the conformance suite: a forced session expiry,
//! a disconnect shorter than the session timeout, a stale node left by
//! another session, digest auth, shutdown, namespace and chroot placement
//! (on the server the test command starts, 127.0.0.1:2181 or
//! `RPC_TEST_ZOOKEEPER`), and a server restarted with an empty data dir (on a
//! private ZooKeeper process this test starts and kills itself).

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[cfg(feature = "zookeeper")]
#[macro_use]
#[allow(unused_macros)]
mod conformance;

feature_stub!(
    zookeeper_tests_need_the_zookeeper_feature,
    "zookeeper",
    "real-server tests"
);

#[cfg(feature = "zookeeper")]
mod zookeeper {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use rpc_core::config::{Addresses, TlsConfig};
    use rpc_core::{
        Discover, RegistrationState, Registry, RegistryConfig, RegistryKind, ServiceMetaInfo,
        Watch, WatchEvent,
    };
    use rpc_registry::{AnyRegistry, ServiceCache, ZookeeperRegistry};
    use zookeeper_client::{Acls, Client, CreateMode};

    use crate::common::ports::free_port;
    use crate::conformance::private::{TestCerts, certs_or_skip, found_or_skip};
    use crate::conformance::proxy::FaultProxy;
    use crate::conformance::servers_required;

    const WAIT: Duration = Duration::from_secs(20);
    const SERVICE: &str = "Zk.Extra:1.0";

    fn server() -> String {
        std::env::var("RPC_TEST_ZOOKEEPER").unwrap_or_else(|_| "127.0.0.1:2181".into())
    }

    /// The shared server, or a skip (a failure under RPC_REQUIRE_SERVERS=1).
    async fn shared_server(test: &str) -> bool {
        let addr = server();
        let probe = Client::connector().with_fail_eagerly().connect(&addr);
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(3), probe).await,
            Ok(Ok(_))
        );
        if !up {
            assert!(
                !servers_required(),
                "RPC_REQUIRE_SERVERS=1 but no ZooKeeper at {addr}"
            );
            skip_note!(
                "SKIP [zookeeper] {test}: no server at {addr} (scripts/registry-servers.sh up zookeeper)"
            );
        }
        up
    }

    fn unique_chroot() -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        format!(
            "/zk-test-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )
    }

    fn config(address: String, ttl_secs: u64) -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Zookeeper,
            address: Addresses(vec![address]),
            ttl_secs,
            timeout_ms: 2_000,
            ..RegistryConfig::default()
        }
    }

    fn meta(port: u16) -> ServiceMetaInfo {
        ServiceMetaInfo::new("Zk.Extra", "1.0", "127.0.0.1", port)
    }

    async fn admin(chroot: &str) -> Client {
        Client::connect(&format!("{}{chroot}", server()))
            .await
            .unwrap()
    }

    /// Ends the session of `registry`, which reaches the server through
    /// `proxy`: cut it off (so its own reconnection cannot win the session
    /// back), attach a second client to the session and close it, until the
    /// server reports the session expired; then let it reconnect.
    async fn expire_session(registry: &ZookeeperRegistry, proxy: &FaultProxy) {
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

    /// Events until `pred` accepts one (bounded).
    async fn until(
        watch: &mut Watch,
        what: &str,
        mut pred: impl FnMut(&WatchEvent) -> bool,
    ) -> Vec<WatchEvent> {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(WAIT, async {
            while let Some(e) = watch.next().await {
                let hit = pred(&e);
                seen.push(e);
                if hit {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(matches!(found, Ok(true)), "no {what}; saw {seen:?}");
        seen
    }

    fn keys(list: &[ServiceMetaInfo]) -> Vec<String> {
        let mut k: Vec<_> = list.iter().map(ServiceMetaInfo::node_key).collect();
        k.sort();
        k
    }

    #[tokio::test]
    async fn a_forced_session_expiry_re_registers_every_node_and_re_arms_watches() {
        if !shared_server("expiry").await {
            return;
        }
        let chroot = unique_chroot();
        let upstream: SocketAddr = server().parse().unwrap();
        let proxy = FaultProxy::start(upstream).await;
        let provider = ZookeeperRegistry::connect(&config(format!("{}{chroot}", proxy.addr()), 2))
            .await
            .unwrap();
        let consumer = ZookeeperRegistry::connect(&config(format!("{}{chroot}", server()), 2))
            .await
            .unwrap();
        let (a, b) = (meta(9101), meta(9102));
        let ra = provider.register(a.clone()).await.unwrap();
        let rb = provider.register(b.clone()).await.unwrap();
        let cache = ServiceCache::new(consumer);
        let handle = cache.service(SERVICE).await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 2))
            .await
            .unwrap();
        // A watch on the provider's own registry rides on the expiring session.
        let mut own = provider.watch(SERVICE).await.unwrap();
        until(&mut own, "first snapshot", |e| {
            matches!(e, WatchEvent::Snapshot(_))
        })
        .await;

        let old = provider.session().unwrap().id();
        expire_session(&provider, &proxy).await;
        for r in [&ra, &rb] {
            let mut state = r.state();
            tokio::time::timeout(
                WAIT,
                state.wait_for(|s| {
                    matches!(s, RegistrationState::Registered { generation } if *generation >= 1)
                }),
            )
            .await
            .expect("the provider did not re-register")
            .unwrap();
        }
        let new = provider.session().unwrap().id();
        assert_ne!(new, old);
        let admin = admin(&chroot).await;
        for m in [&a, &b] {
            let (data, stat) = admin.get_data(&provider.instance_path(m)).await.unwrap();
            assert_eq!(stat.ephemeral_owner, new.0, "owned by the new session");
            assert_eq!(ServiceMetaInfo::from_json(&data).unwrap(), *m);
        }
        // The provider-side watch resynchronised in the new session...
        let seen = until(
            &mut own,
            "a snapshot after the expiry",
            |e| matches!(e, WatchEvent::Snapshot(l) if l.len() == 2),
        )
        .await;
        assert!(
            seen.contains(&WatchEvent::Connected(false)),
            "the outage was reported: {seen:?}"
        );
        // ...and is armed there: a new instance shows up as an upsert.
        let c = meta(9103);
        let _rc = provider.register(c.clone()).await.unwrap();
        until(&mut own, "the new instance", |e| {
            *e == WatchEvent::Upsert(c.clone())
        })
        .await;
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 3))
            .await
            .expect("the consumer cache did not catch up");
    }

    #[tokio::test]
    async fn a_disconnect_within_the_session_timeout_keeps_the_session_and_the_nodes() {
        if !shared_server("short disconnect").await {
            return;
        }
        let chroot = unique_chroot();
        let upstream: SocketAddr = server().parse().unwrap();
        let proxy = FaultProxy::start(upstream).await;
        // 4 s session; the cut lasts 1 s.
        let provider = ZookeeperRegistry::connect(&config(format!("{}{chroot}", proxy.addr()), 4))
            .await
            .unwrap();
        let other = ZookeeperRegistry::connect(&config(format!("{}{chroot}", server()), 4))
            .await
            .unwrap();
        let a = meta(9201);
        let ra = provider.register(a.clone()).await.unwrap();
        let session = provider.session().unwrap().id();
        let admin = admin(&chroot).await;
        let (_, before) = admin.get_data(&provider.instance_path(&a)).await.unwrap();
        let mut own = provider.watch(SERVICE).await.unwrap();
        until(&mut own, "first snapshot", |e| {
            matches!(e, WatchEvent::Snapshot(_))
        })
        .await;

        proxy.cut();
        until(&mut own, "the disconnect", |e| {
            *e == WatchEvent::Connected(false)
        })
        .await;
        // A change the provider cannot see while cut off.
        let b = meta(9202);
        let _rb = other.register(b.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.restore();

        // Back in the same session: the missed change arrives as a snapshot.
        let seen = until(&mut own, "the reconnection", |e| {
            *e == WatchEvent::Connected(true)
        })
        .await;
        let snapshot = seen.iter().rev().find_map(|e| match e {
            WatchEvent::Snapshot(l) => Some(keys(l)),
            _ => None,
        });
        assert_eq!(snapshot, Some(keys(&[a.clone(), b.clone()])), "{seen:?}");
        assert_eq!(provider.session().unwrap().id(), session, "same session");
        assert_eq!(
            *ra.state().borrow(),
            RegistrationState::Registered { generation: 0 },
            "a disconnect is not a re-registration"
        );
        let (_, after) = admin.get_data(&provider.instance_path(&a)).await.unwrap();
        assert_eq!(after.czxid, before.czxid, "the very same node");
        assert_eq!(after.ephemeral_owner, session.0);
        // Watching goes on after the reconnection.
        other.shutdown().await;
        until(&mut own, "the removal", |e| {
            *e == WatchEvent::Remove(b.node_key())
        })
        .await;
    }

    #[tokio::test]
    async fn a_node_left_by_another_session_is_replaced_not_adopted() {
        if !shared_server("stale node").await {
            return;
        }
        let chroot = unique_chroot();
        let provider = ZookeeperRegistry::connect(&config(format!("{}{chroot}", server()), 2))
            .await
            .unwrap();
        let a = meta(9301);
        let path = provider.instance_path(&a);
        // A previous process's node whose session has not expired yet.
        let stale = admin(&chroot).await;
        stale
            .mkdir(
                path.rsplit_once('/').unwrap().0,
                &CreateMode::Persistent.with_acls(Acls::anyone_all()),
            )
            .await
            .unwrap();
        stale
            .create(
                &path,
                b"{\"stale\":true}",
                &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
            )
            .await
            .unwrap();
        let _ra = provider.register(a.clone()).await.unwrap();
        let admin = admin(&chroot).await;
        let (data, stat) = admin.get_data(&path).await.unwrap();
        let own = provider.session().unwrap().id().0;
        assert_eq!(stat.ephemeral_owner, own);
        assert_eq!(ServiceMetaInfo::from_json(&data).unwrap(), a);
        // The old session ends: the node, now ours, stays.
        drop(stale);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(provider.discover(SERVICE).await.unwrap(), vec![a]);
    }

    /// TLS settings ZooKeeper cannot honour, and a password without a
    /// user, are configuration errors naming the key. No server needed.
    #[tokio::test]
    async fn tls_settings_and_a_lone_password_are_checked() {
        let mut cfg = config("127.0.0.1:1".into(), 2);
        cfg.tls = Some(TlsConfig::default());
        let err = ZookeeperRegistry::connect(&cfg).await.unwrap_err();
        assert_eq!(
            err.kind(),
            rpc_core::RegistryErrorKind::InvalidConfig,
            "{err}"
        );
        assert!(err.to_string().contains("`registry.tls.ca_file`"), "{err}");
        cfg.tls = Some(TlsConfig {
            ca_file: Some("ca.pem".into()),
            domain: Some("zk.local".into()),
            ..TlsConfig::default()
        });
        let err = ZookeeperRegistry::connect(&cfg).await.unwrap_err();
        assert!(err.to_string().contains("`registry.tls.domain`"), "{err}");
        let mut cfg = config("127.0.0.1:1".into(), 2);
        cfg.password = Some("secret".into());
        let err = ZookeeperRegistry::connect(&cfg).await.unwrap_err();
        assert_eq!(
            err.kind(),
            rpc_core::RegistryErrorKind::InvalidConfig,
            "{err}"
        );
        assert!(err.to_string().contains("registry.password"), "{err}");
    }

    #[tokio::test]
    async fn shutdown_removes_the_nodes_at_once_and_namespace_and_chroot_place_them() {
        if !shared_server("shutdown").await {
            return;
        }
        let chroot = unique_chroot();
        let mut cfg = config(format!("{}{chroot}", server()), 30);
        cfg.namespace = Some("team-a".into());
        let registry = AnyRegistry::from_config(&cfg).await.unwrap();
        assert_eq!(registry.kind(), RegistryKind::Zookeeper);
        let a = meta(9401);
        let ra = registry.register(a.clone()).await.unwrap();
        let root = Client::connect(&server()).await.unwrap();
        let path = format!("{chroot}/team-a/rpc/{SERVICE}/127.0.0.1:9401");
        let (data, stat) = root.get_data(&path).await.unwrap();
        assert_eq!(ServiceMetaInfo::from_json(&data).unwrap(), a);
        assert_ne!(stat.ephemeral_owner, 0, "an ephemeral node");

        let started = Instant::now();
        registry.shutdown().await;
        assert_eq!(*ra.state().borrow(), RegistrationState::Deregistered);
        assert_eq!(root.check_stat(&path).await.unwrap(), None);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not waiting for the 30 s session timeout"
        );
        assert!(registry.register(meta(9402)).await.is_err());
        drop(ra);
    }

    #[tokio::test]
    async fn digest_auth_keeps_the_nodes_to_the_same_credentials() {
        if !shared_server("digest auth").await {
            return;
        }
        let chroot = unique_chroot();
        let addr = format!("{}{chroot}", server());
        let with_auth = |user: &str| {
            let mut c = config(addr.clone(), 2);
            c.username = Some(user.into());
            c.password = Some("s3cret".into());
            c
        };
        let provider = ZookeeperRegistry::connect(&with_auth("rpc")).await.unwrap();
        let a = meta(9501);
        let _ra = provider.register(a.clone()).await.unwrap();
        let same = ZookeeperRegistry::connect(&with_auth("rpc")).await.unwrap();
        assert_eq!(same.discover(SERVICE).await.unwrap(), vec![a]);
        let anonymous = ZookeeperRegistry::connect(&config(addr.clone(), 2))
            .await
            .unwrap();
        let denied = anonymous.discover(SERVICE).await;
        assert!(denied.is_err(), "read without credentials: {denied:?}");
        let stranger = ZookeeperRegistry::connect(&with_auth("other"))
            .await
            .unwrap();
        assert!(stranger.discover(SERVICE).await.is_err());
        let mut half = config(addr, 2);
        half.username = Some("rpc".into());
        assert!(ZookeeperRegistry::connect(&half).await.is_err());
    }

    // ------------------------------------------------ private server

    const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
    const CLASSPATH: &str = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-nop.jar";
    /// Netty, for ZooKeeper's TLS port (Debian's `libnetty-java`, which the
    /// `zookeeper` package depends on; its `netty-all.jar` only points at
    /// these).
    const NETTY_JARS: &[&str] = &[
        "netty-buffer",
        "netty-codec",
        "netty-common",
        "netty-handler",
        "netty-resolver",
        "netty-transport",
        "netty-transport-native-unix-common",
    ];

    fn netty_classpath() -> Option<String> {
        let jars: Vec<String> = NETTY_JARS
            .iter()
            .map(|j| format!("/usr/share/java/{j}.jar"))
            .collect();
        jars.iter()
            .all(|j| Path::new(j).exists())
            .then(|| jars.join(":"))
    }

    /// Java and Debian's ZooKeeper jar, or a skip (a failure under
    /// RPC_REQUIRE_SERVERS=1).
    fn zookeeper_installed(test: &str) -> bool {
        let found = Path::new(ZK_JAR).exists()
            && Command::new("java")
                .arg("-version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        found_or_skip(found, "zookeeper", test, &format!("no java or no {ZK_JAR}"))
    }

    /// A standalone ZooKeeper on loopback, killed on drop.
    struct PrivateZk {
        child: Child,
    }

    impl PrivateZk {
        /// With TLS only, on `port` (Netty; Debian's netty jars): the server
        /// presents `certs.server_cert` and requires a client certificate
        /// signed by `certs.ca` (ZooKeeper's default `ssl.clientAuth=need`).
        fn start_tls(dir: &Path, port: u16, certs: &TestCerts, netty: &str) -> Self {
            let data = dir.join("data");
            std::fs::create_dir_all(&data).unwrap();
            // ZooKeeper's PEM key store: the key and the certificate in one file.
            let bundle = dir.join("server-bundle.pem");
            let mut pem = std::fs::read(&certs.server_key).unwrap();
            pem.extend(std::fs::read(&certs.server_cert).unwrap());
            std::fs::write(&bundle, pem).unwrap();
            let cfg = dir.join("zoo.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "tickTime=500\ndataDir={}\nsecureClientPort={port}\nsecureClientPortAddress=127.0.0.1\n\
                     serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
                     ssl.keyStore.location={}\nssl.keyStore.type=PEM\n\
                     ssl.trustStore.location={}\nssl.trustStore.type=PEM\n\
                     admin.enableServer=false\n",
                    data.display(),
                    bundle.display(),
                    certs.ca.display()
                ),
            )
            .unwrap();
            let child = Command::new("java")
                .args(["-Xmx128m", "-cp", &format!("{CLASSPATH}:{netty}")])
                .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            Self { child }
        }

        fn start(dir: &Path, port: u16) -> Self {
            let data = dir.join("data");
            std::fs::create_dir_all(&data).unwrap();
            let cfg = dir.join("zoo.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                     admin.enableServer=false\n4lw.commands.whitelist=srvr\n",
                    data.display()
                ),
            )
            .unwrap();
            let child = Command::new("java")
                .args(["-Xmx128m", "-cp", CLASSPATH])
                .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            Self { child }
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for PrivateZk {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// Connects once the server answers (an external process: poll with a
    /// bounded deadline).
    async fn connect_when_ready(config: &RegistryConfig) -> ZookeeperRegistry {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = match ZookeeperRegistry::connect(config).await {
                Ok(r) => match r.discover("probe:1").await {
                    Ok(_) => return r,
                    Err(e) => rpc_core::error::report(&e),
                },
                Err(e) => rpc_core::error::report(&e),
            };
            assert!(
                Instant::now() < deadline,
                "zookeeper did not become ready: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Issue 14: ZooKeeper over TLS with client certificates (a private
    /// server with only a secure port). With the CA and a client
    /// certificate the registry registers, discovers and watches; without a
    /// client certificate the server refuses the session, and a plain
    /// connection to the TLS port gets no session either.
    #[tokio::test]
    async fn tls_with_a_client_certificate() {
        if !zookeeper_installed("tls") {
            return;
        }
        let Some(netty) = netty_classpath() else {
            found_or_skip(
                false,
                "zookeeper",
                "tls",
                "no netty jars in /usr/share/java",
            );
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let Some(certs) = certs_or_skip("zookeeper", "tls", tmp.path()) else {
            return;
        };
        let port = free_port();
        let _zk = PrivateZk::start_tls(&tmp.path().join("z"), port, &certs, &netty);
        let tls = |client_cert: bool| {
            let mut cfg = config(format!("127.0.0.1:{port}/tls"), 4);
            cfg.timeout_ms = 2_000;
            cfg.tls = Some(TlsConfig {
                ca_file: Some(certs.ca.clone()),
                cert_file: client_cert.then(|| certs.client_cert.clone()),
                key_file: client_cert.then(|| certs.client_key.clone()),
                ..TlsConfig::default()
            });
            cfg
        };
        let registry = connect_when_ready(&tls(true)).await;
        let m = ServiceMetaInfo::new("Zk.Tls", "1.0", "127.0.0.1", 9600);
        let reg = registry.register(m.clone()).await.unwrap();
        let cache = ServiceCache::new(registry.clone());
        let handle = cache.service("Zk.Tls:1.0").await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.contains(&m)))
            .await
            .unwrap();

        let e = ZookeeperRegistry::connect(&tls(false)).await.unwrap_err();
        println!("[zookeeper] TLS: served with a client certificate; without one: {e}");
        let plain = config(format!("127.0.0.1:{port}/tls"), 4);
        assert!(
            ZookeeperRegistry::connect(&RegistryConfig {
                timeout_ms: 2_000,
                ..plain
            })
            .await
            .is_err()
        );

        reg.deregister().await.unwrap();
        assert!(registry.discover("Zk.Tls:1.0").await.unwrap().is_empty());
        registry.shutdown().await;
    }

    #[tokio::test]
    async fn a_zookeeper_restarted_with_an_empty_data_dir_gets_every_registration_back() {
        if !zookeeper_installed("restart") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut zk = PrivateZk::start(&tmp.path().join("z1"), port);
        let cfg = config(format!("127.0.0.1:{port}/restart"), 2);
        let provider = connect_when_ready(&cfg).await;
        let consumer = connect_when_ready(&cfg).await;
        let (a, b) = (meta(9601), meta(9602));
        let ra = provider.register(a.clone()).await.unwrap();
        let _rb = provider.register(b.clone()).await.unwrap();
        let cache = ServiceCache::new(consumer);
        let handle = cache.service(SERVICE).await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 2))
            .await
            .unwrap();

        // Same port, no data: every session and node is gone.
        zk.kill();
        let _zk = PrivateZk::start(&tmp.path().join("z2"), port);
        let mut state = ra.state();
        tokio::time::timeout(
            WAIT,
            state.wait_for(
                |s| matches!(s, RegistrationState::Registered { generation } if *generation >= 1),
            ),
        )
        .await
        .expect("the provider did not re-register")
        .unwrap();
        let fresh = connect_when_ready(&cfg).await;
        assert_eq!(
            keys(&fresh.discover(SERVICE).await.unwrap()),
            keys(&[a.clone(), b.clone()])
        );
        // The consumer's watch followed into its own new session.
        tokio::time::timeout(
            WAIT,
            handle.wait_until(|l, healthy| healthy && keys(l) == keys(&[a.clone(), b.clone()])),
        )
        .await
        .expect("the consumer cache did not recover");
        let c = meta(9603);
        let _rc = provider.register(c).await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 3))
            .await
            .expect("the consumer's re-armed watch missed a new instance");
    }
}
