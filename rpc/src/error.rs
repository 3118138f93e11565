//! Errors of the facade: starting and running a provider.

use rpc_core::{ConfigError, RegistryError};
use rpc_transport::TransportError;

/// A provider could not start or stop cleanly, or the metrics endpoint
/// could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Binding or serving failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The registry failed (connecting, registering).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The metrics endpoint (`[metrics] listen`) could not bind its address.
    #[error("metrics endpoint: cannot listen on {addr} (metrics.listen)")]
    MetricsBind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// A metrics recorder is already installed in this process (the
    /// `metrics` facade has one global recorder).
    #[error("metrics endpoint: {0}")]
    MetricsRecorder(String),
}

/// Formats an error with its whole `source()` chain: `outer: cause: root`
/// (defined in `rpc_core`, where the registry crate can use it too).
pub use rpc_core::error::report;
