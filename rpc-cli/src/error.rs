//! Why a command failed, and the exit code each reason gets.

use rpc_core::{ConfigError, RegistryError, RpcError, StatusCode};

/// Exit codes, documented in the README ("Operating it: the `rpc` tool").
pub mod code {
    /// Everything worked.
    pub const OK: i32 = 0;
    /// Bad input: malformed JSON arguments or arguments the method cannot
    /// take, a bad `--registry` URL, SERVICE or `--metadata`, an invalid
    /// configuration.
    pub const BAD_INPUT: i32 = 1;
    /// Command-line usage error (clap's own code).
    pub const USAGE: i32 = 2;
    /// Not found: no such service or instance in the registry, or the
    /// provider does not know the service or method.
    pub const NOT_FOUND: i32 = 3;
    /// The call failed: an error status, a timeout, a connection failure,
    /// a method that returned `Err`, or a ping without a reply.
    pub const CALL_FAILED: i32 = 4;
    /// The registry could not be reached or refused us.
    pub const REGISTRY: i32 = 5;
}

/// A failed command: a message for stderr (one line) and an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// See [`code::BAD_INPUT`].
    #[error("{0}")]
    BadInput(String),
    /// See [`code::NOT_FOUND`].
    #[error("{0}")]
    NotFound(String),
    /// See [`code::CALL_FAILED`].
    #[error("{0}")]
    CallFailed(String),
    /// See [`code::REGISTRY`].
    #[error("registry: {message}")]
    Registry {
        /// The whole error chain, on one line.
        message: String,
        /// The registry's error.
        #[source]
        source: RegistryError,
    },
    /// See [`code::BAD_INPUT`].
    #[error("{0}")]
    Config(#[from] ConfigError),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::BadInput(_) | Self::Config(_) => code::BAD_INPUT,
            Self::NotFound(_) => code::NOT_FOUND,
            Self::CallFailed(_) => code::CALL_FAILED,
            Self::Registry { .. } => code::REGISTRY,
        }
    }
}

impl From<RegistryError> for CliError {
    fn from(e: RegistryError) -> Self {
        Self::Registry {
            message: one_line(&e),
            source: e,
        }
    }
}

impl From<RpcError> for CliError {
    fn from(e: RpcError) -> Self {
        let message = one_line(&e);
        match e {
            RpcError::Registry(source) => Self::Registry { message, source },
            RpcError::Config(e) => Self::Config(e),
            RpcError::NoProvider { .. } => Self::NotFound(message),
            RpcError::Remote {
                code: StatusCode::ServiceNotFound | StatusCode::MethodNotFound,
                ..
            } => Self::NotFound(message),
            // The provider could not take the arguments apart: too few, too
            // many, or of the wrong type. The caller's input, not an outage.
            RpcError::Remote {
                code: StatusCode::BadRequest | StatusCode::Serialization,
                ..
            } => Self::BadInput(format!(
                "{message} (the arguments do not fit the method: a JSON array holds one value per argument)"
            )),
            _ => Self::CallFailed(message),
        }
    }
}

/// An error and its causes on one line (`outer: cause: root`).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    rpc_core::error::report(e).replace('\n', " ")
}
