//! Errors of the wire format.

use rpc_core::BoxError;

/// A frame or body could not be encoded or decoded.
///
/// Frame-level errors ([`CodecError::is_fatal`]) mean the byte stream can no
/// longer be trusted: the connection must be closed. Body-level errors concern
/// one call only and become an error response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The first two bytes are not the protocol magic.
    #[error("bad magic 0x{0:04x} (expected 0x4d52): not an RPC peer or a desynchronised stream")]
    BadMagic(u16),
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The message type byte is not one we know.
    #[error("unknown message type {0}")]
    UnknownMessageType(u8),
    /// The header announces a frame larger than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced frame length (header + body).
        len: u64,
        /// Configured maximum.
        max: usize,
    },
    /// The serializer id is not one we know.
    #[error("unknown serializer id {0}")]
    UnknownSerializer(u8),
    /// The compression bits of the serializer byte hold the reserved value.
    #[error("unknown compression flag {0}")]
    UnknownCompression(u8),
    /// A body could not be compressed (libzstd could not allocate).
    #[error("{algorithm} compression failed")]
    Compress {
        /// `zstd`.
        algorithm: &'static str,
        /// What was wrong.
        #[source]
        source: BoxError,
    },
    /// A compressed body could not be decompressed.
    #[error("{algorithm} decompression failed")]
    Decompress {
        /// `lz4` or `zstd`.
        algorithm: &'static str,
        /// What was wrong.
        #[source]
        source: BoxError,
    },
    /// A compressed body would decompress past the frame limit: refused
    /// before the output was allocated.
    #[error("body decompresses to {len} bytes or more, over the maximum of {max} bytes")]
    DecompressedTooLarge {
        /// Bytes announced, or decoded when refused.
        len: u64,
        /// The limit (the receiver's maximum frame length).
        max: usize,
    },
    /// A request envelope is malformed.
    #[error("malformed request envelope: {0}")]
    BadEnvelope(&'static str),
    /// Encoding a value failed.
    #[error("{serializer} encoding failed")]
    Encode {
        /// Serializer name.
        serializer: &'static str,
        /// The serializer's error.
        #[source]
        source: BoxError,
    },
    /// Decoding a value failed.
    #[error("{serializer} decoding failed")]
    Decode {
        /// Serializer name.
        serializer: &'static str,
        /// The serializer's error.
        #[source]
        source: BoxError,
    },
    /// Reading or writing the socket failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// Whether the stream is unusable after this error (close the connection).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::BadMagic(_)
                | Self::UnsupportedVersion(_)
                | Self::UnknownMessageType(_)
                | Self::FrameTooLarge { .. }
                | Self::Io(_)
        )
    }
}
