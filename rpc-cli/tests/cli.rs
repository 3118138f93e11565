//! The real `rpc` binary against real registries: the local one (a
//! directory) and the servers the test command starts on loopback
//! (`scripts/registry-servers.sh up etcd zookeeper consul nacos`). A
//! missing server skips its backend with one printed line, and fails it
//! under `RPC_REQUIRE_SERVERS=1`.
//!
//! Each backend's test starts providers in this process (in a namespace,
//! chroot or group of its own), then runs `rpc` as a child process with
//! `--registry URL` and asserts on its output and exit code: services,
//! instances (table and JSON), describe, call (a struct argument, a user
//! error, an unknown method, malformed JSON), ping, a provider without the
//! published method list, and watch (sees an add and a remove, then stops
//! on SIGTERM with exit code 0).

use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rpc::registry::AnyRegistry;
use rpc::serde::{Deserialize, Serialize};
use rpc::{Provider, RpcConfig, ServiceMetaInfo};
use rpc_core::{Discover, Registry};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

const RPC: &str = env!("CARGO_BIN_EXE_rpc");
/// Bound for anything that should happen "soon" (registry propagation,
/// a child process answering).
const WAIT: Duration = Duration::from_secs(20);
/// The providers' TTL (`ttl_secs = 2`).
const TTL: Duration = Duration::from_secs(2);
/// How soon `rpc watch` must print a change: within the TTL, plus 5 s for
/// the registry to tell its watchers (Nacos pushes, then is read again).
const WATCH_BOUND: Duration = Duration::from_secs(2 + 5);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "rpc::serde")]
pub struct Item {
    pub name: String,
    pub price: u32,
    pub tags: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "rpc::serde")]
pub enum ShopError {
    Invalid { reason: String },
}

/// What the tool is pointed at.
#[rpc::service(name = "Cli.Shop", version = "1.0")]
pub trait Shop {
    /// A struct argument; a user error for a zero price.
    async fn add(&self, item: Item) -> Result<Item, ShopError>;
    /// No arguments.
    async fn count(&self) -> u32;
}

struct ShopImpl;

impl Shop for ShopImpl {
    async fn add(&self, item: Item) -> Result<Item, ShopError> {
        if item.price == 0 {
            return Err(ShopError::Invalid {
                reason: "a price of 0".into(),
            });
        }
        Ok(Item {
            name: item.name.to_uppercase(),
            ..item
        })
    }
    async fn count(&self) -> u32 {
        7
    }
}

/// A service served by a bare server and registered by hand with the
/// record older providers wrote: no method list, no framework version.
#[rpc::service(name = "Cli.Legacy", version = "1.0")]
pub trait Legacy {
    async fn hello(&self, name: String) -> String;
}

struct LegacyImpl;

impl Legacy for LegacyImpl {
    async fn hello(&self, name: String) -> String {
        format!("hello {name}")
    }
}

/// One backend under test.
struct Target {
    name: &'static str,
    /// `--registry` for the tool.
    url: String,
    /// The `[registry]` section for the providers.
    registry_toml: String,
    _dir: Option<tempfile::TempDir>,
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn remote(name: &'static str, url_base: &str, address: &str, scope: (&str, String)) -> Target {
    let (key, value) = scope;
    Target {
        name,
        url: format!("{url_base}?{key}={value}&ttl_secs=2"),
        registry_toml: format!(
            "type = \"{name}\"\naddress = \"{address}\"\n{key} = \"{value}\"\nttl_secs = 2\ntimeout_ms = 3000\n"
        ),
        _dir: None,
    }
}

impl Target {
    fn config(&self) -> RpcConfig {
        let text = format!(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\n\n[registry]\n{}",
            self.registry_toml
        );
        RpcConfig::from_toml_str(&text, "cli test").unwrap()
    }

    /// Whether the registry answers; a skip line or a failure if not.
    async fn available(&self) -> bool {
        let config = self.config();
        let probe = async {
            let r = AnyRegistry::from_config(&config.registry).await?;
            r.services().await.map(|_| ())
        };
        let why = match tokio::time::timeout(Duration::from_secs(10), probe).await {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => rpc_core::error::report(&e),
            Err(_) => "no answer within 10 s".into(),
        };
        assert!(
            std::env::var("RPC_REQUIRE_SERVERS").as_deref() != Ok("1"),
            "[{}] server required (RPC_REQUIRE_SERVERS=1) but unavailable: {why}",
            self.name
        );
        eprintln!(
            "SKIP [{}] rpc tool: no server: {why} (scripts/registry-servers.sh up starts one)",
            self.name
        );
        false
    }

