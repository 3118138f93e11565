//! TLS and mutual TLS over loopback, with certificates generated here
//! (rcgen): real rustls handshakes on both sides, and each way a
//! handshake can go wrong, with the error text asserted.
#![cfg(feature = "tls")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rpc_core::{ClientTlsConfig, RpcError, SerializerKind, ServerConfig, ServerTlsConfig};
use rpc_transport::{CallOptions, Connector, Endpoint, EndpointConfig, Server, TransportError};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

mod common;
use common::{Echo, Running, SLOW_STARTED, WAIT};

/// Certificates in a temporary directory: a CA, a server certificate it
/// signed for `localhost` and `127.0.0.1`, a client certificate, an
/// expired server certificate, and a second CA that signed nothing here.
struct Pki {
    dir: tempfile::TempDir,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        let root = ca("test CA");
        write("ca.pem", &root.pem());
        write("other-ca.pem", &ca("another CA").pem());
        let leaf = |names: Vec<String>, expired: bool, stem: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            if expired {
                params.not_before = rcgen::date_time_ymd(2000, 1, 1);
                params.not_after = rcgen::date_time_ymd(2001, 1, 1);
            }
            let cert = params.signed_by(&key, &root).unwrap();
            write(&format!("{stem}.pem"), &cert.pem());
            write(&format!("{stem}.key"), &key.serialize_pem());
        };
        let server_names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        leaf(server_names.clone(), false, "server");
        leaf(server_names, true, "expired");
        leaf(vec!["consumer-1".to_owned()], false, "client");
        write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
        );
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self, stem: &str, mutual: bool) -> ServerTlsConfig {
        ServerTlsConfig {
            cert_file: self.path(&format!("{stem}.pem")),
            key_file: self.path(&format!("{stem}.key")),
            client_ca_file: mutual.then(|| self.path("ca.pem")),
        }
    }

    fn client(&self, ca: &str, with_cert: bool) -> ClientTlsConfig {
        ClientTlsConfig {
            ca_file: Some(self.path(ca)),
            cert_file: with_cert.then(|| self.path("client.pem")),
            key_file: with_cert.then(|| self.path("client.key")),
            server_name: None,
        }
    }
}

/// A server with a 5 s handshake timeout: room for a debug-build
/// handshake on a loaded machine.
async fn start(tls: Option<ServerTlsConfig>) -> Running {
    start_with(tls, 5_000).await
}

/// A server whose TLS handshake (and first frame) must arrive within
/// `first_frame_timeout_ms` (ms).
async fn start_with(tls: Option<ServerTlsConfig>, first_frame_timeout_ms: u64) -> Running {
    let server = Server::builder(ServerConfig {
        tls,
        first_frame_timeout_ms,
        ..ServerConfig::default()
    })
    .service(Echo)
    .bind()
    .await
    .unwrap();
    Running::spawn(server)
}

fn endpoint(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Endpoint {
    let connector = match tls {
        Some(t) => Connector::Tls(rpc_transport::tls::TlsConnector::from_config(&t).unwrap()),
        None => Connector::Tcp,
    };
    Endpoint::new(
        addr.to_string(),
        EndpointConfig {
            connector,
            // No heartbeat within a test: one would also flush a stream
            // that forgot to, and hide the bug.
            heartbeat_after: Duration::from_secs(600),
            dead_after: Duration::from_secs(600),
            ..EndpointConfig::default()
        },
    )
}

fn opts() -> CallOptions<'static> {
    CallOptions {
        service: "Test:1.0",
        method: "echo",
        serializer: SerializerKind::Postcard,
        timeout: WAIT,
        metadata: rpc_core::Metadata::empty(),
        compression: rpc_core::Compression::None,
        compression_threshold: 0,
    }
}

async fn echo(ep: &Endpoint, text: &str) -> Result<String, RpcError> {
    ep.call(&opts(), &(text,)).await
}

fn text_of(e: &RpcError) -> String {
    rpc_core::error::report(e)
}

