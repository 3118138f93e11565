//! A bound on the console's open connections.
//!
//! `axum::serve` accepts every connection it is offered and keeps it until
//! the client goes (it has no header-read timeout either), so a client, or
//! a page left open in many tabs, could hold any number. This listener
//! wraps the TCP one: each connection holds a permit for as long as it is
//! open, and one over the limit is closed at once with a log line, as the
//! provider's transport does at `server.max_connections`. Hand-written
//! because axum offers the `Listener` seam but no limit of its own, and
//! tower's limits count requests, not connections.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// A TCP listener that serves at most `max` connections at once.
pub(crate) struct Capped {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
}

impl Capped {
    pub(crate) fn new(inner: TcpListener, max: usize) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl axum::serve::Listener for Capped {
    type Io = Held;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Held, SocketAddr) {
        loop {
            let (io, peer) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    return (
                        Held {
                            io,
                            _permit: permit,
                        },
                        peer,
                    );
                }
                Err(_) => {
                    warn!(target: "rpc_console", %peer, max_connections = self.max, "console: refusing a connection: at the connection limit (--max-connections)");
                    drop(io);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection and its permit, released when it closes.
pub(crate) struct Held {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Held {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
