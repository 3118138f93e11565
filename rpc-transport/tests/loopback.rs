//! Transport over loopback TCP with a hand-written service: concurrency and
//! ordering, deadlines, cancellation, reconnects, bad frames, shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rpc_codec::{HEADER_LEN, Header, MessageType, encode_empty};
use rpc_core::{RpcError, SerializerKind, ServerConfig, StatusCode};
use rpc_transport::server::{Call, CallError, HandlerFuture, ServiceHandler};
use rpc_transport::{CallOptions, Endpoint, EndpointConfig, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

mod common;
use common::{WAIT, frames_until_closed, heartbeat, read_frame};

/// Test service. `block(k)` waits until `release(k)`; `hang` never returns
/// and reports its cancellation through `dropped`.
#[derive(Default)]
struct TestService {
    gates: Mutex<HashMap<u64, Arc<Notify>>>,
    dropped: Arc<Notify>,
    started: Arc<Notify>,
}

impl TestService {
    fn gate(&self, k: u64) -> Arc<Notify> {
        self.gates
            .lock()
            .unwrap()
            .entry(k)
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }
}

struct NotifyOnDrop(Arc<Notify>);
impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

struct Handler(Arc<TestService>);

impl ServiceHandler for Handler {
    fn service_name(&self) -> &str {
        "Test"
    }
    fn service_version(&self) -> &str {
        "1.0"
    }
    fn methods(&self) -> &'static [&'static str] {
        &["echo", "add", "block", "release", "hang", "panic"]
    }
    fn call(&self, call: Call<'_>) -> Result<HandlerFuture, CallError> {
        let r = call.replier;
        let svc = self.0.clone();
        match call.method {
            "echo" => {
                let (s,): (String,) = call.decode_args()?;
                Ok(Box::pin(async move { r.encode(&s) }))
            }
            "add" => {
                let (a, b): (i32, i32) = call.decode_args()?;
                Ok(Box::pin(async move { r.encode(&(a + b)) }))
            }
            "block" => {
                let (k,): (u64,) = call.decode_args()?;
                let gate = svc.gate(k);
                Ok(Box::pin(async move {
                    svc.started.notify_one();
                    gate.notified().await;
                    r.encode(&k)
                }))
            }
            "release" => {
                let (k,): (u64,) = call.decode_args()?;
                svc.gate(k).notify_one();
                Ok(Box::pin(async move { r.encode(&()) }))
            }
            "hang" => Ok(Box::pin(async move {
                let _guard = NotifyOnDrop(svc.dropped.clone());
                svc.started.notify_one();
                std::future::pending::<()>().await;
                r.encode(&())
            })),
            "panic" => Ok(Box::pin(async move {
                if r.encode(&()).is_ok() {
                    panic!("handler bug");
                }
                r.encode(&())
            })),
            _ => Err(call.method_not_found("Test:1.0")),
        }
    }
}

/// A server with its test service, running in a task.
struct Running {
    addr: SocketAddr,
    svc: Arc<TestService>,
    server: common::Running,
}

impl Running {
    async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

async fn start_with(config: ServerConfig) -> Running {
    let svc = Arc::new(TestService::default());
    let server = Server::builder(config)
        .service(Handler(svc.clone()))
        .bind()
        .await
        .unwrap();
    let server = common::Running::spawn(server);
    Running {
        addr: server.addr,
        svc,
        server,
    }
}

async fn start() -> Running {
    start_with(ServerConfig::default()).await
}

fn opts(method: &str, timeout: Duration) -> CallOptions<'_> {
    CallOptions {
        service: "Test:1.0",
        method,
        serializer: SerializerKind::Bincode,
        timeout,
        metadata: rpc_core::Metadata::empty(),
        compression: rpc_core::Compression::None,
        compression_threshold: 0,
    }
}

fn endpoint(addr: SocketAddr) -> Arc<Endpoint> {
    Arc::new(Endpoint::new(addr.to_string(), EndpointConfig::default()))
}

