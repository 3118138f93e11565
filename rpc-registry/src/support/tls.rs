//! What the TLS-capable backends (etcd, ZooKeeper, Consul) share of
//! `registry.tls`.

use std::path::Path;

use rpc_core::RegistryError;

/// Reads the PEM file that `registry.tls.{key}` names; the error names the
/// key and the path.
pub(crate) fn read_pem(
    backend: &'static str,
    path: &Path,
    key: &str,
) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|e| {
        RegistryError::unavailable(
            backend,
            format!("cannot read registry.tls.{key} {}", path.display()),
            e,
        )
    })
}
