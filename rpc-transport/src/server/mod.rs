//! The server: accept loop, per-connection tasks, graceful shutdown.
//!
//! Each connection is served by one task that reads frames, answers a
//! handler that finishes on its first poll inline and starts a task for any
//! other, and writes replies as they finish (out of order), coalescing every
//! reply that is ready into one write (streamed once it passes a few
//! kilobytes, so the client starts on a long burst early). Shutdown
//! stops accepting and reading, lets in-flight calls finish up to a deadline,
//! then aborts what is left.

mod connection;
mod handler;
mod layer;
mod liveness;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rpc_core::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use handler::{Call, CallError, HandlerFuture, Replier, ServiceHandler};
pub use layer::ServerLayer;

use crate::connect::Acceptor;
use crate::error::TransportError;
use crate::io::Io;

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) services: HashMap<String, Arc<dyn ServiceHandler>>,
    pub(crate) max_frame_len: usize,
    pub(crate) max_in_flight_per_connection: usize,
    /// Server-wide bound on running handlers; beyond it calls get `Overloaded`.
    pub(crate) in_flight: Arc<Semaphore>,
    /// How long a connection may go without progress.
    pub(crate) limits: liveness::Limits,
    /// Layers around every call, outermost first.
    pub(crate) layers: Box<[Arc<dyn ServerLayer>]>,
    /// Smallest reply body, in bytes, compressed for a compressed request.
    pub(crate) compression_threshold: usize,
}

/// Connections being refused at once (a go-away, then a short linger) when
/// the server is full; past this, further ones are simply closed.
const MAX_REFUSING: usize = 64;

/// Collects services, then binds.
#[derive(Default)]
pub struct ServerBuilder {
    config: ServerConfig,
    services: HashMap<String, Arc<dyn ServiceHandler>>,
    duplicate: Option<String>,
    layers: Vec<Arc<dyn ServerLayer>>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("config", &self.config)
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl ServerBuilder {
    /// A builder using `config` (`[server]` of `rpc.toml`).
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config,
            services: HashMap::new(),
            duplicate: None,
            layers: Vec::new(),
        }
    }

    /// Adds a layer around every call ([`ServerLayer`]). The first added
    /// is the outermost.
    pub fn layer(mut self, layer: impl ServerLayer) -> Self {
        self.layers.push(Arc::new(layer));
        self
    }

    /// Adds an already shared layer.
    pub fn add_layer(&mut self, layer: Arc<dyn ServerLayer>) {
        self.layers.push(layer);
    }

    /// Adds a service (usually a generated `FooServer`).
    pub fn service(mut self, handler: impl ServiceHandler) -> Self {
        self.add_arc(Arc::new(handler));
        self
    }

    /// Adds an already shared service.
    pub fn add_arc(&mut self, handler: Arc<dyn ServiceHandler>) {
        let key = rpc_core::service_key(handler.service_name(), handler.service_version());
        if self.services.insert(key.clone(), handler).is_some() {
            self.duplicate = Some(key);
        }
    }

    /// Binds the listening socket (`host:port`; port 0 picks a free one).
    pub async fn bind(self) -> Result<Server, TransportError> {
        // Certificates are read before the port is taken: a bad file
        // fails startup, naming the key and the file.
        let acceptor = Acceptor::from_config(&self.config)?;
        if let Some(key) = self.duplicate {
            return Err(TransportError::DuplicateService(key));
        }
        // Parsed, so that every spelling of an address binds the way it is
        // published (an IPv6 address needs brackets here).
        let addr = rpc_core::Host::parse(&self.config.host).with_port(self.config.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| TransportError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local_addr = listener.local_addr()?;
        Ok(self.finish(Listener::Tcp(listener), local_addr, acceptor))
    }

    /// Listens on `network` instead of a socket (tests): the server gets
    /// an address of its own there, which clients with
    /// [`Connector::Memory`](crate::Connector::Memory) dial. `[server.tls]`
    /// and `host`/`port` do not apply.
    pub fn bind_memory(
        self,
        network: &crate::memory::MemoryNetwork,
    ) -> Result<Server, TransportError> {
        if let Some(key) = self.duplicate {
            return Err(TransportError::DuplicateService(key));
        }
        let (local_addr, incoming) = network.listen();
        Ok(self.finish(Listener::Memory(incoming), local_addr, Acceptor::Tcp))
    }

    fn finish(self, listener: Listener, local_addr: SocketAddr, acceptor: Acceptor) -> Server {
        Server {
            listener,
            local_addr,
            acceptor,
            handshake_timeout: Duration::from_millis(self.config.first_frame_timeout_ms.max(1)),
            shared: Arc::new(Shared {
                services: self.services,
                max_frame_len: self.config.max_frame_len,
                max_in_flight_per_connection: self.config.max_in_flight_per_connection,
                in_flight: Arc::new(Semaphore::new(self.config.max_in_flight)),
                limits: liveness::Limits::from_config(&self.config),
                layers: self.layers.into_boxed_slice(),
                compression_threshold: self.config.compression_threshold,
            }),
            max_connections: self.config.max_connections,
            shutdown_timeout: self.config.shutdown_timeout(),
        }
    }
}

/// Where a server's connections come from.
enum Listener {
    Tcp(TcpListener),
    Memory(crate::memory::Incoming),
}

/// One accepted connection.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Memory(tokio::io::DuplexStream),
}

