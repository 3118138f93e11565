//! Support for the chaos tests: a [`Backend`] (a private registry server, or
//! the `local` registry's directory) that can be stopped and started again
//! with the same or an empty data dir; real `example-provider` processes
//! ([`ProviderProc`]) configured through `RPC_*` variables and followed
//! through their log lines; an in-process consumer calling `get_user`
//! continuously ([`Load`]); and the one-line measurement format.

#![allow(dead_code)]

pub mod servers;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use example_common::{AppError, UserServiceClient};
use rpc::registry::{AnyRegistry, ServiceCache, ServiceHandle};
use rpc::{Consumer, RegistryConfig, RegistryKind, RpcConfig, ServiceMetaInfo};
use rpc_core::config::Addresses;
use rpc_core::{Discover, Registration, Registry};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use servers::{Consul, Etcd, Nacos, Zookeeper};

pub const SERVICE: &str = "UserService:1.0";
/// Bound on waits for things that should take a second or two.
pub const WAIT: Duration = Duration::from_secs(20);
/// The provider's `server.shutdown_grace_ms`.
pub const GRACE_MS: u64 = 500;
/// Calling tasks of the consumer.
pub const CALLERS: usize = 4;

pub fn servers_required() -> bool {
    std::env::var("RPC_REQUIRE_SERVERS").is_ok_and(|v| v == "1")
}

/// Prints the one SKIP line, or fails when servers are required.
pub fn skip(backend: &str, test: &str, why: &str) {
    assert!(
        !servers_required(),
        "RPC_REQUIRE_SERVERS=1 but [{backend}] {test} cannot run: {why}"
    );
    skip_note!("SKIP [{backend}] {test}: {why} (scripts/registry-servers.sh install {backend})");
}

/// One measurement line, `CHAOS backend=.. scenario=.. key=value ...`.
pub fn report(backend: Kind, scenario: &str, fields: &[(&str, String)]) {
    let mut line = format!("CHAOS backend={} scenario={scenario}", backend.name());
    for (k, v) in fields {
        line.push_str(&format!(" {k}={v}"));
    }
    println!("{line}");
}

pub fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Local,
    Etcd,
    Zookeeper,
    Consul,
    Nacos,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Etcd => "etcd",
            Kind::Zookeeper => "zookeeper",
            Kind::Consul => "consul",
            Kind::Nacos => "nacos",
        }
    }

    fn registry_kind(self) -> RegistryKind {
        match self {
            Kind::Local => RegistryKind::Local,
            Kind::Etcd => RegistryKind::Etcd,
            Kind::Zookeeper => RegistryKind::Zookeeper,
            Kind::Consul => RegistryKind::Consul,
            Kind::Nacos => RegistryKind::Nacos,
        }
    }
}

enum Server {
    /// The directory, and where it was moved while "stopped".
    Local {
        dir: PathBuf,
        away: Option<PathBuf>,
    },
    Etcd(Etcd),
    Zookeeper(Zookeeper),
    Consul(Consul),
    Nacos(Nacos),
}

/// A registry for one test: its own server process (or directory), ports
/// and data.
pub struct Backend {
    pub kind: Kind,
    /// `registry.ttl_secs` given to providers and the consumer.
    pub ttl_secs: u64,
    server: Server,
    // Last: the server processes are killed before their directory goes.
    tmp: tempfile::TempDir,
}