#[tokio::test]
async fn unary_calls_with_both_serializers() {
    let s = start().await;
    let ep = endpoint(s.addr);
    let sum: i32 = ep.call(&opts("add", WAIT), &(2, 40)).await.unwrap();
    assert_eq!(sum, 42);
    let mut o = opts("echo", WAIT);
    o.serializer = SerializerKind::Json;
    let back: String = ep.call(&o, &("héllo",)).await.unwrap();
    assert_eq!(back, "héllo");
    s.shutdown().await;
}

#[tokio::test]
async fn responses_come_back_out_of_order_on_one_connection() {
    let s = start().await;
    let ep = endpoint(s.addr);
    let (ep2, ep3) = (ep.clone(), ep.clone());
    // The first call blocks until the second is served: only a multiplexed
    // connection that answers out of order can finish both.
    let first = tokio::spawn(async move {
        let k: u64 = ep2.call(&opts("block", WAIT), &(7u64,)).await.unwrap();
        k
    });
    tokio::time::timeout(WAIT, s.svc.started.notified())
        .await
        .unwrap();
    let () = ep3.call(&opts("release", WAIT), &(7u64,)).await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, first).await.unwrap().unwrap(), 7);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_all_answered() {
    let s = start().await;
    let ep = endpoint(s.addr);
    let mut tasks = Vec::new();
    for i in 0..500i32 {
        let ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            let r: i32 = ep.call(&opts("add", WAIT), &(i, 1)).await.unwrap();
            assert_eq!(r, i + 1);
        }));
    }
    for t in tasks {
        tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
    s.shutdown().await;
}

/// 300 calls of 2 KiB each in flight at once: bursts of about 600 KiB each
/// way, far past the 8 KiB at which a connection starts streaming its
/// write buffer and past its 256 KiB high-water mark. Every call must get
/// its own payload back.
async fn bursts_round_trip_intact() {
    let s = start().await;
    let ep = endpoint(s.addr);
    let mut tasks = Vec::new();
    for i in 0..300usize {
        let ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            let payload: String = std::iter::repeat_n(char::from(b'a' + (i % 26) as u8), 2048)
                .chain(i.to_string().chars())
                .collect();
            let back: String = ep.call(&opts("echo", WAIT), &(&payload,)).await.unwrap();
            assert_eq!(back, payload, "call {i} got another call's reply");
        }));
    }
    for t in tasks {
        tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
    s.shutdown().await;
}

#[tokio::test]
async fn bursts_round_trip_intact_on_current_thread() {
    bursts_round_trip_intact().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn bursts_round_trip_intact_on_multi_thread() {
    bursts_round_trip_intact().await;
}

#[tokio::test]
async fn timeout_fails_the_call_and_cancels_the_handler() {
    let s = start().await;
    let ep = endpoint(s.addr);
    let err = ep
        .call::<_, ()>(&opts("hang", Duration::from_millis(200)), &())
        .await
        .unwrap_err();
    // The client's timer or the server's (same remaining time) fires first.
    assert!(err.is_timeout(), "{err}");
    // The server stops the handler: deadline travelled with the request.
    tokio::time::timeout(WAIT, s.svc.dropped.notified())
        .await
        .expect("handler was not cancelled");
    s.shutdown().await;
}

#[tokio::test]
async fn dropping_a_call_future_cancels_it_on_the_server() {
    let s = start().await;
    let ep = endpoint(s.addr);
    let ep2 = ep.clone();
    let call = tokio::spawn(async move { ep2.call::<_, ()>(&opts("hang", WAIT), &()).await });
    tokio::time::timeout(WAIT, s.svc.started.notified())
        .await
        .unwrap();
    call.abort();
    // Long before the 10 s deadline the handler is dropped via a cancel frame.
    tokio::time::timeout(Duration::from_secs(5), s.svc.dropped.notified())
        .await
        .expect("cancel did not reach the handler");
    // The connection is still good.
    let r: i32 = ep.call(&opts("add", WAIT), &(1, 1)).await.unwrap();
    assert_eq!(r, 2);
    s.shutdown().await;
}

#[tokio::test]
async fn unknown_service_and_method_are_error_responses() {
    let s = start().await;
    let ep = endpoint(s.addr);
    let err = ep
        .call::<_, ()>(&opts("nope", WAIT), &())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::MethodNotFound), "{err}");
    let mut o = opts("echo", WAIT);
    o.service = "Missing:1.0";
    let err = ep.call::<_, String>(&o, &("x",)).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::ServiceNotFound), "{err}");
    // Wrong argument types are a serialization error, not a closed connection.
    let err = ep
        .call::<_, i32>(&opts("add", WAIT), &("not", "ints"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Serialization), "{err}");
    let r: i32 = ep.call(&opts("add", WAIT), &(3, 4)).await.unwrap();
    assert_eq!(r, 7);
    s.shutdown().await;
}

