//! The streams a connection runs over: plain TCP, TLS over TCP, and
//! in-memory pipes for tests.
//!
//! The connection tasks (`client::connection`, `server::connection`) are
//! generic over [`Io`], so each kind of stream gets its own compiled loop
//! and plain TCP keeps its fast path: the opportunistic non-blocking write
//! of a long batch (`stream_out`), which a TLS stream cannot offer (its
//! records are produced inside rustls), and no flush (TCP has no buffer of
//! its own, where a TLS stream may hold records until flushed). Which
//! stream a connection uses is decided once, at the configuration edge:
//! [`crate::Connector`] on the client, [`crate::Acceptor`] on the server.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A connected byte stream, split into a read and a write half owned by
/// one connection task.
pub trait Io: Send + 'static {
    /// The read half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// The write half.
    type Write: IoWrite;
    /// Splits the stream.
    fn split(self) -> (Self::Read, Self::Write);
}

/// The write half of an [`Io`].
pub trait IoWrite: AsyncWrite + Unpin + Send + 'static {
    /// Whether bytes `write` accepted can wait in a buffer of the stream
    /// until `flush` (TLS: records rustls has not written to the socket
    /// yet). The connection loops flush after each batch when it is set.
    const BUFFERED: bool;

    /// Writes what the stream takes at once, without waiting
    /// (`WouldBlock` when it takes nothing now). The default polls one
    /// `write` with a no-op waker: if the stream is not ready, the waker is
    /// dropped, and the loop's own awaited write registers the real one
    /// when it runs. (For TLS: rustls encrypts, and writes what the socket
    /// takes; what it holds back is sent by the next write or the flush.)
    fn try_write_now(&mut self, buf: &[u8]) -> io::Result<usize> {
        use futures_util::FutureExt;
        use tokio::io::AsyncWriteExt;
        match self.write(buf).now_or_never() {
            Some(result) => result,
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Io for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;
    fn split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }
}

impl IoWrite for OwnedWriteHalf {
    const BUFFERED: bool = false;
    fn try_write_now(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.try_write(buf)
    }
}

/// Streams without owned halves split through tokio's lock-guarded
/// `split` (one uncontended lock per poll: a TLS record costs far more).
macro_rules! split_io {
    ($($t:ty),* $(,)?) => {$(
        impl Io for $t {
            type Read = ReadHalf<$t>;
            type Write = WriteHalf<$t>;
            fn split(self) -> (Self::Read, Self::Write) {
                tokio::io::split(self)
            }
        }
        impl IoWrite for WriteHalf<$t> {
            const BUFFERED: bool = true;
        }
    )*};
}

split_io!(DuplexStream);

#[cfg(feature = "tls")]
split_io!(
    tokio_rustls::client::TlsStream<TcpStream>,
    tokio_rustls::server::TlsStream<TcpStream>,
);

/// One step of a connection loop's output: writes `buf` if it holds
/// anything (`Some(bytes written)`), else flushes (`None`). One future for
/// both, because the loop's `select!` can borrow the write half once.
pub(crate) async fn write_or_flush<W: IoWrite>(
    wr: &mut W,
    buf: &[u8],
) -> io::Result<Option<usize>> {
    use tokio::io::AsyncWriteExt;
    if buf.is_empty() {
        wr.flush().await.map(|()| None)
    } else {
        wr.write(buf).await.map(Some)
    }
}
