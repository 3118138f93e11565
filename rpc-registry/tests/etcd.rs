//! etcd behaviour beyond the conformance suite, on private etcd processes
//! this test starts and kills itself (the `etcd` binary installed by
//! `scripts/registry-servers.sh`): a server reset to an empty data dir, a
//! provider partitioned past its lease TTL, TLS with client certificates.

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[cfg(feature = "etcd")]
#[macro_use]
#[allow(unused_macros)]
mod conformance;

feature_stub!(
    etcd_tests_need_the_etcd_feature,
    "etcd",
    "real-server tests"
);

#[cfg(feature = "etcd")]
mod private_etcd {
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use rpc_core::config::{Addresses, TlsConfig};
    use rpc_core::{
        Discover, RegistrationState, Registry, RegistryConfig, RegistryErrorKind, RegistryKind,
        ServiceMetaInfo,
    };
    use rpc_registry::{EtcdRegistry, ServiceCache};

    use crate::common::ports::free_port;
    use crate::conformance::private::{TestCerts, binary_or_skip, certs_or_skip};
    use crate::conformance::proxy::FaultProxy;

    const WAIT: Duration = Duration::from_secs(20);

    /// `etcd` on the PATH, or a skip (a failure under RPC_REQUIRE_SERVERS=1).
    fn etcd_binary(test: &str) -> bool {
        binary_or_skip("etcd", test, "etcd", "--version")
    }

    /// One etcd member on loopback, killed on drop.
    struct Etcd {
        child: Child,
        client_port: u16,
        peer_port: u16,
        scheme: &'static str,
    }

    impl Etcd {
        fn start(dir: &Path, client_port: u16, peer_port: u16, tls: Option<&TestCerts>) -> Self {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let client = format!("{scheme}://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let mut cmd = Command::new("etcd");
            cmd.args(["--name", "t", "--data-dir"])
                .arg(dir)
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("t={peer}")])
                .args(["--initial-cluster-state", "new"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(t) = tls {
                cmd.arg("--cert-file")
                    .arg(&t.server_cert)
                    .arg("--key-file")
                    .arg(&t.server_key)
                    .arg("--trusted-ca-file")
                    .arg(&t.ca)
                    .arg("--client-cert-auth");
            }
            Self {
                child: cmd.spawn().unwrap(),
                client_port,
                peer_port,
                scheme,
            }
        }

        fn endpoint(&self) -> String {
            format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn config(endpoint: String) -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Etcd,
            address: Addresses(vec![endpoint]),
            ttl_secs: 2,
            timeout_ms: 1_000,
            ..RegistryConfig::default()
        }
    }

    /// Connects once the member answers (an external process: no event to
    /// await, so poll its health with a bounded deadline).
    async fn connect_when_ready(config: &RegistryConfig) -> EtcdRegistry {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = EtcdRegistry::connect(config).await {
                if r.discover("probe:1").await.is_ok() {
                    return r;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `etcdctl` against `endpoint` (as `user`, if given); panics with
    /// its output if it fails.
    fn etcdctl(endpoint: &str, user: Option<&str>, args: &[&str]) {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").args(["--endpoints", endpoint]);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn meta(port: u16) -> ServiceMetaInfo {
        ServiceMetaInfo::new("Etcd.Private", "1.0", "127.0.0.1", port)
    }

    /// Issue 14: etcd with authentication on. A user with read-write rights
    /// on `/rpc/` registers, discovers and watches; a wrong password fails
    /// at connect as `Unauthenticated`; a user without rights on the prefix
    /// gets `PermissionDenied` for registering and discovering. Neither is
    /// an outage (`is_transient` is false), so nothing retries it as one.
    #[tokio::test]
    async fn authentication_with_a_good_user_a_bad_password_and_no_rights() {
        if !etcd_binary("auth") || !binary_or_skip("etcd", "auth", "etcdctl", "version") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(&tmp.path().join("d"), free_port(), free_port(), None);
        let endpoint = etcd.endpoint();
        drop(connect_when_ready(&config(endpoint.clone())).await);
        let ctl = |args: &[&str]| etcdctl(&endpoint, None, args);
        ctl(&["user", "add", "root", "--new-user-password", "rootpw"]);
        ctl(&["user", "grant-role", "root", "root"]);
        ctl(&["role", "add", "rpc"]);
        ctl(&[
            "role",
            "grant-permission",
            "rpc",
            "readwrite",
            "/rpc/",
            "--prefix=true",
        ]);
        ctl(&["user", "add", "rpc", "--new-user-password", "rpcpw"]);
        ctl(&["user", "grant-role", "rpc", "rpc"]);
        ctl(&["user", "add", "nobody", "--new-user-password", "nopw"]);
        ctl(&["auth", "enable"]);
        let as_user = |user: &str, password: &str| RegistryConfig {
            username: Some(user.into()),
            password: Some(password.into()),
            ..config(endpoint.clone())
        };

        // The right user: everything works.
        let good = EtcdRegistry::connect(&as_user("rpc", "rpcpw"))
            .await
            .unwrap();
        let m = meta(9300);
        let reg = good.register(m.clone()).await.unwrap();
        assert_eq!(
            good.discover("Etcd.Private:1.0").await.unwrap(),
            vec![m.clone()]
        );
        let cache = ServiceCache::new(good.clone());
        let handle = cache.service("Etcd.Private:1.0").await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.contains(&m)))
            .await
            .unwrap();

        // A wrong password: refused at connect, as credentials.
        let e = EtcdRegistry::connect(&as_user("rpc", "wrong"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::Unauthenticated, "{e}");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("authentication failed"), "{e}");

        // A user without rights on the prefix: connected, but refused.
        let nobody = EtcdRegistry::connect(&as_user("nobody", "nopw"))
            .await
            .unwrap();
        let e = nobody.register(meta(9301)).await.unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::PermissionDenied, "{e}");
        let e = nobody.discover("Etcd.Private:1.0").await.unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("permission denied"), "{e}");
        println!("[etcd] auth: good user served; bad password and no rights refused: {e}");