#[tokio::test]
async fn a_panicking_handler_is_a_handler_error() {
    let s = start().await;
    let ep = endpoint(s.addr);
    let err = ep
        .call::<_, ()>(&opts("panic", WAIT), &())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Handler), "{err}");
    let r: i32 = ep.call(&opts("add", WAIT), &(1, 2)).await.unwrap();
    assert_eq!(r, 3);
    s.shutdown().await;
}

#[tokio::test]
async fn server_in_flight_limit_answers_overloaded() {
    let s = start_with(ServerConfig {
        max_in_flight: 1,
        ..ServerConfig::default()
    })
    .await;
    let ep = endpoint(s.addr);
    let ep2 = ep.clone();
    let blocked =
        tokio::spawn(async move { ep2.call::<_, u64>(&opts("block", WAIT), &(1u64,)).await });
    tokio::time::timeout(WAIT, s.svc.started.notified())
        .await
        .unwrap();
    let err = ep
        .call::<_, i32>(&opts("add", WAIT), &(1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Overloaded), "{err}");
    assert!(err.is_safe_to_retry());
    s.svc.gate(1).notify_one();
    assert_eq!(blocked.await.unwrap().unwrap(), 1);
    s.shutdown().await;
}

async fn read_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let s = start_with(ServerConfig {
        max_frame_len: 4096,
        ..ServerConfig::default()
    })
    .await;
    let ep = endpoint(s.addr);
    let r: i32 = ep.call(&opts("add", WAIT), &(1, 1)).await.unwrap();
    assert_eq!(r, 2);

    // Garbage.
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_closed(&mut raw).await,
        "garbage did not close the connection"
    );

    // A header announcing a frame over the limit: closed before any body.
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let mut hdr = [0u8; HEADER_LEN];
    Header {
        serializer: 0,
        message_type: MessageType::Request,
        status: StatusCode::Ok,
        request_id: 1,
        body_len: 1 << 30,
    }
    .write_to(&mut hdr);
    raw.write_all(&hdr).await.unwrap();
    assert!(read_closed(&mut raw).await, "oversized frame did not close");

    // A truncated frame followed by EOF.
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    raw.write_all(&hdr[..7]).await.unwrap();
    raw.shutdown().await.unwrap();
    assert!(read_closed(&mut raw).await);

    // A well-framed request whose envelope is garbage: error response, not close.
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let mut f = rpc_codec::FrameBuf::with_capacity(3);
    f.body_mut().extend_from_slice(&[1, 2, 3]);
    let frame = f
        .finish(0, MessageType::Request, StatusCode::Ok, 99, 4096)
        .unwrap();
    raw.write_all(&frame).await.unwrap();
    let reply = read_frame(&mut raw).await;
    assert_eq!(reply.header.request_id, 99);
    assert_eq!(reply.header.status, StatusCode::BadRequest);

    // A heartbeat is echoed on the same connection.
    let mut hb = BytesMut::new();
    encode_empty(&mut hb, MessageType::Heartbeat, 5);
    raw.write_all(&hb).await.unwrap();
    let reply = read_frame(&mut raw).await;
    assert_eq!(reply.header.message_type, MessageType::Heartbeat);
    assert_eq!(reply.header.request_id, 5);

    // Everyone else is still served.
    let r: i32 = ep.call(&opts("add", WAIT), &(2, 2)).await.unwrap();
    assert_eq!(r, 4);
    s.shutdown().await;
}

