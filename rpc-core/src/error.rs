//! Errors of the core crate: what a call, a registry and a configuration can report.
//!
//! [`RpcError`] is the one error a generated client method returns. Registry
//! backends report [`RegistryError`]; configuration loading reports
//! [`ConfigError`], which always names the file and the key.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::time::Duration;

use crate::status::StatusCode;

/// A boxed error source, kept so `source()` chains stay intact.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a remote call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The registry lists no instance of the service, and listed none
    /// before the call's deadline (a call that finds the list empty waits
    /// for a provider until then).
    #[error("no provider available for service `{service}`")]
    NoProvider {
        /// The `name:version` key that was looked up.
        service: String,
    },
    /// The caller's deadline passed before a response arrived.
    #[error("call to `{service}.{method}` timed out after {timeout:?}")]
    Timeout {
        /// Service key.
        service: String,
        /// Method name.
        method: String,
        /// The deadline the call had.
        timeout: Duration,
    },
    /// The server answered with an error status.
    #[error("`{service}.{method}` failed on {addr}: {code}: {message}")]
    Remote {
        /// Service key.
        service: String,
        /// Method name.
        method: String,
        /// Provider address.
        addr: String,
        /// Status from the response header.
        code: StatusCode,
        /// The server's explanation.
        message: String,
    },
    /// Dialing the provider failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Provider address.
        addr: String,
        /// The dial error.
        #[source]
        source: std::io::Error,
    },
    /// The request was never written to the provider (its connection died
    /// first): it certainly did not run, so it is safe to send elsewhere.
    #[error("request to {addr} was not sent: the connection closed first")]
    Unsent {
        /// Provider address.
        addr: String,
        /// Why the connection closed, if known.
        #[source]
        source: Option<BoxError>,
    },
    /// The connection died after the request was written, before the
    /// response arrived: the call may or may not have run.
    #[error("connection to {addr} closed before the response arrived")]
    ConnectionClosed {
        /// Provider address.
        addr: String,
        /// The read or write error that closed it, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Arguments could not be encoded or the response could not be decoded.
    #[error("serialization failed: {context}")]
    Serialization {
        /// What was being (de)serialized.
        context: String,
        /// The serializer's error.
        #[source]
        source: BoxError,
    },
    /// The client refused the call locally (too many calls in flight).
    #[error("client overloaded: {0}")]
    Overloaded(String),
    /// Discovery failed.
    #[error("registry error")]
    Registry(#[from] RegistryError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The client or server was shut down.
    #[error("shut down")]
    Shutdown,
    /// Every instance is ejected by the outlier detector or refused by the
    /// retry budget: the call was not attempted.
    #[error("no healthy provider for `{service}`: {reason}")]
    Unavailable {
        /// Service key.
        service: String,
        /// Why no attempt was made.
        reason: String,
    },
}

impl RpcError {
    /// The status code of a remote error, if this is one.
    pub fn code(&self) -> Option<StatusCode> {
        match self {
            Self::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the call's deadline passed, whichever side noticed first: the
    /// client ([`RpcError::Timeout`]) or the provider, which runs the same
    /// remaining time and answers [`StatusCode::Timeout`]. The two timers
    /// race, so a caller that treats timeouts alike should ask this rather
    /// than match one variant.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. }) || self.code() == Some(StatusCode::Timeout)
    }

    /// Whether a server layer refused the call for want of valid credentials
    /// ([`StatusCode::Unauthenticated`]). Never retried, never counted
    /// against the provider's health.
    pub fn is_unauthenticated(&self) -> bool {
        self.code() == Some(StatusCode::Unauthenticated)
    }

    /// Whether a server layer refused the call as not permitted
    /// ([`StatusCode::PermissionDenied`]). Never retried, never counted
    /// against the provider's health.
    pub fn is_permission_denied(&self) -> bool {
        self.code() == Some(StatusCode::PermissionDenied)
    }

    /// Whether the provider (rather than the caller's own input) is to blame:
    /// what an outlier detector counts against an instance.
    pub fn is_provider_failure(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Unsent { .. }
            | Self::ConnectionClosed { .. }
            | Self::Timeout { .. } => true,
            Self::Remote { code, .. } => matches!(
                code,
                StatusCode::Overloaded
                    | StatusCode::ShuttingDown
                    | StatusCode::Handler
                    | StatusCode::Timeout
                    | StatusCode::ServiceNotFound
            ),
            _ => false,
        }
    }

    /// Whether the request certainly did not run on the server, so a retry on
    /// another instance cannot execute it twice.
    pub fn is_safe_to_retry(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Unsent { .. }
            | Self::Overloaded(_)
            | Self::NoProvider { .. } => true,
            Self::Remote { code, .. } => code.is_safe_to_retry(),
            _ => false,
        }
    }
}

