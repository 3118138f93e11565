//! `rpc console`'s HTTP endpoints, with the real binary over a local
//! registry and a provider in this process: status codes, content types,
//! the event stream, calls (a reply, malformed JSON, an unknown method, a
//! provider that times out), hostile input (a huge body, odd paths,
//! methods), the access token, and a registry that goes away.
//! (The page in a real browser: `console_browser.rs`.)

use std::net::SocketAddr;
use std::time::Duration;

use rpc::{Provider, RpcConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const RPC: &str = env!("CARGO_BIN_EXE_rpc");
const WAIT: Duration = Duration::from_secs(20);

#[rpc::service(name = "Console.Echo", version = "1.0")]
pub trait Echo {
    async fn echo(&self, text: String) -> String;
    /// Answers after 30 s.
    async fn slow(&self) -> u32;
}

struct EchoImpl;

impl Echo for EchoImpl {
    async fn echo(&self, text: String) -> String {
        format!("echo: {text}")
    }
    async fn slow(&self) -> u32 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        1
    }
}

struct Setup {
    dir: tempfile::TempDir,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

async fn provider() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nhost = \"127.0.0.1\"\nshutdown_grace_ms = 0\n[registry]\ntype = \"local\"\naddress = \"{}\"\nttl_secs = 2\n",
        dir.path().join("reg").display()
    );
    let config = RpcConfig::from_toml_str(&text, "console test").unwrap();
    let p = Provider::builder(&config)
        .service(EchoServer::new(EchoImpl))
        .bind()
        .await
        .unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let _ = p
            .run(async {
                let _ = rx.await;
            })
            .await;
    });
    Setup { dir, stop, done }
}

struct Console {
    addr: SocketAddr,
    _child: tokio::process::Child,
}

impl Console {
    /// Sends the console `signal` (`INT`, `TERM`) and waits (bounded) for it
    /// to exit: its exit code; `stops` says what the wait expects.
    async fn signal(&mut self, signal: &str, stops: &str) -> Option<i32> {
        let pid = self._child.id().unwrap().to_string();
        let sent = tokio::process::Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(WAIT, self._child.wait())
            .await
            .expect(stops)
            .unwrap()
            .code()
    }
}