    /// Runs the tool with `args` after `--registry URL`.
    async fn rpc(&self, args: &[&str]) -> Output {
        let run = tokio::process::Command::new(RPC)
            .arg("--registry")
            .arg(&self.url)
            .args(args)
            .env_remove("RPC_CONFIG")
            .env_remove("RUST_LOG")
            .current_dir(std::env::temp_dir())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(WAIT, run)
            .await
            .unwrap_or_else(|_| panic!("[{}] rpc {args:?} did not finish", self.name))
            .unwrap()
    }
}

struct Running {
    addr: String,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.done)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn shop_provider(config: &RpcConfig) -> Running {
    let p = Provider::builder(config)
        .service(ShopServer::new(ShopImpl))
        .bind()
        .await
        .unwrap();
    let addr = p.local_addr().to_string();
    let (stop, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        p.run(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running { addr, stop, done }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[track_caller]
fn expect(o: &Output, exit: i32, what: &str) -> (String, String) {
    let (out, err) = text(o);
    assert_eq!(
        o.status.code(),
        Some(exit),
        "{what}: exit code\nstdout: {out}\nstderr: {err}"
    );
    (out, err)
}

async fn exercise(t: Target) {
    if !t.available().await {
        return;
    }
    let name = t.name;
    let config = t.config();
    let p1 = shop_provider(&config).await;

    // services: wait until the registry lists the provider.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let o = t.rpc(&["services"]).await;
        let (out, _) = expect(&o, 0, "services");
        if out
            .lines()
            .any(|l| l.split_whitespace().eq(["Cli.Shop:1.0", "1"]))
        {
            assert!(out.starts_with("SERVICE"), "[{name}] {out}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "[{name}] services never listed Cli.Shop:1.0 with one instance: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let o = t.rpc(&["services", "-o", "json"]).await;
    let (out, _) = expect(&o, 0, "services json");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"service": "Cli.Shop:1.0", "instances": 1})),
        "[{name}] {out}"
    );

    // instances, both forms; a bare name has the default version.
    let o = t.rpc(&["instances", "Cli.Shop"]).await;
    let (out, _) = expect(&o, 0, "instances");
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].starts_with("ADDRESS"), "[{name}] {out}");
    assert!(rows[1].starts_with(&p1.addr), "[{name}] {out}");
    assert!(rows[1].contains("mr/1"), "[{name}] {out}");
    assert!(
        out.lines().all(|l| l.chars().count() <= 80),
        "[{name}] {out}"
    );
    let o = t
        .rpc(&["instances", "Cli.Shop:1.0", "--output", "json"])
        .await;
    let (out, _) = expect(&o, 0, "instances json");
    let records: Vec<ServiceMetaInfo> = serde_json::from_str(&out).unwrap();
    assert_eq!(records.len(), 1, "[{name}] {out}");
    assert_eq!(records[0].address(), p1.addr);
    let o = t.rpc(&["instances", "Cli.Nobody"]).await;
    let (_, err) = expect(&o, 3, "instances of an unknown service");
    assert!(
        err.contains("no instance of `Cli.Nobody:1.0`"),
        "[{name}] {err}"
    );

    // describe
    let o = t.rpc(&["describe", "Cli.Shop"]).await;
    let (out, _) = expect(&o, 0, "describe");
    assert!(out.contains("METHODS      add\n"), "[{name}] {out}");
    assert!(out.contains("             count\n"), "[{name}] {out}");
    assert!(
        out.contains("SERIALIZERS  bincode, json, msgpack, postcard"),
        "[{name}] {out}"
    );
    assert!(out.contains("COMPRESSIONS lz4, zstd"), "[{name}] {out}");

