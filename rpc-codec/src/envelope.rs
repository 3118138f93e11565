//! Request and response bodies.
//!
//! A request body is a small binary envelope followed by the arguments,
//! serialized as one tuple by the frame's serializer:
//!
//! ```text
//! u64  deadline_us        remaining time in microseconds; 0 = none
//! u16  service_len, then  service key bytes (UTF-8, "name:version")
//! u16  method_len, then   method name bytes (UTF-8)
//! u16  metadata_count, then per entry: u16 key_len, key, u16 value_len, value
//! ...  arguments          the rest of the body
//! ```
//!
//! The envelope is fixed binary, not serde, so a server can route a call and
//! answer `ServiceNotFound` or `BadRequest` without knowing the serializer,
//! and parse it without allocating (strings borrow from the frame).
//!
//! A response body with status 0 is the serialized return value; with any
//! other status it is a UTF-8 error message.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;

use crate::error::CodecError;
use crate::frame::{FrameBuf, MessageType};
use crate::serializer;
use rpc_core::{Metadata, SerializerKind, StatusCode};

/// A parsed request envelope, borrowing from the frame body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestEnvelope<'a> {
    /// Time the caller still waits, if it set a deadline.
    pub deadline: Option<Duration>,
    /// `name:version`.
    pub service: &'a str,
    /// Method name.
    pub method: &'a str,
    /// Caller metadata.
    pub metadata: Vec<(&'a str, &'a str)>,
    /// Serialized argument tuple.
    pub args: &'a [u8],
}

fn get_str<'a>(src: &mut &'a [u8], what: &'static str) -> Result<&'a str, CodecError> {
    if src.len() < 2 {
        return Err(CodecError::BadEnvelope(what));
    }
    let len = src.get_u16() as usize;
    if src.len() < len {
        return Err(CodecError::BadEnvelope(what));
    }
    let (s, rest) = src.split_at(len);
    *src = rest;
    std::str::from_utf8(s).map_err(|_| CodecError::BadEnvelope("string is not UTF-8"))
}

fn put_str(dst: &mut BytesMut, s: &str, what: &'static str) -> Result<(), CodecError> {
    let len = u16::try_from(s.len()).map_err(|_| CodecError::BadEnvelope(what))?;
    dst.put_u16(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

impl<'a> RequestEnvelope<'a> {
    /// Parses a request body.
    pub fn parse(body: &'a [u8]) -> Result<Self, CodecError> {
        let mut src = body;
        if src.len() < 8 {
            return Err(CodecError::BadEnvelope("truncated deadline"));
        }
        let deadline_us = src.get_u64();
        let service = get_str(&mut src, "truncated service key")?;
        let method = get_str(&mut src, "truncated method name")?;
        if src.len() < 2 {
            return Err(CodecError::BadEnvelope("truncated metadata count"));
        }
        let count = src.get_u16() as usize;
        // Each entry takes at least 4 bytes: refuse counts the body cannot hold
        // before reserving anything.
        if count * 4 > src.len() {
            return Err(CodecError::BadEnvelope("metadata count exceeds body"));
        }
        let mut metadata = Vec::with_capacity(count);
        for _ in 0..count {
            let k = get_str(&mut src, "truncated metadata key")?;
            let v = get_str(&mut src, "truncated metadata value")?;
            metadata.push((k, v));
        }
        Ok(Self {
            deadline: (deadline_us > 0).then(|| Duration::from_micros(deadline_us)),
            service,
            method,
            metadata,
            args: src,
        })
    }
}

/// Everything needed to encode a request frame.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    /// Request id.
    pub request_id: u64,
    /// Serializer for the arguments (and the reply).
    pub serializer: SerializerKind,
    /// Remaining deadline.
    pub deadline: Option<Duration>,
    /// `name:version`.
    pub service: &'a str,
    /// Method name.
    pub method: &'a str,
    /// Caller metadata (binary values go as base64 text: see
    /// [`Metadata::wire_entries`]). An empty map encodes as a zero count.
    pub metadata: &'a Metadata,
}

/// Encodes a whole request frame, arguments serialized straight into it.
pub fn encode_request<A: Serialize + ?Sized>(
    head: &RequestHead<'_>,
    args: &A,
    max_frame_len: usize,
) -> Result<BytesMut, CodecError> {
    encode_request_with(head, 64, max_frame_len, |b| {
        serializer::encode(head.serializer, args, b)
    })
}

/// Encodes a request frame around arguments already serialized with
/// `head.serializer` (so a retry does not serialize them again).
pub fn encode_request_raw(
    head: &RequestHead<'_>,
    args: &[u8],
    max_frame_len: usize,
) -> Result<BytesMut, CodecError> {
    encode_request_with(head, args.len(), max_frame_len, |b| {
        b.put_slice(args);
        Ok(())
    })
}

fn encode_request_with(
    head: &RequestHead<'_>,
    args_hint: usize,
    max_frame_len: usize,
    args: impl FnOnce(&mut BytesMut) -> Result<(), CodecError>,
) -> Result<BytesMut, CodecError> {
    let mut f = FrameBuf::with_capacity(32 + head.service.len() + head.method.len() + args_hint);
    let b = f.body_mut();
    let deadline_us = head
        .deadline
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1))
        .unwrap_or(0);
    b.put_u64(deadline_us);
    put_str(b, head.service, "service key longer than 65535 bytes")?;
    put_str(b, head.method, "method name longer than 65535 bytes")?;
    let count = u16::try_from(head.metadata.len())
        .map_err(|_| CodecError::BadEnvelope("more than 65535 metadata entries"))?;
    b.put_u16(count);
    if !head.metadata.is_empty() {
        for (k, v) in head.metadata.wire_entries() {
            put_str(b, k, "metadata key longer than 65535 bytes")?;
            put_str(b, &v, "metadata value longer than 65535 bytes")?;
        }
    }
    args(b)?;
    f.finish(
        serializer::id_of(head.serializer),
        MessageType::Request,
        StatusCode::Ok,
        head.request_id,
        max_frame_len,
    )
}

