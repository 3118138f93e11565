//! The seams where a connection's stream is chosen: [`Connector`] turns an
//! address into a connected stream on the client, [`Acceptor`] turns an
//! accepted TCP stream into the stream a server connection runs over.
//! Both are chosen once, from the configuration; each connection task is
//! then compiled for its concrete stream ([`crate::io::Io`]).

use std::io;

use rpc_core::{ClientConfig, ConfigError, ServerConfig};
use tokio::io::DuplexStream;
use tokio::net::TcpStream;
use tracing::debug;

/// A connected stream, of the kind its [`Connector`] makes.
pub(crate) enum Dialed {
    Tcp(TcpStream),
    Memory(DuplexStream),
    /// Boxed: a TLS stream is far larger than the others.
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// How a client dials a provider.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Connector {
    /// Plain TCP. The default, and the fastest path.
    #[default]
    Tcp,
    /// TLS over TCP (`[client.tls]`).
    #[cfg(feature = "tls")]
    Tls(crate::tls::TlsConnector),
    /// In-process pipes to servers bound with
    /// [`ServerBuilder::bind_memory`](crate::ServerBuilder::bind_memory)
    /// on this network: no sockets, so tests can run on the paused clock.
    Memory(crate::memory::MemoryNetwork),
    /// Dials nothing: every dial fails at once with this reason. For an
    /// instance this consumer cannot talk to (TLS on one side only), or a
    /// consumer whose `[client.tls]` could not be loaded, so its calls
    /// fail with the reason instead of going out in plaintext.
    Refuse(std::sync::Arc<str>),
}

impl Connector {
    /// The connector `[client]` asks for: TLS when `[client.tls]` is set.
    ///
    /// Errors: the TLS files (see [`crate::tls`]), or `[client.tls]` in a
    /// build without the `tls` feature.
    pub fn from_config(c: &ClientConfig) -> Result<Self, ConfigError> {
        match &c.tls {
            None => Ok(Self::Tcp),
            #[cfg(feature = "tls")]
            Some(tls) => Ok(Self::Tls(crate::tls::TlsConnector::from_config(tls)?)),
            #[cfg(not(feature = "tls"))]
            Some(_) => Err(ConfigError::new(
                "[client.tls]",
                "client.tls",
                "TLS needs the `tls` cargo feature of rpc (the examples enable it)",
            )),
        }
    }

    /// Connects to `addr` (`host:port`), shaking hands when this is TLS:
    /// the one dial that endpoints and `ping` share.
    ///
    /// # Errors
    /// The TCP dial's, the reason of a [`Connector::Refuse`], or the
    /// handshake's, in words a user can act on.
    pub(crate) async fn dial(&self, addr: &str) -> io::Result<Dialed> {
        let tcp = async || {
            let stream = TcpStream::connect(addr).await?;
            if let Err(e) = stream.set_nodelay(true) {
                debug!(%addr, error = %e, "set_nodelay failed");
            }
            Ok::<_, io::Error>(stream)
        };
        match self {
            Self::Tcp => Ok(Dialed::Tcp(tcp().await?)),
            Self::Memory(net) => Ok(Dialed::Memory(net.connect(addr)?)),
            Self::Refuse(why) => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                why.to_string(),
            )),
            #[cfg(feature = "tls")]
            Self::Tls(tls) => {
                let stream = tls.connect(addr, tcp().await?).await.map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("TLS handshake failed: {}", crate::tls::handshake_reason(&e)),
                    )
                })?;
                Ok(Dialed::Tls(Box::new(stream)))
            }
        }
    }

    /// Whether this connector speaks TLS.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        if let Self::Tls(_) = self {
            return true;
        }
        false
    }
}

/// How a server turns an accepted TCP connection into its stream.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Acceptor {
    /// Plain TCP. The default.
    #[default]
    Tcp,
    /// TLS over TCP (`[server.tls]`), mutual when it has a client CA.
    #[cfg(feature = "tls")]
    Tls(crate::tls::TlsAcceptor),
}

impl Acceptor {
    /// The acceptor `[server]` asks for: TLS when `[server.tls]` is set.
    ///
    /// Errors: the TLS files (see [`crate::tls`]), or `[server.tls]` in a
    /// build without the `tls` feature.
    pub fn from_config(c: &ServerConfig) -> Result<Self, ConfigError> {
        match &c.tls {
            None => Ok(Self::Tcp),
            #[cfg(feature = "tls")]
            Some(tls) => Ok(Self::Tls(crate::tls::TlsAcceptor::from_config(tls)?)),
            #[cfg(not(feature = "tls"))]
            Some(_) => Err(ConfigError::new(
                "[server.tls]",
                "server.tls",
                "TLS needs the `tls` cargo feature of rpc (the examples enable it)",
            )),
        }
    }

    /// Whether this acceptor speaks TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Tcp)
    }

    /// `tcp`, `tls` or `mutual tls`, for logs.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            #[cfg(feature = "tls")]
            Self::Tls(t) if t.is_mutual() => "mutual tls",
            #[cfg(feature = "tls")]
            Self::Tls(_) => "tls",
        }
    }
}