#[tokio::test]
async fn reconnects_after_the_server_restarts() {
    let s = start().await;
    let addr = s.addr;
    let ep = endpoint(addr);
    let r: i32 = ep.call(&opts("add", WAIT), &(1, 1)).await.unwrap();
    assert_eq!(r, 2);
    s.shutdown().await;

    // The server is gone: calls fail fast with a clear error, never hang.
    let err = ep
        .call::<_, i32>(&opts("add", WAIT), &(1, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RpcError::ConnectionClosed { .. } | RpcError::Connect { .. } | RpcError::Unsent { .. }
        ),
        "{err}"
    );

    // Same port again.
    let s2 = start_with(ServerConfig {
        port: addr.port(),
        ..ServerConfig::default()
    })
    .await;
    let ok = tokio::time::timeout(WAIT, async {
        loop {
            match ep.call::<_, i32>(&opts("add", WAIT), &(2, 3)).await {
                Ok(v) => return v,
                Err(
                    RpcError::Connect { .. }
                    | RpcError::ConnectionClosed { .. }
                    | RpcError::Unsent { .. },
                ) => {
                    // Backoff gate: the endpoint itself decides when to dial.
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    })
    .await
    .expect("did not reconnect");
    assert_eq!(ok, 5);
    s2.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_calls() {
    let mut s = start().await;
    let ep = endpoint(s.addr);
    let ep2 = ep.clone();
    let in_flight =
        tokio::spawn(async move { ep2.call::<_, u64>(&opts("block", WAIT), &(3u64,)).await });
    tokio::time::timeout(WAIT, s.svc.started.notified())
        .await
        .unwrap();

    s.server.stop();
    // New connections are refused once the listener is gone.
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            if TcpStream::connect(s.addr).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused.is_ok(), "listener still accepting after shutdown");
    assert!(!s.server.is_finished(), "server stopped before draining");

    // A call on the draining connection is not read; the server's go-away
    // tells the client so, and the error says it is safe to send elsewhere.
    for _ in 0..3 {
        let err = ep
            .call::<_, i32>(&opts("add", WAIT), &(1, 1))
            .await
            .unwrap_err();
        assert!(err.is_safe_to_retry(), "{err:?}");
    }

    s.svc.gate(3).notify_one();
    let v = tokio::time::timeout(WAIT, in_flight)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(v, 3);
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_aborts_calls_that_outlive_the_drain_deadline() {
    let mut s = start_with(ServerConfig {
        shutdown_timeout_ms: 200,
        ..ServerConfig::default()
    })
    .await;
    let ep = endpoint(s.addr);
    let ep2 = ep.clone();
    let stuck = tokio::spawn(async move { ep2.call::<_, ()>(&opts("hang", WAIT), &()).await });
    tokio::time::timeout(WAIT, s.svc.started.notified())
        .await
        .unwrap();
    s.server.stop();
    s.shutdown().await;
    let err = tokio::time::timeout(WAIT, stuck)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RpcError::ConnectionClosed { .. }), "{err}");
}

#[tokio::test]
async fn connection_refused_is_a_connect_error_and_backs_off() {
    // Bind and drop to find a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // A backoff longer than the test, so the second call lands inside it
    // however long the machine takes between the two calls (the default's
    // first pause is 25-50 ms).
    let ep = Endpoint::new(
        format!("127.0.0.1:{port}"),
        EndpointConfig {
            backoff_initial: Duration::from_secs(60),
            ..EndpointConfig::default()
        },
    );
    let e1 = ep
        .call::<_, i32>(&opts("add", WAIT), &(1, 1))
        .await
        .unwrap_err();
    assert!(matches!(e1, RpcError::Connect { .. }), "{e1}");
    assert!(e1.is_safe_to_retry());
    let e2 = ep
        .call::<_, i32>(&opts("add", WAIT), &(1, 1))
        .await
        .unwrap_err();
    assert!(e2.to_string().contains("cannot connect"), "{e2}");
    let src = std::error::Error::source(&e2).unwrap().to_string();
    assert!(src.contains("backing off"), "{src}");
}

// ----------------------------------------------------- stalled connections
// Issue 12, fault 2: a few connections that make no progress must not take
// a provider off the air.

/// A heartbeat frame, the cheapest complete frame a peer can send.
/// Reads frames until the server closes the connection; the frames read.
#[tokio::test]
async fn a_silent_connection_holding_the_last_slot_is_closed_and_others_are_refused_meanwhile() {
    let s = start_with(ServerConfig {
        max_connections: 1,
        // Long enough that the caller below surely finds the slot taken.
        first_frame_timeout_ms: 2_000,
        ..ServerConfig::default()
    })
    .await;
    // Takes the only slot and sends nothing (connections are accepted in
    // the order they were queued, so it is served before the caller's).
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let ep = endpoint(s.addr);
    let err = ep
        .call::<_, i32>(&opts("add", WAIT), &(1, 2))
        .await
        .unwrap_err();
    // Refused at once with a go-away, not left in the accept queue until
    // its deadline: safe to send elsewhere.
    assert!(
        matches!(err, RpcError::Unsent { .. }),
        "a caller of a full server got {err:?}"
    );
    assert!(err.is_safe_to_retry());
    // The silent connection is closed for sending no frame in time ...
    let frames = frames_until_closed(&mut silent)
        .await
        .expect("a silent connection was not closed");
    // A go-away that says nothing was read.
    let summary: Vec<_> = frames
        .iter()
        .map(|f| (f.header.message_type, f.header.request_id))
        .collect();
    assert_eq!(summary, [(MessageType::GoAway, 0)]);
    drop(silent);
    // ... and its slot serves callers again.
    let r: i32 = ep.call(&opts("add", WAIT), &(1, 2)).await.unwrap();
    assert_eq!(r, 3);
    s.shutdown().await;
}

#[tokio::test]
async fn a_frame_sent_by_halves_is_bounded_by_the_frame_timeout() {
    let s = start_with(ServerConfig {
        first_frame_timeout_ms: 60_000,
        frame_timeout_ms: 300,
        ..ServerConfig::default()
    })
    .await;
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    raw.write_all(&heartbeat(1)).await.unwrap();
    // Half a header, then nothing.
    raw.write_all(&heartbeat(2)[..7]).await.unwrap();
    let frames = frames_until_closed(&mut raw)
        .await
        .expect("a half-sent frame kept its connection open");
    // The heartbeat before it was answered, then a go-away.
    let kinds: Vec<_> = frames.iter().map(|f| f.header.message_type).collect();
    assert_eq!(kinds, [MessageType::Heartbeat, MessageType::GoAway]);
    s.shutdown().await;
}

// The liveness bounds that depend on time passing (a trickling frame, a
// slow large frame, an idle connection, a peer that stops reading) are in
// `liveness_paused.rs`, on the paused clock over an in-memory network.

// Issue 12, fault 8: a fatal decode error must not tear down calls already
// read on the same connection.
#[tokio::test]
async fn a_bad_frame_behind_a_good_request_answers_the_request_then_goes_away() {
    let s = start_with(ServerConfig {
        max_frame_len: 4096,
        ..ServerConfig::default()
    })
    .await;
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let head = rpc_codec::RequestHead {
        request_id: 1,
        serializer: SerializerKind::Bincode,
        deadline: Some(WAIT),
        service: "Test:1.0",
        method: "add",
        metadata: rpc_core::Metadata::empty(),
    };
    let args =
        rpc_transport::encode_args(SerializerKind::Bincode, &(20, 22), "Test", "add").unwrap();
    let mut bytes = BytesMut::new();
    bytes.extend_from_slice(&rpc_codec::encode_request_raw(&head, &args, 4096).unwrap());
    // Right behind it, in the same write: a header claiming a body over
    // `max_frame_len`.
    let mut hdr = [0u8; HEADER_LEN];
    Header {
        serializer: 0,
        message_type: MessageType::Request,
        status: StatusCode::Ok,
        request_id: 2,
        body_len: 1 << 20,
    }
    .write_to(&mut hdr);
    bytes.extend_from_slice(&hdr);
    raw.write_all(&bytes).await.unwrap();
    let frames = frames_until_closed(&mut raw)
        .await
        .expect("the connection was not closed");
    let summary: Vec<_> = frames
        .iter()
        .map(|f| (f.header.message_type, f.header.request_id, f.header.status))
        .collect();
    assert_eq!(
        summary,
        [
            (MessageType::Response, 1, StatusCode::Ok),
            (MessageType::GoAway, 1, StatusCode::Ok)
        ]
    );
    let sum: i32 = rpc_codec::serializer::decode(SerializerKind::Bincode, &frames[0].body).unwrap();
    assert_eq!(sum, 42);
    s.shutdown().await;
}

fn big_text() -> String {
    (0..2000).map(|i| format!("user-{} ", i % 13)).collect()
}

/// A request frame for `Test:1.0.echo(text)` in bincode, compressed with
/// `c` whatever its size.
fn compressed_echo(c: rpc_core::Compression, id: u64, text: &str) -> BytesMut {
    let head = rpc_codec::RequestHead {
        request_id: id,
        serializer: SerializerKind::Bincode,
        deadline: Some(WAIT),
        service: "Test:1.0",
        method: "echo",
        metadata: rpc_core::Metadata::empty(),
    };
    let plain = rpc_codec::encode_request(&head, &(text,), 1 << 20).unwrap();
    rpc_codec::compression::compress_frame(plain, c, 0)
}

#[tokio::test]
async fn compressed_calls_round_trip_and_replies_use_the_request_algorithm() {
    use rpc_codec::compression::{flag, open_body};
    use rpc_core::Compression;
    let s = start_with(ServerConfig {
        compression_threshold: 256,
        ..ServerConfig::default()
    })
    .await;
    let ep = endpoint(s.addr);
    let text = big_text();
    for c in Compression::ALL {
        let o = CallOptions {
            compression: c,
            compression_threshold: 256,
            ..opts("echo", WAIT)
        };
        let back: String = ep.call(&o, &(&text,)).await.unwrap();
        assert_eq!(back, text, "{c:?}");
        let short: String = ep.call(&o, &("hi",)).await.unwrap();
        assert_eq!(short, "hi");
    }

    // On the wire: the reply to a compressed request is compressed with
    // the same algorithm when it is over the server's threshold...
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    for (i, c) in [Compression::Lz4, Compression::Zstd]
        .into_iter()
        .enumerate()
    {
        let id = i as u64 + 1;
        let req = compressed_echo(c, id, &text);
        assert_eq!(req[3], flag(0, c));
        raw.write_all(&req).await.unwrap();
        let reply = read_frame(&mut raw).await;
        assert_eq!(reply.header.request_id, id);
        assert_eq!(reply.header.status, StatusCode::Ok);
        assert_eq!(reply.header.serializer, flag(0, c), "{c:?}");
        assert!((reply.header.body_len as usize) < text.len() / 4);
        let (ser, body) = open_body(reply.header.serializer, reply.body, 1 << 20).unwrap();
        assert_eq!(ser, 0);
        let back: String = rpc_codec::serializer::decode(SerializerKind::Bincode, &body).unwrap();
        assert_eq!(back, text);
        // ... and plain when it is under it.
        raw.write_all(&compressed_echo(c, 10 + id, "hi"))
            .await
            .unwrap();
        let reply = read_frame(&mut raw).await;
        assert_eq!(
            reply.header.serializer, 0,
            "{c:?}: small replies stay plain"
        );
    }
    // A consumer that does not compress never gets a compressed reply.
    let plain: String = ep.call(&opts("echo", WAIT), &(&text,)).await.unwrap();
    assert_eq!(plain, text);
    let head = rpc_codec::RequestHead {
        request_id: 30,
        serializer: SerializerKind::Bincode,
        deadline: Some(WAIT),
        service: "Test:1.0",
        method: "echo",
        metadata: rpc_core::Metadata::empty(),
    };
    raw.write_all(&rpc_codec::encode_request(&head, &(&text,), 1 << 20).unwrap())
        .await
        .unwrap();
    let reply = read_frame(&mut raw).await;
    assert_eq!(reply.header.serializer, 0);
    assert_eq!(
        reply.body.len(),
        text.len() + 3,
        "bincode: varint length, then the text"
    );
    s.shutdown().await;
}

/// Hostile compressed bodies are answered with `bad request` on the same
/// connection, which keeps serving: a zstd bomb (32 KiB that expand to
/// 1 GiB, against a 1 MiB limit), the reserved flag, and lz4 garbage.
#[tokio::test]
async fn hostile_compressed_requests_are_refused_and_the_connection_lives() {
    let s = start_with(ServerConfig {
        max_frame_len: 1 << 20,
        ..ServerConfig::default()
    })
    .await;
    let ep = endpoint(s.addr);
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let send = |body: Vec<u8>, serializer: u8, id: u64| {
        let mut f = rpc_codec::FrameBuf::with_capacity(body.len());
        f.body_mut().extend_from_slice(&body);
        f.finish(
            serializer,
            MessageType::Request,
            StatusCode::Ok,
            id,
            1 << 20,
        )
        .unwrap()
    };
    // 8192 RLE blocks of 128 KiB of zeros.
    let mut bomb = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 7 << 3];
    for i in 0..8192u32 {
        let header = u32::from(i == 8191) | (1 << 1) | ((128 * 1024) << 3);
        bomb.extend_from_slice(&header.to_le_bytes()[..3]);
        bomb.push(0);
    }
    let mut lz4_garbage = 1000u32.to_le_bytes().to_vec();
    lz4_garbage.extend_from_slice(&[0xFF; 40]);
    for (id, body, byte, want) in [
        (1, bomb, 0x80, "over the maximum"),
        (2, b"whatever".to_vec(), 0xC0, "unknown compression flag 3"),
        (3, lz4_garbage, 0x40, "lz4 decompression failed"),
    ] {
        raw.write_all(&send(body, byte, id)).await.unwrap();
        let reply = read_frame(&mut raw).await;
        assert_eq!(reply.header.request_id, id);
        assert_eq!(reply.header.status, StatusCode::BadRequest);
        assert_eq!(reply.header.serializer & 0xC0, 0, "error replies are plain");
        let msg = String::from_utf8_lossy(&reply.body);
        assert!(msg.contains(want), "{id}: {msg}");
    }
    // The same connection still answers.
    let mut hb = BytesMut::new();
    encode_empty(&mut hb, MessageType::Heartbeat, 5);
    raw.write_all(&hb).await.unwrap();
    assert_eq!(read_frame(&mut raw).await.header.request_id, 5);
    let r: i32 = ep.call(&opts("add", WAIT), &(2, 2)).await.unwrap();
    assert_eq!(r, 4);
    s.shutdown().await;
}
