//! Nacos behaviour beyond the conformance suite, on private rnacos servers
//! this test starts, kills and restarts itself (the `rnacos` binary that
//! `scripts/registry-servers.sh` installs; override with `RPC_TEST_RNACOS`):
//! a restarted server gets its providers back without any help, and an
//! empty list right after a restart does not wipe a consumer's list until
//! it is confirmed.

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[cfg(feature = "nacos")]
#[macro_use]
#[allow(unused_macros)]
mod conformance;

feature_stub!(
    nacos_tests_need_the_nacos_feature,
    "nacos",
    "real-server tests"
);

#[cfg(feature = "nacos")]
mod private_nacos {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use rpc_core::config::Addresses;
    use rpc_core::{RegistrationState, Registry, RegistryConfig, RegistryKind, ServiceMetaInfo};
    use rpc_registry::{CacheOptions, NacosRegistry, ServiceCache, ServiceHandle};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::process::{Child, Command};

    use crate::common::ports::free_port_with;
    use crate::conformance::private::found_or_skip;
    use crate::conformance::proxy::FaultProxy;

    const WAIT: Duration = Duration::from_secs(30);
    /// The cache's empty-push grace in these tests (the cache's policy is
    /// the only one; Nacos reports breaks and lists, nothing more). Shorter
    /// than the default to keep the test short, and longer than a provider
    /// takes to register again after a restart (about 4 s, measured).
    const GRACE: Duration = Duration::from_secs(10);
    /// How long one rnacos run may take to create its admin user: past
    /// its second and last try (10.5 s after start), with room for a
    /// loaded machine.
    const ADMIN_WAIT: Duration = Duration::from_secs(20);
    const GRPC_OFFSET: u16 = 1000;
    const CONSOLE_OFFSET: u16 = 2000;

    /// The rnacos binary, or a skip (a failure under RPC_REQUIRE_SERVERS=1).
    fn rnacos_binary(test: &str) -> Option<PathBuf> {
        let candidates = std::env::var_os("RPC_TEST_RNACOS")
            .map(PathBuf::from)
            .into_iter()
            .chain(
                std::env::var_os("PATH")
                    .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|d| d.join("rnacos")),
            )
            .chain(
                std::env::var_os("CARGO_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                    .map(|c| c.join("bin").join("rnacos")),
            );
        let found = candidates.into_iter().find(|c| c.is_file());
        found_or_skip(found.is_some(), "nacos", test, "no rnacos binary");
        found
    }

    /// An rnacos process of this test, on loopback, data in a temp dir.
    /// Restarting it keeps the ports and starts from an empty data dir.
    struct PrivateNacos {
        bin: PathBuf,
        port: u16,
        root: tempfile::TempDir,
        child: Option<Child>,
        runs: u32,
        /// With authentication on: the admin's user name and password.
        auth: Option<(&'static str, &'static str)>,
    }

    impl PrivateNacos {
        async fn start(bin: PathBuf) -> Self {
            Self::start_with(bin, None).await
        }

        async fn start_with(bin: PathBuf, auth: Option<(&'static str, &'static str)>) -> Self {
            let mut server = Self {
                bin,
                port: free_port_with(&[GRPC_OFFSET, CONSOLE_OFFSET]),
                root: tempfile::tempdir().unwrap(),
                child: None,
                runs: 0,
                auth,
            };
            server.run().await;
            server
        }

        fn endpoint(&self) -> String {
            format!("127.0.0.1:{}", self.port)
        }

        fn addr(&self) -> SocketAddr {
            self.endpoint().parse().unwrap()
        }