/// A registry backend failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The registry server could not be reached or answered with an error.
    #[error("{backend} registry unavailable: {message}")]
    Unavailable {
        /// Backend name (`etcd`, `local`, ...).
        backend: &'static str,
        /// What failed.
        message: String,
        /// The client library's error.
        #[source]
        source: Option<BoxError>,
    },
    /// A registry request did not finish in time.
    #[error("{backend} registry: {what} timed out after {after:?}")]
    TimedOut {
        /// Backend name.
        backend: &'static str,
        /// The request.
        what: String,
        /// How long it was given.
        after: std::time::Duration,
    },
    /// The registry refused our credentials, or they do not allow what was
    /// asked. Not an outage: retrying as one would hammer the server with
    /// the same bad credentials, so callers back off to their slowest pace
    /// and report it once.
    #[error("{backend} registry refused {what}: {message}")]
    Denied {
        /// Backend name.
        backend: &'static str,
        /// [`RegistryErrorKind::Unauthenticated`] (no or bad credentials)
        /// or [`RegistryErrorKind::PermissionDenied`] (good credentials,
        /// no rights).
        kind: RegistryErrorKind,
        /// The request refused.
        what: String,
        /// The server's reason.
        message: String,
        /// The client library's error.
        #[source]
        source: Option<BoxError>,
    },
    /// A `[registry]` setting the backend cannot honour, or a value it
    /// rejects; names the key.
    #[error("{backend} registry: `registry.{key}`: {message}")]
    InvalidConfig {
        /// Backend name.
        backend: &'static str,
        /// The key under `[registry]`, dotted (`tls.ca_file`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Something the configuration points at does not exist on the server
    /// (a Consul datacenter).
    #[error("{backend} registry: {what} does not exist")]
    NotFound {
        /// Backend name.
        backend: &'static str,
        /// What is missing.
        what: String,
    },
    /// The backend named in the configuration is not compiled in.
    #[error("registry backend `{0}` is not compiled in; enable the cargo feature `{0}`")]
    NotCompiled(&'static str),
    /// Local I/O failed (the `local` backend's directory).
    #[error("registry I/O error at {path}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The registry has been shut down.
    #[error("registry shut down")]
    Shutdown,
}

impl RegistryError {
    /// Builds [`RegistryError::Unavailable`] from a client library error.
    pub fn unavailable(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Unavailable {
            backend,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// [`RegistryError::Unavailable`] without an underlying error.
    pub fn unavailable_because(backend: &'static str, message: impl Into<String>) -> Self {
        Self::Unavailable {
            backend,
            message: message.into(),
            source: None,
        }
    }

    /// A registry request that did not finish within `after`.
    pub fn timed_out(backend: &'static str, what: &str, after: std::time::Duration) -> Self {
        Self::TimedOut {
            backend,
            what: what.to_owned(),
            after,
        }
    }

    /// [`RegistryError::Denied`]; `kind` is `Unauthenticated` or
    /// `PermissionDenied` (anything else is taken as `PermissionDenied`).
    pub fn denied(
        backend: &'static str,
        kind: RegistryErrorKind,
        what: impl Into<String>,
        message: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        let kind = match kind {
            RegistryErrorKind::Unauthenticated => RegistryErrorKind::Unauthenticated,
            _ => RegistryErrorKind::PermissionDenied,
        };
        Self::Denied {
            backend,
            kind,
            what: what.into(),
            message: message.into(),
            source,
        }
    }

    /// [`RegistryError::InvalidConfig`] for `registry.{key}`.
    pub fn invalid_config(
        backend: &'static str,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::InvalidConfig {
            backend,
            key: key.into(),
            message: message.into(),
        }
    }

    /// What a caller can do about it.
    pub fn kind(&self) -> RegistryErrorKind {
        match self {
            Self::Unavailable { .. } | Self::Io { .. } => RegistryErrorKind::Unavailable,
            Self::TimedOut { .. } => RegistryErrorKind::TimedOut,
            Self::Denied { kind, .. } => *kind,
            Self::InvalidConfig { .. } | Self::NotCompiled(_) => RegistryErrorKind::InvalidConfig,
            Self::NotFound { .. } => RegistryErrorKind::NotFound,
            Self::Shutdown => RegistryErrorKind::Shutdown,
        }
    }

    /// Whether trying again later may succeed by itself (an outage or a
    /// timeout); credentials, configuration and a shut-down registry need
    /// someone to act first.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            RegistryErrorKind::Unavailable | RegistryErrorKind::TimedOut
        )
    }
}

/// The kind of a [`RegistryError`], for callers that act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegistryErrorKind {
    /// The server cannot be reached or failed (retry with backoff).
    Unavailable,
    /// A request took longer than `registry.timeout_ms` (retry).
    TimedOut,
    /// No credentials, or bad ones (`registry.username`/`password`,
    /// `registry.token`).
    Unauthenticated,
    /// Good credentials without the rights asked for (an ACL, an etcd role).
    PermissionDenied,
    /// A `[registry]` setting is wrong or unsupported by the backend.
    InvalidConfig,
    /// Something the configuration names does not exist on the server.
    NotFound,
    /// The registry was shut down.
    Shutdown,
}

/// The configuration could not be loaded. Always names where and which key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration in {origin}: key `{key}`: {message}")]
pub struct ConfigError {
    /// The file (or `environment`, or `defaults`) the bad value came from.
    pub origin: String,
    /// Dotted key path, e.g. `registry.type`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
    /// Underlying parse or I/O error.
    #[source]
    pub source: Option<BoxError>,
}

impl ConfigError {
    /// An error about `key` (dotted) from `origin` (a file, an environment
    /// variable, or what else set it), without a source.
    pub fn new(
        origin: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            origin: origin.into(),
            key: key.into(),
            message: message.into(),
            source: None,
        }
    }
}

/// Formats an error with its whole `source()` chain: `outer: cause: root`.
/// Error types keep their sources separate, as they should; this is for the
/// one log line or message at the top, where a bare outer message (`etcd
/// registry unavailable: get /rpc/X/`) would hide the cause.
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
