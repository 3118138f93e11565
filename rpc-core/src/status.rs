//! Status codes carried in every response header.

use std::fmt;

/// The outcome of a call, as carried in the frame header's status byte.
///
/// Values are part of the wire format (see `docs/protocol.md`): never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum StatusCode {
    /// The body holds the serialized return value.
    Ok = 0,
    /// No service with the requested `name:version` on this server.
    ServiceNotFound = 1,
    /// The service exists but has no such method.
    MethodNotFound = 2,
    /// The request envelope could not be parsed.
    BadRequest = 3,
    /// Arguments or return value failed to (de)serialize.
    Serialization = 4,
    /// The handler failed (panicked) while serving the call.
    Handler = 5,
    /// The request's deadline passed before the server finished it.
    Timeout = 6,
    /// The server refused the call because it is at capacity.
    Overloaded = 7,
    /// The server is shutting down and accepts no new calls.
    ShuttingDown = 8,
    /// The call carries no valid credentials: a server layer (for example
    /// an auth check on a token in the metadata) refused it before the
    /// handler ran. Added without a protocol version bump: older peers
    /// decode it as [`StatusCode::Unknown`] with the message intact.
    Unauthenticated = 9,
    /// The caller is known but may not make this call: a server layer
    /// refused it before the handler ran. Added like `Unauthenticated`.
    PermissionDenied = 10,
    /// A status byte this version does not know.
    Unknown = 255,
}

impl StatusCode {
    /// Decodes a status byte; unknown values map to [`StatusCode::Unknown`].
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Ok,
            1 => Self::ServiceNotFound,
            2 => Self::MethodNotFound,
            3 => Self::BadRequest,
            4 => Self::Serialization,
            5 => Self::Handler,
            6 => Self::Timeout,
            7 => Self::Overloaded,
            8 => Self::ShuttingDown,
            9 => Self::Unauthenticated,
            10 => Self::PermissionDenied,
            _ => Self::Unknown,
        }
    }

    /// The status byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether a call that failed with this status never ran on the server,
    /// so sending it to another instance cannot execute it twice.
    pub fn is_safe_to_retry(self) -> bool {
        matches!(
            self,
            Self::Overloaded | Self::ShuttingDown | Self::ServiceNotFound
        )
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Ok => "ok",
            Self::ServiceNotFound => "service not found",
            Self::MethodNotFound => "method not found",
            Self::BadRequest => "bad request",
            Self::Serialization => "serialization failure",
            Self::Handler => "handler error",
            Self::Timeout => "deadline exceeded",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting down",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission denied",
            Self::Unknown => "unknown status",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for v in 0..=10u8 {
            assert_eq!(StatusCode::from_u8(v).as_u8(), v);
        }
        assert_eq!(StatusCode::from_u8(11), StatusCode::Unknown);
        assert!(!StatusCode::Unauthenticated.is_safe_to_retry());
        assert!(!StatusCode::PermissionDenied.is_safe_to_retry());
    }
}