        async fn run(&mut self) {
            self.runs += 1;
            let dir = self.root.path().join(format!("run-{}", self.runs));
            std::fs::create_dir_all(&dir).unwrap();
            let log = std::fs::File::create(dir.join("rnacos.log")).unwrap();
            // Started in its data dir: rnacos reads ./.env from its cwd.
            let mut cmd = Command::new(&self.bin);
            if let Some((user, password)) = self.auth {
                // rnacos counts failed open-API logins per user (100 a
                // minute, RNACOS_API_LOGIN_ONE_MINUTE_LIMIT) and past that
                // refuses even the right password for the rest of the
                // minute (rnacos 0.8.8, measured). This test waits for the
                // admin user by logging in, and every try before the user
                // exists fails: not what the limit is for.
                cmd.env("RNACOS_ENABLE_OPEN_API_AUTH", "true")
                    .env("RNACOS_INIT_ADMIN_USERNAME", user)
                    .env("RNACOS_INIT_ADMIN_PASSWORD", password)
                    .env("RNACOS_API_LOGIN_ONE_MINUTE_LIMIT", "100000");
            }
            let child = cmd
                .current_dir(&dir)
                .env("RNACOS_SDK_HOST", "127.0.0.1")
                .env("RNACOS_CONSOLE_HOST", "127.0.0.1")
                .env("RNACOS_HTTP_PORT", self.port.to_string())
                .env("RNACOS_GRPC_PORT", (self.port + GRPC_OFFSET).to_string())
                .env(
                    "RNACOS_HTTP_CONSOLE_PORT",
                    (self.port + CONSOLE_OFFSET).to_string(),
                )
                .env("RNACOS_DATA_DIR", dir.join("db"))
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            self.child = Some(child);
            let deadline = Instant::now() + WAIT;
            while !self.ready().await {
                assert!(
                    Instant::now() < deadline,
                    "rnacos not ready on {} (log in {})",
                    self.endpoint(),
                    dir.display()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// `GET /health` answers "success".
        async fn ready(&self) -> bool {
            let probe = async {
                let mut s = TcpStream::connect(self.addr()).await.ok()?;
                s.write_all(
                    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                )
                .await
                .ok()?;
                let mut body = String::new();
                s.read_to_string(&mut body).await.ok()?;
                Some(body.contains("success"))
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(2), probe).await,
                Ok(Some(true))
            )
        }

        /// `Ok` when `/nacos/v1/auth/login` gives `user` a token, else what
        /// the server answered (the last line of its response) or why
        /// nothing came.
        async fn login(&self, user: &str, password: &str) -> Result<(), String> {
            let probe = async {
                let mut s = TcpStream::connect(self.addr())
                    .await
                    .map_err(|e| e.to_string())?;
                let request = format!(
                    "POST /nacos/v1/auth/login?username={user}&password={password} HTTP/1.1\r\n\
                     Host: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                s.write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut body = String::new();
                s.read_to_string(&mut body)
                    .await
                    .map_err(|e| e.to_string())?;
                if body.contains("accessToken") {
                    Ok(())
                } else {
                    Err(body.lines().last().unwrap_or_default().to_owned())
                }
            };
            tokio::time::timeout(Duration::from_secs(2), probe)
                .await
                .unwrap_or_else(|_| Err("no answer in 2 s".into()))
        }

        /// Waits until the admin user can log in. rnacos creates it 0.5 s
        /// after start when its Raft node is leader by then, else once more
        /// 10 s later, and never after that (`UserManager::inject`,
        /// src/user/mod.rs); on a loaded machine the election can miss both,
        /// so a server without its admin after [`ADMIN_WAIT`] is started
        /// again from an empty data dir, up to three runs.
        async fn wait_for_admin(&mut self, user: &str, password: &str) {
            let mut last = String::new();
            for attempt in 1..=3 {
                let deadline = Instant::now() + ADMIN_WAIT;
                while Instant::now() < deadline {
                    match self.login(user, password).await {
                        Ok(()) => return,
                        Err(why) => last = why,
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                if attempt == 3 {
                    break;
                }
                eprintln!(
                    "[nacos] run {attempt}: no admin login after {ADMIN_WAIT:?} ({last}); \
                     restarting rnacos"
                );
                self.restart().await;
            }
            // The data dir goes with the test; its log's end comes along.
            let log = self
                .root
                .path()
                .join(format!("run-{}", self.runs))
                .join("rnacos.log");
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "rnacos never accepted the admin login: {last}\nend of its log:\n{}",
                tail.join("\n")
            );
        }

        async fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                child.kill().await.unwrap();
            }
        }

        async fn restart(&mut self) {
            self.kill().await;
            self.run().await;
        }
    }

    /// Two proxies, on P and P + 1000, as the Nacos 2.x client derives its
    /// gRPC port from the address.
    /// Issue 14: Nacos login (rnacos with `RNACOS_ENABLE_OPEN_API_AUTH`,
    /// which guards its HTTP open API and gRPC naming requests). The right
    /// user and password register and discover; a wrong password is
    /// refused as `Unauthenticated`, not taken for an outage.
    #[tokio::test]
    async fn login_with_a_good_and_a_bad_password() {
        let Some(bin) = rnacos_binary("login") else {
            return;
        };
        let mut server = PrivateNacos::start_with(bin, Some(("admin", "secret123"))).await;
        // rnacos creates its admin user a moment after it answers /health;
        // a client logging in before that gets no token (and the SDK tries
        // again only 30 s later).
        server.wait_for_admin("admin", "secret123").await;
        let as_user = |password: &str| RegistryConfig {
            username: Some("admin".into()),
            password: Some(password.into()),
            ..config(server.endpoint())
        };
        let good = NacosRegistry::connect(&as_user("secret123")).await.unwrap();
        let m = ServiceMetaInfo::new("Nacos.Login", "1.0", "127.0.0.1", 9500);
        let reg = good.register(m.clone()).await.unwrap();
        let cache = ServiceCache::new(good.clone());
        let handle = cache.service("Nacos.Login:1.0").await.unwrap();
        tokio::time::timeout(WAIT, handle.wait_until(|l, _| l.contains(&m)))
            .await
            .expect("the instance was not discovered with the right login");

        let e = match NacosRegistry::connect(&as_user("wrong")).await {
            Err(e) => e,
            Ok(bad) => bad
                .register(ServiceMetaInfo::new(
                    "Nacos.Login",
                    "1.0",
                    "127.0.0.1",
                    9501,
                ))
                .await
                .map(drop)
                .unwrap_err(),
        };
        println!("[nacos] login: right password served; wrong password refused: {e}");
        assert_eq!(
            e.kind(),
            rpc_core::RegistryErrorKind::Unauthenticated,
            "{e}"
        );
        assert!(!e.is_transient());
        reg.deregister().await.unwrap();
        good.shutdown().await;
    }

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
            panic!("no free port pair for the proxies");
        }

