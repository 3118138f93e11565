//! `echo`: the practical ceiling. tokio-util's `LengthDelimitedCodec` over
//! one TCP connection, paying the same serialization as the others (bincode
//! 2 serde, standard configuration) and nothing else: no dispatch table, no
//! per-call task, no channel, no timer.
//!
//! * Request and response frame: `(request id: u64, BenchmarkMessage)`.
//! * Server: one task per connection; decodes each frame, encodes the
//!   message back under the same id, flushes when no further frame is
//!   already readable (so pipelined requests share a write).
//! * Client: a single pipelined loop keeping N requests in flight; a slot
//!   table indexed by request id holds each call's start time; every
//!   response is decoded (allocating the message, as the others do) and a
//!   new request goes out in its slot.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::driver::{Outcome, Timeline};
use crate::message::BenchmarkMessage;

const CONFIG: bincode::config::Configuration = bincode::config::standard();

fn encode(scratch: &mut BytesMut, id: u64, msg: &BenchmarkMessage) -> Result<Bytes, String> {
    let mut w = scratch.writer();
    bincode::serde::encode_into_std_write((id, msg), &mut w, CONFIG)
        .map_err(|e| format!("encode failed: {e}"))?;
    Ok(w.into_inner().split().freeze())
}

fn decode(frame: &[u8]) -> Result<(u64, BenchmarkMessage), String> {
    bincode::serde::decode_from_slice::<(u64, BenchmarkMessage), _>(frame, CONFIG)
        .map(|(v, _)| v)
        .map_err(|e| format!("decode failed: {e}"))
}

/// Binds, reports the address, serves until `shutdown`.
pub async fn serve(
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("echo server bind failed: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("echo server has no local address: {e}"))?;
    ready(addr);
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(stream).await {
                            eprintln!("echo server: connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("echo server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    };
    tokio::select! {
        () = accept => Ok(()),
        () = shutdown => Ok(()),
    }
}

async fn serve_connection(stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, LengthDelimitedCodec::new());
    let mut writer: Writer = FramedWrite::new(w, LengthDelimitedCodec::new());
    let mut scratch = BytesMut::with_capacity(4096);
    while let Some(frame) = reader.next().await {
        let mut frame = Some(frame);
        // Answer every frame that is already readable, then write once.
        while let Some(f) = frame.take() {
            let f = f.map_err(|e| format!("read failed: {e}"))?;
            let (id, msg) = decode(&f)?;
            let out = encode(&mut scratch, id, &msg)?;
            writer
                .feed(out)
                .await
                .map_err(|e| format!("write failed: {e}"))?;
            frame = reader.next().now_or_never().flatten();
        }
        flush(&mut writer).await?;
    }
    Ok(())
}

type Reader = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;
type Writer = FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>;

async fn flush(writer: &mut Writer) -> Result<(), String> {
    SinkExt::<Bytes>::flush(writer)
        .await
        .map_err(|e| format!("write failed: {e}"))
}

async fn next_frame(
    reader: &mut Reader,
    call_timeout: Duration,
) -> Result<(u64, BenchmarkMessage), String> {
    match tokio::time::timeout(call_timeout, reader.next()).await {
        Err(_) => Err(format!("no response within {call_timeout:?}")),
        Ok(None) => Err("the server closed the connection".to_owned()),
        Ok(Some(Err(e))) => Err(format!("read failed: {e}")),
        Ok(Some(Ok(f))) => decode(&f),
    }
}

/// Connects, then keeps `inflight` requests in flight until the end of the
/// time line. A response that takes longer than `call_timeout` ends the run
/// with an error.
pub async fn client(
    addr: SocketAddr,
    inflight: usize,
    warmup: Duration,
    duration: Duration,
    setup_timeout: Duration,
) -> Result<Outcome, String> {
    let call_timeout = setup_timeout;
    let stream = tokio::time::timeout(setup_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out after {setup_timeout:?}"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut reader: Reader = FramedRead::new(r, LengthDelimitedCodec::new());
    let mut writer: Writer = FramedWrite::new(w, LengthDelimitedCodec::new());
    let mut scratch = BytesMut::with_capacity(4096);
    let template = BenchmarkMessage::sample();

    // Sanity: one round trip must echo the message unchanged.
    let first = encode(&mut scratch, 0, &template)?;
    writer
        .send(first)
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    let (id, back) = next_frame(&mut reader, call_timeout).await?;
    if id != 0 || back != template {
        return Err("the first call returned a different message than it sent".into());
    }

    let timeline = Timeline::starting_now(warmup, duration);
    let mut out = Outcome::default();
    // Slot table: start time of the call in flight under each id.
    let mut started: Vec<Option<Instant>> = vec![None; inflight];
    for (id, slot) in started.iter_mut().enumerate() {
        let t0 = Instant::now();
        let req = encode(&mut scratch, id as u64, &template)?;
        writer
            .feed(req)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        *slot = Some(t0);
    }
    flush(&mut writer).await?;
    let mut outstanding = inflight;
    while outstanding > 0 {
        let mut got = Some(next_frame(&mut reader, call_timeout).await?);
        while let Some((id, msg)) = got.take() {
            let t1 = Instant::now();
            let start = usize::try_from(id)
                .ok()
                .and_then(|i| started.get_mut(i))
                .and_then(Option::take)
                .ok_or_else(|| format!("response for unknown request id {id}"))?;
            drop(msg);
            if timeline.in_window(t1) {
                out.hist.record(t1 - start);
            }
            if t1 < timeline.end {
                let t0 = Instant::now();
                let req = encode(&mut scratch, id, &template)?;
                writer
                    .feed(req)
                    .await
                    .map_err(|e| format!("write failed: {e}"))?;
                started[id as usize] = Some(t0);
            } else {
                outstanding -= 1;
            }
            // Handle every response already readable before writing.
            got = match reader.next().now_or_never() {
                Some(Some(Ok(f))) => Some(decode(&f)?),
                Some(Some(Err(e))) => return Err(format!("read failed: {e}")),
                Some(None) => return Err("the server closed the connection".to_owned()),
                None => None,
            };
        }
        flush(&mut writer).await?;
    }
    Ok(out)
}
