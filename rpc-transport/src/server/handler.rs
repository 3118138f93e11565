//! The seam between the server and service implementations: generated
//! dispatch (`#[service]`) implements [`ServiceHandler`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::BytesMut;
use rpc_codec::{CodecError, serializer};
use rpc_core::{Compression, Context, SerializerKind, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The future a handler returns: the whole encoded response frame, or an
/// error status to send instead.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<BytesMut, CallError>> + Send>>;

/// A service the server can dispatch to.
pub trait ServiceHandler: Send + Sync + 'static {
    /// Service name (the trait name by default).
    fn service_name(&self) -> &str;
    /// Service version.
    fn service_version(&self) -> &str;
    /// Method names, for logs and registry metadata.
    fn methods(&self) -> &'static [&'static str];
    /// Decodes the arguments of `call` and returns the future that runs the
    /// method and encodes its reply. Unknown methods and undecodable arguments
    /// are errors here, before anything runs.
    fn call(&self, call: Call<'_>) -> Result<HandlerFuture, CallError>;
}

/// One incoming call, borrowing from the request frame.
#[derive(Debug)]
pub struct Call<'a> {
    /// Method name.
    pub method: &'a str,
    /// Encoded argument tuple.
    pub args: &'a [u8],
    /// How to encode the reply.
    pub replier: Replier,
    /// The call's context: service, method, metadata, deadline, peer. The
    /// handler's future runs with it current ([`Context::current`]).
    pub context: &'a Context,
}

impl Call<'_> {
    /// Decodes the argument tuple.
    pub fn decode_args<A: DeserializeOwned>(&self) -> Result<A, CallError> {
        serializer::decode(self.replier.serializer, self.args).map_err(|e| {
            CallError::new(
                StatusCode::Serialization,
                format!(
                    "cannot decode arguments of `{}`: {}",
                    self.method,
                    error_chain(&e)
                ),
            )
        })
    }

    /// The standard "no such method" error.
    pub fn method_not_found(&self, service: &str) -> CallError {
        CallError::new(
            StatusCode::MethodNotFound,
            format!("service `{service}` has no method `{}`", self.method),
        )
    }
}

/// Encodes one reply: request id, serializer and frame limit of the call.
/// `Copy`, so a handler future can carry it without borrowing the request.
#[derive(Clone, Copy, Debug)]
pub struct Replier {
    pub(crate) request_id: u64,
    pub(crate) serializer: SerializerKind,
    pub(crate) max_frame_len: usize,
    /// Expected reply size: the request's argument size, a fair guess for
    /// most services, so the reply buffer is allocated once.
    pub(crate) size_hint: usize,
    /// The request's compression, used for a reply body of at least
    /// `compression_threshold` bytes.
    pub(crate) compression: Compression,
    pub(crate) compression_threshold: usize,
}

impl Replier {
    /// A replier for tests and custom servers.
    pub fn new(request_id: u64, serializer: SerializerKind, max_frame_len: usize) -> Self {
        Self {
            request_id,
            serializer,
            max_frame_len,
            size_hint: 128,
            compression: Compression::None,
            compression_threshold: usize::MAX,
        }
    }

    /// The same replier, compressing a reply body of at least `threshold`
    /// bytes with `c` (the server passes the request's algorithm, so a
    /// consumer that did not compress never receives a compressed reply).
    pub fn with_compression(mut self, c: Compression, threshold: usize) -> Self {
        self.compression = c;
        self.compression_threshold = threshold;
        self
    }

    /// The same replier, expecting a reply of about `bytes`.
    pub fn with_size_hint(mut self, bytes: usize) -> Self {
        self.size_hint = bytes;
        self
    }

    /// Encodes `value` as the successful response frame.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<BytesMut, CallError> {
        let frame = self.encode_plain(value)?;
        if self.compression == Compression::None {
            return Ok(frame);
        }
        Ok(rpc_codec::compression::compress_frame(
            frame,
            self.compression,
            self.compression_threshold,
        ))
    }

    fn encode_plain<T: Serialize + ?Sized>(&self, value: &T) -> Result<BytesMut, CallError> {
        rpc_codec::encode_response_sized(
            self.request_id,
            self.serializer,
            value,
            self.max_frame_len,
            self.size_hint + 16,
        )
        .map_err(|e| {
            let status = match e {
                CodecError::FrameTooLarge { .. } => StatusCode::Handler,
                _ => StatusCode::Serialization,
            };
            CallError::new(
                status,
                format!("cannot encode the reply: {}", error_chain(&e)),
            )
        })
    }
}

/// A call that fails with a status instead of a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallError {
    /// Status for the response header.
    pub status: StatusCode,
    /// Message for the response body.
    pub message: String,
}

impl CallError {
    /// A call error.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for CallError {}

/// `err: cause: cause`, for messages that cross the wire.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}