        reg.deregister().await.unwrap();
        assert!(good.discover("Etcd.Private:1.0").await.unwrap().is_empty());
    }

    /// With two endpoints and one of them dead, every put and delete still
    /// succeeds: a call the client's balancer routed to the dead one is sent
    /// again. (In a cluster, the member a provider happened to use dies.)
    #[tokio::test]
    async fn registrations_and_deregistrations_survive_a_dead_endpoint() {
        if !etcd_binary("dead endpoint") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(&tmp.path().join("d"), free_port(), free_port(), None);
        let direct = connect_when_ready(&config(etcd.endpoint())).await;
        let upstream = etcd
            .endpoint()
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let proxy = FaultProxy::start(upstream).await;
        let mut cfg = config(etcd.endpoint());
        cfg.address = Addresses(vec![format!("http://{}", proxy.addr()), etcd.endpoint()]);
        let provider = connect_when_ready(&cfg).await;
        let mut regs = Vec::new();
        for port in 9300..9305 {
            regs.push(provider.register(meta(port)).await.unwrap());
        }
        proxy.cut();
        for port in 9305..9310 {
            let r = tokio::time::timeout(WAIT, provider.register(meta(port)))
                .await
                .expect("register hung");
            regs.push(r.unwrap_or_else(|e| panic!("register {port} with one endpoint dead: {e}")));
        }
        for r in regs {
            let port = r.meta().service_port;
            tokio::time::timeout(WAIT, r.deregister())
                .await
                .expect("deregister hung")
                .unwrap_or_else(|e| panic!("deregister {port} with one endpoint dead: {e}"));
        }
        assert_eq!(
            direct.discover("Etcd.Private:1.0").await.unwrap(),
            Vec::new(),
            "a deregistered instance is still listed"
        );
    }

