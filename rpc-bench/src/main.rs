//! Side-by-side benchmark: this framework (`rpc`), tarpc, and a bare framed
//! echo, each with its server and client in separate processes pinned to
//! separate cores. See `README.md` in this crate.
//!
//! ```text
//! rpc-bench run    [--duration SECS] [--warmup SECS] [--inflight 1,32,256]
//!                  [--systems rpc,tarpc,echo] [--runtime current|multi]
//!                  [--repeat N] [--no-pin] [--baseline PATH]
//! rpc-bench pick   (consumer hot path: discovery + load-balancer pick, ns and allocations)
//! rpc-bench server --system X [--runtime R] [--registry-dir DIR] [--lifetime SECS]
//! rpc-bench client --system X --addr HOST:PORT --inflight N [--registry-dir DIR]
//!                  [--duration SECS] [--warmup SECS] [--runtime R] [--setup-timeout SECS]
//! ```

mod args;
mod cpuload;
mod driver;
mod histogram;
mod memory;
mod message;
mod orchestrate;
mod pick;
mod systems;

#[global_allocator]
static ALLOC: pick::CountingAlloc = pick::CountingAlloc;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use args::{Args, Flavour};
use systems::System;

const USAGE: &str = "\
usage:
  rpc-bench pick     time the consumer's discovery + pick, count its allocations
  rpc-bench run [--duration SECS] [--warmup SECS] [--inflight LIST]
                [--systems LIST] [--runtime current|multi] [--repeat N] [--no-pin] [--baseline PATH]
  rpc-bench server --system rpc|tarpc|echo [--runtime current|multi]
                [--registry-dir DIR] [--lifetime SECS]
  rpc-bench client --system rpc|tarpc|echo --addr HOST:PORT --inflight N
                [--registry-dir DIR] [--duration SECS] [--warmup SECS]
                [--runtime current|multi] [--setup-timeout SECS]

run (what you normally want) starts, for each in-flight level and system, a
server process pinned to CPU 0 and a client process pinned to CPU 1, and
prints a Markdown table.

  --duration SECS   measured time per run (default 5)
  --warmup SECS     unmeasured time before it (default 1)
  --inflight LIST   comma-separated calls in flight (default 1,32,256)
  --systems LIST    comma-separated: rpc, rpc-layered, rpc-layered-bincode, rpc-bincode,
                    rpc-postcard, rpc-msgpack, rpc-lz4, rpc-zstd (every body compressed),
                    rpc-tls (TLS 1.3), rpc-prom (metrics on, Prometheus recorder
                    installed), tarpc, echo (default rpc, tarpc, echo)
  --runtime R       current: tokio current_thread runtimes (default);
                    multi: tokio multi_thread runtimes with 1 worker thread
  --repeat N        runs per cell; the table shows median (min-max) (default 1)
  --no-pin          do not pin the processes with taskset
  --baseline PATH   also run the `rpc` system of another rpc-bench binary
                    (built from an earlier commit) as `rpc@base`, interleaved
                    with the others: an A/B in one run

server prints its listening address on stdout when ready and serves until
SIGTERM/Ctrl-C (or --lifetime, default 600 s). client prints one RESULT line.
`rpc` needs --registry-dir: the local registry directory both sides share.";

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let mut argv = std::env::args().skip(1);
    let Some(cmd) = argv.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = argv.collect();
    let outcome = match cmd.as_str() {
        "run" => Args::parse(&rest)
            .and_then(|a| a.into_run())
            .map(|run| orchestrate::run(&run)),
        "server" => Args::parse(&rest)
            .and_then(|a| a.into_server())
            .map(|s| server(&s)),
        "client" => Args::parse(&rest)
            .and_then(|a| a.into_client())
            .map(|c| client(&c)),
        "pick" => Ok(pick::run()),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => Err(format!("unknown command `{other}`")),
    };
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("rpc-bench {cmd}: error: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("rpc-bench {cmd}: {e}\n(`rpc-bench --help` shows the usage)");
            ExitCode::from(2)
        }
    }
}