impl Listener {
    async fn accept(&mut self) -> std::io::Result<(Accepted, SocketAddr)> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| (Accepted::Tcp(s), peer)),
            Listener::Memory(rx) => match rx.recv().await {
                Some((s, peer)) => Ok((Accepted::Memory(s), peer)),
                // The network holds the sender while the server exists.
                None => std::future::pending().await,
            },
        }
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listener: Listener,
    local_addr: SocketAddr,
    acceptor: Acceptor,
    /// Longest TLS handshake (`server.first_frame_timeout_ms`: the
    /// handshake comes before the first frame).
    handshake_timeout: Duration,
    shared: Arc<Shared>,
    max_connections: usize,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("services", &self.shared.services.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Server {
    /// Starts building a server.
    pub fn builder(config: ServerConfig) -> ServerBuilder {
        ServerBuilder::new(config)
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the server speaks TLS (published as `tls = true`).
    pub fn is_tls(&self) -> bool {
        self.acceptor.is_tls()
    }

    /// `name:version` of every service served.
    pub fn service_keys(&self) -> Vec<String> {
        self.shared.services.keys().cloned().collect()
    }

    /// The method wire names of the service `key` (`name:version`), if it
    /// is served.
    pub fn methods(&self, key: &str) -> Option<&'static [&'static str]> {
        self.shared.services.get(key).map(|h| h.methods())
    }

    /// Serves until `shutdown` completes, then drains: stops accepting and
    /// reading, waits up to `shutdown_timeout_ms` for in-flight calls to be
    /// answered, aborts the rest, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), TransportError> {
        let Server {
            mut listener,
            local_addr,
            acceptor,
            handshake_timeout,
            shared,
            max_connections,
            shutdown_timeout,
        } = self;
        #[cfg(not(feature = "tls"))]
        let _ = handshake_timeout;
        let stop = CancellationToken::new();
        let force = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(max_connections));
        info!(%local_addr, transport = acceptor.describe(), "serving");

        tokio::pin!(shutdown);
        let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
        let mut accept_failures = 0u32;
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((Accepted::Memory(stream), peer)) => {
                    // No refusal dance in memory: a full server just
                    // closes the pipe.
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        continue;
                    };
                    tracker.spawn(serve_and_linger(
                        stream,
                        peer,
                        shared.clone(),
                        stop.clone(),
                        force.clone(),
                        permit,
                    ));
                }
                Ok((Accepted::Tcp(stream), peer)) => {
                    accept_failures = 0;
                    // A full server accepts and refuses at once: a caller
                    // left in the kernel's accept queue would wait out its
                    // whole deadline, where a refusal lets it try another
                    // instance now.
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        warn!(%peer, max_connections, "refusing a connection: at the connection limit (server.max_connections; go-away)");
                        if acceptor.is_tls() {
                            // A plaintext go-away would reach a TLS client
                            // as a corrupt handshake; the close fails its
                            // dial at once all the same.
                            drop(stream);
                            continue;
                        }
                        match refusing.clone().try_acquire_owned() {
                            Ok(slot) => {
                                tracker.spawn(async move {
                                    connection::refuse(stream).await;
                                    drop(slot);
                                });
                            }
                            // Too many refusals at once to linger on each:
                            // the go-away still goes out if the socket takes
                            // it now (a fresh socket always has room).
                            Err(_) => connection::refuse_now(&stream),
                        }
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "set_nodelay failed");
                    }
                    let shared = shared.clone();
                    let stop = stop.clone();
                    let force = force.clone();
                    match &acceptor {
                        Acceptor::Tcp => {
                            tracker
                                .spawn(serve_and_linger(stream, peer, shared, stop, force, permit));
                        }
                        #[cfg(feature = "tls")]
                        Acceptor::Tls(tls) => {
                            let tls = tls.inner.clone();
                            tracker.spawn(async move {
                                // In the connection's own task: a slow or
                                // silent handshake holds only its own slot,
                                // for at most the handshake timeout.
                                let handshake = tokio::select! {
                                    r = tokio::time::timeout(handshake_timeout, tls.accept(stream)) => r,
                                    _ = force.cancelled() => return,
                                };
                                match handshake {
                                    Ok(Ok(stream)) => {
                                        serve_and_linger(stream, peer, shared, stop, force, permit).await;
                                    }
                                    Ok(Err(e)) => warn!(%peer, error = %e, "TLS handshake failed: closing the connection"),
                                    Err(_) => warn!(%peer, ?handshake_timeout, "TLS handshake did not complete in time: closing the connection"),
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    accept_failures = accept_failures.saturating_add(1);
                    let pause = Duration::from_millis(10u64 << accept_failures.min(7));
                    warn!(error = %e, ?pause, "accept failed");
                    tokio::time::sleep(pause).await;
                }
            }
        }

        drop(listener);
        info!(%local_addr, connections = tracker.len(), "shutting down: draining in-flight calls");
        stop.cancel();
        tracker.close();
        if tokio::time::timeout(shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                ?shutdown_timeout,
                connections = tracker.len(),
                "drain deadline passed: aborting remaining calls"
            );
            force.cancel();
            tracker.wait().await;
        }
        info!(%local_addr, "stopped");
        Ok(())
    }
}

/// Serves one connection, frees its slot, then lingers if the peer is owed it.
async fn serve_and_linger<S: Io>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    force: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let linger = connection::serve(stream, peer, shared, stop, force).await;
    drop(permit);
    if let Some(rd) = linger {
        connection::linger(rd).await;
    }
}
