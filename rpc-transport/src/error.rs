//! Errors of the transport crate. Calls report [`rpc_core::RpcError`];
//! this enum covers serving.

/// Serving failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr} (server.host, server.port)")]
    Bind {
        /// Address asked for.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable (TLS files, mostly).
    #[error(transparent)]
    Config(#[from] rpc_core::ConfigError),
    /// Two handlers claim the same `name:version`.
    #[error("service `{0}` is added twice")]
    DuplicateService(String),
    /// A heartbeat round trip ([`ping`](crate::client::ping)) failed.
    #[error("ping {addr}: {reason}")]
    Ping {
        /// The address pinged.
        addr: String,
        /// What went wrong, in words.
        reason: String,
        /// The socket error, if there was one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// Other socket I/O failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}
