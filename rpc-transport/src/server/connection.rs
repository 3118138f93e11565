//! One server connection: read, dispatch, coalesce replies.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures_util::{FutureExt, StreamExt};

use crate::ids::IdMap;
use rpc_codec::{
    Frame, MessageType, RequestEnvelope, compression, encode_empty, encode_error, serializer,
};
use rpc_core::{Compression, Context, Metadata, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Shared;
use super::handler::{Call, Replier, error_chain};
use super::liveness::{Progress, Reading, TimedCodec};
use crate::io::{Io, IoWrite, write_or_flush};
use crate::stream_out::write_if_long;

/// Replies buffered beyond this stop the connection from reading more
/// requests until the socket takes them.
const WRITE_HIGH_WATER: usize = 256 * 1024;

/// Serves one connection until it ends. Returns the read half when the
/// peer is owed a [`linger`] (after a go-away): the caller frees the
/// connection's slot first, since the linger serves only the peer.
pub(crate) async fn serve<S: Io>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    force: CancellationToken,
) -> Option<S::Read> {
    let (rd, mut wr) = stream.split();
    // Bytes a buffering stream (TLS) accepted but may not have sent yet.
    let mut unflushed = false;
    let mut frames =
        FramedRead::with_capacity(rd, TimedCodec::new(shared.max_frame_len), 16 * 1024);
    let mut handlers: JoinSet<(u64, BytesMut)> = JoinSet::new();
    let mut running: IdMap<AbortHandle> = IdMap::default();
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    let mut reading = true;
    // Highest request id read: a go-away promises answers up to it.
    let mut last_read: u64 = 0;
    let limit = shared.max_in_flight_per_connection;
    let mut progress = Progress::new(shared.limits);
    let mut meter = crate::meter::Meter::server();
    let mut received = 0u64;
    let period = shared.limits.tick();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the peer is owed a clean end: after a go-away, the close waits
    // for the peer to close its side (bounded), so replies still on their
    // way are not lost to a reset.
    let mut graceful = false;
    debug!(%peer, "connection opened");

    let reason: String = loop {
        if !reading && handlers.is_empty() && wbuf.is_empty() {
            break "done".into();
        }
        tokio::select! {
            biased;
            _ = force.cancelled() => {
                break format!("aborted by shutdown with {} calls running", handlers.len());
            }
            Some(done) = handlers.join_next(), if !handlers.is_empty() => {
                // Cancelled handlers were removed from `running` when cancelled.
                if let Ok((id, reply)) = done {
                    running.remove(&id);
                    wbuf.extend_from_slice(&reply);
                    match write_if_long(&mut wr, &mut wbuf) {
                        Ok(n) => {
                            progress.written += n as u64;
                            unflushed |= n > 0 && S::Write::BUFFERED;
                        }
                        Err(e) => break format!("write failed: {e}"),
                    }
                }
            }
            next = frames.next(), if reading && handlers.len() < limit && wbuf.len() < WRITE_HIGH_WATER => {
                match next {
                    Some(Ok(frame)) => {
                        progress.frames += 1;
                        received += (rpc_codec::frame::HEADER_LEN + frame.body.len()) as u64;
                        if frame.header.message_type == MessageType::Request {
                            last_read = last_read.max(frame.header.request_id);
                        }
                        if let Err(reason) = dispatch(frame, peer, &shared, &mut handlers, &mut running, &mut wbuf) {
                            warn!(%peer, reason, last_read, "protocol violation: answering the calls already read, then closing (go-away)");
                            encode_empty(&mut wbuf, MessageType::GoAway, last_read);
                            reading = false;
                            graceful = true;
                        }
                        match write_if_long(&mut wr, &mut wbuf) {
                            Ok(n) => {
                                progress.written += n as u64;
                                unflushed |= n > 0 && S::Write::BUFFERED;
                            }
                            Err(e) => break format!("write failed: {e}"),
                        }
                    }
                    // A TLS peer that closes without close_notify (most
                    // clients, when a process exits) ends its stream this
                    // way: a close, not a bad frame.
                    Some(Err(rpc_codec::CodecError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        debug!(%peer, error = %e, "peer closed its side");
                        reading = false;
                    }
                    Some(Err(e)) => {
                        // The stream cannot be followed past a bad frame, but
                        // the calls read before it are good: answer them, and
                        // tell the peer where the line is so it can resend
                        // the rest.
                        warn!(%peer, reason = %error_chain(&e), last_read, "bad frame: answering the calls already read, then closing (go-away)");
                        encode_empty(&mut wbuf, MessageType::GoAway, last_read);
                        reading = false;
                        graceful = true;
                    }
                    None => {
                        debug!(%peer, "peer closed its side");
                        reading = false;
                    }
                }
            }
            written = write_or_flush(&mut wr, &wbuf), if !wbuf.is_empty() || unflushed => {
                match written {
                    Ok(Some(0)) => break "the peer stopped reading".into(),
                    Ok(Some(n)) => {
                        wbuf.advance(n);
                        progress.written += n as u64;
                        unflushed = S::Write::BUFFERED;
                    }
                    Ok(None) => unflushed = false,
                    Err(e) => break format!("write failed: {e}"),
                }
            }
            _ = stop.cancelled(), if reading => {
                // Graceful shutdown: answer what was read, read nothing new,
                // and tell the client where the line is so it can resend the
                // rest elsewhere.
                reading = false;
                graceful = true;
                encode_empty(&mut wbuf, MessageType::GoAway, last_read);
            }
            _ = tick.tick() => {
                meter.report(progress.written, received);
                let state = if !reading {
                    if wbuf.is_empty() { Reading::Stopped } else { Reading::HeldByPeer }
                } else if handlers.len() >= limit {
                    Reading::HeldBySelf
                } else if wbuf.len() >= WRITE_HIGH_WATER {
                    Reading::HeldByPeer
                } else {
                    Reading::Open
                };
                match progress.check(state, frames.decoder_mut()) {
                    Ok(()) => {}
                    Err(stalled) if stalled.is_graceful() => {
                        // The calls already read are answered, and the
                        // go-away tells the peer that nothing after them
                        // was read, so it can send those elsewhere.
                        // Logged like a bad frame: a peer that stalls is
                        // broken or hostile, and the operator is told why.
                        warn!(%peer, reason = %stalled, last_read, "closing a connection that made no progress (go-away)");
                        encode_empty(&mut wbuf, MessageType::GoAway, last_read);
                        reading = false;
                        graceful = true;
                    }
                    Err(stalled) => {
                        warn!(%peer, reason = %stalled, "closing a connection that reads nothing");
                        break stalled.to_string();
                    }
                }
            }
        }
    };
    meter.report(progress.written, received);
    drop(meter);
    // Dropping the JoinSet aborts handlers still running (peer gone or forced).
    handlers.abort_all();
    // A TLS shutdown writes close_notify, which a peer that stopped reading
    // never takes: bounded, and cut short by a forced shutdown. (TCP's is
    // a FIN and returns at once.)
    tokio::select! {
        _ = tokio::time::timeout(CLOSE_LINGER, wr.shutdown()) => {}
        _ = force.cancelled() => {}
    }
    debug!(%peer, reason, "connection closed");
    graceful.then(|| frames.into_inner())
}

/// Closing with unread input would reset the connection, and a reset can
/// destroy replies the peer has not read yet: after a go-away, read until
/// the peer closes too, bounded in time and bytes.
pub(crate) async fn linger<R: AsyncRead + Unpin>(rd: R) {
    let _ = tokio::time::timeout(CLOSE_LINGER, discard(rd, CLOSE_LINGER_BYTES)).await;
}

/// Refuses a connection the server has no slot for: a go-away with request
/// id 0 (nothing was read, so every call the client sent is safe to send
/// elsewhere), then the same bounded linger as any go-away.
pub(crate) async fn refuse(stream: TcpStream) {
    let (rd, mut wr) = stream.into_split();
    let frame = refusal();
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        if wr.write_all(&frame).await.is_ok() {
            let _ = wr.shutdown().await;
            discard(rd, CLOSE_LINGER_BYTES).await;
        }
    })
    .await;
}