impl Backend {
    /// Starts a private server (`members` etcd members; 1 elsewhere) and
    /// waits until it answers; `None` after printing a SKIP line when the
    /// server is not installed.
    pub async fn start(kind: Kind, test: &str, members: usize) -> Option<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("chaos-{}-", kind.name()))
            .tempdir()
            .unwrap();
        let server = match kind {
            Kind::Local => {
                let dir = tmp.path().join("registry");
                std::fs::create_dir_all(&dir).unwrap();
                Server::Local { dir, away: None }
            }
            Kind::Etcd => {
                if !servers::runs("etcd", &["--version"]) {
                    skip("etcd", test, "no `etcd` binary");
                    return None;
                }
                Server::Etcd(Etcd::start(tmp.path(), members))
            }
            Kind::Zookeeper => {
                if !std::path::Path::new(servers::ZK_JAR).exists()
                    || !servers::runs("java", &["-version"])
                {
                    skip("zookeeper", test, "no java or no ZooKeeper jar");
                    return None;
                }
                Server::Zookeeper(Zookeeper::start(tmp.path()))
            }
            Kind::Consul => {
                if !servers::runs("consul", &["version"]) {
                    skip("consul", test, "no `consul` binary");
                    return None;
                }
                Server::Consul(Consul::start(tmp.path()))
            }
            Kind::Nacos => {
                let Some(bin) = servers::rnacos_binary() else {
                    skip("nacos", test, "no `rnacos` binary");
                    return None;
                };
                Server::Nacos(Nacos::start(tmp.path(), bin))
            }
        };
        let ttl_secs = match (kind, members) {
            // A cluster's member loss means a leader election: the lease TTL
            // of scripts/etcd-cluster-test.sh and the compose file.
            (Kind::Etcd, n) if n > 1 => 5,
            // Not used by the Nacos backend (liveness is the connection's);
            // the server drops a closed connection's instances in ~1 s.
            (Kind::Nacos, _) => 3,
            _ => 2,
        };
        let mut backend = Self {
            kind,
            ttl_secs,
            server,
            tmp,
        };
        backend.ready().await;
        Some(backend)
    }

    pub fn dir(&self) -> &std::path::Path {
        self.tmp.path()
    }

    /// The TTL in use: how long a dead provider may stay listed.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }

    /// The scenario's promise for a SIGKILLed provider: gone from consumers
    /// within the TTL, plus the server's expiry granularity and a margin
    /// for a loaded two-core machine.
    pub fn removal_bound(&self) -> Duration {
        let ttl = self.ttl();
        match self.kind {
            // Sessions expire in tick-sized buckets (tickTime 500 ms).
            Kind::Zookeeper => ttl + ttl / 2 + Duration::from_millis(1500),
            _ => ttl + Duration::from_millis(1500),
        }
    }

    pub fn addresses(&self) -> Vec<String> {
        match &self.server {
            Server::Local { dir, .. } => vec![dir.display().to_string()],
            Server::Etcd(e) => e.endpoints(),
            Server::Zookeeper(z) => vec![z.address()],
            Server::Consul(c) => vec![c.address()],
            Server::Nacos(n) => vec![n.address()],
        }
    }

    pub fn registry_config(&self) -> RegistryConfig {
        RegistryConfig {
            kind: self.kind.registry_kind(),
            address: Addresses(self.addresses()),
            ttl_secs: self.ttl_secs,
            timeout_ms: 2_000,
            ..RegistryConfig::default()
        }
    }

    /// `RPC_*` variables for a provider process.
    pub fn provider_env(&self) -> Vec<(String, String)> {
        let r = self.registry_config();
        vec![
            ("RPC_REGISTRY_TYPE".into(), self.kind.name().into()),
            ("RPC_REGISTRY_ADDRESS".into(), self.addresses().join(",")),
            ("RPC_REGISTRY_TTL_SECS".into(), r.ttl_secs.to_string()),
            ("RPC_REGISTRY_TIMEOUT_MS".into(), r.timeout_ms.to_string()),
            ("RPC_SERVER_SHUTDOWN_GRACE_MS".into(), GRACE_MS.to_string()),
        ]
    }

    /// The consumer's configuration: fail-over and a short outlier
    /// cool-down. `get_user` is idempotent by its `#[rpc(idempotent)]`
    /// attribute (so a call lost with a crashed provider is retried
    /// elsewhere): nothing in the configuration says so.
    pub fn consumer_config(&self) -> RpcConfig {
        let mut c = RpcConfig {
            registry: self.registry_config(),
            ..RpcConfig::default()
        };
        c.client.fault_tolerance = rpc::FaultTolerance::FailOver;
        c.client.outlier_cooldown_ms = 1_000;
        c
    }

    /// Waits (bounded) until the server answers a discovery through the
    /// backend itself. An external process gives no event to await: poll.
    pub async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            assert!(
                !self.exited(),
                "[{}] the registry server exited\n{}",
                self.kind.name(),
                self.tail()
            );
            if self.answers().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "[{}] the registry server did not become ready in 40 s\n{}",
                self.kind.name(),
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether a server process has exited by itself.
    fn exited(&mut self) -> bool {
        let gone = |p: &mut Option<servers::Proc>| p.as_mut().is_some_and(|p| !p.alive());
        match &mut self.server {
            Server::Local { .. } => false,
            Server::Etcd(e) => e.members.iter_mut().any(|m| gone(&mut m.proc)),
            Server::Zookeeper(z) => gone(&mut z.proc),
            Server::Consul(c) => gone(&mut c.proc),
            Server::Nacos(n) => gone(&mut n.proc),
        }
    }

    async fn answers(&self) -> bool {
        match &self.server {
            Server::Local { .. } => return true,
            Server::Consul(c) if !c.has_leader().await => return false,
            Server::Nacos(n) if !n.healthy().await => return false,
            _ => {}
        }
        let cfg = self.registry_config();
        let probe = async {
            let r = AnyRegistry::from_config(&cfg).await.ok()?;
            r.discover("Chaos.Probe:1").await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(3), probe).await,
            Ok(Some(_))
        )
    }

    pub fn tail(&self) -> String {
        match &self.server {
            Server::Local { .. } => String::new(),
            Server::Etcd(e) => e.tail(),
            Server::Zookeeper(z) => z.tail(),
            Server::Consul(c) => c.tail(),
            Server::Nacos(n) => n.tail(),
        }
    }

    /// Stops the registry: SIGKILL of the server (every member). For
    /// `local`, the directory is moved away and a plain file takes its
    /// place, so that providers' heartbeats cannot simply recreate it.
    pub fn stop(&mut self) {
        match &mut self.server {
            Server::Local { dir, away } => {
                let to = dir.with_extension("away");
                std::fs::rename(&*dir, &to).unwrap();
                std::fs::write(&*dir, b"stopped by the chaos test").unwrap();
                *away = Some(to);
            }
            Server::Etcd(e) => e.kill(),
            Server::Zookeeper(z) => z.kill(),
            Server::Consul(c) => c.kill(),
            Server::Nacos(n) => n.kill(),
        }
    }

    /// Starts the registry again on the same ports, with its data or with an
    /// empty data dir, and waits until it answers. Returns when the new
    /// server was started (before waiting).
    pub async fn start_again(&mut self, empty: bool) -> Instant {
        let started = Instant::now();
        match &mut self.server {
            Server::Local { dir, away } => {
                if dir.is_file() {
                    std::fs::remove_file(&*dir).unwrap();
                }
                match away.take() {
                    Some(from) if !empty => std::fs::rename(from, &*dir).unwrap(),
                    Some(from) => {
                        std::fs::remove_dir_all(from).unwrap();
                        std::fs::create_dir_all(&*dir).unwrap();
                    }
                    None if empty => {
                        std::fs::remove_dir_all(&*dir).unwrap();
                        std::fs::create_dir_all(&*dir).unwrap();
                    }
                    None => {}
                }
            }
            Server::Etcd(e) => e.restart(empty),
            Server::Zookeeper(z) => z.restart(empty),
            Server::Consul(c) => c.restart(empty),
            Server::Nacos(n) => n.restart(empty),
        }
        self.ready().await;
        started
    }

    pub fn etcd(&mut self) -> &mut Etcd {
        match &mut self.server {
            Server::Etcd(e) => e,
            _ => panic!("not etcd"),
        }
    }

    /// A consumer with [`Backend::consumer_config`] (adjusted by `tweak`),
    /// its client, and its cache's handle of the service.
    pub async fn consumer(
        &self,
        tweak: impl FnOnce(&mut RpcConfig),
    ) -> (Consumer, UserServiceClient, ServiceHandle) {
        let mut config = self.consumer_config();
        tweak(&mut config);
        let consumer = Consumer::from_config(&config).await.unwrap();
        let client = UserServiceClient::new(&consumer);
        let handle = consumer.cache().service(SERVICE).await.unwrap();
        (consumer, client, handle)
    }

    /// A fresh registry client and cache, as a new consumer process would
    /// have: what the registry itself lists now.
    pub async fn observer(&self) -> (ServiceCache<AnyRegistry>, ServiceHandle) {
        let registry = AnyRegistry::from_config(&self.registry_config())
            .await
            .unwrap();
        let cache = ServiceCache::new(registry);
        let handle = cache.service(SERVICE).await.unwrap();
        (cache, handle)
    }

    /// Registers an instance of the service from this process.
    pub async fn register(&self, meta: ServiceMetaInfo) -> (AnyRegistry, Registration) {
        let registry = AnyRegistry::from_config(&self.registry_config())
            .await
            .unwrap();
        let reg = registry.register(meta).await.unwrap();
        (registry, reg)
    }
}

