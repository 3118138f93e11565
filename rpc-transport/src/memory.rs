//! In-process connections for tests: servers and clients joined by
//! `tokio::io::duplex` pipes instead of sockets, so a test of the client
//! policies (retries, budgets, outlier ejection, deadlines, go-away,
//! cancellation) runs on tokio's paused clock, deterministically.
//!
//! A server bound with [`ServerBuilder::bind_memory`](crate::ServerBuilder::bind_memory)
//! gets an address of the usual form (`127.0.0.1:PORT`, the port unique
//! within its [`MemoryNetwork`]); it registers, and is discovered, like any
//! other. A client whose connector is [`Connector::Memory`](crate::Connector::Memory)
//! dials such addresses through the network. Dialling an address with no
//! live server is refused, as a dead TCP port is. The frames, the
//! connection tasks and everything above them are the production code.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::DuplexStream;
use tokio::sync::mpsc;

/// Bytes buffered in each direction of an in-memory connection: a socket
/// buffer's order of size, so back-pressure behaves as it does on TCP.
const PIPE_BYTES: usize = 256 * 1024;
/// Connections waiting to be accepted, per server (a listen backlog).
const BACKLOG: usize = 128;
/// First port handed out; ports only name servers, nothing is bound.
const FIRST_PORT: u16 = 40_000;

pub(crate) type Incoming = mpsc::Receiver<(DuplexStream, SocketAddr)>;

/// A set of in-memory servers that clients can dial by address. Cheap to
/// clone: clones are the same network.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Net>>,
}

#[derive(Default)]
struct Net {
    next_port: u16,
    listeners: HashMap<String, mpsc::Sender<(DuplexStream, SocketAddr)>>,
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers = self
            .inner
            .lock()
            .map(|n| n.listeners.len())
            .unwrap_or_default();
        f.debug_struct("MemoryNetwork")
            .field("servers", &servers)
            .finish()
    }
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn next_addr(net: &mut Net) -> SocketAddr {
        let port = FIRST_PORT.wrapping_add(net.next_port);
        net.next_port = net.next_port.wrapping_add(1);
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A new listening address and the queue of its incoming connections.
    pub(crate) fn listen(&self) -> (SocketAddr, Incoming) {
        let mut net = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let addr = Self::next_addr(&mut net);
        let (tx, rx) = mpsc::channel(BACKLOG);
        net.listeners.insert(addr.to_string(), tx);
        (addr, rx)
    }

    /// Dials `addr`: a pipe whose other end the server at `addr` accepts
    /// (a test can write raw bytes into it, as into a socket).
    /// Refused when no server listens there (any more) or its backlog is
    /// full.
    pub fn connect(&self, addr: &str) -> io::Result<DuplexStream> {
        let mut net = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let refused = || {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("no in-memory server listens at {addr}"),
            )
        };
        let Some(tx) = net.listeners.get(addr).cloned() else {
            return Err(refused());
        };
        let peer = Self::next_addr(&mut net);
        let (client, server) = tokio::io::duplex(PIPE_BYTES);
        match tx.try_send((server, peer)) {
            Ok(()) => Ok(client),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                net.listeners.remove(addr);
                Err(refused())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the in-memory server at {addr} has a full backlog"),
            )),
        }
    }
}
