//! `tokio_util::codec` glue: turns a byte stream into [`Frame`]s.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::CodecError;
use crate::frame::{Frame, HEADER_LEN, Header};

/// Splits a byte stream into frames, refusing any frame longer than
/// `max_frame_len` from its header alone, before buffering its body.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl FrameCodec {
    /// A codec accepting frames up to `max_frame_len` bytes (header included).
    pub fn new(max_frame_len: usize) -> Self {
        Self { max_frame_len }
    }

    /// The configured maximum.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(rpc_core::config::DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(header) = Header::parse(src, self.max_frame_len)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + header.body_len as usize;
        if src.len() < total {
            // The length was checked against the maximum by `Header::parse`.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        frame.advance(HEADER_LEN);
        Ok(Some(Frame {
            header,
            body: frame.freeze(),
        }))
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let total = HEADER_LEN + frame.body.len();
        if total > self.max_frame_len || frame.body.len() > u32::MAX as usize {
            return Err(CodecError::FrameTooLarge {
                len: total as u64,
                max: self.max_frame_len,
            });
        }
        let header = Header {
            body_len: frame.body.len() as u32,
            ..frame.header
        };
        let start = dst.len();
        dst.reserve(total);
        dst.put_bytes(0, HEADER_LEN);
        header.write_to(&mut dst[start..]);
        dst.put_slice(&frame.body);
        Ok(())
    }
}