#[tokio::test]
async fn one_way_tls_carries_calls_large_and_concurrent() {
    let pki = Pki::new();
    let s = start(Some(pki.server("server", false))).await;
    let ep = Arc::new(endpoint(s.addr, Some(pki.client("ca.pem", false))));
    assert_eq!(echo(&ep, "hello").await.unwrap(), "hello");
    // Many TLS records in one reply, and many calls sharing the connection.
    let big: String = "0123456789abcdef".repeat(64 * 1024);
    assert_eq!(echo(&ep, &big).await.unwrap(), big);
    // Larger than the socket buffers: some TLS records wait in rustls when
    // the socket is full, and only a flush sends them (without one, this
    // reply never completes).
    let huge: String = "fedcba9876543210".repeat(384 * 1024);
    for _ in 0..3 {
        let back = tokio::time::timeout(WAIT, echo(&ep, &huge))
            .await
            .expect("reply stuck");
        assert!(back.unwrap() == huge);
    }
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let ep = ep.clone();
            tokio::spawn(async move { echo(&ep, &format!("call {i}")).await })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        assert_eq!(c.await.unwrap().unwrap(), format!("call {i}"));
    }
    s.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_admits_a_signed_client_and_refuses_one_without_a_certificate() {
    let pki = Pki::new();
    let s = start(Some(pki.server("server", true))).await;
    let with_cert = endpoint(s.addr, Some(pki.client("ca.pem", true)));
    assert_eq!(echo(&with_cert, "mtls").await.unwrap(), "mtls");

    let without = endpoint(s.addr, Some(pki.client("ca.pem", false)));
    let e = echo(&without, "x").await.unwrap_err();
    let t = text_of(&e);
    // TLS 1.3: the client finishes its side first, so the refusal arrives
    // as the server's alert on the first read.
    assert!(t.contains("CertificateRequired"), "{t}");
    // The server keeps serving good clients.
    assert_eq!(echo(&with_cert, "still").await.unwrap(), "still");
    s.shutdown().await;
}

#[tokio::test]
async fn bad_certificates_and_names_fail_the_dial_with_rustls_reasons() {
    let pki = Pki::new();
    let s = start(Some(pki.server("server", false))).await;
    // A CA that did not sign the server's certificate.
    let e = echo(
        &endpoint(s.addr, Some(pki.client("other-ca.pem", false))),
        "x",
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RpcError::Connect { .. }), "{e:?}");
    let t = text_of(&e);
    assert!(
        t.contains("TLS handshake failed") && t.contains("UnknownIssuer"),
        "{t}"
    );
    assert!(t.contains(&s.addr.to_string()), "names the address: {t}");
    // A name the certificate does not carry.
    let mut wrong_name = pki.client("ca.pem", false);
    wrong_name.server_name = Some("elsewhere.example".into());
    let t = text_of(
        &echo(&endpoint(s.addr, Some(wrong_name)), "x")
            .await
            .unwrap_err(),
    );
    assert!(t.contains("certificate not valid for name"), "{t}");
    // The good client still gets through.
    let good = endpoint(s.addr, Some(pki.client("ca.pem", false)));
    assert_eq!(echo(&good, "ok").await.unwrap(), "ok");
    s.shutdown().await;

    let expired = start(Some(pki.server("expired", false))).await;
    let t = text_of(
        &echo(
            &endpoint(expired.addr, Some(pki.client("ca.pem", false))),
            "x",
        )
        .await
        .unwrap_err(),
    );
    assert!(t.contains("certificate expired"), "{t}");
    expired.shutdown().await;
}

