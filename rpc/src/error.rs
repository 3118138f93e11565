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

/// Formats an error with its whole `source()` chain: `outer: cause: root`.
/// Error types here keep their sources separate, as they should; this is for
/// the one log line or message at the top.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = e.source();
    }
    s
}
