//! The fixed frame header and the frame type.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::CodecError;
use rpc_core::StatusCode;

/// `'M' 'R'`: the first two bytes of every frame.
pub const MAGIC: u16 = 0x4D52;
/// Protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 18;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// A call: body is a request envelope.
    Request = 1,
    /// A reply: body is the value (status 0) or a UTF-8 error message.
    Response = 2,
    /// A liveness probe; answered by a heartbeat with the same id. Empty body.
    Heartbeat = 3,
    /// The caller gave up on request `request_id`; the server may stop it. Empty body.
    Cancel = 4,
    /// The server is shutting down: it read every request up to and
    /// including `request_id` (which it will answer) and will read no more.
    /// Requests after it were not read: the caller may send them elsewhere.
    /// Empty body.
    GoAway = 5,
}

impl MessageType {
    /// Decodes the message type byte.
    pub fn from_u8(v: u8) -> Result<Self, CodecError> {
        match v {
            1 => Ok(Self::Request),
            2 => Ok(Self::Response),
            3 => Ok(Self::Heartbeat),
            4 => Ok(Self::Cancel),
            5 => Ok(Self::GoAway),
            other => Err(CodecError::UnknownMessageType(other)),
        }
    }
}

/// The fixed 18-byte header (big endian); see the crate docs for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Serializer id of the body (see [`crate::serializer`]); kept raw so an
    /// unknown id can be answered with an error instead of a closed connection.
    pub serializer: u8,
    /// Message type.
    pub message_type: MessageType,
    /// Status; 0 in everything but error responses.
    pub status: StatusCode,
    /// Correlates a response with its request on a multiplexed connection.
    pub request_id: u64,
    /// Body length in bytes.
    pub body_len: u32,
}

impl Header {
    /// Writes the header into `dst` (exactly [`HEADER_LEN`] bytes).
    pub fn write_to(&self, dst: &mut [u8]) {
        let mut w = &mut dst[..HEADER_LEN];
        w.put_u16(MAGIC);
        w.put_u8(VERSION);
        w.put_u8(self.serializer);
        w.put_u8(self.message_type as u8);
        w.put_u8(self.status.as_u8());
        w.put_u64(self.request_id);
        w.put_u32(self.body_len);
    }

    /// Parses a header from the first [`HEADER_LEN`] bytes of `src`, checking
    /// the body length against `max_frame_len` so no buffer is ever sized
    /// from an unchecked length. `Ok(None)` if fewer bytes are available.
    pub fn parse(src: &[u8], max_frame_len: usize) -> Result<Option<Self>, CodecError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut r = &src[..HEADER_LEN];
        let magic = r.get_u16();
        if magic != MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
        let version = r.get_u8();
        if version != VERSION {
            return Err(CodecError::UnsupportedVersion(version));
        }
        let serializer = r.get_u8();
        let message_type = MessageType::from_u8(r.get_u8())?;
        let status = StatusCode::from_u8(r.get_u8());
        let request_id = r.get_u64();
        let body_len = r.get_u32();
        let frame_len = HEADER_LEN as u64 + u64::from(body_len);
        if frame_len > max_frame_len as u64 {
            return Err(CodecError::FrameTooLarge {
                len: frame_len,
                max: max_frame_len,
            });
        }
        Ok(Some(Self {
            serializer,
            message_type,
            status,
            request_id,
            body_len,
        }))
    }
}

/// A decoded frame: header plus body bytes (shared, not copied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The body, `header.body_len` bytes.
    pub body: Bytes,
}

/// Builds one frame in place: header space first, body encoded straight
/// after it, header patched at the end. Avoids copying bodies.
#[derive(Debug)]
pub struct FrameBuf {
    buf: BytesMut,
}

impl FrameBuf {
    /// An empty frame with room for `body_hint` body bytes.
    pub fn with_capacity(body_hint: usize) -> Self {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + body_hint);
        buf.put_bytes(0, HEADER_LEN);
        Self { buf }
    }

    /// Appends to the body.
    pub fn body_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Current body length.
    pub fn body_len(&self) -> usize {
        self.buf.len() - HEADER_LEN
    }

    /// Writes the header (with the real body length) and returns the frame bytes.
    pub fn finish(
        mut self,
        serializer: u8,
        message_type: MessageType,
        status: StatusCode,
        request_id: u64,
        max_frame_len: usize,
    ) -> Result<BytesMut, CodecError> {
        let len = self.buf.len();
        if len > max_frame_len || len - HEADER_LEN > u32::MAX as usize {
            return Err(CodecError::FrameTooLarge {
                len: len as u64,
                max: max_frame_len,
            });
        }
        let header = Header {
            serializer,
            message_type,
            status,
            request_id,
            body_len: (len - HEADER_LEN) as u32,
        };
        header.write_to(&mut self.buf[..HEADER_LEN]);
        Ok(self.buf)
    }
}

/// Encodes a body-less frame (heartbeat or cancel) into `dst`.
pub fn encode_empty(dst: &mut BytesMut, message_type: MessageType, request_id: u64) {
    let start = dst.len();
    dst.put_bytes(0, HEADER_LEN);
    Header {
        serializer: 0,
        message_type,
        status: StatusCode::Ok,
        request_id,
        body_len: 0,
    }
    .write_to(&mut dst[start..]);
}