fn runtime(flavour: Flavour) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = match flavour {
        Flavour::Current => tokio::runtime::Builder::new_current_thread(),
        Flavour::Multi => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1);
            b
        }
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the tokio runtime: {e}"))
}

/// `rpc-bench server`.
pub struct ServerArgs {
    pub system: System,
    pub runtime: Flavour,
    pub registry_dir: Option<PathBuf>,
    pub lifetime: Duration,
}

fn server(a: &ServerArgs) -> Result<(), String> {
    let rt = runtime(a.runtime)?;
    let ready = |addr: SocketAddr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{addr}");
        let _ = out.flush();
    };
    let lifetime = a.lifetime;
    let shutdown = async move {
        tokio::select! {
            () = rpc::shutdown_signal() => {}
            () = tokio::time::sleep(lifetime) => {
                eprintln!("rpc-bench server: lifetime of {lifetime:?} reached, stopping");
            }
        }
    };
    rt.block_on(async {
        match a.system {
            System::Tarpc => systems::tarpc_sys::serve(ready, shutdown).await,
            System::Echo => systems::echo::serve(ready, shutdown).await,
            // Every other system is the framework (`System::is_rpc`).
            _ => {
                let dir = a
                    .registry_dir
                    .as_deref()
                    .ok_or("--system rpc needs --registry-dir")?;
                systems::rpc_fw::serve(dir, a.system, ready, shutdown).await
            }
        }
    })
}

/// `rpc-bench client`.
pub struct ClientArgs {
    pub system: System,
    pub addr: SocketAddr,
    pub registry_dir: Option<PathBuf>,
    pub inflight: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub runtime: Flavour,
    pub setup_timeout: Duration,
}

fn client(a: &ClientArgs) -> Result<(), String> {
    let rt = runtime(a.runtime)?;
    // Setup (discovery, connect, first call) twice over, the run itself, and
    // slack for the last in-flight calls to come back.
    let bound = a.setup_timeout * 3 + a.warmup + a.duration;
    let outcome = rt.block_on(async {
        let run = async {
            match a.system {
                System::Tarpc => {
                    systems::tarpc_sys::client(
                        a.addr,
                        a.inflight,
                        a.warmup,
                        a.duration,
                        a.setup_timeout,
                    )
                    .await
                }
                System::Echo => {
                    systems::echo::client(a.addr, a.inflight, a.warmup, a.duration, a.setup_timeout)
                        .await
                }
                // Every other system is the framework (`System::is_rpc`).
                _ => {
                    let dir = a
                        .registry_dir
                        .as_deref()
                        .ok_or("--system rpc needs --registry-dir")?;
                    systems::rpc_fw::client(
                        dir,
                        a.system,
                        a.addr,
                        a.inflight,
                        a.warmup,
                        a.duration,
                        a.setup_timeout,
                    )
                    .await
                }
            }
        };
        tokio::time::timeout(bound, run)
            .await
            .map_err(|_| format!("the client did not finish within {bound:?}"))?
    })?;
    // Memory while the connection and the runtime still live.
    let rss = memory::status_kib(None, "VmRSS");
    let hwm = memory::status_kib(None, "VmHWM");
    // Drop the runtime (and with it the connection) before reporting.
    drop(rt);
    if let Some(e) = &outcome.first_error {
        eprintln!(
            "rpc-bench client ({}): {} failed calls ({} in the window); first: {e}",
            a.system, outcome.errors_total, outcome.errors
        );
    }
    let mut line = outcome.result_line(a.system.name(), a.inflight, a.duration);
    if let (Some(rss), Some(hwm)) = (rss, hwm) {
        line.push_str(&format!(" rss_kib={rss} hwm_kib={hwm}"));
    }
    println!("{line}");
    if outcome.hist.count() == 0 {
        return Err("no call completed in the measured window".into());
    }
    Ok(())
}