        fn endpoint(&self) -> String {
            self.http.addr().to_string()
        }

        fn cut(&self) {
            self.http.cut();
            self.grpc.cut();
        }
    }

    fn config(endpoint: String) -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Nacos,
            address: Addresses(vec![endpoint]),
            timeout_ms: 2_000,
            group: Some("private".into()),
            ..RegistryConfig::default()
        }
    }

    fn cache(consumer: NacosRegistry) -> ServiceCache<NacosRegistry> {
        ServiceCache::with_options(
            consumer,
            CacheOptions {
                backoff_max: Duration::from_secs(1),
                empty_grace: GRACE,
                ..CacheOptions::default()
            },
        )
    }

    /// Sets the flag if the handle's list is ever empty.
    fn watch_for_empty(handle: &ServiceHandle) -> Arc<AtomicBool> {
        let emptied = Arc::new(AtomicBool::new(false));
        let (h, flag) = (handle.clone(), emptied.clone());
        tokio::spawn(async move {
            let mut changes = h.changes();
            loop {
                if h.instances().is_empty() {
                    flag.store(true, Ordering::SeqCst);
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        emptied
    }

    async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(limit, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
        }
    }

    /// The server restarts empty: the provider notices and registers again
    /// by itself (a new generation), and a consumer's list never empties.
    #[tokio::test]
    async fn a_restarted_server_gets_its_providers_back() {
        let Some(bin) = rnacos_binary("server restart") else {
            return;
        };
        let mut server = PrivateNacos::start(bin).await;
        let provider = NacosRegistry::connect(&config(server.endpoint()))
            .await
            .unwrap();
        let consumer = NacosRegistry::connect(&config(server.endpoint()))
            .await
            .unwrap();
        let meta = ServiceMetaInfo::new("Private.Restart", "1.0", "127.0.0.1", 7600);
        let registration = provider.register(meta.clone()).await.unwrap();
        let cache = cache(consumer);
        let handle = cache.service("Private.Restart:1.0").await.unwrap();
        within(
            "the instance",
            WAIT,
            handle.wait_until(|l, _| l.contains(&meta)),
        )
        .await;
        let emptied = watch_for_empty(&handle);

        let restarted = Instant::now();
        server.restart().await;
        let mut state = registration.state();
        within(
            "the provider to register again",
            WAIT,
            state.wait_for(
                |s| matches!(s, RegistrationState::Registered { generation } if *generation >= 1),
            ),
        )
        .await
        .unwrap();
        println!(
            "[nacos] server restart to re-registration: {:?}",
            restarted.elapsed()
        );
        within(
            "the consumer to be healthy and list it",
            WAIT,
            handle.wait_until(|l, healthy| healthy && l.contains(&meta)),
        )
        .await;
        println!(
            "[nacos] server restart to a healthy consumer listing it again: {:?}",
            restarted.elapsed()
        );
        assert!(
            !emptied.load(Ordering::SeqCst),
            "the consumer's list was emptied during the restart"
        );
        registration.deregister().await.unwrap();
        within(
            "the deregistration to reach the consumer",
            WAIT,
            handle.wait_until(|l, _| l.is_empty()),
        )
        .await;
    }

    /// The server restarts empty and its only provider cannot come back
    /// (partitioned for good): right after reconnecting, the consumer keeps
    /// its list for the cache's grace ([`GRACE`]), then the server, still answering with
    /// nothing, is believed and the last instance is removed.
    #[tokio::test]
    async fn an_empty_list_after_a_restart_is_held_then_confirmed() {
        let Some(bin) = rnacos_binary("empty-push guard") else {
            return;
        };
        let mut server = PrivateNacos::start(bin).await;
        let proxy = ProxyPair::start(server.addr()).await;
        let provider = NacosRegistry::connect(&config(proxy.endpoint()))
            .await
            .unwrap();
        let consumer = NacosRegistry::connect(&config(server.endpoint()))
            .await
            .unwrap();
        let meta = ServiceMetaInfo::new("Private.Guard", "1.0", "127.0.0.1", 7700);
        let _registration = provider.register(meta.clone()).await.unwrap();
        let cache = cache(consumer);
        let handle = cache.service("Private.Guard:1.0").await.unwrap();
        within(
            "the instance",
            WAIT,
            handle.wait_until(|l, _| l.contains(&meta)),
        )
        .await;

        proxy.cut();
        server.restart().await;
        let back = Instant::now();
        // The consumer reconnects to an empty server. Its list must hold for
        // the grace period after that (which starts after `back`)...
        let emptied = tokio::time::timeout(
            GRACE - Duration::from_secs(1),
            handle.wait_until(|l, _| l.is_empty()),
        )
        .await;
        assert!(
            emptied.is_err(),
            "the list was emptied {:?} after the restart, within the grace period",
            back.elapsed()
        );
        assert_eq!(handle.instances().as_slice(), std::slice::from_ref(&meta));
        // ...and then give way to the server's answer.
        within(
            "the confirmed empty list",
            WAIT,
            handle.wait_until(|l, healthy| healthy && l.is_empty()),
        )
        .await;
        println!(
            "[nacos] empty list applied {:?} after the restart (grace {GRACE:?})",
            back.elapsed()
        );
    }
}
