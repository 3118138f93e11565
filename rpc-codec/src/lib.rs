//! The wire format of the RPC framework. No sockets here.
//!
//! Every message is one frame: a fixed 18-byte header followed by a body.
//! All integers are big endian.
//!
//! | offset | size | field          | values                                                     |
//! |-------:|-----:|----------------|------------------------------------------------------------|
//! | 0      | 2    | magic          | `0x4D52` (`"MR"`)                                          |
//! | 2      | 1    | version        | `1`                                                        |
//! | 3      | 1    | serializer     | id in the low 6 bits: `0` bincode 2, `1` JSON, `2` postcard, `3` MessagePack; [`compression`] in the top 2 |
//! | 4      | 1    | message type   | `1` request, `2` response, `3` heartbeat, `4` cancel, `5` go-away |
//! | 5      | 1    | status         | [`rpc_core::StatusCode`]; `0` except in error responses    |
//! | 6      | 8    | request id     | chosen by the caller, echoed in the response               |
//! | 14     | 4    | body length    | bytes after the header; header + body <= max frame length  |
//!
//! A request body is an [`envelope`]: deadline, service key, method and
//! metadata in fixed binary, then the argument tuple in the frame's
//! serializer. A response body is the serialized return value (status 0) or
//! a UTF-8 error message. The same table, with examples, is in
//! `docs/protocol.md`; golden frames in `tests/golden/` pin it.
//!
//! # Layout
//!
//! * [`frame`] — [`Header`], [`Frame`], [`FrameBuf`] (encode in place).
//! * [`codec`] — [`FrameCodec`], the `tokio_util` decoder that enforces the
//!   maximum frame length from the header before buffering a body.
//! * [`envelope`] — request envelope parse/encode, response encoding.
//! * [`serializer`] — the [`Serializer`] trait, [`Bincode`] and [`Json`].
//! * [`compression`] — lz4 and zstd bodies, flagged in the top two bits of
//!   the serializer byte, decompressed within the frame limit.
//! * [`error`] — [`CodecError`].

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod codec;
pub mod compression;
pub mod envelope;
pub mod error;
pub mod frame;
pub mod serializer;

pub use codec::FrameCodec;
pub use envelope::{
    RequestEnvelope, RequestHead, encode_error, encode_request, encode_request_raw,
    encode_response, encode_response_sized,
};
pub use error::CodecError;
pub use frame::{Frame, FrameBuf, HEADER_LEN, Header, MAGIC, MessageType, VERSION, encode_empty};
pub use serializer::{Bincode, Json, Serializer};
