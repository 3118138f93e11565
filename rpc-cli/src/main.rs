//! `rpc`: the operators' tool. Lists, watches, describes and calls the
//! services of any registry this framework supports, reading the same
//! `rpc.toml` as providers and consumers, or a `--registry` URL.
//!
//! Map of the crate:
//! * `main.rs`: the command line (clap), the runtime, exit codes.
//! * `target.rs`: which registry (`rpc.toml`, `--registry` URL forms).
//! * `commands.rs`: `services`, `instances`, `describe`, `call`, `ping`.
//! * `watch.rs`: `watch`, live changes until Ctrl-C.
//! * `config_check.rs`: `config check`, effective settings and their source.
//! * `console/`: `console`, the web console (axum; the page is
//!   `console/index.html`, embedded), live health in `console/health.rs`.
//! * `output.rs`: 80-column tables, timestamps, JSON.
//! * `error.rs`: errors and their exit codes (`error::code`).

mod commands;
mod config_check;
mod console;
mod error;
mod output;
mod target;
mod watch;

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::{CliError, code};

/// Lists, watches, describes and calls the services of a registry
/// (embedded local, etcd, ZooKeeper, Consul, Nacos).
///
/// The registry is the one `rpc.toml` names (--config, else $RPC_CONFIG,
/// else ./rpc.toml; RPC_* variables override keys), or --registry URL.
/// SERVICE is `name` (version 1.0) or `name:version`.
///
/// Exit codes: 0 ok, 1 bad input (arguments, JSON, configuration),
/// 2 usage, 3 not found (service, instance or method), 4 call failed,
/// 5 registry unreachable or refusing.
#[derive(Debug, Parser)]
#[command(name = "rpc", version, max_term_width = 80)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Registry URL, replacing the configuration's [registry]:
    /// etcd://host:port[,host:port], zookeeper://host:port[/chroot],
    /// consul://host:port, nacos://host:port, local:///dir; a query sets
    /// other keys (?token=..&namespace=..).
    #[arg(long, global = true, value_name = "URL")]
    registry: Option<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text that fits 80 columns.
    Table,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every service key in the registry, with its instance count.
    Services,
    /// The instances of a service, with their metadata.
    ///
    /// Columns: address, weight, group, protocol, registered since (UTC),
    /// other metadata.
    Instances {
        /// `name` or `name:version`.
        service: String,
    },
    /// Live changes, one line each, until Ctrl-C.
    ///
    /// Instances present, added, updated and removed, and the registry
    /// connection lost or back. Without SERVICE, every service.
    Watch {
        /// `name` or `name:version`.
        service: Option<String>,
    },
    /// A service's versions, methods and instances.
    Describe {
        /// `name` or `name:version`.
        service: String,
    },
    /// Calls a method by name: JSON arguments in, JSON reply out.
    ///
    /// The call goes through discovery, balancing, retries and the
    /// deadline like any consumer's, with the JSON serializer. A method
    /// whose `Result` is `Err` prints the error value and exits 4.
    #[command(allow_negative_numbers = true)]
    Call {
        /// `name` or `name:version`.
        service: String,
        /// The method's wire name.
        method: String,
        /// The arguments: a JSON array of them, or one JSON value for a
        /// one-argument method (wrap an array argument: [[1,2]]). None for
        /// a method without arguments.
        args: Option<String>,
        /// Timeout in ms (default: the configuration's).
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
        timeout: Option<u64>,
        /// Call metadata, repeatable.
        #[arg(long = "metadata", short = 'm', value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// Call this instance directly instead of discovering one.
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
    },
    /// A heartbeat round trip to a provider's address.
    ///
    /// Tells "the process is up and speaks this protocol" from "it is
    /// registered".
    Ping {
        /// The provider's address.
        address: String,
        /// How long to wait for each reply, in ms.
        #[arg(long, value_name = "MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// How many pings, one per connection.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
    },
    /// A web console: services, instances live from the registry watch,
    /// per-instance health from their metrics endpoints, and a form to
    /// call a method. Serves until Ctrl-C or SIGTERM.
    Console {
        /// Where to listen. Anything but loopback needs --token.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// An access token every request must carry (`Authorization:
        /// Bearer TOKEN`, or `?token=TOKEN` in the page's address). Also
        /// read from RPC_CONSOLE_TOKEN.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// Most connections served at once; one more is closed at once
        /// (a page holds one or two).
        #[arg(long, value_name = "N", default_value_t = 256,
              value_parser = clap::value_parser!(u16).range(1..))]
        max_connections: u16,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validates a configuration and prints the effective settings, each
    /// with where it came from (file, environment, default).
    Check {
        /// The file (default: as for every command).
        file: Option<PathBuf>,
    },
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed.
            let exit = if e.use_stderr() {
                code::USAGE
            } else {
                code::OK
            };
            let _ = e.print();
            std::process::exit(exit);
        }
    };
    // Logs only when asked for (RUST_LOG): the tool's own output is what
    // it prints, and an error is one line.
    // The console logs its own requests and the calls made from it.
    let default = if matches!(cli.command, Command::Console { .. }) {
        "rpc_console=info"
    } else {
        "off"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rpc: cannot start the async runtime: {e}");
            std::process::exit(code::BAD_INPUT);
        }
    };
    let exit = match runtime.block_on(run(cli)) {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("rpc: {e}");
            e.exit_code()
        }
    };
    let _ = std::io::stdout().flush();
    // Exit without waiting for registry clients' background tasks.
    std::process::exit(exit);
}

async fn run(cli: Cli) -> Result<i32, CliError> {
    let out = cli.output;
    if let Command::Config {
        action: ConfigAction::Check { file },
    } = &cli.command
    {
        let file = file.as_deref().or(cli.config.as_deref());
        return config_check::run(file, cli.registry.as_deref(), out);
    }
    if let Command::Ping {
        address,
        timeout,
        count,
    } = &cli.command
    {
        // No registry is needed, only [client.tls] if the file has it.
        let config = rpc::RpcConfig::load(cli.config.as_deref())?;
        let connector = rpc::transport::Connector::from_config(&config.client)?;
        return commands::ping(address, *timeout, *count, &connector, out).await;
    }
    let config = target::load(cli.config.as_deref(), cli.registry.as_deref())?;
    match cli.command {
        Command::Services => commands::services(&config, out).await,
        Command::Instances { service } => commands::instances(&config, &service, out).await,
        Command::Describe { service } => commands::describe(&config, &service, out).await,
        Command::Watch { service } => watch::run(&config, service.as_deref(), out).await,
        Command::Call {
            service,
            method,
            args,
            timeout,
            metadata,
            address,
        } => {
            let call = commands::CallArgs {
                service: &service,
                method: &method,
                args: args.as_deref(),
                timeout,
                metadata: &metadata,
                address: address.as_deref(),
            };
            commands::call(&config, call, out).await
        }
        Command::Console {
            listen,
            token,
            max_connections,
        } => {
            let token = token.or_else(|| std::env::var("RPC_CONSOLE_TOKEN").ok());
            console::run(&config, listen, token, usize::from(max_connections)).await
        }
        Command::Ping { .. } | Command::Config { .. } => Ok(code::OK),
    }
}