pub fn has(list: &[ServiceMetaInfo], addr: &str) -> bool {
    list.iter().any(|m| m.address() == addr)
}

pub fn addrs(list: &[ServiceMetaInfo]) -> Vec<String> {
    list.iter().map(ServiceMetaInfo::address).collect()
}

/// Waits (bounded by `within`) until the handle's list satisfies `accept`;
/// how long that took. Fails naming `what`.
pub async fn wait_list(
    handle: &ServiceHandle,
    within: Duration,
    what: &str,
    accept: impl FnMut(&[ServiceMetaInfo], bool) -> bool,
) -> Duration {
    let started = Instant::now();
    if tokio::time::timeout(within, handle.wait_until(accept))
        .await
        .is_err()
    {
        panic!(
            "{what}: not within {within:?}; the cache lists {:?} (healthy: {}, last error: {:?})",
            addrs(&handle.instances()),
            handle.is_healthy(),
            handle.last_error()
        );
    }
    started.elapsed()
}

// ------------------------------------------------------------- providers

/// A real `example-provider` process, its stderr log followed line by line.
pub struct ProviderProc {
    child: Child,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    seen: watch::Receiver<usize>,
}

impl ProviderProc {
    /// Starts a provider on `port` (0: any) and waits until it has
    /// registered (its `registered` log line).
    pub async fn start(backend: &Backend, port: u16) -> Self {
        Self::start_with(backend, port, &[]).await
    }

