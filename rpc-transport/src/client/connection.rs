//! One multiplexed client connection and the task that drives it.
//!
//! Callers encode their request frame themselves (in parallel) and hand it
//! to the connection's task with a oneshot for the reply. The task alone owns
//! the table of pending calls, so no call takes a lock on a shared map; it
//! appends every queued frame to one buffer before writing (coalescing), and
//! routes each response by request id. Coalescing holds on either tokio
//! runtime: with calls already in flight the task yields once before a write
//! so every runnable caller queues first, and a batch past a few kilobytes
//! is streamed out while it grows (see `stream_out`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use rpc_codec::{Frame, FrameCodec, MessageType, encode_empty};
use rpc_core::BoxError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::debug;

use crate::ids::IdMap;
use crate::io::{Io, IoWrite, write_or_flush};
use crate::stream_out::write_if_long;

/// Frames queued beyond this stop the task from taking more calls until the
/// socket drains.
const WRITE_HIGH_WATER: usize = 256 * 1024;

/// Why a connection ended, handed to every call still waiting on it.
#[derive(Clone, Debug)]
pub(crate) struct Closed {
    pub(crate) reason: Arc<str>,
    /// Whether this call's request had been handed to the socket: if not,
    /// it certainly did not run.
    pub(crate) written: bool,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Closed {}

impl Closed {
    pub(crate) fn boxed(&self) -> BoxError {
        Box::new(self.clone())
    }
}

pub(crate) type Reply = Result<Frame, Closed>;

/// A call handed to the connection task. Its frame's request id is a
/// placeholder: the task numbers requests in the order it writes them, which
/// is what lets a server's go-away separate read from unread requests.
pub(crate) struct Outgoing {
    pub(crate) frame: BytesMut,
    pub(crate) reply: oneshot::Sender<Reply>,
    /// Held until the call is answered or abandoned: the in-flight bound
    /// covers calls whose callers already gave up.
    pub(crate) permit: OwnedSemaphorePermit,
}

struct Pending {
    reply: oneshot::Sender<Reply>,
    _permit: OwnedSemaphorePermit,
}

/// Liveness settings of a connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Liveness {
    /// With nothing read for this long, send a heartbeat.
    pub(crate) heartbeat_after: Duration,
    /// With a heartbeat unanswered for this long, declare the peer dead.
    pub(crate) dead_after: Duration,
}

