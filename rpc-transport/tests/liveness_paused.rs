//! The server's liveness bounds (a frame trickling in, a large frame on a
//! slow link, an idle connection, a peer that stops reading) on tokio's
//! paused clock: the server runs on an in-memory network
//! (`MemoryNetwork`), the test writes raw bytes into its pipe, and every
//! wait is virtual time, so the bounds are checked exactly and no test
//! sleeps on the wall clock. (Moved here from `loopback.rs`, where they
//! slept on real sockets.)

use std::time::Duration;

use bytes::BytesMut;
use rpc_codec::{HEADER_LEN, MessageType};
use rpc_core::{SerializerKind, ServerConfig, StatusCode};
use rpc_transport::{MemoryNetwork, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

mod common;
use common::{Echo, frames_until_closed, heartbeat, read_frame};

/// The server on its own in-memory network, and the network to dial it.
struct Memory {
    net: MemoryNetwork,
    server: common::Running,
}

impl Memory {
    fn connect(&self) -> DuplexStream {
        self.net.connect(&self.server.addr.to_string()).unwrap()
    }

    async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

fn start_with(config: ServerConfig) -> Memory {
    let net = MemoryNetwork::new();
    let server = Server::builder(config)
        .service(Echo)
        .bind_memory(&net)
        .unwrap();
    Memory {
        net,
        server: common::Running::spawn(server),
    }
}

fn echo_request(id: u64, payload: &str) -> BytesMut {
    let head = rpc_codec::RequestHead {
        request_id: id,
        serializer: SerializerKind::Bincode,
        deadline: Some(Duration::from_secs(60)),
        service: "Test:1.0",
        method: "echo",
        metadata: rpc_core::Metadata::empty(),
    };
    let args =
        rpc_transport::encode_args(SerializerKind::Bincode, &(payload,), "Test", "echo").unwrap();
    rpc_codec::encode_request_raw(&head, &args, 1 << 24).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_frame_trickling_in_a_byte_at_a_time_is_bounded_by_the_frame_timeout() {
    let s = start_with(ServerConfig {
        first_frame_timeout_ms: 60_000,
        frame_timeout_ms: 500,
        ..ServerConfig::default()
    });
    let (mut rd, mut wr) = tokio::io::split(s.connect());
    wr.write_all(&heartbeat(1)).await.unwrap();
    // A request of 200 bytes, sent a byte every 50 ms: 10 s in all, while
    // bytes keep arriving all along.
    let mut f = rpc_codec::FrameBuf::with_capacity(200);
    f.body_mut().extend_from_slice(&[0u8; 200 - HEADER_LEN]);
    let frame = f
        .finish(0, MessageType::Request, StatusCode::Ok, 7, 1 << 20)
        .unwrap();
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 256];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let started = tokio::time::Instant::now();
    let mut sent = 0;
    for byte in frame.iter() {
        if closed.is_finished() || wr.write_all(&[*byte]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sent < frame.len(),
        "the whole trickled frame was taken: no bound on a partial frame"
    );
    tokio::time::timeout(common::WAIT, closed)
        .await
        .unwrap()
        .unwrap();
    // Virtual time: the bound held within its own period (500 ms, checked
    // on a tick), not after the whole 10 s trickle.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
    s.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_large_frame_arriving_steadily_is_not_cut_by_the_frame_timeout() {
    let s = start_with(ServerConfig {
        first_frame_timeout_ms: 300,
        frame_timeout_ms: 300,
        ..ServerConfig::default()
    });
    let mut raw = s.connect();
    // A 64 KiB echo, sent in 4 KiB pieces every 50 ms: 0.8 s in all, past
    // both bounds, at about 80 KiB/s (a slow link, not a stalled one).
    let payload = "y".repeat(64 * 1024);
    let frame = echo_request(1, &payload);
    for piece in frame.chunks(4096) {
        raw.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = read_frame(&mut raw).await;
    assert_eq!(reply.header.request_id, 1);
    assert_eq!(reply.header.status, StatusCode::Ok);
    let echoed: String =
        rpc_codec::serializer::decode(SerializerKind::Bincode, &reply.body).unwrap();
    assert_eq!(echoed.len(), payload.len());
    s.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_gets_a_go_away_then_is_closed() {
    let s = start_with(ServerConfig {
        idle_timeout_ms: 300,
        ..ServerConfig::default()
    });
    let mut raw = s.connect();
    raw.write_all(&heartbeat(1)).await.unwrap();
    let started = tokio::time::Instant::now();
    let frames = frames_until_closed(&mut raw)
        .await
        .expect("an idle connection was not closed");
    let kinds: Vec<_> = frames.iter().map(|f| f.header.message_type).collect();
    assert_eq!(kinds, [MessageType::Heartbeat, MessageType::GoAway]);
    // Nothing was read: every call the peer may have sent since is unread.
    assert_eq!(frames[1].header.request_id, 0);
    // Not before the idle bound, and not long after it (the server checks
    // on a tick and lingers up to 1 s for the peer to close).
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(300) && after < Duration::from_secs(3),
        "{after:?}"
    );
    s.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_its_replies_is_closed() {
    let s = start_with(ServerConfig {
        idle_timeout_ms: 300,
        ..ServerConfig::default()
    });
    // 400 echo calls of 64 KiB each: 25 MiB of replies, far more than the
    // pipe's buffer and the server's write high-water mark hold.
    let payload = "x".repeat(64 * 1024);
    let mut requests = BytesMut::new();
    for id in 1..=400u64 {
        requests.extend_from_slice(&echo_request(id, &payload));
    }
    let (mut rd, mut wr) = tokio::io::split(s.connect());
    // The writes stall once the server stops reading us; that is expected.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&requests).await;
        wr
    });
    // The input: a peer that reads nothing for a while (as a consumer
    // stopped with SIGSTOP), longer than the idle bound.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(common::WAIT, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "a peer that read nothing kept its connection"
    );
    assert!(
        total < 400 * 64 * 1024,
        "every reply was delivered ({total} bytes): the server never gave up"
    );
    writer.abort();
    s.shutdown().await;
}