    /// [`ProviderProc::start`] with extra `RPC_*` variables.
    pub async fn start_with(backend: &Backend, port: u16, extra: &[(&str, &str)]) -> Self {
        let mut p = Self::spawn(backend, port, extra);
        let listening = p
            .wait_line(WAIT, "listening", |l| l.contains("listening;"))
            .await;
        p.port = listening
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .and_then(|a| a.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no addr= in {listening:?}"));
        p.wait_line(WAIT, "registered", |l| {
            l.contains("rpc::provider: registered ")
        })
        .await;
        p
    }

    /// Starts the process and returns at once, without waiting for it to
    /// listen or register.
    pub fn spawn(backend: &Backend, port: u16, extra: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_example-provider"));
        cmd.args(["--port", &port.to_string()])
            .current_dir(backend.dir())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // Only this test's configuration: no inherited RPC_* variable.
        for (k, _) in std::env::vars() {
            if k.starts_with("RPC_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(backend.provider_env());
        cmd.envs(extra.iter().copied());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, seen) = watch::channel(0usize);
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let mut l = sink.lock().unwrap();
                l.push(line);
                tx.send_replace(l.len());
            }
        });
        Self {
            child,
            port,
            lines,
            seen,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for a log line accepted by `accept`; returns it.
    pub async fn wait_line(
        &mut self,
        within: Duration,
        what: &str,
        mut accept: impl FnMut(&str) -> bool,
    ) -> String {
        let mut from = 0;
        let found = tokio::time::timeout(within, async {
            loop {
                {
                    let lines = self.lines.lock().unwrap();
                    if let Some(l) = lines[from..].iter().find(|l| accept(l)) {
                        return Some(l.clone());
                    }
                    from = lines.len();
                }
                if self.seen.changed().await.is_err() {
                    // stderr closed: the process exited.
                    let lines = self.lines.lock().unwrap();
                    return lines[from..].iter().find(|l| accept(l)).cloned();
                }
            }
        })
        .await;
        match found {
            Ok(Some(l)) => l,
            _ => panic!(
                "provider :{}: no `{what}` line within {within:?}; its log:\n{}",
                self.port,
                self.log()
            ),
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        self.child.start_kill().unwrap();
    }

    /// SIGTERM: graceful shutdown.
    pub fn term(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {} failed", self.pid());
    }

    /// Waits (bounded) for the process to exit.
    pub async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "provider :{} did not exit within {within:?}; its log:\n{}",
                self.port,
                self.log()
            ),
        }
    }
}