/// A live connection. Dropping the last handle stops its task; calls still
/// waiting then fail with `ConnectionClosed`.
pub(crate) struct Connection {
    /// The server refused the connection: a go-away naming request 0
    /// before any response (it is at its connection limit).
    refused: Arc<std::sync::OnceLock<Instant>>,
    // Unbounded because every queued call holds an `in_flight` permit, which
    // is the bound; a bounded channel would pay a second semaphore per call.
    tx: mpsc::UnboundedSender<Outgoing>,
    closed: Arc<AtomicBool>,
    pub(crate) in_flight: Arc<Semaphore>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Connection {
    pub(crate) fn spawn<S: Io>(
        stream: S,
        addr: Arc<str>,
        max_in_flight: usize,
        max_frame_len: usize,
        liveness: Liveness,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(std::sync::OnceLock::new());
        let task = tokio::spawn(drive(
            stream,
            rx,
            addr,
            closed.clone(),
            refused.clone(),
            max_frame_len,
            liveness,
        ));
        Self {
            refused,
            tx,
            closed,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// When the server refused this connection, if it did (see the field).
    pub(crate) fn refused_at(&self) -> Option<Instant> {
        self.refused.get().copied()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Queues a call. `Err` returns it untouched if the connection is gone:
    /// nothing was written, so the call is safe to send elsewhere.
    pub(crate) fn send(&self, out: Outgoing) -> Result<(), Outgoing> {
        self.tx.send(out).map_err(|e| e.0)
    }
}

async fn drive<S: Io>(
    stream: S,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    addr: Arc<str>,
    closed: Arc<AtomicBool>,
    refused: Arc<std::sync::OnceLock<Instant>>,
    max_frame_len: usize,
    liveness: Liveness,
) {
    let (rd, mut wr) = stream.split();
    let mut frames = FramedRead::with_capacity(rd, FrameCodec::new(max_frame_len), 16 * 1024);
    // Bytes a buffering stream (TLS) accepted but may not have sent yet.
    let mut unflushed = false;
    let mut pending: IdMap<Pending> = IdMap::default();
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    let mut batch: Vec<Outgoing> = Vec::with_capacity(64);
    let mut sweep = tokio::time::interval(liveness.heartbeat_after.min(Duration::from_millis(500)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_read = Instant::now();
    let mut heard = false;
    let mut heartbeat_sent: Option<Instant> = None;
    let mut accepting = true;
    let mut next_id: u64 = 0;
    let mut yielded = false;
    // Whether any response arrived: a go-away before one is a refusal.
    let mut answered = false;
    let mut meter = crate::meter::Meter::client();
    let (mut sent, mut received) = (0u64, 0u64);

    let reason: String = loop {
        if !accepting && pending.is_empty() && wbuf.is_empty() {
            break "connection released".into();
        }
        tokio::select! {
            biased;
            next = frames.next() => match next {
                Some(Ok(frame)) => {
                    received += (rpc_codec::frame::HEADER_LEN + frame.body.len()) as u64;
                    // The clock is read at the next sweep, not per frame.
                    heard = true;
                    heartbeat_sent = None;
                    match frame.header.message_type {
                        MessageType::Response => {
                            answered = true;
                            // A reply to an abandoned call has nowhere to go.
                            if let Some(p) = pending.remove(&frame.header.request_id) {
                                let _ = p.reply.send(Ok(frame));
                            }
                        }
                        MessageType::Heartbeat => {}
                        MessageType::GoAway => {
                            let line = frame.header.request_id;
                            if line == 0 && !answered {
                                let _ = refused.set(Instant::now());
                            }
                            // New calls go to a new connection from now on.
                            closed.store(true, Ordering::Release);
                            accepting = false;
                            let unread: Vec<u64> = pending.keys().copied().filter(|id| *id > line).collect();
                            debug!(%addr, line, unread = unread.len(), "server going away");
                            let why = Closed {
                                reason: Arc::from(format!("{addr}: the server sent a go-away (it is shutting down, full, closing an idle connection or a bad stream) before reading this call")),
                                written: false,
                            };
                            for id in unread {
                                if let Some(p) = pending.remove(&id) {
                                    let _ = p.reply.send(Err(why.clone()));
                                }
                            }
                            rx.close();
                            while let Ok(out) = rx.try_recv() {
                                let _ = out.reply.send(Err(why.clone()));
                            }
                        }
                        other => break format!("protocol violation: server sent a {other:?} frame"),
                    }
                }
                // A read error (a reset, a TLS alert such as a refused
                // client certificate) is not a bad frame: say which.
                Some(Err(rpc_codec::CodecError::Io(e))) => break format!("read failed: {e}"),
                Some(Err(e)) => break format!("bad frame from server: {}", rpc_core::error::report(&e)),
                None => break "closed by the server".into(),
            },
            n = rx.recv_many(&mut batch, 128), if accepting && wbuf.len() < WRITE_HIGH_WATER => {
                if n == 0 {
                    // Every handle is gone: finish what is pending, take nothing new.
                    accepting = false;
                    continue;
                }
                let in_flight_before = pending.len();
                let mut write_failed = None;
                for mut out in batch.drain(..) {
                    if out.reply.is_closed() {
                        continue; // gave up before it was written
                    }
                    next_id += 1;
                    if let Some(id_field) = out.frame.get_mut(6..14) {
                        id_field.copy_from_slice(&next_id.to_be_bytes());
                    }
                    wbuf.extend_from_slice(&out.frame);
                    pending.insert(next_id, Pending { reply: out.reply, _permit: out.permit });
                    if write_failed.is_none() {
                        match write_if_long(&mut wr, &mut wbuf) {
                            Ok(n) => {
                                sent += n as u64;
                                unflushed |= n > 0 && S::Write::BUFFERED;
                            }
                            Err(e) => write_failed = Some(e),
                        }
                    }
                }
                if let Some(e) = write_failed {
                    // Every call of the batch is pending now and fails as
                    // possibly written, as any call in a failed write does.
                    break format!("write failed: {e}");
                }
                if !wbuf.is_empty() && !yielded && in_flight_before > 0 {
                    // Coalescing must not depend on scheduling order. On a
                    // multi-thread runtime the first caller's wake runs this
                    // task next (the LIFO slot), which alone would send one
                    // request per write. One yield per write lets every
                    // caller that is already runnable queue its request.
                    // With nothing in flight before this batch no reply is
                    // about to wake more callers: a lone call goes at once.
                    yielded = true;
                    tokio::task::yield_now().await;
                }
            }
            written = write_or_flush(&mut wr, &wbuf), if !wbuf.is_empty() || unflushed => match written {
                Ok(Some(0)) => break "the server stopped reading".into(),
                Ok(Some(n)) => {
                    wbuf.advance(n);
                    sent += n as u64;
                    yielded = false;
                    unflushed = S::Write::BUFFERED;
                }
                Ok(None) => unflushed = false,
                Err(e) => break format!("write failed: {e}"),
            },
            _ = sweep.tick() => {
                meter.report(sent, received);
                if std::mem::take(&mut heard) {
                    last_read = Instant::now();
                }
                // Calls whose callers gave up (timeout, dropped future): free
                // their slot and tell the server to stop working on them.
                pending.retain(|id, p| {
                    let keep = !p.reply.is_closed();
                    if !keep {
                        encode_empty(&mut wbuf, MessageType::Cancel, *id);
                    }
                    keep
                });
                // Idle connections heartbeat too: a server closes a
                // connection it hears nothing from (`server.idle_timeout_ms`,
                // 30 s by default), and a dead peer is noticed before a call
                // is queued behind it. Not after a go-away: the server reads
                // nothing more, so a heartbeat would go unanswered and fail
                // calls it promised to answer; their deadlines bound them.
                if !accepting {
                    heartbeat_sent = None;
                } else if let Some(sent) = heartbeat_sent {
                    if sent.elapsed() >= liveness.dead_after {
                        break format!("no heartbeat reply for {:?}", liveness.dead_after);
                    }
                } else if last_read.elapsed() >= liveness.heartbeat_after {
                    encode_empty(&mut wbuf, MessageType::Heartbeat, 0);
                    heartbeat_sent = Some(Instant::now());
                }
            }
        }
    };

    closed.store(true, Ordering::Release);
    meter.report(sent, received);
    drop(meter);
    debug!(%addr, reason, pending = pending.len(), "connection closed");
    let reason: Arc<str> = Arc::from(format!("{addr}: {reason}"));
    // Pending calls may have reached the server (partly written buffers
    // included): their outcome is unknown.
    let written = Closed {
        reason: reason.clone(),
        written: true,
    };
    for (_, p) in pending.drain() {
        let _ = p.reply.send(Err(written.clone()));
    }
    // Calls still queued were never written: they fail fast, as unsent.
    let unsent = Closed {
        reason,
        written: false,
    };
    rx.close();
    while let Ok(out) = rx.try_recv() {
        let _ = out.reply.send(Err(unsent.clone()));
    }
}
