//! [`ping`]: one heartbeat round trip on a fresh connection, to tell "the
//! process is up and speaks this protocol" from "it is registered" (the
//! `rpc ping` command).

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use rpc_codec::{HEADER_LEN, Header, MessageType, encode_empty};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};

use crate::TransportError;
use crate::connect::{Connector, Dialed};

/// The request id of a ping's heartbeat; the server echoes it.
const PING_ID: u64 = 0x7069_6e67;

/// How long a [`ping`] took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pong {
    /// Dialling the address (TCP handshake).
    pub connect: Duration,
    /// Writing the heartbeat until its reply was read.
    pub round_trip: Duration,
}

/// Dials `addr` (`host:port`), sends one heartbeat frame and waits for the
/// server's heartbeat reply, all within `limit`. The connection is closed
/// afterwards.
///
/// # Errors
/// [`TransportError::Ping`] naming the address and why: the dial failed,
/// no reply came within `limit`, or the reply was not a heartbeat of this
/// protocol (another server on that port).
pub async fn ping(addr: &str, limit: Duration) -> Result<Pong, TransportError> {
    ping_with(addr, limit, &Connector::Tcp).await
}

/// [`ping`] through `connector`: with TLS, `connect` includes the
/// handshake, and a handshake failure is the error.
pub async fn ping_with(
    addr: &str,
    limit: Duration,
    connector: &Connector,
) -> Result<Pong, TransportError> {
    let fail = |reason: String, source: Option<io::Error>| TransportError::Ping {
        addr: addr.to_owned(),
        reason,
        source,
    };
    let started = Instant::now();
    let dial = connector.dial(addr);
    let stream = match timeout(limit, dial).await {
        Err(_) => return Err(fail(format!("cannot connect within {limit:?}"), None)),
        Ok(Err(e)) => return Err(fail("cannot connect".into(), Some(e))),
        Ok(Ok(stream)) => stream,
    };
    match stream {
        Dialed::Tcp(s) => exchange(s, addr, started, limit).await.map_err(|e| match e {
            // A TLS server closes a plaintext peer during its handshake.
            TransportError::Ping {
                addr,
                reason,
                source: Some(io),
            } if io.kind() == io::ErrorKind::UnexpectedEof => TransportError::Ping {
                addr,
                reason: format!(
                    "{reason}: closed without a reply (a TLS provider? set [client.tls] to ping it over TLS)"
                ),
                source: Some(io),
            },
            other => other,
        }),
        Dialed::Memory(s) => exchange(s, addr, started, limit).await,
        #[cfg(feature = "tls")]
        Dialed::Tls(s) => exchange(*s, addr, started, limit).await,
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: &str,
    started: Instant,
    limit: Duration,
) -> Result<Pong, TransportError> {
    let fail = |reason: String, source: Option<io::Error>| TransportError::Ping {
        addr: addr.to_owned(),
        reason,
        source,
    };
    let connect = started.elapsed();
    let mut frame = BytesMut::with_capacity(HEADER_LEN);
    encode_empty(&mut frame, MessageType::Heartbeat, PING_ID);
    let sent = Instant::now();
    let mut head = [0u8; HEADER_LEN];
    let round = async {
        stream.write_all(&frame).await?;
        stream.flush().await?;
        stream.read_exact(&mut head).await
    };
    match timeout(limit.saturating_sub(connect), round).await {
        Err(_) => return Err(fail(format!("no reply within {limit:?}"), None)),
        Ok(Err(e)) => return Err(fail("the connection failed".into(), Some(e))),
        Ok(Ok(_)) => {}
    }
    let round_trip = sent.elapsed();
    // A heartbeat reply has no body: any announced length is refused.
    match Header::parse(&head, HEADER_LEN) {
        Ok(Some(h)) if h.message_type == MessageType::Heartbeat && h.request_id == PING_ID => {
            Ok(Pong {
                connect,
                round_trip,
            })
        }
        Ok(Some(h)) => Err(fail(
            format!(
                "the reply was a {:?} frame for request {}, not the heartbeat",
                h.message_type, h.request_id
            ),
            None,
        )),
        Ok(None) => Err(fail("the reply was truncated".into(), None)),
        Err(e) => Err(fail(format!("not an rpc server ({e})"), None)),
    }
}