/// Starts `rpc console` on an ephemeral port over `dir`'s registry.
async fn console(dir: &std::path::Path, extra: &[&str]) -> Console {
    let mut child = tokio::process::Command::new(RPC)
        .arg("--registry")
        .arg(format!("local://{}?ttl_secs=2", dir.join("reg").display()))
        .args(["console", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("RPC_CONFIG")
        .env_remove("RPC_CONSOLE_TOKEN")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the console prints its address")
        .unwrap()
        .expect("a line");
    let url = line.strip_prefix("console: http://").expect(&line);
    let addr = url.trim_end_matches('/').parse().unwrap();
    Console {
        addr,
        _child: child,
    }
}

/// Sends raw bytes, reads the reply until the server closes (bounded).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the console answers and closes in time");
    String::from_utf8_lossy(&out).into_owned()
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    let r = raw(
        addr,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    request(addr, "GET", path, "", "").await
}

async fn call(addr: SocketAddr, json: &str) -> (u16, serde_json::Value) {
    let (status, head, body) = request(
        addr,
        "POST",
        "/api/call",
        "Content-Type: application/json\r\n",
        json,
    )
    .await;
    assert!(head.contains("content-type: application/json"), "{head}");
    (status, serde_json::from_str(&body).unwrap())
}

/// Waits (bounded) until `GET /api/services` lists the echo service.
async fn until_listed(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _, body) = get(addr, "/api/services").await;
        if status == 200 && body.contains("Console.Echo:1.0") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never listed: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_with_the_right_status_and_type() {
    let p = provider().await;
    let c = console(p.dir.path(), &[]).await;
    until_listed(c.addr).await;

    let (status, head, body) = get(c.addr, "/").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(body.contains("<title>rpc console</title>"));

    let (status, head, body) = get(c.addr, "/api/services").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/json"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["registry"], "local");
    assert_eq!(v["services"][0]["service"], "Console.Echo:1.0");
    assert_eq!(v["services"][0]["instances"], 1);

    let (status, _, body) = get(c.addr, "/api/services/Console.Echo:1.0").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["methods"], serde_json::json!(["echo", "slow"]));
    assert_eq!(v["instances"].as_array().unwrap().len(), 1);
    assert_eq!(v["instances"][0]["tls"], false);
    assert!(v["instances"][0]["since"].as_u64().unwrap() > 1_700_000_000);

    // The event stream: its type, and the first snapshot at once.
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    s.write_all(b"GET /api/services/Console.Echo:1.0/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("event: instances") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        seen.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{seen}"
    );
    assert!(seen.contains("Console.Echo:1.0"), "{seen}");
    drop(s);

    // Unknown things.
    for path in [
        "/api/services/Nope:1.0",
        "/api/services/Nope:1.0/events",
        "/api/services/Nope:1.0/health",
    ] {
        let (status, head, body) = get(c.addr, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(head.contains("application/json"), "{path}");
        assert!(body.contains("no service `Nope:1.0`"), "{body}");
    }
    for path in [
        "/nope",
        "/../../etc/passwd",
        "/api",
        "/api/services/a/b/c/d",
        "/%00",
    ] {
        let (status, _, body) = get(c.addr, path).await;
        assert!(status == 404 || status == 400, "{path}: {status} {body}");
    }
    let (status, _, _) = get(c.addr, "/api/services/%20/health").await;
    assert!(status == 400 || status == 404, "{status}");
    let (status, _, _) = get(c.addr, "/api/call").await;
    assert_eq!(status, 405);
    let (status, _, _) = request(c.addr, "DELETE", "/api/services", "", "").await;
    assert_eq!(status, 405);

    let _ = p.stop.send(());
    let _ = tokio::time::timeout(WAIT, p.done).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_the_console_answer_or_say_why_not() {
    let p = provider().await;
    let c = console(p.dir.path(), &[]).await;
    until_listed(c.addr).await;

    let (status, v) = call(
        c.addr,
        r#"{"service":"Console.Echo:1.0","method":"echo","args":"\"hi\""}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reply"], "echo: hi");
    // Scripts may send the arguments as JSON rather than JSON text.
    let (status, v) = call(
        c.addr,
        r#"{"service":"Console.Echo:1.0","method":"echo","args":["hi"]}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reply"], "echo: hi");
    // A string is always JSON text: `hi` is not JSON, and it says so.
    let (status, v) = call(
        c.addr,
        r#"{"service":"Console.Echo:1.0","method":"echo","args":"hi"}"#,
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");
    let (status, v) = call(
        c.addr,
        r#"{"service":"Console.Echo:1.0","method":"echo","args":"[\"hi\"]","timeout_ms":0}"#,
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("timeout_ms"), "{v}");

    let (status, v) = call(
        c.addr,
        r#"{"service":"Console.Echo:1.0","method":"echo","args":"[\"hi\""}"#,
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");

    let (status, v) = call(
        c.addr,
        r#"{"service":"Console.Echo:1.0","method":"nope","args":""}"#,
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("method not found"),
        "{v}"
    );

    let (status, v) = call(
        c.addr,
        r#"{"service":"Console.Echo:1.0","method":"slow","args":"","timeout_ms":200}"#,
    )
    .await;
    // Whichever side notices the deadline first, the console says 504.
    assert_eq!(status, 504, "{v}");
    let text = v["error"].as_str().unwrap();
    assert!(
        text.contains("timed out") || text.contains("deadline exceeded"),
        "{v}"
    );

    let (status, v) = call(c.addr, r#"{"service":"Nope:1.0","method":"x","args":""}"#).await;
    assert_eq!(status, 404, "{v}");

    // Not JSON, wrong shape, too big.
    let (status, v) = call(c.addr, "{not json").await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = call(c.addr, r#"{"service":1}"#).await;
    assert_eq!(status, 422, "{v}");
    let huge = format!(
        r#"{{"service":"Console.Echo:1.0","method":"echo","args":"\"{}\""}}"#,
        "x".repeat(1 << 20)
    );
    let (status, _, _) = request(
        c.addr,
        "POST",
        "/api/call",
        "Content-Type: application/json\r\n",
        &huge,
    )
    .await;
    assert_eq!(status, 413);

    // Still serving after all that.
    let (status, _) = call(
        c.addr,
        r#"{"service":"Console.Echo:1.0","method":"echo","args":"[\"again\"]"}"#,
    )
    .await;
    assert_eq!(status, 200);

    // The registry goes away: the page is told, with a status it can show.
    // The provider stops first: its heartbeat (every ttl/3) would write its
    // record again, and so make the directory again, under the old name.
    let _ = p.stop.send(());
    tokio::time::timeout(WAIT, p.done)
        .await
        .expect("the provider stops")
        .unwrap();
    std::fs::rename(p.dir.path().join("reg"), p.dir.path().join("gone")).unwrap();
    let (status, _, body) = get(c.addr, "/api/services").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("registry unreachable"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_on_every_request_when_set() {
    let p = provider().await;
    let c = console(p.dir.path(), &["--token", "s3cret"]).await;
    for path in [
        "/",
        "/api/services",
        "/api/services/Console.Echo:1.0/events",
        "/nope",
    ] {
        let (status, _, body) = get(c.addr, path).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("access token"), "{body}");
    }
    let (status, _, _) = request(
        c.addr,
        "GET",
        "/api/services",
        "Authorization: Bearer wrong\r\n",
        "",
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = request(
        c.addr,
        "GET",
        "/api/services",
        "Authorization: Bearer s3cret\r\n",
        "",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = get(c.addr, "/?token=s3cret").await;
    assert_eq!(status, 200);

    // Anything but loopback needs a token at all.
    let out = tokio::process::Command::new(RPC)
        .arg("--registry")
        .arg(format!("local://{}", p.dir.path().join("reg").display()))
        .args(["console", "--listen", "0.0.0.0:0"])
        .env_remove("RPC_CONSOLE_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
    // An empty token is none (found by a reviewer: it used to open a
    // public console with no check at all).
    for (flag, env) in [(Some(""), None), (None, Some(""))] {
        let mut cmd = tokio::process::Command::new(RPC);
        cmd.arg("--registry")
            .arg(format!("local://{}", p.dir.path().join("reg").display()))
            .args(["console", "--listen", "0.0.0.0:0"])
            .env_remove("RPC_CONSOLE_TOKEN")
            .kill_on_drop(true);
        if let Some(t) = flag {
            cmd.args(["--token", t]);
        }
        if let Some(t) = env {
            cmd.env("RPC_CONSOLE_TOKEN", t);
        }
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .expect("the console refuses to start")
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag:?} {env:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
    }

    let _ = p.stop.send(());
    let _ = tokio::time::timeout(WAIT, p.done).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_console_with_a_page_still_open() {
    let p = provider().await;
    let mut c = console(p.dir.path(), &[]).await;
    until_listed(c.addr).await;
    // A page's event stream, left open.
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    s.write_all(b"GET /api/services/Console.Echo:1.0/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0);
    assert_eq!(
        c.signal("INT", "the console stops on Ctrl-C though a page is open")
            .await,
        Some(0)
    );
    let _ = p.stop.send(());
    let _ = tokio::time::timeout(WAIT, p.done).await;
}

/// SIGTERM (what systemd and docker send) stops the console too, and a
/// client that sent half a request does not hold it: open connections get
/// a bounded drain (found by a reviewer: it waited for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_console_though_a_request_is_half_sent() {
    let p = provider().await;
    let mut c = console(p.dir.path(), &[]).await;
    until_listed(c.addr).await;
    let mut half = TcpStream::connect(c.addr).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    // The console has taken the connection: a full request on another one
    // is answered, so the half one was accepted before it.
    let (status, _, _) = get(c.addr, "/api/services").await;
    assert_eq!(status, 200);
    assert_eq!(
        c.signal(
            "TERM",
            "the console stops on SIGTERM though a request is half sent"
        )
        .await,
        Some(0)
    );
    drop(half);
    let _ = p.stop.send(());
    let _ = tokio::time::timeout(WAIT, p.done).await;
}

/// Connections are bounded (`--max-connections`): with two held open, a
/// third is closed without an answer, and once one of the two goes, the
/// console serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed() {
    let p = provider().await;
    let c = console(p.dir.path(), &["--max-connections", "2"]).await;
    until_listed(c.addr).await;
    // Two idle connections, each answered once so it is surely accepted
    // (keep-alive keeps it open and holding its permit).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(c.addr).await.unwrap();
        s.write_all(b"GET /api/services HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let reply = raw(
        c.addr,
        b"GET /api/services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.is_empty(), "a third connection was served: {reply}");
    drop(held.pop());
    // The console notices the close on its own time: try until served.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _, _) = get(c.addr, "/api/services").await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served again after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = p.stop.send(());
    let _ = tokio::time::timeout(WAIT, p.done).await;
}
