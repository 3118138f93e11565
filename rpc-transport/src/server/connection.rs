//! One server connection: read, dispatch, coalesce replies.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures_util::{FutureExt, StreamExt};

use crate::ids::IdMap;
use rpc_codec::{
    Frame, FrameCodec, MessageType, RequestEnvelope, encode_empty, encode_error, serializer,
};
use rpc_core::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Shared;
use super::handler::{Call, Replier, error_chain};
use crate::stream_out::write_if_long;

/// Replies buffered beyond this stop the connection from reading more
/// requests until the socket takes them.
const WRITE_HIGH_WATER: usize = 256 * 1024;

pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    force: CancellationToken,
) {
    let (rd, mut wr) = stream.into_split();
    let mut frames =
        FramedRead::with_capacity(rd, FrameCodec::new(shared.max_frame_len), 16 * 1024);
    let mut handlers: JoinSet<(u64, BytesMut)> = JoinSet::new();
    let mut running: IdMap<AbortHandle> = IdMap::default();
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    let mut reading = true;
    // Highest request id read: a go-away promises answers up to it.
    let mut last_read: u64 = 0;
    let limit = shared.max_in_flight_per_connection;
    debug!(%peer, "connection opened");

    loop {
        if !reading && handlers.is_empty() && wbuf.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            _ = force.cancelled() => {
                debug!(%peer, in_flight = handlers.len(), "connection aborted by shutdown");
                break;
            }
            Some(done) = handlers.join_next(), if !handlers.is_empty() => {
                // Cancelled handlers were removed from `running` when cancelled.
                if let Ok((id, reply)) = done {
                    running.remove(&id);
                    wbuf.extend_from_slice(&reply);
                    if let Err(e) = write_if_long(&wr, &mut wbuf) {
                        debug!(%peer, error = %e, "write failed");
                        break;
                    }
                }
            }
            next = frames.next(), if reading && handlers.len() < limit && wbuf.len() < WRITE_HIGH_WATER => {
                match next {
                    Some(Ok(frame)) => {
                        if frame.header.message_type == MessageType::Request {
                            last_read = last_read.max(frame.header.request_id);
                        }
                        if let Err(reason) = dispatch(frame, &shared, &mut handlers, &mut running, &mut wbuf) {
                            warn!(%peer, reason, "closing connection: protocol violation");
                            break;
                        }
                        if let Err(e) = write_if_long(&wr, &mut wbuf) {
                            debug!(%peer, error = %e, "write failed");
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        warn!(%peer, reason = %error_chain(&e), "closing connection: bad frame");
                        break;
                    }
                    None => {
                        debug!(%peer, "peer closed its side");
                        reading = false;
                    }
                }
            }
            written = wr.write(&wbuf), if !wbuf.is_empty() => {
                match written {
                    Ok(0) => {
                        debug!(%peer, "peer stopped reading");
                        break;
                    }
                    Ok(n) => wbuf.advance(n),
                    Err(e) => {
                        debug!(%peer, error = %e, "write failed");
                        break;
                    }
                }
            }
            _ = stop.cancelled(), if reading => {
                // Graceful shutdown: answer what was read, read nothing new,
                // and tell the client where the line is so it can resend the
                // rest elsewhere.
                reading = false;
                encode_empty(&mut wbuf, MessageType::GoAway, last_read);
            }
        }
    }
    // Dropping the JoinSet aborts handlers still running (peer gone or forced).
    handlers.abort_all();
    let _ = wr.shutdown().await;
    debug!(%peer, "connection closed");
}

/// Handles one incoming frame. `Err` means the peer broke the protocol and
/// the connection must close.
fn dispatch(
    frame: Frame,
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
        wbuf.extend_from_slice(&encode_error(id, h.serializer, status, msg));
    };
    let ser = match serializer::from_id(h.serializer) {
        Ok(s) => s,
        Err(e) => {
            fail(wbuf, StatusCode::BadRequest, &e.to_string());
            return Ok(());
        }
    };
    let env = match RequestEnvelope::parse(&frame.body) {
        Ok(env) => env,
        Err(e) => {
            fail(wbuf, StatusCode::BadRequest, &e.to_string());
            return Ok(());
        }
    };
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
    let replier = Replier::new(id, ser, shared.max_frame_len).with_size_hint(env.args.len());
    let call = Call {
        method: env.method,
        args: env.args,
        replier,
    };
    let fut = match service.call(call) {
        Ok(fut) => fut,
        Err(e) => {
            fail(wbuf, e.status, &e.message);
            return Ok(());
        }
    };
    let deadline = env.deadline;
    let serializer_id = h.serializer;
    // Fast path: most handlers finish on their first poll. Answer those
    // inline — no task, no timer, no map entry. A handler that is not done
    // yet has registered interest with whatever it waits on; moving it into
    // a task and polling it there re-registers with the task's waker.
    let mut fut = fut;
    let polled = std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().now_or_never()));
    if let Some(outcome) = polled.transpose() {
        drop(permit);
        let reply = match outcome {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => encode_error(id, serializer_id, e.status, &e.message),
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
    let guarded = AssertUnwindSafe(fut).catch_unwind();
    let task = handlers.spawn(async move {
        let outcome = match deadline {
            Some(d) => tokio::time::timeout(d, guarded).await.ok(),
            None => Some(guarded.await),
        };
        drop(permit);
        let reply = match outcome {
            Some(Ok(Ok(frame))) => frame,
            Some(Ok(Err(e))) => encode_error(id, serializer_id, e.status, &e.message),
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