#[tokio::test]
async fn plaintext_and_tls_peers_that_disagree_get_clear_errors() {
    let pki = Pki::new();
    // A TLS client at a plaintext port.
    let plain = start(None).await;
    let t = text_of(
        &echo(
            &endpoint(plain.addr, Some(pki.client("ca.pem", false))),
            "x",
        )
        .await
        .unwrap_err(),
    );
    assert!(t.contains("does not speak TLS"), "{t}");
    assert_eq!(
        echo(&endpoint(plain.addr, None), "plain").await.unwrap(),
        "plain"
    );
    plain.shutdown().await;

    // A plaintext client at a TLS port: the server closes it (its frame
    // is no TLS record), the client gets an error, not a hang.
    let tls = start(Some(pki.server("server", false))).await;
    let e = tokio::time::timeout(WAIT, echo(&endpoint(tls.addr, None), "x"))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(
        matches!(
            e,
            RpcError::ConnectionClosed { .. } | RpcError::Unsent { .. }
        ),
        "{e:?}"
    );
    let good = endpoint(tls.addr, Some(pki.client("ca.pem", false)));
    assert_eq!(echo(&good, "tls").await.unwrap(), "tls");
    tls.shutdown().await;
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_closed_and_others_are_served() {
    let pki = Pki::new();
    let s = start_with(Some(pki.server("server", false)), 300).await;
    // Connects and says nothing: the server's handshake waits on it.
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let good = endpoint(s.addr, Some(pki.client("ca.pem", false)));
    assert_eq!(echo(&good, "meanwhile").await.unwrap(), "meanwhile");
    // Closed once the handshake timeout (first_frame_timeout_ms, 300 ms
    // here) passes: the read sees the end of the stream.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the server closes a silent handshake")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(echo(&good, "after").await.unwrap(), "after");
    s.shutdown().await;
}

#[tokio::test]
async fn unusable_certificate_files_fail_startup_naming_key_and_file() {
    let pki = Pki::new();
    let bind = |tls: ServerTlsConfig| async move {
        Server::builder(ServerConfig {
            tls: Some(tls),
            ..ServerConfig::default()
        })
        .service(Echo)
        .bind()
        .await
    };
    let config_error = |r: Result<Server, TransportError>| match r {
        Err(TransportError::Config(e)) => e,
        Err(other) => panic!("not a config error: {other}"),
        Ok(_) => panic!("bound with a bad certificate"),
    };
    // (what is wrong, the key named, a phrase of the message)
    let cases: [(ServerTlsConfig, &str, &str); 5] = [
        (
            ServerTlsConfig {
                cert_file: pki.path("nope.pem"),
                ..pki.server("server", false)
            },
            "server.tls.cert_file",
            "nope.pem",
        ),
        (
            ServerTlsConfig {
                cert_file: PathBuf::new(),
                ..pki.server("server", false)
            },
            "server.tls.cert_file",
            "is required",
        ),
        (
            ServerTlsConfig {
                cert_file: pki.path("garbage.pem"),
                ..pki.server("server", false)
            },
            "server.tls.cert_file",
            "garbage.pem",
        ),
        (
            ServerTlsConfig {
                key_file: pki.path("server.pem"),
                ..pki.server("server", false)
            },
            "server.tls.key_file",
            "no PEM private key",
        ),
        (
            ServerTlsConfig {
                key_file: pki.path("client.key"),
                ..pki.server("server", false)
            },
            "server.tls.key_file",
            "does not go with server.tls.cert_file",
        ),
    ];
    for (tls, key, phrase) in cases {
        let e = config_error(bind(tls).await);
        assert_eq!(e.key, key);
        assert_eq!(e.origin, "[server.tls]");
        assert!(e.message.contains(phrase), "{key}: {}", e.message);
    }

    let mut bad_ca = pki.client("garbage.pem", false);
    let e = rpc_transport::tls::TlsConnector::from_config(&bad_ca).unwrap_err();
    assert_eq!(e.key, "client.tls.ca_file");
    bad_ca.ca_file = Some(pki.path("ca.pem"));
    bad_ca.cert_file = Some(pki.path("client.pem"));
    let e = rpc_transport::tls::TlsConnector::from_config(&bad_ca).unwrap_err();
    assert_eq!(e.key, "client.tls.key_file");
}

/// Graceful shutdown over TLS: the go-away, the answers to the calls
/// already read, the close_notify and the linger all go through the TLS
/// stream's halves.
#[tokio::test]
async fn a_tls_server_drains_its_calls_on_shutdown() {
    let pki = Pki::new();
    let s = start(Some(pki.server("server", false))).await;
    let ep = Arc::new(endpoint(s.addr, Some(pki.client("ca.pem", false))));
    assert_eq!(echo(&ep, "warm").await.unwrap(), "warm");
    let slow = CallOptions {
        method: "slow_echo",
        ..opts()
    };
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let ep = ep.clone();
            tokio::spawn(async move {
                ep.call::<_, String>(&slow, &(format!("s{i}"), 300u64))
                    .await
            })
        })
        .collect();
    // Every call is running on the server; stop it now.
    let started = tokio::time::timeout(WAIT, SLOW_STARTED.acquire_many(20))
        .await
        .unwrap()
        .unwrap();
    started.forget();
    s.shutdown().await;
    for (i, c) in calls.into_iter().enumerate() {
        assert_eq!(
            c.await.unwrap().unwrap(),
            format!("s{i}"),
            "call {i} was drained"
        );
    }
    let e = echo(&ep, "after").await.unwrap_err();
    assert!(e.is_safe_to_retry(), "after shutdown: {e}");
}