    // call: a struct argument, a user error, an unknown method, bad JSON.
    let o = t
        .rpc(&[
            "call",
            "Cli.Shop",
            "add",
            r#"{"name":"pen","price":3,"tags":["a"]}"#,
        ])
        .await;
    let (out, _) = expect(&o, 0, "call with a struct argument");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"Ok": {"name": "PEN", "price": 3, "tags": ["a"]}}),
        "[{name}]"
    );
    let o = t
        .rpc(&[
            "call",
            "Cli.Shop",
            "add",
            r#"[{"name":"pen","price":0,"tags":[]}]"#,
        ])
        .await;
    let (out, err) = expect(&o, 4, "call returning a user error");
    assert!(
        out.contains("\"reason\": \"a price of 0\""),
        "[{name}] {out}"
    );
    assert!(err.contains("returned an error"), "[{name}] {err}");
    let o = t.rpc(&["call", "Cli.Shop", "remove", "1"]).await;
    let (_, err) = expect(&o, 3, "call of an unknown method");
    assert!(err.contains("method not found"), "[{name}] {err}");
    let o = t.rpc(&["call", "Cli.Shop", "add", "{name: pen}"]).await;
    let (_, err) = expect(&o, 1, "call with malformed JSON");
    assert!(err.contains("not valid JSON"), "[{name}] {err}");
    assert_eq!(err.lines().count(), 1, "[{name}] one line: {err}");
    let o = t
        .rpc(&[
            "call",
            "Cli.Shop",
            "count",
            "--address",
            &p1.addr,
            "-m",
            "k=v",
        ])
        .await;
    let (out, _) = expect(&o, 0, "a direct call");
    assert_eq!(out.trim(), "7", "[{name}]");

    // Arguments the method cannot take are the caller's mistake (exit 1),
    // and negative numbers need no `--`.
    let o = t.rpc(&["call", "Cli.Shop", "count", "5"]).await;
    let (_, err) = expect(&o, 1, "an argument for a method without any");
    assert!(err.contains("do not fit the method"), "[{name}] {err}");
    let o = t.rpc(&["call", "Cli.Shop", "add", "-1"]).await;
    expect(&o, 1, "a negative number where a struct is due");

    // ping
    let o = t.rpc(&["ping", &p1.addr]).await;
    let (out, _) = expect(&o, 0, "ping");
    assert!(
        out.starts_with(&format!("pong from {}", p1.addr)),
        "[{name}] {out}"
    );
    // A reader that leaves early (`| head -1`) ends it quietly, with 0.
    let mut pings = tokio::process::Command::new(RPC)
        .args(["ping", &p1.addr, "--count", "100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = BufReader::new(pings.stdout.take().unwrap());
    stdout.read_line(&mut first).await.unwrap();
    assert!(first.starts_with("pong from"), "[{name}] {first}");
    drop(stdout);
    let o = tokio::time::timeout(WAIT, pings.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "[{name}] closed pipe: {err}");
    assert!(!err.contains("panicked"), "[{name}] {err}");

    // A provider from before method lists: describe says so, call works.
    let registry = AnyRegistry::from_config(&config.registry).await.unwrap();
    let server = rpc::transport::Server::builder(config.server.clone())
        .service(LegacyServer::new(LegacyImpl))
        .bind()
        .await
        .unwrap();
    let mut old =
        ServiceMetaInfo::new("Cli.Legacy", "1.0", "127.0.0.1", server.local_addr().port());
    old.metadata.insert("protocol".into(), "mr/1".into());
    let (legacy_stop, legacy_rx) = oneshot::channel::<()>();
    let legacy = tokio::spawn(server.run(async {
        let _ = legacy_rx.await;
    }));
    let registration = registry.register(old).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let out = loop {
        let o = t.rpc(&["describe", "Cli.Legacy"]).await;
        if o.status.code() == Some(0) {
            break text(&o).0;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "[{name}] {:?}",
            text(&o)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(out.contains("not published"), "[{name}] {out}");
    let o = t.rpc(&["call", "Cli.Legacy", "hello", "\"old\""]).await;
    let (out, _) = expect(&o, 0, "call of a provider without a method list");
    assert_eq!(out.trim(), "\"hello old\"", "[{name}]");
    registration.deregister().await.unwrap();
    let _ = legacy_stop.send(());
    let _ = legacy.await;

    // Registry data is printed as data: a record from the year 10000 with
    // control characters in its metadata neither panics nor breaks lines.
    if name == "local" {
        let mut odd = ServiceMetaInfo::new("Cli.Odd", "1.0", "127.0.0.1", 9);
        odd.metadata.insert("since".into(), "253402300800".into());
        odd.metadata
            .insert("note".into(), "two\nlines \u{1b}[31mred".into());
        let odd = registry.register(odd).await.unwrap();
        let o = t.rpc(&["instances", "Cli.Odd"]).await;
        let (out, _) = expect(&o, 0, "instances of an odd record");
        assert_eq!(out.lines().count(), 2, "[{name}] {out}");
        assert!(!out.contains('\u{1b}'), "[{name}] {out}");
        assert!(out.contains("two\\nlines"), "[{name}] {out}");
        odd.deregister().await.unwrap();
    }

    // watch: sees a second provider come and go, then stops on SIGTERM.
    let mut child = tokio::process::Command::new(RPC)
        .args(["--registry", &t.url, "watch", "Cli.Shop"])
        .env_remove("RPC_CONFIG")
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // `started`: when the change began (before the provider starts or stops).
    let mut wait_line = async |what: &str, addr: &str, started: tokio::time::Instant| {
        let found = tokio::time::timeout_at(started + WATCH_BOUND, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                seen.push(line.clone());
                if line.contains(&format!("Cli.Shop:1.0  {what}  {addr}")) {
                    return;
                }
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "[{name}] no `{what} {addr}` line within {WATCH_BOUND:?} (TTL {TTL:?}): {seen:?}"
        );
        eprintln!(
            "[{name}] rpc watch printed `{what}` after {:?}",
            started.elapsed()
        );
    };
    wait_line("present", &p1.addr, tokio::time::Instant::now()).await;
    let started = tokio::time::Instant::now();
    let p2 = shop_provider(&config).await;
    let p2_addr = p2.addr.clone();
    wait_line("added", &p2_addr, started).await;
    // Stopped concurrently: the line must come while the provider is still
    // shutting down (its grace, the registry's session), not after.
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(p2.stop());
    wait_line("removed", &p2_addr, started).await;
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    // SIGTERM, what systemd, docker and `timeout` send (Ctrl-C's SIGINT
    // takes the same path, rpc::shutdown_signal).
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "[{name}] watch after SIGTERM");
    p1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    exercise(Target {
        name: "local",
        url: format!("local://{path}"),
        registry_toml: format!("type = \"local\"\naddress = \"{path}\"\nttl_secs = 2\n"),
        _dir: Some(dir),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd() {
    exercise(remote(
        "etcd",
        "etcd://127.0.0.1:2379",
        "http://127.0.0.1:2379",
        ("namespace", unique("cli")),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper() {
    exercise(remote(
        "zookeeper",
        "zookeeper://127.0.0.1:2181",
        "127.0.0.1:2181",
        ("namespace", unique("cli")),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul() {
    exercise(remote(
        "consul",
        "consul://127.0.0.1:8500",
        "http://127.0.0.1:8500",
        ("namespace", unique("cli")),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacos() {
    exercise(remote(
        "nacos",
        "nacos://127.0.0.1:8848",
        "127.0.0.1:8848",
        ("group", unique("cli")),
    ))
    .await;
}

/// What needs no registry server: help, usage errors, config check, bad
/// URLs, an unreachable registry, a ping nobody answers.
#[tokio::test]
async fn usage_config_and_unreachable_registries_have_their_exit_codes() {
    let run = async |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = tokio::process::Command::new(RPC);
        cmd.args(args)
            .env_remove("RPC_CONFIG")
            .current_dir(std::env::temp_dir())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        tokio::time::timeout(WAIT, cmd.output())
            .await
            .unwrap()
            .unwrap()
    };
    let o = run(&["--help"], &[]).await;
    let (out, _) = expect(&o, 0, "--help");
    assert!(out.contains("Usage: rpc"), "{out}");
    assert!(out.lines().all(|l| l.chars().count() <= 80), "{out}");
    let o = run(&["frobnicate"], &[]).await;
    expect(&o, 2, "an unknown command");

    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[client]\ntimeout_ms = 700\n\n[registry]\ntype = \"etcd\"\naddress = \"http://127.0.0.1:2379\"\n",
    )
    .unwrap();
    let good = good.display().to_string();
    let o = run(
        &["config", "check", &good],
        &[
            ("RPC_CLIENT_RETRIES", "4"),
            ("RPC_REGISTRY_PASSWORD", "hunter2"),
        ],
    )
    .await;
    let (out, _) = expect(&o, 0, "config check");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(out.starts_with(&format!("{good}: valid\n")), "{out}");
    assert_eq!(line("client.timeout_ms"), "file 700");
    assert_eq!(line("client.retries"), "env RPC_CLIENT_RETRIES 4");
    assert_eq!(line("client.serializer"), "default \"postcard\"");
    assert_eq!(line("registry.password"), "env RPC_REGISTRY_PASSWORD ***");
    assert!(!out.contains("hunter2"), "{out}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[client]\ntimeout_ms = \"soon\"\n").unwrap();
    let o = run(&["config", "check", &bad.display().to_string()], &[]).await;
    let (_, err) = expect(&o, 1, "config check of a bad file");
    assert!(
        err.contains("bad.toml") && err.contains("client.timeout_ms"),
        "{err}"
    );

    // Certificate files are read as at startup.
    let tls = dir.path().join("tls.toml");
    std::fs::write(
        &tls,
        "[server.tls]\ncert_file = \"/nonexistent/server.pem\"\nkey_file = \"/nonexistent/server.key\"\n",
    )
    .unwrap();
    let o = run(&["config", "check", &tls.display().to_string()], &[]).await;
    let (_, err) = expect(&o, 1, "config check of a missing certificate");
    assert!(
        err.contains("server.tls.cert_file") && err.contains("/nonexistent/server.pem"),
        "{err}"
    );

    let o = run(&["--registry", "memory://", "services"], &[]).await;
    let (_, err) = expect(&o, 1, "a memory registry URL");
    assert!(err.contains("inside one process"), "{err}");
    // The same from a configuration file (it used to list an empty
    // registry of its own and exit 0).
    let memory = dir.path().join("memory.toml");
    std::fs::write(&memory, "[registry]\ntype = \"memory\"\n").unwrap();
    let o = run(
        &["--config", &memory.display().to_string(), "services"],
        &[],
    )
    .await;
    let (_, err) = expect(&o, 1, "a memory registry in rpc.toml");
    assert!(err.contains("inside one process"), "{err}");
    // Nothing listens on port 1 of loopback.
    let o = run(
        &[
            "--registry",
            "etcd://127.0.0.1:1?timeout_ms=2000",
            "services",
        ],
        &[],
    )
    .await;
    let (_, err) = expect(&o, 5, "an unreachable registry");
    assert!(
        err.starts_with("rpc: registry: etcd registry unavailable"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let o = run(&["ping", "127.0.0.1:1", "--timeout", "2000"], &[]).await;
    let (_, err) = expect(&o, 4, "a ping nobody answers");
    assert!(err.contains("ping 127.0.0.1:1: cannot connect"), "{err}");
}

/// `rpc call --address` and `rpc ping` reach a TLS provider when the
/// configuration has `[client.tls]`, and a plain ping says what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_and_ping_by_address_speak_tls_when_configured() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(d.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(d.join("server.key"), key.serialize_pem()).unwrap();
    let provider_config = RpcConfig::from_toml_str(
        &format!(
            "[registry]\ntype = \"local\"\naddress = \"{r}/reg\"\n[server.tls]\ncert_file = \"{r}/server.pem\"\nkey_file = \"{r}/server.key\"\n",
            r = d.display()
        ),
        "provider.toml",
    )
    .unwrap();
    let p = shop_provider(&provider_config).await;
    let client = d.join("client.toml");
    std::fs::write(
        &client,
        format!("[client.tls]\nca_file = \"{}/ca.pem\"\n", d.display()),
    )
    .unwrap();
    let client = client.display().to_string();
    let run = async |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(RPC);
        cmd.args(args)
            .env_remove("RPC_CONFIG")
            .current_dir(d)
            .kill_on_drop(true);
        tokio::time::timeout(WAIT, cmd.output())
            .await
            .unwrap()
            .unwrap()
    };
    let o = run(&[
        "--config",
        &client,
        "call",
        "Cli.Shop",
        "count",
        "--address",
        &p.addr,
    ])
    .await;
    let (out, _) = expect(&o, 0, "a direct call over TLS");
    assert_eq!(out.trim(), "7");
    let o = run(&["--config", &client, "ping", &p.addr]).await;
    let (out, _) = expect(&o, 0, "ping over TLS");
    assert!(out.starts_with(&format!("pong from {}", p.addr)), "{out}");
    let o = run(&["ping", &p.addr, "--timeout", "5000"]).await;
    let (_, err) = expect(&o, 4, "a plain ping at a TLS port");
    assert!(err.contains("a TLS provider?"), "{err}");
    p.stop().await;
}
