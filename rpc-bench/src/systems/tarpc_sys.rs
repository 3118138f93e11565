//! `tarpc`: tarpc 0.38 with its serde transport (tokio-serde's bincode
//! format, i.e. bincode 1 with its default varint options, inside tokio's
//! `LengthDelimitedCodec`) over one TCP connection. Server: one
//! `BaseChannel` per connection, each request executed in its own spawned
//! task (tarpc's documented pattern). Client: the generated client over the
//! same connection, shared by all in-flight calls.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::driver::{self, Caller, Outcome, Timeline};
use crate::message::BenchmarkMessage;

/// The benchmark service, tarpc flavour.
#[tarpc::service]
pub trait TarpcBench {
    /// Returns its argument.
    async fn echo(m: BenchmarkMessage) -> BenchmarkMessage;
}

#[derive(Clone)]
struct EchoImpl;

impl TarpcBench for EchoImpl {
    async fn echo(self, _: tarpc::context::Context, m: BenchmarkMessage) -> BenchmarkMessage {
        m
    }
}

fn codec() -> LengthDelimitedCodec {
    // tarpc's own `tcp::listen`/`connect` use this codec with default limits
    // (8 MiB frames); the framework's default limit is the same.
    LengthDelimitedCodec::new()
}

/// Binds, reports the address, serves until `shutdown`.
pub async fn serve(
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("tarpc server bind failed: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("tarpc server has no local address: {e}"))?;
    ready(addr);
    let accept = async {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tarpc server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let transport =
                tarpc::serde_transport::new(Framed::new(stream, codec()), Bincode::default());
            let channel = BaseChannel::with_defaults(transport);
            tokio::spawn(
                channel
                    .execute(EchoImpl.serve())
                    .for_each(|response| async move {
                        tokio::spawn(response);
                    }),
            );
        }
    };
    tokio::select! {
        () = accept => Ok(()),
        () = shutdown => Ok(()),
    }
}

#[derive(Clone)]
struct TarpcCaller(TarpcBenchClient);

impl Caller for TarpcCaller {
    async fn echo(&self, msg: BenchmarkMessage) -> Result<BenchmarkMessage, String> {
        self.0
            .echo(tarpc::context::current(), msg)
            .await
            .map_err(|e| super::chain(&e))
    }
}

/// Connects, then runs the closed loop.
pub async fn client(
    addr: SocketAddr,
    inflight: usize,
    warmup: Duration,
    duration: Duration,
    setup_timeout: Duration,
) -> Result<Outcome, String> {
    let stream = tokio::time::timeout(setup_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out after {setup_timeout:?}"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let transport = tarpc::serde_transport::new(Framed::new(stream, codec()), Bincode::default());
    let mut config = tarpc::client::Config::default();
    // The default (1000) already exceeds every level we run; keep it explicit.
    config.max_in_flight_requests = config.max_in_flight_requests.max(inflight);
    let client = TarpcBenchClient::new(config, transport).spawn();
    let caller = TarpcCaller(client);
    driver::check_round_trip(&caller, setup_timeout).await?;
    let timeline = Timeline::starting_now(warmup, duration);
    Ok(driver::closed_loop(caller, inflight, timeline).await)
}
