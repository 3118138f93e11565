//! Example provider: serves `UserService`, registers it, deregisters on
//! Ctrl-C or SIGTERM.
//!
//! ```text
//! example-provider [--config rpc.toml] [--port N]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use example_common::{InMemoryUsers, UserServiceServer};
use rpc::{Provider, RpcConfig};
use tracing::{error, info};

const USAGE: &str = "usage: example-provider [--config FILE] [--port N]

Serves UserService and registers it in the registry configured in rpc.toml
(default: the embedded `local` registry). Ctrl-C deregisters and drains.

  --config FILE   configuration file (else $RPC_CONFIG, else ./rpc.toml, else defaults)
  --port N        listen port, overriding server.port (0 = any free port)";

struct Args {
    config: Option<PathBuf>,
    port: Option<u16>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        port: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => args.config = Some(it.next().ok_or("--config needs a file")?.into()),
            "--port" => {
                let v = it.next().ok_or("--port needs a number")?;
                args.port = Some(
                    v.parse()
                        .map_err(|_| format!("--port: `{v}` is not a port number"))?,
                );
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}\n");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut config = match RpcConfig::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(port) = args.port {
        config.server.port = port;
    }
    // `[metrics] listen`: a Prometheus endpoint for this process's metrics.
    let metrics = match rpc::observe::MetricsEndpoint::start(&config.metrics).await {
        Ok(m) => m,
        Err(e) => {
            error!("cannot start: {}", rpc::error::report(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut builder =
        Provider::builder(&config).service(UserServiceServer::new(InMemoryUsers::seeded()));
    if let Some(m) = &metrics {
        // Published in the registry: the port really bound, also for port 0.
        builder = builder.metrics_endpoint(m.local_addr());
    }
    let provider = match builder.bind().await {
        Ok(p) => p,
        Err(e) => {
            error!("cannot start: {}", rpc::error::report(&e));
            return ExitCode::FAILURE;
        }
    };
    info!(
        addr = %provider.local_addr(),
        registry = %config.registry.kind,
        "listening; Ctrl-C to stop"
    );
    match provider.run(rpc::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", rpc::error::report(&e));
            ExitCode::FAILURE
        }
    }
}
