//! Example consumer: discovers `UserService`, shows a few calls, then runs
//! a load phase and prints a one-line summary. Exits non-zero if any call
//! failed, so it doubles as a deployment smoke test.
//!
//! ```text
//! example-consumer [--config rpc.toml] [--calls N | --duration SECS] [--concurrency C] [--wait SECS]
//! ```

mod histogram;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use example_common::{AppError, UserServiceClient};
use rpc::{Consumer, RpcConfig};

use histogram::Histogram;

const USAGE: &str = "usage: example-consumer [--config FILE] [--calls N | --duration SECS] [--concurrency C] [--wait SECS]

Discovers UserService through the registry configured in rpc.toml, shows a
few calls, then calls get_user N times (or for SECS seconds) with C calls in
flight and prints: calls=N ok=N failed=N p50_us=.. p99_us=..
Exit status is 1 if any call failed.

  --config FILE    configuration file (else $RPC_CONFIG, else ./rpc.toml, else defaults)
  --calls N        calls in the load phase (default 20)
  --duration SECS  run the load phase for SECS seconds instead
  --concurrency C  calls in flight (default 1)
  --wait SECS      how long to wait for a provider to appear (default 10)";

struct Args {
    config: Option<PathBuf>,
    calls: u64,
    duration: Option<Duration>,
    concurrency: usize,
    wait: Duration,
}

fn number<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag}: `{v}` is not a valid number"))
}

/// Seconds as a duration: more than 0, at most a day (86,400 s); `nan`,
/// `inf` and negatives are refused (`Duration::from_secs_f64` would panic).
fn seconds(flag: &str, v: Option<String>) -> Result<Duration, String> {
    let raw = v.clone().unwrap_or_default();
    let s: f64 = number(flag, v)?;
    if !(s > 0.0 && s <= 86_400.0) {
        return Err(format!(
            "{flag}: `{raw}` is not more than 0 and at most 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Most concurrent callers: each is a task with a call in flight.
const MAX_CONCURRENCY: usize = 65_536;

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        config: None,
        calls: 20,
        duration: None,
        concurrency: 1,
        wait: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--config" => a.config = Some(it.next().ok_or("--config needs a file")?.into()),
            "--calls" => a.calls = number("--calls", it.next())?,
            "--duration" => a.duration = Some(seconds("--duration", it.next())?),
            "--concurrency" => {
                a.concurrency = number::<usize>("--concurrency", it.next())?.max(1);
                if a.concurrency > MAX_CONCURRENCY {
                    return Err(format!("--concurrency: at most {MAX_CONCURRENCY}"));
                }
            }
            "--wait" => a.wait = seconds("--wait", it.next())?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
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
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, String> {
    let config = RpcConfig::load(args.config.as_deref()).map_err(|e| e.to_string())?;
    // `[metrics] listen`: a Prometheus endpoint for this process's metrics.
    let _metrics = rpc::observe::MetricsEndpoint::start(&config.metrics)
        .await
        .map_err(|e| rpc::error::report(&e))?;
    let consumer = Consumer::from_config(&config)
        .await
        .map_err(|e| rpc::error::report(&e))?;
    let users = UserServiceClient::new(&consumer);
    let key = users.service_client().service_key().to_owned();

    println!("registry: {} | service: {key}", config.registry.kind);
    let providers = wait_for_providers(&consumer, &key, args.wait).await?;
    println!(
        "providers: {}",
        providers
            .iter()
            .map(|m| m.address())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // A few calls that show what a user sees, user errors included.
    match users.get_user(1).await {
        Ok(Ok(u)) => println!(
            "get_user(1)          -> {} <{}> {:?}",
            u.name, u.email, u.tags
        ),
        Ok(Err(e)) => println!("get_user(1)          -> application error: {e}"),
        Err(e) => return Err(format!("get_user(1) failed: {}", rpc::error::report(&e))),
    }
    match users.rename(2, "Grace Hopper".to_owned()).await {
        Ok(Ok(u)) => println!("rename(2, ..)        -> {} (id {})", u.name, u.id),
        Ok(Err(e)) => println!("rename(2, ..)        -> application error: {e}"),
        Err(e) => return Err(format!("rename failed: {}", rpc::error::report(&e))),
    }
    match users.get_user(404).await {
        Ok(Err(AppError::NotFound { id })) => {
            println!(
                "get_user(404)        -> NotFound {{ id: {id} }} (a user error, passed through)"
            )
        }
        other => println!("get_user(404)        -> {other:?}"),
    }

    let summary = load(&users, &args).await;
    println!("{summary}");
    Ok(summary.failed == 0)
}

async fn wait_for_providers(
    consumer: &Consumer,
    key: &str,
    wait: Duration,
) -> Result<Arc<Vec<rpc::ServiceMetaInfo>>, String> {
    // Within `--wait`, a registry that cannot answer yet (starting, electing
    // a leader) is waited for like an empty provider list: the cache keeps
    // retrying in the background; each lookup waits up to the registry timeout.
    let started = tokio::time::Instant::now();
    let handle = loop {
        match consumer.cache().service(key).await {
            Ok(handle) => break handle,
            Err(e) if started.elapsed() < wait => {
                eprintln!("waiting for the registry: {e}");
            }
            Err(e) => return Err(format!("discovery failed: {e}")),
        }
    };
    let left = wait.saturating_sub(started.elapsed());
    tokio::time::timeout(left, handle.wait_until(|list, _| !list.is_empty()))
        .await
        .map_err(|_| format!("no provider of {key} appeared within {wait:?}; is example-provider running with the same registry?"))
}

struct Summary {
    calls: u64,
    ok: u64,
    failed: u64,
    elapsed: Duration,
    hist: Histogram,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let qps = self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "calls={} ok={} failed={} p50_us={} p99_us={} qps={:.0}",
            self.calls,
            self.ok,
            self.failed,
            self.hist.quantile(0.50),
            self.hist.quantile(0.99),
            qps
        )
    }
}

async fn load(users: &UserServiceClient, args: &Args) -> Summary {
    let issued = Arc::new(AtomicU64::new(0));
    let deadline = args.duration.map(|d| Instant::now() + d);
    let limit = args.calls;
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let users = users.clone();
        let issued = issued.clone();
        workers.spawn(async move {
            let mut hist = Histogram::default();
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut first_error: Option<String> = None;
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                let more = match deadline {
                    Some(d) => Instant::now() < d,
                    None => n < limit,
                };
                if !more {
                    break;
                }
                let t = Instant::now();
                match users.get_user(1 + n % 3).await {
                    Ok(Ok(_)) => {
                        hist.record(t.elapsed());
                        ok += 1;
                    }
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| format!("application error: {e}"));
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| rpc::error::report(&e));
                    }
                }
            }
            (hist, ok, failed, first_error)
        });
    }
    let mut total = Summary {
        calls: 0,
        ok: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        hist: Histogram::default(),
    };
    while let Some(done) = workers.join_next().await {
        let Ok((hist, ok, failed, first_error)) = done else {
            total.failed += 1;
            continue;
        };
        total.hist.merge(&hist);
        total.ok += ok;
        total.failed += failed;
        if let Some(e) = first_error {
            eprintln!("call failed: {e}");
        }
    }
    total.calls = total.ok + total.failed;
    total.elapsed = start.elapsed();
    total
}