#[tokio::test]
async fn ping_speaks_tls_when_configured() {
    use rpc_transport::client::{ping, ping_with};
    let pki = Pki::new();
    let s = start(Some(pki.server("server", false))).await;
    let tls = Connector::Tls(
        rpc_transport::tls::TlsConnector::from_config(&pki.client("ca.pem", false)).unwrap(),
    );
    let pong = ping_with(&s.addr.to_string(), WAIT, &tls).await.unwrap();
    assert!(pong.connect <= WAIT);
    // Plain ping at a TLS port: refused by the server, not a hang.
    let e = ping(&s.addr.to_string(), WAIT).await.unwrap_err();
    let t = rpc_core::error::report(&e);
    assert!(t.contains("a TLS provider?"), "{t}");
    s.shutdown().await;
}

/// A TLS client at a port that accepts and then says nothing: the dial
/// (handshake included) is bounded by the connect timeout.
#[tokio::test]
async fn a_server_that_never_answers_the_handshake_fails_the_dial_in_time() {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        // Accept and hold the connection open, silent.
        let (conn, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(conn);
    });
    let connector = Connector::Tls(
        rpc_transport::tls::TlsConnector::from_config(&pki.client("ca.pem", false)).unwrap(),
    );
    let ep = Endpoint::new(
        addr.to_string(),
        EndpointConfig {
            connector,
            connect_timeout: Duration::from_millis(300),
            ..EndpointConfig::default()
        },
    );
    let e = tokio::time::timeout(WAIT, echo(&ep, "x"))
        .await
        .expect("the dial is bounded")
        .unwrap_err();
    let t = text_of(&e);
    assert!(matches!(e, RpcError::Connect { .. }), "{e:?}");
    assert!(t.contains("connect timed out"), "{t}");
    held.abort();
}

/// A TLS peer that pipelines requests and never reads a reply: its
/// connection is closed at the idle bound, and the server's shutdown ends
/// within its drain deadline (a TLS close_notify that the peer never takes
/// must not hold either).
#[tokio::test]
async fn a_tls_peer_that_never_reads_does_not_hold_the_server() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let server = Server::builder(ServerConfig {
        tls: Some(pki.server("server", false)),
        idle_timeout_ms: 300,
        shutdown_timeout_ms: 300,
        // The silent peer holds the only slot until it is closed.
        max_connections: 1,
        ..ServerConfig::default()
    })
    .service(Echo)
    .bind()
    .await
    .unwrap();
    let addr = server.local_addr();
    let (stop, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let connector =
        rpc_transport::tls::TlsConnector::from_config(&pki.client("ca.pem", false)).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(&addr.to_string(), tcp).await.unwrap();
    // 200 echo requests of 64 KiB: far more replies than the socket
    // buffers hold, and this peer reads none of them.
    let payload = "z".repeat(64 * 1024);
    let writer = tokio::spawn(async move {
        for id in 1..=200u64 {
            let head = rpc_codec::RequestHead {
                request_id: id,
                serializer: SerializerKind::Postcard,
                deadline: Some(Duration::from_secs(60)),
                service: "Test:1.0",
                method: "echo",
                metadata: rpc_core::Metadata::empty(),
            };
            let frame = rpc_codec::encode_request(&head, &(&payload,), 1 << 20).unwrap();
            if tls.write_all(&frame).await.is_err() {
                break;
            }
        }
        // Hold the stream (unread) until the test ends.
        std::future::pending::<()>().await;
        drop(tls);
    });
    // The idle bound closes the silent peer's connection and frees its
    // slot: a good client gets in (each attempt a fresh endpoint; a slot
    // still held refuses it).
    let good = async {
        loop {
            let ep = endpoint(addr, Some(pki.client("ca.pem", false)));
            if echo(&ep, "in").await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, good)
        .await
        .expect("the silent peer's connection was never released");
    // Stop: the drain ends at its deadline.
    let _ = stop.send(());
    tokio::time::timeout(WAIT, done)
        .await
        .expect("the server's shutdown hung on a peer that does not read")
        .unwrap()
        .unwrap();
    writer.abort();
}
