//! Consul behaviour beyond the conformance suite, on private dev agents
//! this test starts and kills itself (the `consul` binary installed by
//! `scripts/registry-servers.sh`): an agent restart that forgets every
//! service, a provider whose heartbeats stop (hidden by the passing filter
//! while Consul still lists it as critical), HTTPS with client certificates.

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[cfg(feature = "consul")]
#[macro_use]
#[allow(unused_macros)]
mod conformance;
#[cfg(feature = "consul")]
mod consul_support;

feature_stub!(
    consul_tests_need_the_consul_feature,
    "consul",
    "real-server tests"
);

#[cfg(feature = "consul")]
mod private_consul {
    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use rpc_core::config::{Addresses, TlsConfig};
    use rpc_core::{
        Discover, RegistrationState, Registry, RegistryConfig, RegistryErrorKind, RegistryKind,
        ServiceMetaInfo,
    };
    use rpc_registry::{AnyRegistry, ConsulRegistry, ServiceCache};

    use crate::common::ports::free_port;
    use crate::conformance::private::{TestCerts, binary_or_skip, certs_or_skip};
    use crate::conformance::proxy::FaultProxy;
    use crate::consul_support;

    const WAIT: Duration = Duration::from_secs(20);
    const TTL: Duration = Duration::from_secs(2);

    /// `consul` on the PATH, or a skip (a failure under RPC_REQUIRE_SERVERS=1).
    fn consul_binary(test: &str) -> bool {
        binary_or_skip("consul", test, "consul", "version")
    }

    /// One dev agent on loopback with ports of its own, killed on drop.
    struct Agent {
        child: Child,
        http: u16,
        ports: [u16; 3],
        https: Option<u16>,
    }

    impl Agent {
        fn start(http: u16, ports: [u16; 3], tls: Option<(&TestCerts, u16)>) -> Self {
            Self::start_with(http, ports, tls, None)
        }