/// [`refuse`] without the linger: the go-away if the socket takes it at
/// once, then the close.
pub(crate) fn refuse_now(stream: &TcpStream) {
    let _ = stream.try_write(&refusal());
}

/// The go-away of a refusal: request id 0, nothing was read.
fn refusal() -> BytesMut {
    let mut frame = BytesMut::with_capacity(rpc_codec::HEADER_LEN);
    encode_empty(&mut frame, MessageType::GoAway, 0);
    frame
}

/// The status a failure is sent with: a layer or handler that fails with
/// `Ok` is sent as `Handler`, since "ok" with a message body would be
/// decoded as the method's return value.
fn failure(status: StatusCode) -> StatusCode {
    if status == StatusCode::Ok {
        StatusCode::Handler
    } else {
        status
    }
}

/// How long a connection that sent a go-away waits for its peer to close.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// Most bytes read and dropped meanwhile.
const CLOSE_LINGER_BYTES: usize = 1 << 20;

async fn discard<R: AsyncRead + Unpin>(mut rd: R, mut left: usize) {
    let mut buf = [0u8; 4096];
    while left > 0 {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Handles one incoming frame. `Err` means the peer broke the protocol and
/// the connection must close.
fn dispatch(
    frame: Frame,
    peer: SocketAddr,
    shared: &Shared,
    handlers: &mut JoinSet<(u64, BytesMut)>,
    running: &mut IdMap<AbortHandle>,
    wbuf: &mut BytesMut,
) -> Result<(), &'static str> {
    let h = frame.header;
    match h.message_type {
        MessageType::Request => {}
        MessageType::Heartbeat => {
            encode_empty(wbuf, MessageType::Heartbeat, h.request_id);
            return Ok(());
        }
        MessageType::Cancel => {
            if let Some(task) = running.remove(&h.request_id) {
                task.abort();
            }
            return Ok(());
        }
        MessageType::Response => return Err("a client sent a response frame"),
        MessageType::GoAway => return Err("a client sent a go-away frame"),
    }
    let id = h.request_id;
    let fail = |wbuf: &mut BytesMut, status: StatusCode, msg: &str| {
        wbuf.extend_from_slice(&encode_error(id, h.serializer, failure(status), msg));
    };
    let (ser, compressed) = match compression::split(h.serializer)
        .and_then(|(id, c)| Ok((serializer::from_id(id)?, c)))
    {
        Ok(s) => s,
        Err(e) => {
            fail(wbuf, StatusCode::BadRequest, &e.to_string());
            return Ok(());
        }
    };
    let body = if compressed == Compression::None {
        frame.body
    } else {
        // Bounded by the frame limit: a bomb is refused, not inflated.
        match compression::decompress(compressed, &frame.body, shared.max_frame_len) {
            Ok(plain) => bytes::Bytes::from(plain),
            Err(e) => {
                debug!(%peer, "refused a compressed request: {}", error_chain(&e));
                fail(wbuf, StatusCode::BadRequest, &error_chain(&e));
                return Ok(());
            }
        }
    };
    let env = match RequestEnvelope::parse(&body) {
        Ok(env) => env,
        Err(e) => {
            fail(wbuf, StatusCode::BadRequest, &e.to_string());
            return Ok(());
        }
    };
    // Metadata costs nothing unless the caller sent some; its size is
    // bounded before any work grows with it.
    let metadata = if env.metadata.is_empty() {
        Metadata::new()
    } else {
        match Metadata::from_wire(env.metadata.iter().copied()) {
            Ok(md) => md,
            Err(e) => {
                fail(wbuf, StatusCode::BadRequest, &e.to_string());
                return Ok(());
            }
        }
    };
    // Shares the frame's buffer: the names are slices of it.
    let cx = Context::from_request(
        body.clone(),
        env.service,
        env.method,
        metadata,
        env.deadline,
        peer,
    );
    // Layers run before the service lookup, so a caller they refuse cannot
    // probe which services exist. A layer that panics fails its call, not
    // the connection and the other calls on it.
    let verdict = std::panic::catch_unwind(AssertUnwindSafe(|| {
        shared
            .layers
            .iter()
            .try_for_each(|layer| layer.on_call(&cx))
    }));
    match verdict {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(%peer, service = env.service, method = env.method, status = %e.status, "a server layer refused the call");
            fail(wbuf, e.status, &e.message);
            return Ok(());
        }
        Err(_panic) => {
            warn!(%peer, service = env.service, method = env.method, "a server layer panicked: failing the call");
            fail(wbuf, StatusCode::Handler, "a server layer panicked");
            return Ok(());
        }
    }
    let Some(service) = shared.services.get(env.service) else {
        fail(
            wbuf,
            StatusCode::ServiceNotFound,
            &format!("no service `{}` on this server", env.service),
        );
        return Ok(());
    };
    let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
        fail(
            wbuf,
            StatusCode::Overloaded,
            "server at its in-flight limit",
        );
        return Ok(());
    };
    let replier = Replier::new(id, ser, shared.max_frame_len)
        .with_size_hint(env.args.len())
        .with_compression(compressed, shared.compression_threshold);
    let call = Call {
        method: env.method,
        args: env.args,
        replier,
        context: &cx,
    };
    // Decoding (user `Deserialize` impls) and the layers' `around` run
    // synchronously here: a panic in them fails this call only.
    let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| {
        service.call(call).map(|mut fut| {
            // Innermost first, so the first layer added ends up outermost.
            for layer in shared.layers.iter().rev() {
                fut = layer.around(&cx, fut);
            }
            fut
        })
    }));
    let fut = match prepared {
        Ok(Ok(fut)) => fut,
        Ok(Err(e)) => {
            fail(wbuf, e.status, &e.message);
            return Ok(());
        }
        Err(_panic) => {
            warn!(%peer, service = env.service, method = env.method, "decoding the call or a server layer's `around` panicked: failing the call");
            fail(
                wbuf,
                StatusCode::Handler,
                "the server panicked preparing the call",
            );
            return Ok(());
        }
    };
    let serializer_id = h.serializer;
    let encode_failure =
        move |e: super::CallError| encode_error(id, serializer_id, failure(e.status), &e.message);
    // Fast path: most handlers finish on their first poll. Answer those
    // inline — no task, no timer, no map entry. A handler that is not done
    // yet has registered interest with whatever it waits on; moving it into
    // a task and polling it there re-registers with the task's waker.
    let mut fut = cx.scope(fut);
    let polled = std::panic::catch_unwind(AssertUnwindSafe(|| (&mut fut).now_or_never()));
    if let Some(outcome) = polled.transpose() {
        drop(permit);
        let reply = match outcome {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => encode_failure(e),
            Err(_panic) => encode_error(
                id,
                serializer_id,
                StatusCode::Handler,
                "the handler panicked",
            ),
        };
        wbuf.extend_from_slice(&reply);
        return Ok(());
    }
    // A handler that waits must not pin the request (and the read buffer
    // it was split from) for as long as it runs.
    let deadline = fut.context_mut().and_then(|cx| {
        cx.compact();
        cx.deadline()
    });
    let guarded = AssertUnwindSafe(fut).catch_unwind();
    let task = handlers.spawn(async move {
        let outcome = match deadline {
            Some(d) => tokio::time::timeout_at(d, guarded).await.ok(),
            None => Some(guarded.await),
        };
        drop(permit);
        let reply = match outcome {
            Some(Ok(Ok(frame))) => frame,
            Some(Ok(Err(e))) => encode_failure(e),
            Some(Err(_panic)) => encode_error(
                id,
                serializer_id,
                StatusCode::Handler,
                "the handler panicked",
            ),
            // The caller has given up: its deadline passed. Say so, in case it
            // is still listening (clock skew), and free the work.
            None => encode_error(
                id,
                serializer_id,
                StatusCode::Timeout,
                "deadline exceeded on the server",
            ),
        };
        (id, reply)
    });
    running.insert(id, task);
    Ok(())
}
