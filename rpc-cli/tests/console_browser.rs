//! `rpc console` in a real browser: Debian's `chromium` driven through
//! WebDriver by Debian's `chromedriver` (`scripts/browser.sh install`
//! installs both; the test command runs it). Without chromedriver the test
//! prints one SKIP line, and fails under `RPC_REQUIRE_SERVERS=1`.
//!
//! Two providers run as child processes (this test binary again, in its
//! provider role) with a 2 s TTL, on the local registry and on etcd (a
//! SKIP line without an etcd on loopback, a failure under
//! `RPC_REQUIRE_SERVERS=1`). The page must list
//! both, show one gone after a SIGKILL without a reload, show it back when
//! it restarts, make a call from the form and show the reply, show the
//! error for malformed JSON, and refuse a request without the token when
//! one is set. It saves a screenshot (`target/console.png`, or the path in
//! `RPC_CONSOLE_SCREENSHOT`).
//!
//! The WebDriver client is a few JSON requests over HTTP/1.1 on a
//! `TcpStream`: the W3C protocol's handful of endpoints used here do not
//! justify a WebDriver crate and its dependency tree.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const RPC: &str = env!("CARGO_BIN_EXE_rpc");
const WAIT: Duration = Duration::from_secs(30);
/// The providers' TTL is 2 s: a killed provider's record expires within
/// it (the local registry also sees the dead process; etcd revokes the
/// lease), and the watch tells the page; 8 s of slack for the registry's
/// own delivery.
const GONE_BOUND: Duration = Duration::from_secs(2 + 8);
const PROVIDER_ENV: &str = "RPC_CONSOLE_TEST_PROVIDER";

#[rpc::service(name = "Console.Echo", version = "1.0")]
pub trait Echo {
    async fn echo(&self, text: String) -> String;
}

struct EchoImpl;

impl Echo for EchoImpl {
    async fn echo(&self, text: String) -> String {
        format!("echo: {text}")
    }
}

/// The provider role: when `RPC_CONSOLE_TEST_PROVIDER` holds a
/// `[registry]` section, serve `Console.Echo` there until killed.
#[tokio::test]
async fn provider_process() {
    let Ok(registry) = std::env::var(PROVIDER_ENV) else {
        return;
    };
    let text = format!(
        "[server]\nhost = \"127.0.0.1\"\n[registry]\n{registry}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
    );
    let config = rpc::RpcConfig::from_toml_str(&text, "provider role").unwrap();
    // A metrics endpoint, published in the registry: the console's health.
    let metrics = rpc::observe::MetricsEndpoint::start(&config.metrics)
        .await
        .unwrap()
        .unwrap();
    let p = rpc::Provider::builder(&config)
        .service(EchoServer::new(EchoImpl))
        .metrics_endpoint(metrics.local_addr())
        .bind()
        .await
        .unwrap();
    println!("provider: {}", p.local_addr());
    p.run(std::future::pending()).await.unwrap();
}

/// A registry the test runs on: the `--registry` URL the console takes
/// and the `[registry]` section the providers and the load use.
struct Target {
    name: &'static str,
    url: String,
    registry_toml: String,
}

fn spawn_provider(t: &Target) -> tokio::process::Child {
    tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "provider_process", "--nocapture"])
        .env(PROVIDER_ENV, &t.registry_toml)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The chromedriver binary, or a skip (a failure under RPC_REQUIRE_SERVERS=1).
fn chromedriver() -> Option<String> {
    for p in ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"] {
        if std::path::Path::new(p).exists() {
            return Some(p.to_owned());
        }
    }
    assert!(
        std::env::var("RPC_REQUIRE_SERVERS").as_deref() != Ok("1"),
        "chromedriver required (RPC_REQUIRE_SERVERS=1) but not installed"
    );
    eprintln!(
        "SKIP [browser] console: no chromedriver (scripts/browser.sh install installs Debian's chromium and chromium-driver)"
    );
    None
}

/// One WebDriver (or any JSON) request; returns the status and the body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the head, then Content-Length bytes (a server may keep the
    // connection open despite `Connection: close`).
    let read = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let lower = head.to_ascii_lowercase();
                let len = lower
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let done = match len {
                    Some(n) => rest.len() >= n,
                    None => lower.contains("chunked") && rest.contains("\r\n0\r\n"),
                };
                if done {
                    return text;
                }
            }
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return String::from_utf8_lossy(&out).into_owned();
            }
            out.extend_from_slice(&buf[..n]);
        }
    };
    let text = tokio::time::timeout(WAIT, read)
        .await
        .expect("an answer in time");
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let rest = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (
        status,
        serde_json::from_str(&rest).unwrap_or(Value::String(rest)),
    )
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