// ------------------------------------------------------------------ load

/// One finished call.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub started: Instant,
    pub took: Duration,
    /// `None` for a success.
    pub error: Option<String>,
    pub timeout: bool,
}

impl Outcome {
    pub fn ended(&self) -> Instant {
        self.started + self.took
    }
}

/// [`CALLERS`] tasks calling `get_user(1)` continuously (a 2 ms pause
/// between a task's calls keeps two parallel tests from eating the CPU).
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<Vec<Outcome>>,
    pub started: Instant,
}

impl Load {
    pub fn start(client: &UserServiceClient) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CALLERS {
            let client = client.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = client.get_user(1).await;
                    let took = started.elapsed();
                    let (error, timeout) = match result {
                        Ok(Ok(user)) if user.id == 1 => (None, false),
                        Ok(Ok(user)) => (Some(format!("wrong user {user:?}")), false),
                        Ok(Err(AppError::NotFound { id })) => {
                            (Some(format!("user {id} not found")), false)
                        }
                        Ok(Err(e)) => (Some(format!("application error {e:?}")), false),
                        Err(e) => (Some(rpc::error::report(&e).to_string()), e.is_timeout()),
                    };
                    out.push(Outcome {
                        started,
                        took,
                        error,
                        timeout,
                    });
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                out
            });
        }
        Self {
            stop,
            tasks,
            started: Instant::now(),
        }
    }

    pub async fn stop(mut self) -> Calls {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let collected = tokio::time::timeout(WAIT, async {
            while let Some(done) = self.tasks.join_next().await {
                all.extend(done.unwrap());
            }
        })
        .await;
        assert!(collected.is_ok(), "callers did not stop within {WAIT:?}");
        all.sort_by_key(|o| o.started);
        Calls {
            all,
            started: self.started,
        }
    }
}

/// Every call a [`Load`] made.
pub struct Calls {
    pub all: Vec<Outcome>,
    pub started: Instant,
}

impl Calls {
    pub fn total(&self) -> usize {
        self.all.len()
    }

    pub fn failed(&self) -> Vec<&Outcome> {
        self.all.iter().filter(|o| o.error.is_some()).collect()
    }

    /// Calls that started within `[from, to)`.
    pub fn between(&self, from: Instant, to: Instant) -> impl Iterator<Item = &Outcome> {
        self.all
            .iter()
            .filter(move |o| o.started >= from && o.started < to)
    }

    /// The first failures, with when they happened, for assertion messages.
    pub fn describe_failures(&self) -> String {
        let failed = self.failed();
        let mut s = format!("{} of {} calls failed", failed.len(), self.total());
        for o in failed.iter().take(8) {
            s.push_str(&format!(
                "\n  at +{}ms after {}ms: {}",
                o.started.duration_since(self.started).as_millis(),
                o.took.as_millis(),
                o.error.as_deref().unwrap_or_default()
            ));
        }
        s
    }

    pub fn assert_no_failure(&self, scenario: &str) {
        assert!(self.total() > 0, "{scenario}: no call was made");
        assert!(
            self.failed().is_empty(),
            "{scenario}: {}",
            self.describe_failures()
        );
    }
}
