//! A TCP proxy that can cut every connection through it and refuse new
//! ones: a network partition between consumers and a real registry server,
//! without stopping the server (providers keep talking to it directly).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Forwards `127.0.0.1:<port>` to `upstream`. Tasks stop when it is dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    seen: watch::Sender<Seen>,
    generation: watch::Sender<u64>,
    _accept: tokio::task::JoinHandle<()>,
}

/// What the proxy saw: connections refused while cut, and when it accepted
/// the others (the first [`Seen::CAP`]).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Connections refused while cut.
    pub refused: usize,
    /// When each accepted connection arrived.
    pub accepted: Vec<Instant>,
}

impl Seen {
    const CAP: usize = 10_000;
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self._accept.abort();
    }
}

impl FaultProxy {
    /// Starts proxying to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), upstream)
    }

    /// Starts proxying `listen` to `upstream`; fails if `listen` is taken
    /// (for clients that derive a second port from the first, like Nacos).
    pub async fn start_at(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        Ok(Self::serve(TcpListener::bind(listen).await?, upstream))
    }

    fn serve(listener: TcpListener, upstream: SocketAddr) -> Self {
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (seen, _) = watch::channel(Seen::default());
        let (generation, _) = watch::channel(0u64);
        let accept = {
            let cut = cut.clone();
            let seen = seen.clone();
            let generation = generation.clone();
            tokio::spawn(async move {
                let mut conns = JoinSet::new();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(client); // refused: closed at once
                        seen.send_modify(|s| s.refused += 1);
                        continue;
                    }
                    seen.send_modify(|s| {
                        if s.accepted.len() < Seen::CAP {
                            s.accepted.push(Instant::now());
                        }
                    });
                    let mut cut_now = generation.subscribe();
                    conns.spawn(async move {
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let mut client = client;
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut_now.changed() => {}
                        }
                    });
                    while conns.try_join_next().is_some() {}
                }
            })
        };
        Self {
            addr,
            cut,
            seen,
            generation,
            _accept: accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Waits (at most `limit`) until what the proxy saw satisfies `f`;
    /// `None` on timeout.
    #[allow(dead_code)]
    pub async fn wait_seen(
        &self,
        limit: std::time::Duration,
        mut f: impl FnMut(&Seen) -> bool,
    ) -> Option<Seen> {
        let mut rx = self.seen.subscribe();
        let seen = tokio::time::timeout(limit, rx.wait_for(|s| f(s)))
            .await
            .ok()?;
        seen.ok().map(|s| s.clone())
    }
}