/// Encodes a successful response frame carrying `value`.
pub fn encode_response<T: Serialize + ?Sized>(
    request_id: u64,
    serializer: SerializerKind,
    value: &T,
    max_frame_len: usize,
) -> Result<BytesMut, CodecError> {
    encode_response_sized(request_id, serializer, value, max_frame_len, 128)
}

/// [`encode_response`] with room for `body_hint` bytes from the start, so a
/// large reply is not grown (reallocated and copied) several times.
pub fn encode_response_sized<T: Serialize + ?Sized>(
    request_id: u64,
    serializer: SerializerKind,
    value: &T,
    max_frame_len: usize,
    body_hint: usize,
) -> Result<BytesMut, CodecError> {
    let mut f = FrameBuf::with_capacity(body_hint.clamp(64, 64 * 1024));
    serializer::encode(serializer, value, f.body_mut())?;
    f.finish(
        serializer::id_of(serializer),
        MessageType::Response,
        StatusCode::Ok,
        request_id,
        max_frame_len,
    )
}

/// Encodes an error response frame. The message is truncated to fit 64 KiB.
pub fn encode_error(
    request_id: u64,
    serializer_id: u8,
    status: StatusCode,
    message: &str,
) -> BytesMut {
    let mut end = message.len().min(64 * 1024);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut f = FrameBuf::with_capacity(end);
    f.body_mut().put_slice(&message.as_bytes()[..end]);
    // 64 KiB plus a header always fits the u32 length; the minimum configurable
    // maximum frame length is checked by the peer that reads it.
    match f.finish(
        // Error messages are never compressed, whatever the request was.
        serializer_id & crate::compression::SERIALIZER_ID_MASK,
        MessageType::Response,
        status,
        request_id,
        usize::MAX,
    ) {
        Ok(b) => b,
        Err(_) => BytesMut::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{HEADER_LEN, Header};

    #[test]
    fn request_round_trips_through_the_envelope() {
        let head = RequestHead {
            request_id: 42,
            serializer: SerializerKind::Bincode,
            deadline: Some(Duration::from_millis(1500)),
            service: "UserService:1.0",
            method: "get_user",
            metadata: &[("trace", "abc")].into_iter().collect(),
        };
        let frame = encode_request(&head, &(7u64, "x"), 1 << 20).unwrap();
        let h = Header::parse(&frame, 1 << 20).unwrap().unwrap();
        assert_eq!(h.request_id, 42);
        assert_eq!(h.message_type, MessageType::Request);
        assert_eq!(h.body_len as usize, frame.len() - HEADER_LEN);
        let env = RequestEnvelope::parse(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(env.service, "UserService:1.0");
        assert_eq!(env.method, "get_user");
        assert_eq!(env.deadline, Some(Duration::from_millis(1500)));
        assert_eq!(env.metadata, vec![("trace", "abc")]);
        let args: (u64, String) = serializer::decode(SerializerKind::Bincode, env.args).unwrap();
        assert_eq!(args, (7, "x".to_owned()));
    }

    #[test]
    fn raw_and_typed_requests_encode_identically() {
        let head = RequestHead {
            request_id: 9,
            serializer: SerializerKind::Bincode,
            deadline: Some(Duration::from_millis(5)),
            service: "S:1",
            method: "m",
            metadata: &rpc_core::Metadata::new(),
        };
        let typed = encode_request(&head, &(1u8, "two"), 1 << 20).unwrap();
        let mut args = BytesMut::new();
        serializer::encode(SerializerKind::Bincode, &(1u8, "two"), &mut args).unwrap();
        let raw = encode_request_raw(&head, &args, 1 << 20).unwrap();
        assert_eq!(typed, raw);
    }

    #[test]
    fn truncated_envelopes_are_errors_not_panics() {
        let head = RequestHead {
            request_id: 1,
            serializer: SerializerKind::Json,
            deadline: None,
            service: "S:1",
            method: "m",
            metadata: &[("k", "v")].into_iter().collect(),
        };
        let frame = encode_request(&head, &(), 1 << 20).unwrap();
        let body = &frame[HEADER_LEN..];
        for cut in 0..body.len() {
            // Every strict prefix either fails or parses with fewer arg bytes.
            let _ = RequestEnvelope::parse(&body[..cut]);
        }
        assert!(RequestEnvelope::parse(&body[..5]).is_err());
    }

    #[test]
    fn oversized_request_is_refused_at_encode() {
        let head = RequestHead {
            request_id: 1,
            serializer: SerializerKind::Bincode,
            deadline: None,
            service: "S:1",
            method: "m",
            metadata: &rpc_core::Metadata::new(),
        };
        let big = vec![0u8; 4096];
        assert!(matches!(
            encode_request(&head, &big, 1024),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn error_messages_are_truncated_on_char_boundaries() {
        let msg = "é".repeat(40_000);
        let f = encode_error(3, 0, StatusCode::Handler, &msg);
        let h = Header::parse(&f, usize::MAX).unwrap().unwrap();
        assert!(h.body_len as usize <= 64 * 1024);
        assert!(std::str::from_utf8(&f[HEADER_LEN..]).is_ok());
    }
}
