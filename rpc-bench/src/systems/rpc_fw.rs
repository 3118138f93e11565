//! `rpc`: this framework as a user gets it. The provider serves the
//! macro-generated `BenchServer` through `rpc::Provider`; the consumer finds
//! it through the `local` registry (a directory shared by both processes)
//! and calls through the generated `BenchClient` (discovery cache, round
//! robin balancer, one pooled multiplexed connection).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    // Replies are compressed only for a compressed request (`rpc-lz4`,
    // `rpc-zstd`), and then all of them, to show what compression costs.
    cfg.server.compression_threshold = 0;
    cfg
}

/// Binds, prints the address, registers and serves until `shutdown`;
/// deregisters and drains on the way out.
pub async fn serve(
    registry_dir: &Path,
    system: super::System,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let layered = system.is_layered();
    let mut cfg = config(registry_dir);
    if system == super::System::RpcTls {
        cfg.server.tls = Some(make_certificates(registry_dir)?);
    }
    let _metrics = prometheus(system, &mut cfg).await?;
    let mut builder = rpc::Provider::builder(&cfg).service(BenchServer::new(EchoImpl));
    if layered {
        builder = builder.layer(CountingServerLayer::default());
    }
    let provider = builder
        .bind()
        .await
        .map_err(|e| format!("provider bind failed: {}", chain(&e)))?;
    ready(provider.local_addr());
    provider
        .run(shutdown)
        .await
        .map_err(|e| format!("provider failed: {}", chain(&e)))
}

/// For `rpc-prom`: turns `[metrics]` on and installs the Prometheus
/// recorder with its endpoint on an ephemeral loopback port (which runs
/// the recorder's upkeep, as in production); kept until the process ends.
async fn prometheus(
    system: super::System,
    cfg: &mut RpcConfig,
) -> Result<Option<rpc::observe::MetricsEndpoint>, String> {
    if system != super::System::RpcProm {
        return Ok(None);
    }
    cfg.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    rpc::observe::MetricsEndpoint::start(&cfg.metrics)
        .await
        .map_err(|e| format!("metrics endpoint: {}", chain(&e)))
}

struct RpcCaller<S = rpc::client::DefaultStack>(BenchClient<S>);

impl<S> Clone for RpcCaller<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S: rpc::client::Call> Caller for RpcCaller<S> {
    async fn echo(&self, msg: BenchmarkMessage) -> Result<BenchmarkMessage, String> {
        self.0.echo(msg).await.map_err(|e| chain(&e))
    }
}

/// The `rpc-layered` server layer: counts calls (a relaxed increment), the
/// least a real layer (metrics, auth) does.
#[derive(Default)]
struct CountingServerLayer(AtomicU64);

impl rpc::server::ServerLayer for CountingServerLayer {
    fn on_call(&self, _cx: &rpc::Context) -> Result<(), rpc::server::CallError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The `rpc-layered` client layer around each call: counts calls.
#[derive(Clone, Default)]
struct CountingLayer(Arc<AtomicU64>);

impl<S> rpc::client::Layer<S> for CountingLayer
where
    S: rpc::client::Call,
{
    type Service = Counting<S>;
    fn layer(&self, inner: S) -> Counting<S> {
        Counting(inner, self.0.clone())
    }
}

struct Counting<S>(S, Arc<AtomicU64>);

impl<S: rpc::client::Call> rpc::client::Call for Counting<S> {
    async fn call(
        &self,
        cx: &mut rpc::client::ClientContext<'_>,
        args: &[u8],
    ) -> Result<rpc::transport::RawReply, rpc::RpcError> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.call(cx, args).await
    }
}

/// Discovers the provider (which must be the one at `expect`), then runs
/// the closed loop.
pub async fn client(
    registry_dir: &Path,
    system: super::System,
    expect: SocketAddr,
    inflight: usize,
    warmup: Duration,
    duration: Duration,
    setup_timeout: Duration,
) -> Result<Outcome, String> {
    let layered = system.is_layered();
    let mut cfg = config(registry_dir);
    cfg.client.serializer = system.serializer();
    cfg.client.compression = system.compression();
    if system == super::System::RpcTls {
        // The server wrote them before it registered.
        cfg.client.tls = Some(rpc::ClientTlsConfig {
            ca_file: Some(registry_dir.join("tls/ca.pem")),
            ..Default::default()
        });
    }
    cfg.client.compression_threshold = 0;
    let _metrics = prometheus(system, &mut cfg).await?;
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
    let (warm, run) = (warmup, duration);
    if layered {
        let consumer = consumer.layer(CountingLayer::default());
        let caller = RpcCaller(BenchClient::new(&consumer));
        return measure(caller, inflight, warm, run, setup_timeout).await;
    }
    let caller = RpcCaller(BenchClient::new(&consumer));
    measure(caller, inflight, warm, run, setup_timeout).await
}

/// One checked round trip, then the closed loop.
async fn measure<C: Caller>(
    caller: C,
    inflight: usize,
    warmup: Duration,
    duration: Duration,
    setup_timeout: Duration,
) -> Result<Outcome, String> {
    driver::check_round_trip(&caller, setup_timeout).await?;
    let timeline = Timeline::starting_now(warmup, duration);
    Ok(driver::closed_loop(caller, inflight, timeline).await)
}

/// A CA and a server certificate for 127.0.0.1, written under
/// `dir/tls/` for the client process to find; EC P-256 (rcgen's default),
/// as a production certificate would commonly be.
fn make_certificates(dir: &Path) -> Result<rpc::ServerTlsConfig, String> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let err = |e: rcgen::Error| format!("making test certificates: {e}");
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).map_err(|e| format!("{}: {e}", tls.display()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(err)?).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .map_err(err)?
        .signed_by(&key, &ca)
        .map_err(err)?;
    let write = |name: &str, text: String| {
        let path = tls.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    write("ca.pem", ca.pem())?;
    Ok(rpc::ServerTlsConfig {
        cert_file: write("server.pem", cert.pem())?,
        key_file: write("server.key", key.serialize_pem())?,
        client_ca_file: None,
    })
}
