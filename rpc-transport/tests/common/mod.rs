//! Helpers the transport's test binaries share: a server run in a task,
//! a small echo service, and raw frame reading for tests that speak the
//! protocol by hand. (Each test binary uses a part of it.)
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rpc_codec::{FrameCodec, MessageType, encode_empty};
use rpc_transport::Server;
use rpc_transport::server::{Call, CallError, HandlerFuture, ServiceHandler};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;
use tokio_util::codec::Decoder;

/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A server running in a task until [`Running::shutdown`].
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Runs `server` in a task.
    pub fn spawn(server: Server) -> Self {
        let addr = server.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            stop: Some(tx),
            done,
        }
    }

    /// Tells the server to stop, without waiting.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Whether the server's task has ended.
    pub fn is_finished(&self) -> bool {
        self.done.is_finished()
    }

    /// Stops the server and waits (bounded) until it has drained.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, self.done)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Counts `slow_echo` calls that have started (for the one test that
/// waits for them).
pub static SLOW_STARTED: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(0);

/// `Test:1.0`: `echo(s)` and `slow_echo(s, ms)`.
pub struct Echo;

impl ServiceHandler for Echo {
    fn service_name(&self) -> &str {
        "Test"
    }
    fn service_version(&self) -> &str {
        "1.0"
    }
    fn methods(&self) -> &'static [&'static str] {
        &["echo", "slow_echo"]
    }
    fn call(&self, call: Call<'_>) -> Result<HandlerFuture, CallError> {
        let r = call.replier;
        match call.method {
            "slow_echo" => {
                let (s, ms): (String, u64) = call.decode_args()?;
                SLOW_STARTED.add_permits(1);
                Ok(Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    r.encode(&s)
                }))
            }
            _ => {
                let (s,): (String,) = call.decode_args()?;
                Ok(Box::pin(async move { r.encode(&s) }))
            }
        }
    }
}

/// A heartbeat frame with request id `id`.
pub fn heartbeat(id: u64) -> BytesMut {
    let mut hb = BytesMut::new();
    encode_empty(&mut hb, MessageType::Heartbeat, id);
    hb
}

/// The next frame on `stream` (panics on a close or after [`WAIT`]).
pub async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> rpc_codec::Frame {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    loop {
        if let Some(f) = codec.decode(&mut buf).unwrap() {
            return f;
        }
        let n = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed while waiting for a frame");
    }
}

/// Every frame until the peer closes; `None` if it never does ([`WAIT`]).
pub async fn frames_until_closed(
    stream: &mut (impl AsyncRead + Unpin),
) -> Option<Vec<rpc_codec::Frame>> {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    loop {
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            frames.push(f);
        }
        match tokio::time::timeout(WAIT, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(frames),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}