struct Browser {
    driver: SocketAddr,
    session: String,
}

impl Browser {
    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = http(
            self.driver,
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
        )
        .await;
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Polls `script` (bounded by `within`) until `done` accepts its value.
    async fn until(
        &self,
        what: &str,
        within: Duration,
        script: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.js(script).await;
            if done(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: last seen {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn present(&self) -> Value {
        self.js("return [...document.querySelectorAll('#instances tbody tr[data-state=present]')].map(r => r.dataset.address).sort()").await
    }
}

async fn console(t: &Target, extra: &[&str]) -> (SocketAddr, tokio::process::Child) {
    let mut child = tokio::process::Command::new(RPC)
        .arg("--registry")
        .arg(&t.url)
        .args(["console", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("RPC_CONFIG")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = line
        .strip_prefix("console: http://")
        .expect(&line)
        .trim_end_matches('/')
        .parse()
        .unwrap();
    (addr, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser_on_the_local_registry() {
    if std::env::var(PROVIDER_ENV).is_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("reg");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.display();
    browse(Target {
        name: "local",
        url: format!("local://{path}?ttl_secs=2"),
        registry_toml: format!("type = \"local\"\naddress = \"{path}\"\nttl_secs = 2\n"),
    })
    .await;
}

/// The same on etcd (started on loopback by `scripts/registry-servers.sh
/// up etcd`); a skip line without it, a failure under
/// `RPC_REQUIRE_SERVERS=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser_on_etcd() {
    if std::env::var(PROVIDER_ENV).is_ok() {
        return;
    }
    if TcpStream::connect("127.0.0.1:2379").await.is_err() {
        assert!(
            std::env::var("RPC_REQUIRE_SERVERS").as_deref() != Ok("1"),
            "[etcd] server required (RPC_REQUIRE_SERVERS=1) but nothing listens on 127.0.0.1:2379"
        );
        eprintln!(
            "SKIP [etcd] console in a browser: no server on 127.0.0.1:2379 (scripts/registry-servers.sh up etcd)"
        );
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let ns = format!("console-{}-{nanos}", std::process::id());
    browse(Target {
        name: "etcd",
        url: format!("etcd://127.0.0.1:2379?namespace={ns}&ttl_secs=2"),
        registry_toml: format!(
            "type = \"etcd\"\naddress = \"http://127.0.0.1:2379\"\nnamespace = \"{ns}\"\nttl_secs = 2\n"
        ),
    })
    .await;
}

async fn browse(t: Target) {
    let Some(driver_bin) = chromedriver() else {
        return;
    };
    let t = &t;
    eprintln!("[{}] console in a browser", t.name);

    // chromedriver on a free port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _driver = tokio::process::Command::new(driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let driver: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(driver).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, v) = http(
        driver,
        "POST",
        "/session",
        Some(&json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"]
            }
        }}})),
    )
    .await;
    assert_eq!(status, 200, "new session: {v}");
    let b = Browser {
        driver,
        session: v["value"]["sessionId"].as_str().unwrap().to_owned(),
    };

    let mut p1 = spawn_provider(t);
    let mut p2 = spawn_provider(t);
    let (addr, _console) = console(t, &[]).await;

    // The services page lists it; the service page lists both instances.
    b.go(&format!("http://{addr}/")).await;
    b.until(
        "the service listed",
        WAIT,
        "return document.querySelector('#services tbody')?.innerText || ''",
        |v| v.as_str().is_some_and(|t| t.contains("Console.Echo:1.0")),
    )
    .await;
    b.go(&format!("http://{addr}/#/service/Console.Echo:1.0"))
        .await;
    let both = b
        .until("both instances listed", WAIT, "return [...document.querySelectorAll('#instances tbody tr[data-state=present]')].length", |v| v == 2)
        .await;
    assert_eq!(both, 2);
    // Traffic, so the health columns have something to show.
    let traffic = {
        let registry = t.registry_toml.clone();
        tokio::spawn(async move {
            let text = format!("[registry]\n{registry}");
            let config = rpc::RpcConfig::from_toml_str(&text, "traffic").unwrap();
            let consumer = rpc::Consumer::from_config(&config).await.unwrap();
            let client = EchoClient::new(&consumer);
            loop {
                let _ = client.echo("load".into()).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    b.until(
        "calls/s, errors and p99 of both instances, with their charts",
        WAIT,
        "return [...document.querySelectorAll('#instances tbody tr[data-state=present]')].filter(r => /^[0-9]/.test(r.cells[5].innerText) && /%$/.test(r.cells[6].innerText) && /^[0-9]/.test(r.cells[7].innerText) && r.querySelector('canvas')).length",
        |v| v == 2,
    )
    .await;
    let before = b.present().await;
    // A mark that a reload would erase.
    b.js("window.__noReload = 42; return true").await;

    // SIGKILL one provider: gone from the page within the TTL bound.
    let killed_pid = p2.id().unwrap();
    p2.kill().await.unwrap();
    let started = tokio::time::Instant::now();
    b.until(
        "the killed provider gone",
        GONE_BOUND,
        "return [...document.querySelectorAll('#instances tbody tr[data-state=present]')].length",
        |v| v == 1,
    )
    .await;
    eprintln!(
        "provider {killed_pid} gone from the page after {:?}",
        started.elapsed()
    );
    assert_eq!(
        b.js("return window.__noReload").await,
        42,
        "the page reloaded"
    );
    let left = b.present().await;
    assert!(
        before.as_array().unwrap().contains(&left[0]),
        "{before} {left}"
    );

    // Started again: back, still without a reload.
    let mut p3 = spawn_provider(t);
    b.until(
        "the provider back",
        WAIT,
        "return [...document.querySelectorAll('#instances tbody tr[data-state=present]')].length",
        |v| v == 2,
    )
    .await;
    assert_eq!(
        b.js("return window.__noReload").await,
        42,
        "the page reloaded"
    );
    b.until(
        "health of the restarted instance, and charts with a trend",
        WAIT,
        "return [...document.querySelectorAll('#instances tbody tr[data-state=present]')].filter(r => /^[0-9]/.test(r.cells[5].innerText)).length",
        |v| v == 2,
    )
    .await;

    // A call from the form.
    b.until(
        "methods listed",
        WAIT,
        "return document.querySelector('#call-method')?.options.length || 0",
        |v| v.as_u64().unwrap_or(0) >= 1,
    )
    .await;
    b.js(r#"document.querySelector('#call-method').value = 'echo';
            document.querySelector('#call-args').value = '"from the browser"';
            document.querySelector('#call-submit').click(); return true"#)
        .await;
    b.until(
        "the reply shown",
        WAIT,
        "const r = document.querySelector('#call-result'); return r.hidden ? '' : r.innerText",
        |v| {
            v.as_str()
                .is_some_and(|t| t.contains("echo: from the browser"))
        },
    )
    .await;

    // Screenshot of the live page, then malformed JSON.
    let png = b.cmd("GET", "/screenshot", None).await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let path = std::env::var("RPC_CONSOLE_SCREENSHOT")
        .ok()
        .filter(|_| t.name == "local")
        .unwrap_or_else(|| {
            format!(
                "{}/../target/console-{}.png",
                env!("CARGO_MANIFEST_DIR"),
                t.name
            )
        });
    std::fs::write(&path, &png).unwrap();

    b.js(r#"document.querySelector('#call-args').value = '[1, ';
            document.querySelector('#call-submit').click(); return true"#)
        .await;
    b.until(
        "the JSON error shown",
        WAIT,
        "return document.querySelector('#call-error').innerText",
        |v| {
            v.as_str()
                .is_some_and(|t| t.contains("malformed JSON arguments"))
        },
    )
    .await;

    // With a token: refused without it, served with it.
    let (taddr, _tconsole) = console(t, &["--token", "s3cret"]).await;
    b.go(&format!("http://{taddr}/")).await;
    b.until(
        "refused without the token",
        WAIT,
        "return document.body.innerText",
        |v| v.as_str().is_some_and(|t| t.contains("access token")),
    )
    .await;
    b.go(&format!("http://{taddr}/?token=s3cret#/")).await;
    b.until(
        "served with the token",
        WAIT,
        "return document.querySelector('#services tbody')?.innerText || ''",
        |v| v.as_str().is_some_and(|t| t.contains("Console.Echo:1.0")),
    )
    .await;

    traffic.abort();
    let _ = http(driver, "DELETE", &format!("/session/{}", b.session), None).await;
    for p in [&mut p1, &mut p3] {
        let _ = p.kill().await;
    }
}