    #[tokio::test]
    async fn an_etcd_reset_to_an_empty_data_dir_gets_every_registration_back() {
        if !etcd_binary("reset") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (cp, pp) = (free_port(), free_port());
        let mut etcd = Etcd::start(&tmp.path().join("d1"), cp, pp, None);
        let cfg = config(etcd.endpoint());
        let provider = connect_when_ready(&cfg).await;
        let consumer = connect_when_ready(&cfg).await;
        let (a, b) = (meta(9001), meta(9002));
        let ra = provider.register(a.clone()).await.unwrap();
        let _rb = provider.register(b.clone()).await.unwrap();
        let cache = ServiceCache::new(consumer);
        let handle = cache.service("Etcd.Private:1.0").await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 2))
            .await
            .unwrap();

        // Same ports, empty data: every key and lease is gone.
        etcd.kill();
        let reset_at = Instant::now();
        let _etcd = Etcd::start(
            &tmp.path().join("d2"),
            etcd.client_port,
            etcd.peer_port,
            None,
        );
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
        let mut found = fresh.discover("Etcd.Private:1.0").await.unwrap();
        found.sort_by_key(ServiceMetaInfo::node_key);
        assert_eq!(found, vec![a.clone(), b.clone()]);
        // The consumer's cache resynchronised with the new history.
        tokio::time::timeout(WAIT, handle.wait_until(|l, h| h && l.len() == 2))
            .await
            .unwrap();
        println!(
            "[etcd] reset to an empty data dir -> re-registered in {:?}",
            reset_at.elapsed()
        );
    }

    #[tokio::test]
    async fn a_provider_partitioned_past_its_ttl_registers_again() {
        if !etcd_binary("partition") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(&tmp.path().join("d"), free_port(), free_port(), None);
        let addr = format!("127.0.0.1:{}", etcd.client_port).parse().unwrap();
        let proxy = FaultProxy::start(addr).await;
        let provider = connect_when_ready(&config(format!("http://{}", proxy.addr()))).await;
        let consumer = connect_when_ready(&config(etcd.endpoint())).await;
        let m = meta(9100);
        let reg = provider.register(m.clone()).await.unwrap();
        let cache = ServiceCache::new(consumer);
        let handle = cache.service("Etcd.Private:1.0").await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.contains(&m)))
            .await
            .unwrap();

        // Partitioned longer than the TTL: etcd expires the lease.
        proxy.cut();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.is_empty()))
            .await
            .expect("the lease did not expire during the partition");
        proxy.restore();
        let mut state = reg.state();
        tokio::time::timeout(
            WAIT,
            state.wait_for(
                |s| matches!(s, RegistrationState::Registered { generation } if *generation >= 1),
            ),
        )
        .await
        .expect("no re-registration after the partition healed")
        .unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.contains(&m)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn tls_with_a_client_certificate() {
        if !etcd_binary("tls") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let Some(tls) = certs_or_skip("etcd", "tls", tmp.path()) else {
            return;
        };
        let etcd = Etcd::start(&tmp.path().join("d"), free_port(), free_port(), Some(&tls));
        let mut cfg = config(etcd.endpoint());
        cfg.tls = Some(TlsConfig {
            ca_file: Some(tls.ca.clone()),
            cert_file: Some(tls.client_cert.clone()),
            key_file: Some(tls.client_key.clone()),
            domain: Some("localhost".into()),
        });
        let registry = connect_when_ready(&cfg).await;
        let m = meta(9200);
        let _r = registry.register(m.clone()).await.unwrap();
        assert_eq!(
            registry.discover("Etcd.Private:1.0").await.unwrap(),
            vec![m]
        );

        // Without a client certificate the server refuses us: an error, not a hang.
        let mut no_cert = cfg.clone();
        no_cert.tls = Some(TlsConfig {
            ca_file: Some(tls.ca),
            ..TlsConfig::default()
        });
        let refused = async {
            let r = EtcdRegistry::connect(&no_cert).await?;
            r.discover("Etcd.Private:1.0").await
        };
        let outcome = tokio::time::timeout(WAIT, refused).await.expect("hung");
        assert!(
            outcome.is_err(),
            "a client without a certificate was served"
        );

        // A missing file names the key.
        let mut missing = cfg.clone();
        if let Some(t) = missing.tls.as_mut() {
            t.ca_file = Some("/nonexistent/ca.pem".into());
        }
        let err = EtcdRegistry::connect(&missing).await.unwrap_err();
        assert!(err.to_string().contains("registry.tls.ca_file"), "{err}");
    }

    /// Issue 12, fault 6: 3,000 instance records of about 2 KB (6.6 MB, over
    /// the gRPC client's 4 MiB receive limit) are discovered, read in pages.
    #[tokio::test]
    async fn a_list_larger_than_one_response_is_read_in_pages() {
        if !etcd_binary("large list") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(&tmp.path().join("d"), free_port(), free_port(), None);
        let cfg = config(etcd.endpoint());
        let reg = connect_when_ready(&cfg).await;
        let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        let pad = "x".repeat(2_000);
        let mut bytes = 0;
        for chunk in 0..30u16 {
            let ops: Vec<etcd_client::TxnOp> = (0..100u16)
                .map(|i| {
                    let mut m =
                        ServiceMetaInfo::new("Big", "1.0", "127.0.0.1", 10_000 + chunk * 100 + i);
                    m.metadata.insert("pad".into(), pad.clone());
                    let json = m.to_json();
                    bytes += json.len();
                    etcd_client::TxnOp::put(reg.instance_key(&m), json, None)
                })
                .collect();
            raw.txn(etcd_client::Txn::new().and_then(ops))
                .await
                .unwrap();
        }
        assert!(bytes > 6_000_000, "{bytes}");
        let list = tokio::time::timeout(WAIT, reg.discover("Big:1.0"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(list.len(), 3_000);
        // A consumer's cache gets the whole list too, and follows changes.
        let cache = ServiceCache::new(reg.clone());
        let handle = tokio::time::timeout(WAIT, cache.service("Big:1.0"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(handle.instances().len(), 3_000);
        let extra = ServiceMetaInfo::new("Big", "1.0", "127.0.0.1", 9_999);
        raw.put(reg.instance_key(&extra), extra.to_json(), None)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 3_001))
            .await
            .unwrap();
    }
}
