//! `rpc`: this framework as a user gets it. The provider serves the
//! macro-generated `BenchServer` through `rpc::Provider`; the consumer finds
//! it through the `local` registry (a directory shared by both processes)
//! and calls through the generated `BenchClient` (discovery cache, round
//! robin balancer, one pooled multiplexed connection).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rpc::{RegistryKind, RpcConfig};
use rpc_core::config::Addresses;

use crate::driver::{self, Caller, Outcome, Timeline};
use crate::message::BenchmarkMessage;

use super::chain;

/// The benchmark service.
#[rpc::service(version = "1.0")]
pub trait Bench {
    /// Returns its argument.
    async fn echo(&self, m: BenchmarkMessage) -> BenchmarkMessage;
}

struct EchoImpl;

impl Bench for EchoImpl {
    async fn echo(&self, m: BenchmarkMessage) -> BenchmarkMessage {
        m
    }
}

/// Defaults, plus the `local` registry in `registry_dir` and one
/// connection per provider. Built in code (not from `rpc.toml` or
/// `RPC_*` variables) so the run does not depend on the working directory.
fn config(registry_dir: &Path) -> RpcConfig {
    let mut cfg = RpcConfig::default();
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.registry.kind = RegistryKind::Local;
    cfg.registry.address = Addresses(vec![registry_dir.display().to_string()]);
    cfg.client.connections_per_endpoint = 1;
    cfg
}

/// Binds, prints the address, registers and serves until `shutdown`;
/// deregisters and drains on the way out.
pub async fn serve(
    registry_dir: &Path,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let cfg = config(registry_dir);
    let provider = rpc::Provider::builder(&cfg)
        .service(BenchServer::new(EchoImpl))
        .bind()
        .await
        .map_err(|e| format!("provider bind failed: {}", chain(&e)))?;
    ready(provider.local_addr());
    provider
        .run(shutdown)
        .await
        .map_err(|e| format!("provider failed: {}", chain(&e)))
}

#[derive(Clone)]
struct RpcCaller(BenchClient);

impl Caller for RpcCaller {
    async fn echo(&self, msg: BenchmarkMessage) -> Result<BenchmarkMessage, String> {
        self.0.echo(msg).await.map_err(|e| chain(&e))
    }
}

/// Discovers the provider (which must be the one at `expect`), then runs
/// the closed loop.
pub async fn client(
    registry_dir: &Path,
    expect: SocketAddr,
    inflight: usize,
    warmup: Duration,
    duration: Duration,
    setup_timeout: Duration,
) -> Result<Outcome, String> {
    let cfg = config(registry_dir);
    let consumer = rpc::Consumer::from_config(&cfg)
        .await
        .map_err(|e| format!("consumer setup failed: {}", chain(&e)))?;
    let key = format!(
        "{}:{}",
        BenchClient::SERVICE_NAME,
        BenchClient::SERVICE_VERSION
    );
    let handle = tokio::time::timeout(setup_timeout, consumer.cache().service(&key))
        .await
        .map_err(|_| format!("discovery of `{key}` did not start within {setup_timeout:?}"))?
        .map_err(|e| format!("discovery of `{key}` failed: {}", chain(&e)))?;
    let list = tokio::time::timeout(setup_timeout, handle.wait_until(|list, _| !list.is_empty()))
        .await
        .map_err(|_| {
            format!(
                "no provider of `{key}` appeared in {} within {setup_timeout:?}",
                registry_dir.display()
            )
        })?;
    let want = expect.to_string();
    if !list.iter().any(|m| m.address() == want) {
        let seen: Vec<String> = list.iter().map(|m| m.address()).collect();
        return Err(format!(
            "the registry lists {seen:?} for `{key}`, not the provider at {want}"
        ));
    }
    let caller = RpcCaller(BenchClient::new(&consumer));
    driver::check_round_trip(&caller, setup_timeout).await?;
    let timeline = Timeline::starting_now(warmup, duration);
    Ok(driver::closed_loop(caller, inflight, timeline).await)
}
