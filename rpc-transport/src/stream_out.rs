//! Streaming a long write batch while the batch is still being built.
//!
//! Both connection loops coalesce: they append every frame they can produce
//! to one buffer and write when nothing else is ready. Left at that, a
//! pipelined peer gets a whole burst (hundreds of frames) in one write, and
//! the two ends take turns to idle: each works while the other waits for
//! its burst. Writing whenever the buffer passes a few kilobytes keeps the
//! syscall count low and lets the peer start on the head of the burst.

use std::io;

use bytes::{Buf, BytesMut};

use crate::io::IoWrite;

/// Buffered bytes past which a write is attempted without waiting for the
/// loop to run out of other work.
pub(crate) const STREAM_AT: usize = 8 * 1024;

/// Writes what the socket takes now if `wbuf` holds at least [`STREAM_AT`]
/// bytes. A full socket is not an error: the loop's own write branch
/// finishes the job once it becomes writable.
/// Returns how many bytes went out (for a buffering stream such as TLS:
/// were accepted, and need a flush once the batch is done).
pub(crate) fn write_if_long<W: IoWrite>(wr: &mut W, wbuf: &mut BytesMut) -> io::Result<usize> {
    if wbuf.len() < STREAM_AT {
        return Ok(0);
    }
    match wr.try_write_now(wbuf) {
        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => {
            wbuf.advance(n);
            Ok(n)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}