        /// `start`, with extra agent configuration (HCL).
        fn start_with(
            http: u16,
            ports: [u16; 3],
            tls: Option<(&TestCerts, u16)>,
            hcl: Option<&str>,
        ) -> Self {
            let mut cmd = Command::new("consul");
            cmd.args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-http-port", &http.to_string()])
            .args(["-server-port", &ports[0].to_string()])
            .args(["-serf-lan-port", &ports[1].to_string()])
            .args(["-serf-wan-port", &ports[2].to_string()])
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(["-hcl", "disable_update_check = true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            if let Some(hcl) = hcl {
                cmd.args(["-hcl", hcl]);
            }
            if let Some((t, port)) = tls {
                cmd.args([
                    "-hcl",
                    &format!(
                        "ports {{ https = {port} }}\nverify_incoming_https = true\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
                        t.ca.display(),
                        t.server_cert.display(),
                        t.server_key.display()
                    ),
                ]);
            }
            Self {
                child: cmd.spawn().unwrap(),
                http,
                ports,
                https: tls.map(|(_, p)| p),
            }
        }

        fn http_addr(&self) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], self.http))
        }

        fn address(&self) -> String {
            format!("http://{}", self.http_addr())
        }

        /// Waits (bounded) until the agent has elected itself leader.
        async fn ready(&mut self) {
            assert!(
                self.try_ready().await,
                "the consul agent exited during start-up"
            );
        }

        /// Like `ready`, but `false` if the agent exited instead.
        async fn try_ready(&mut self) -> bool {
            let deadline = Instant::now() + WAIT;
            loop {
                if consul_support::leader(self.http_addr()).await.is_ok() {
                    return true;
                }
                if self.child.try_wait().unwrap().is_some() {
                    return false;
                }
                assert!(Instant::now() < deadline, "consul did not become ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// A ready agent on fresh ports. Free ports are found by binding and
        /// releasing them, so a test running in parallel can take one before
        /// the agent does (and serf also needs the UDP side): an agent that
        /// exits during start-up is started again on other ports.
        async fn launch(tls: Option<&TestCerts>) -> Self {
            Self::launch_with(tls, None).await
        }

        /// `launch`, with extra agent configuration (HCL).
        async fn launch_with(tls: Option<&TestCerts>, hcl: Option<&str>) -> Self {
            for _ in 0..3 {
                let mut agent = Self::start_with(
                    free_port(),
                    [free_port(), free_port(), free_port()],
                    tls.map(|t| (t, free_port())),
                    hcl,
                );
                if agent.try_ready().await {
                    return agent;
                }
                agent.kill();
            }
            panic!("the consul agent exited during start-up three times (ports taken?)");
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn config(address: String) -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Consul,
            address: Addresses(vec![address]),
            ttl_secs: TTL.as_secs(),
            timeout_ms: 1_000,
            ..RegistryConfig::default()
        }
    }

    fn meta(port: u16) -> ServiceMetaInfo {
        ServiceMetaInfo::new("Consul.Private", "1.0", "127.0.0.1", port)
    }

    async fn registered_again(state: &mut tokio::sync::watch::Receiver<RegistrationState>) {
        tokio::time::timeout(
            WAIT,
            state.wait_for(
                |s| matches!(s, RegistrationState::Registered { generation } if *generation >= 1),
            ),
        )
        .await
        .expect("the provider did not re-register")
        .unwrap();
    }

    #[tokio::test]
    async fn an_agent_restart_gets_every_registration_back() {
        if !consul_binary("restart") {
            return;
        }
        let mut agent = Agent::launch(None).await;
        let cfg = config(agent.address());
        let provider = ConsulRegistry::connect(&cfg).await.unwrap();
        let consumer = ConsulRegistry::connect(&cfg).await.unwrap();
        let (a, b) = (meta(9001), meta(9002));
        let ra = provider.register(a.clone()).await.unwrap();
        let rb = provider.register(b.clone()).await.unwrap();
        let cache = ServiceCache::new(consumer);
        let handle = cache.service("Consul.Private:1.0").await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.len() == 2))
            .await
            .unwrap();

        // A dev agent keeps everything in memory: a restart forgets every
        // service, and the index starts over.
        agent.kill();
        let restarted = Instant::now();
        let mut agent = Agent::start(agent.http, agent.ports, None);
        agent.ready().await;
        registered_again(&mut ra.state()).await;
        registered_again(&mut rb.state()).await;
        let fresh = ConsulRegistry::connect(&cfg).await.unwrap();
        assert_eq!(
            fresh.discover("Consul.Private:1.0").await.unwrap(),
            vec![a, b]
        );
        // The consumer's watch resynchronised with the new agent.
        tokio::time::timeout(WAIT, handle.wait_until(|l, h| h && l.len() == 2))
            .await
            .unwrap();
        println!(
            "[consul] agent restart -> re-registered and rediscovered in {:?}",
            restarted.elapsed()
        );
    }

    #[tokio::test]
    async fn a_provider_whose_heartbeats_stop_is_hidden_within_the_ttl() {
        if !consul_binary("heartbeats") {
            return;
        }
        let agent = Agent::launch(None).await;
        let proxy = FaultProxy::start(agent.http_addr()).await;
        let provider = ConsulRegistry::connect(&config(format!("http://{}", proxy.addr())))
            .await
            .unwrap();
        let consumer = ConsulRegistry::connect(&config(agent.address()))
            .await
            .unwrap();
        let m = meta(9100);
        let reg = provider.register(m.clone()).await.unwrap();
        let cache = ServiceCache::new(consumer.clone());
        let handle = cache.service("Consul.Private:1.0").await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.contains(&m)))
            .await
            .unwrap();

        // The provider lives on but cannot reach its agent: no check passes.
        proxy.cut();
        let cut = Instant::now();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.is_empty()))
            .await
            .expect("the instance stayed visible");
        let took = cut.elapsed();
        assert!(
            took <= TTL + Duration::from_millis(1_500),
            "hidden after {took:?}, TTL {TTL:?}"
        );
        assert!(
            consumer
                .discover("Consul.Private:1.0")
                .await
                .unwrap()
                .is_empty()
        );
        // Consul still lists it, critical: only the passing filter hides it.
        let states = consul_support::health_states(
            agent.http_addr(),
            &consumer.consul_name(&m.service_key()),
        )
        .await;
        assert_eq!(
            states,
            vec![(consumer.instance_id(&m), "critical".to_owned())]
        );
        println!("[consul] heartbeats stopped -> hidden from discovery in {took:?} (ttl {TTL:?})");

        // Heartbeats resume: passing again, without a re-registration.
        proxy.restore();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.contains(&m)))
            .await
            .expect("the instance did not come back");
        assert_eq!(
            *reg.state().borrow(),
            RegistrationState::Registered { generation: 0 }
        );
    }

    /// Issue 14: after a registry outage, many consumers' watches come back
    /// spread out rather than in lockstep (jittered backoff). Without
    /// jitter they all fail at the same instant, pause the same
    /// 100, 200, 400 ms, and return within a few ms of each other.
    #[tokio::test]
    async fn watchers_reconnect_spread_out_after_an_outage() {
        if !consul_binary("jitter") {
            return;
        }
        const N: usize = 16;
        const WINDOW: Duration = Duration::from_millis(20);
        let agent = Agent::launch(None).await;
        let proxy = FaultProxy::start(agent.http_addr()).await;
        let cfg = config(format!("http://{}", proxy.addr()));
        let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(N);
        let mut watchers = tokio::task::JoinSet::new();
        for _ in 0..N {
            let consumer = ConsulRegistry::connect(&cfg).await.unwrap();
            let mut watch = consumer.watch("Consul.Jitter:1.0").await.unwrap();
            let first = first_tx.clone();
            watchers.spawn(async move {
                let _consumer = consumer;
                let mut told = false;
                while watch.next().await.is_some() {
                    if !std::mem::replace(&mut told, true) {
                        let _ = first.send(()).await;
                    }
                }
            });
        }
        for _ in 0..N {
            tokio::time::timeout(WAIT, first_rx.recv())
                .await
                .expect("a watcher got no first answer")
                .unwrap();
        }

        // The outage: every connection dropped and new ones refused until
        // the watchers have failed about three times each.
        proxy.cut();
        proxy
            .wait_seen(WAIT, |s| s.refused >= 3 * N)
            .await
            .expect("the watchers did not try again while the registry was down");
        let restored = Instant::now();
        proxy.restore();
        let seen = proxy
            .wait_seen(WAIT, |s| {
                s.accepted.iter().filter(|t| **t >= restored).count() >= N
            })
            .await
            .expect("the watchers did not come back");
        let mut back: Vec<Duration> = seen
            .accepted
            .iter()
            .filter(|t| **t >= restored)
            .map(|t| *t - restored)
            .take(N)
            .collect();
        back.sort();
        let spread = back[N - 1] - back[0];
        let crowd = (0..N)
            .map(|i| {
                back[i..]
                    .iter()
                    .take_while(|t| **t - back[i] <= WINDOW)
                    .count()
            })
            .max()
            .unwrap_or(0);
        println!(
            "[consul] {N} watchers came back over {spread:?} after the outage; at most {crowd} within {WINDOW:?}"
        );
        assert!(
            crowd <= N / 2,
            "{crowd} of {N} watchers reconnected within {WINDOW:?}: {back:?}"
        );
        assert!(
            spread >= Duration::from_millis(100),
            "spread only {spread:?}: {back:?}"
        );
    }

    /// Runs the `consul` CLI against `agent` with `token`; its stdout, or
    /// `Err` with its output.
    fn consul_cli(agent: &Agent, token: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new("consul")
            .args(args)
            .args(["-http-addr", &agent.address(), "-token", token])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Issue 14: Consul with ACLs on (default deny). A token with a policy
    /// that may write services registers, keeps its TTL check passing and
    /// discovers; a token Consul does not know is `Unauthenticated` ("ACL
    /// not found") for registering and discovering; no token at all is
    /// `PermissionDenied` for registering. (Consul 1.8 answers reads
    /// without a token with the list filtered by the ACLs, not an error:
    /// discovery then finds nothing, which is all it may see.)
    #[tokio::test]
    async fn acl_tokens_good_unknown_and_missing() {
        if !consul_binary("acl") {
            return;
        }
        const ROOT: &str = "2b5a3a64-5d3c-4c4b-9d55-0c6c8d6c0001";
        const GOOD: &str = "2b5a3a64-5d3c-4c4b-9d55-0c6c8d6c0002";
        const UNKNOWN: &str = "2b5a3a64-5d3c-4c4b-9d55-0c6c8d6c0003";
        let hcl = format!(
            "acl {{ enabled = true\n default_policy = \"deny\"\n tokens {{ master = \"{ROOT}\" }} }}"
        );
        let agent = Agent::launch_with(None, Some(&hcl)).await;
        // The ACL system comes up just after the leader: poll (bounded).
        let rules = r#"service_prefix "" { policy = "write" } node_prefix "" { policy = "read" }"#;
        let deadline = Instant::now() + WAIT;
        while let Err(e) = consul_cli(
            &agent,
            ROOT,
            &["acl", "policy", "create", "-name", "rpc", "-rules", rules],
        ) {
            assert!(
                Instant::now() < deadline,
                "cannot create the ACL policy: {e}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        consul_cli(
            &agent,
            ROOT,
            &[
                "acl",
                "token",
                "create",
                "-policy-name",
                "rpc",
                "-secret",
                GOOD,
            ],
        )
        .expect("cannot create the token");
        let with_token = |token: Option<&str>| RegistryConfig {
            token: token.map(str::to_owned),
            ..config(agent.address())
        };

        // The good token: register, heartbeat, discover, watch.
        let good = ConsulRegistry::connect(&with_token(Some(GOOD)))
            .await
            .unwrap();
        let m = meta(9400);
        let reg = good.register(m.clone()).await.unwrap();
        let cache = ServiceCache::new(good.clone());
        let handle = cache.service("Consul.Private:1.0").await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.contains(&m)))
            .await
            .expect("the instance never passed its check under the ACL token");

        // A token Consul does not know.
        let unknown = ConsulRegistry::connect(&with_token(Some(UNKNOWN)))
            .await
            .unwrap();
        let e = unknown.register(meta(9401)).await.unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::Unauthenticated, "{e}");
        let e = unknown.discover("Consul.Private:1.0").await.unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::Unauthenticated, "{e}");
        assert!(e.to_string().contains("ACL not found"), "{e}");
        assert!(!e.is_transient());

        // No token: the anonymous token may not write.
        let anonymous = ConsulRegistry::connect(&with_token(None)).await.unwrap();
        let e = anonymous.register(meta(9402)).await.unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::PermissionDenied, "{e}");
        assert!(
            anonymous
                .discover("Consul.Private:1.0")
                .await
                .unwrap()
                .is_empty()
        );
        println!("[consul] ACLs: good token served; unknown token and no token refused: {e}");

        reg.deregister().await.unwrap();
        assert!(
            good.discover("Consul.Private:1.0")
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn shutdown_deregisters_everything_and_configuration_errors_are_clear() {
        if !consul_binary("shutdown") {
            return;
        }
        let agent = Agent::launch(None).await;
        let cfg = config(agent.address());
        let registry = AnyRegistry::from_config(&cfg).await.unwrap();
        assert_eq!(registry.kind(), RegistryKind::Consul);
        let r1 = registry.register(meta(9301)).await.unwrap();
        let _r2 = registry.register(meta(9302)).await.unwrap();
        assert_eq!(
            registry.discover("Consul.Private:1.0").await.unwrap().len(),
            2
        );
        registry.shutdown().await;
        assert_eq!(*r1.state().borrow(), RegistrationState::Deregistered);
        assert!(
            consul_support::health_states(agent.http_addr(), "consul-private-1-0")
                .await
                .is_empty(),
            "shutdown left services on the agent"
        );

        let mut two = cfg.clone();
        two.address = Addresses(vec![agent.address(), agent.address()]);
        let err = ConsulRegistry::connect(&two).await.unwrap_err();
        assert!(err.to_string().contains("one Consul agent"), "{err}");
        assert!(err.to_string().contains("`registry.address`"), "{err}");
        assert_eq!(err.kind(), RegistryErrorKind::InvalidConfig);
        // A datacenter Consul does not know: a setting to fix, not an outage.
        let nowhere = RegistryConfig {
            datacenter: Some("nowhere".into()),
            ..cfg.clone()
        };
        let err = ConsulRegistry::connect(&nowhere)
            .await
            .unwrap()
            .discover("Consul.Private:1.0")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RegistryErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("registry.datacenter"), "{err}");
        let gone = config(format!("http://127.0.0.1:{}", free_port()));
        let err = ConsulRegistry::connect(&gone).await.unwrap_err();
        assert!(err.to_string().contains("does not answer"), "{err}");
        assert_eq!(err.kind(), RegistryErrorKind::Unavailable);
    }

    #[tokio::test]
    async fn https_with_a_client_certificate() {
        if !consul_binary("tls") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let Some(tls) = certs_or_skip("consul", "tls", tmp.path()) else {
            return;
        };
        let agent = Agent::launch(Some(&tls)).await;
        let Some(https) = agent.https else {
            unreachable!("started with TLS")
        };
        let mut cfg = config(format!("https://127.0.0.1:{https}"));
        cfg.tls = Some(TlsConfig {
            ca_file: Some(tls.ca.clone()),
            cert_file: Some(tls.client_cert.clone()),
            key_file: Some(tls.client_key.clone()),
            domain: Some("localhost".into()),
        });
        let registry = ConsulRegistry::connect(&cfg).await.unwrap();
        let m = meta(9200);
        let reg = registry.register(m.clone()).await.unwrap();
        assert_eq!(
            registry.discover("Consul.Private:1.0").await.unwrap(),
            vec![m]
        );
        // Heartbeats go over HTTPS too: still passing after two TTLs.
        tokio::time::sleep(TTL * 2).await;
        assert_eq!(
            registry.discover("Consul.Private:1.0").await.unwrap().len(),
            1
        );
        reg.deregister().await.unwrap();

        // Without a client certificate the agent refuses us: an error, not a hang.
        let mut no_cert = cfg.clone();
        no_cert.tls = Some(TlsConfig {
            ca_file: Some(tls.ca.clone()),
            domain: Some("localhost".into()),
            ..TlsConfig::default()
        });
        let outcome = tokio::time::timeout(WAIT, ConsulRegistry::connect(&no_cert))
            .await
            .expect("hung");
        assert!(
            outcome.is_err(),
            "a client without a certificate was served"
        );

        // A missing file names the key.
        let mut missing = cfg.clone();
        if let Some(t) = missing.tls.as_mut() {
            t.ca_file = Some("/nonexistent/ca.pem".into());
        }
        let err = ConsulRegistry::connect(&missing).await.unwrap_err();
        assert!(err.to_string().contains("registry.tls.ca_file"), "{err}");
    }
}
