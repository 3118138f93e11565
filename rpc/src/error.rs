//! Errors of the facade: starting and running a provider.

use rpc_core::{ConfigError, RegistryError};
use rpc_transport::TransportError;

/// A provider could not start or stop cleanly.
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
}

/// Formats an error with its whole `source()` chain: `outer: cause: root`
/// (defined in `rpc_core`, where the registry crate can use it too).
pub use rpc_core::error::report;
