//! TLS and mutual TLS with rustls (ring provider; no OpenSSL), built from
//! `[server.tls]` and `[client.tls]`.
//!
//! Certificates and keys are PEM files, read once at startup: a file that
//! cannot be read, or holds no certificate or key, fails there with a
//! [`ConfigError`] naming the key (`server.tls.cert_file`, ...) and the
//! file. The crypto provider is passed explicitly (never the process-wide
//! default), so another rustls user in the process cannot change it.
//!
//! A consumer checks a provider's certificate against `client.tls.ca_file`
//! or, without it, the Mozilla roots compiled in by webpki-roots (the
//! platform's store is not read), for the host it dials (an IP address
//! matches an IP SAN) or `client.tls.server_name`.

use std::path::Path;
use std::sync::Arc;

use rpc_core::{ClientTlsConfig, ConfigError, ServerTlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The TLS side of a consumer: a connector and the name to check, if not
/// the dialled host.
#[derive(Clone)]
pub struct TlsConnector {
    pub(crate) inner: tokio_rustls::TlsConnector,
    pub(crate) server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The TLS side of a provider.
#[derive(Clone)]
pub struct TlsAcceptor {
    pub(crate) inner: tokio_rustls::TlsAcceptor,
    /// Whether consumers must present a certificate.
    pub(crate) mutual: bool,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An error about the file `key` names: the file is in the message, and
/// the origin is the section (the configuration file itself is not known
/// here; startup names it when it reports the error).
fn bad(file: &Path, key: &str, message: impl Into<String>) -> ConfigError {
    let section = key.rsplit_once('.').map_or(key, |(s, _)| s);
    ConfigError::new(
        format!("[{section}]"),
        key,
        format!("{}: {}", file.display(), message.into()),
    )
}

fn required(file: &Path, key: &str) -> Result<(), ConfigError> {
    if file.as_os_str().is_empty() {
        let section = key.rsplit_once('.').map_or(key, |(s, _)| s);
        return Err(ConfigError::new(
            format!("[{section}]"),
            key,
            "is required (a PEM file)",
        ));
    }
    Ok(())
}

fn certs(file: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    required(file, key)?;
    let pem = std::fs::read(file)
        .map_err(|e| bad(file, key, format!("cannot read the certificate file: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(file, key, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(file, key, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn private_key(file: &Path, key: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
    required(file, key)?;
    let pem = std::fs::read(file)
        .map_err(|e| bad(file, key, format!("cannot read the key file: {e}")))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        bad(
            file,
            key,
            format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file: {e}"),
        )
    })
}

fn roots(file: &Path, key: &str) -> Result<rustls::RootCertStore, ConfigError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certs(file, key)? {
        store
            .add(cert)
            .map_err(|e| bad(file, key, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

impl TlsAcceptor {
    /// Builds the provider's TLS configuration from `[server.tls]`.
    ///
    /// Errors name the key and the file: unreadable, no certificate, no
    /// key, or a key that does not match the certificate.
    pub fn from_config(c: &ServerTlsConfig) -> Result<Self, ConfigError> {
        let chain = certs(&c.cert_file, "server.tls.cert_file")?;
        let key = private_key(&c.key_file, "server.tls.key_file")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new("rustls", "server.tls", e.to_string()))?;
        let builder = match &c.client_ca_file {
            Some(ca) => {
                let key = "server.tls.client_ca_file";
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca, key)?),
                    provider(),
                )
                .build()
                .map_err(|e| bad(ca, key, format!("cannot verify clients with it: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            bad(
                &c.key_file,
                "server.tls.key_file",
                format!("does not go with server.tls.cert_file: {e}"),
            )
        })?;
        Ok(Self {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            mutual: c.client_ca_file.is_some(),
        })
    }

    /// Whether consumers must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }
}

impl TlsConnector {
    /// Builds the consumer's TLS configuration from `[client.tls]`.
    ///
    /// Errors name the key and the file, as for the provider; a
    /// `cert_file` without `key_file` (or the other way round) and a
    /// malformed `server_name` are errors too.
    pub fn from_config(c: &ClientTlsConfig) -> Result<Self, ConfigError> {
        let roots = match &c.ca_file {
            Some(ca) => roots(ca, "client.tls.ca_file")?,
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new("rustls", "client.tls", e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&c.cert_file, &c.key_file) {
            (Some(cert), Some(key_file)) => {
                let chain = certs(cert, "client.tls.cert_file")?;
                let key = private_key(key_file, "client.tls.key_file")?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    bad(
                        key_file,
                        "client.tls.key_file",
                        format!("does not go with client.tls.cert_file: {e}"),
                    )
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "[client.tls]",
                    "client.tls.key_file",
                    "client.tls.cert_file is set without its key_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "[client.tls]",
                    "client.tls.cert_file",
                    "client.tls.key_file is set without its cert_file",
                ));
            }
        };
        let server_name = match &c.server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|e| {
                ConfigError::new(
                    "[client.tls]",
                    "client.tls.server_name",
                    format!("`{name}` is not a DNS name or an IP address: {e}"),
                )
            })?),
            None => None,
        };
        Ok(Self {
            inner: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Shakes hands over `stream`, dialled at `addr` (`host:port`), as an
    /// endpoint does: for tools and tests that speak the protocol by hand.
    ///
    /// # Errors
    /// The handshake's, as an I/O error with rustls's reason.
    pub async fn connect(
        &self,
        addr: &str,
        stream: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = self.name_for(addr)?;
        self.inner.connect(name, stream).await
    }

    /// The name to check `addr`'s certificate against: the configured
    /// `server_name`, else the host part of `host:port` (brackets of an
    /// IPv6 address removed).
    pub(crate) fn name_for(&self, addr: &str) -> std::io::Result<ServerName<'static>> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = match addr.rsplit_once(':') {
            Some((host, _port)) => host,
            None => addr,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{host}` is not a name a certificate can carry ({e}); set client.tls.server_name"),
            )
        })
    }
}

/// A handshake error in words a user can act on: rustls's own text, with
/// the two mismatches a plain-TCP peer causes named as such.
pub(crate) fn handshake_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        format!("{text} (the provider does not speak TLS: is it plaintext?)")
    } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
        format!(
            "{text} (the provider closed the connection during the handshake: a plaintext provider, or one that refused this client's certificate)"
        )
    } else {
        text
    }
}
