//! Body compression, flagged in the header's serializer byte.
//!
//! ```text
//! serializer byte:  c c s s s s s s
//!                   ^^^ compression: 00 none, 01 lz4, 10 zstd, 11 reserved
//!                       ^^^^^^^^^^^ serializer id (0-63)
//! ```
//!
//! The flag lives in bits no serializer id used (ids are 0-3), so the
//! protocol version stays 1: every frame an older peer sends still decodes,
//! and an older peer that receives a compressed request reads a serializer
//! id it does not know and answers `bad request: unknown serializer id N`
//! (N = 64 + id for lz4, 128 + id for zstd) instead of decoding garbage.
//!
//! What is compressed is the whole body (a request's envelope and
//! arguments, a reply's value); error replies never are (their message
//! must stay readable by anyone). A body is sent compressed only when it
//! is at least the threshold and the compressed form is smaller.
//!
//! Formats: `lz4` is the LZ4 block format with the uncompressed size
//! prepended as a little-endian `u32` (lz4_flex's `compress_prepend_size`);
//! `zstd` is one Zstandard frame (RFC 8878) with its content size, written
//! by libzstd at level 1.
//!
//! Libraries: lz4_flex is pure Rust. zstd is the `zstd` crate (libzstd,
//! built from its bundled C source; tonic and async-compression use the
//! same): the pure-Rust ruzstd was tried first and measured at about 45 µs
//! per body whatever its size (it zeroes a 128 KiB window and allocates a
//! 130 KiB buffer per frame), which made a 580-byte call 3x slower at one
//! call in flight and 12-20x slower under load (README, "Body
//! compression"). Each thread keeps one libzstd context for each
//! direction, so a call allocates only its output.
//!
//! Decompression never allocates more than the caller's limit (the
//! receiver's `max_frame_len`): lz4's announced size is checked against the
//! limit and against the most that LZ4 can expand the input (255:1) before
//! the output buffer exists; a zstd frame's declared content size is
//! checked against the limit before its buffer exists and libzstd writes
//! no further than that buffer; a zstd frame without a content size is
//! streamed through a limit one byte past the maximum, with its window
//! capped. A compression bomb is refused, not allocated.

use std::cell::RefCell;
use std::io::Read;

use bytes::{Bytes, BytesMut};
use rpc_core::Compression;

use crate::error::CodecError;
use crate::frame::{HEADER_LEN, Header};

/// Bits of the serializer byte that carry the serializer id.
pub const SERIALIZER_ID_MASK: u8 = 0b0011_1111;
/// Shift of the two compression bits in the serializer byte.
const FLAG_SHIFT: u32 = 6;

/// LZ4 cannot expand its input by more than this factor (a match of up to
/// 255 extra bytes per length byte), plus a small constant: an announced
/// size beyond that is a lie, refused before allocating.
const LZ4_MAX_RATIO: usize = 255;

/// The smallest zstd window cap for frames without a content size, in
/// bytes: 128 KiB, zstd's largest block.
const ZSTD_MIN_WINDOW: usize = 128 * 1024;

/// libzstd level 1: its fastest standard level. Bodies are small and
/// latency matters more than the last few percent of size.
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    // One context per thread and direction: creating one per call costs
    // more than compressing a small body. `None` if libzstd could not
    // allocate one (then bodies go uncompressed, or fail to open).
    static ZSTD_ENCODER: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
    static ZSTD_DECODER: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// The header byte for a body in `serializer_id` compressed with `c`.
pub fn flag(serializer_id: u8, c: Compression) -> u8 {
    let bits = match c {
        Compression::None => 0,
        Compression::Lz4 => 1,
        Compression::Zstd => 2,
    };
    (serializer_id & SERIALIZER_ID_MASK) | (bits << FLAG_SHIFT)
}

/// Splits a header's serializer byte into the serializer id and the
/// compression of the body. Errors with
/// [`CodecError::UnknownCompression`] on the reserved value `11`.
pub fn split(byte: u8) -> Result<(u8, Compression), CodecError> {
    let c = match byte >> FLAG_SHIFT {
        0 => Compression::None,
        1 => Compression::Lz4,
        2 => Compression::Zstd,
        other => return Err(CodecError::UnknownCompression(other)),
    };
    Ok((byte & SERIALIZER_ID_MASK, c))
}

/// Compresses `body` with `c`. `None` returns a copy. Errors only if
/// libzstd cannot allocate its context or output.
pub fn compress(c: Compression, body: &[u8]) -> Result<Vec<u8>, CodecError> {
    match c {
        Compression::None => Ok(body.to_vec()),
        Compression::Lz4 => Ok(lz4_flex::block::compress_prepend_size(body)),
        Compression::Zstd => {
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(body.len()));
            ZSTD_ENCODER.with(|cell| match cell.borrow_mut().as_mut() {
                Some(enc) => enc
                    .compress_to_buffer(body, &mut out)
                    .map(|_| out)
                    .map_err(|e| CodecError::Compress {
                        algorithm: "zstd",
                        source: Box::new(e),
                    }),
                None => Err(CodecError::Compress {
                    algorithm: "zstd",
                    source: "libzstd could not allocate a context".into(),
                }),
            })
        }
    }
}

/// Decompresses `body`, refusing (before allocating it) any output longer
/// than `max_len` bytes.
pub fn decompress(c: Compression, body: &[u8], max_len: usize) -> Result<Vec<u8>, CodecError> {
    match c {
        Compression::None => {
            if body.len() > max_len {
                return Err(too_large(body.len() as u64, max_len));
            }
            Ok(body.to_vec())
        }
        Compression::Lz4 => {
            let Some((size, rest)) = body.split_first_chunk::<4>() else {
                return Err(CodecError::Decompress {
                    algorithm: "lz4",
                    source: "body shorter than its 4-byte size".into(),
                });
            };
            let size = u32::from_le_bytes(*size) as usize;
            if size > max_len {
                return Err(too_large(size as u64, max_len));
            }
            if size > rest.len().saturating_mul(LZ4_MAX_RATIO).saturating_add(64) {
                return Err(CodecError::Decompress {
                    algorithm: "lz4",
                    source: format!(
                        "announces {size} bytes from {} compressed bytes, more than LZ4 can expand",
                        rest.len()
                    )
                    .into(),
                });
            }
            let mut out = vec![0u8; size];
            let n = lz4_flex::block::decompress_into(rest, &mut out).map_err(|e| {
                CodecError::Decompress {
                    algorithm: "lz4",
                    source: Box::new(e),
                }
            })?;
            if n != size {
                return Err(CodecError::Decompress {
                    algorithm: "lz4",
                    source: format!("announced {size} bytes, decoded {n}").into(),
                });
            }
            Ok(out)
        }
        Compression::Zstd => zstd_decompress(body, max_len),
    }
}

fn zstd_error(e: impl Into<rpc_core::BoxError>) -> CodecError {
    CodecError::Decompress {
        algorithm: "zstd",
        source: e.into(),
    }
}

fn zstd_decompress(body: &[u8], max_len: usize) -> Result<Vec<u8>, CodecError> {
    match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(size)) => {
            if size > max_len as u64 {
                return Err(too_large(size, max_len));
            }
            // libzstd writes into the spare capacity only: a frame that
            // lies about its size fails ("destination buffer is too
            // small") instead of growing the buffer.
            let mut out = Vec::with_capacity(size as usize);
            ZSTD_DECODER.with(|cell| match cell.borrow_mut().as_mut() {
                Some(dec) => dec.decompress_to_buffer(body, &mut out).map_err(zstd_error),
                None => Err(zstd_error("libzstd could not allocate a context")),
            })?;
            if out.len() as u64 != size {
                return Err(zstd_error(format!(
                    "frame announced {size} bytes, held {}",
                    out.len()
                )));
            }
            Ok(out)
        }
        // No content size (other encoders' streaming output): stream it,
        // one byte past the limit at most, with the window capped.
        Ok(None) => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(body)
                .map_err(zstd_error)?
                .single_frame();
            let window_log = max_len
                .max(ZSTD_MIN_WINDOW)
                .next_power_of_two()
                .trailing_zeros();
            decoder.window_log_max(window_log).map_err(zstd_error)?;
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max_len));
            (&mut decoder)
                .take(max_len as u64 + 1)
                .read_to_end(&mut out)
                .map_err(zstd_error)?;
            if out.len() > max_len {
                return Err(too_large(out.len() as u64, max_len));
            }
            // One frame per body, as on the sized path (where libzstd
            // refuses what follows): bytes after it are not ours to ignore.
            let rest = decoder.finish();
            if !rest.is_empty() {
                return Err(zstd_error(format!("{} bytes after the frame", rest.len())));
            }
            Ok(out)
        }
        Err(_) => Err(zstd_error("not a zstd frame, or a truncated one")),
    }
}

fn too_large(len: u64, max: usize) -> CodecError {
    CodecError::DecompressedTooLarge { len, max }
}

/// Compresses the body of a finished frame with `c` when it is at least
/// `threshold` bytes and the compressed body is smaller, rewriting the
/// header's serializer byte and body length; otherwise returns the frame
/// unchanged. A frame that is not well formed is returned unchanged too.
pub fn compress_frame(frame: BytesMut, c: Compression, threshold: usize) -> BytesMut {
    if c == Compression::None || frame.len() < HEADER_LEN + threshold.max(1) {
        return frame;
    }
    let Ok(Some(mut header)) = Header::parse(&frame, usize::MAX) else {
        return frame;
    };
    let Ok(packed) = compress(c, &frame[HEADER_LEN..]) else {
        return frame;
    };
    if packed.len() >= frame.len() - HEADER_LEN {
        return frame;
    }
    let Ok(body_len) = u32::try_from(packed.len()) else {
        return frame;
    };
    header.serializer = flag(header.serializer, c);
    header.body_len = body_len;
    let mut out = BytesMut::with_capacity(HEADER_LEN + packed.len());
    out.resize(HEADER_LEN, 0);
    header.write_to(&mut out[..HEADER_LEN]);
    out.extend_from_slice(&packed);
    out
}

/// The serializer id and plain body of a received frame: decompressed
/// (at most `max_len` bytes) when its header says so, else `body` itself.
pub fn open_body(
    serializer_byte: u8,
    body: Bytes,
    max_len: usize,
) -> Result<(u8, Bytes), CodecError> {
    let (id, c) = split(serializer_byte)?;
    if c == Compression::None {
        return Ok((id, body));
    }
    Ok((id, Bytes::from(decompress(c, &body, max_len)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 8 * 1024 * 1024;

    fn sample() -> Vec<u8> {
        (0..20_000u32)
            .flat_map(|i| format!("user-{} ", i % 97).into_bytes())
            .collect()
    }

    #[test]
    fn flags_round_trip_and_keep_the_serializer_id() {
        for c in Compression::ALL {
            for id in 0..=SERIALIZER_ID_MASK {
                assert_eq!(split(flag(id, c)).unwrap(), (id, c));
            }
        }
        // Plain ids are their own byte: old frames decode unchanged.
        assert_eq!(split(3).unwrap(), (3, Compression::None));
        assert!(matches!(
            split(0b1100_0010),
            Err(CodecError::UnknownCompression(3))
        ));
    }

    #[test]
    fn each_algorithm_round_trips_and_shrinks_a_repetitive_body() {
        let body = sample();
        for c in [Compression::Lz4, Compression::Zstd] {
            let packed = compress(c, &body).unwrap();
            assert!(packed.len() * 4 < body.len(), "{c:?}: {}", packed.len());
            assert_eq!(decompress(c, &packed, LIMIT).unwrap(), body, "{c:?}");
            assert_eq!(
                decompress(c, &compress(c, b"").unwrap(), LIMIT).unwrap(),
                b""
            );
        }
    }

    #[test]
    fn output_longer_than_the_limit_is_refused() {
        let body = sample();
        for c in Compression::ALL {
            let packed = compress(c, &body).unwrap();
            let e = decompress(c, &packed, body.len() - 1).unwrap_err();
            assert!(
                matches!(e, CodecError::DecompressedTooLarge { max, .. } if max == body.len() - 1),
                "{c:?}: {e}"
            );
            assert_eq!(decompress(c, &packed, body.len()).unwrap(), body);
        }
    }

    /// A gigabyte of zeros packs into a few KiB with zstd; the decoder
    /// must stop at the limit, not inflate it. (lz4's block format cannot
    /// hold 1 GiB behind a u32 it checks first: see the next test.)
    #[test]
    fn a_zstd_bomb_is_refused_without_inflating_it() {
        let zeros = vec![0u8; 64 * 1024 * 1024];
        let bomb = compress(Compression::Zstd, &zeros).unwrap();
        assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
        drop(zeros);
        let e = decompress(Compression::Zstd, &bomb, 1024 * 1024).unwrap_err();
        assert!(
            matches!(
                e,
                CodecError::DecompressedTooLarge { .. } | CodecError::Decompress { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn lz4_sizes_that_lie_are_refused_before_allocating() {
        // 4 GiB announced by a 4-byte prefix over 3 bytes of input.
        let mut lie = u32::MAX.to_le_bytes().to_vec();
        lie.extend_from_slice(&[0x10, 0x41, 0x00]);
        let e = decompress(Compression::Lz4, &lie, usize::MAX).unwrap_err();
        let why = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(why.contains("more than LZ4 can expand"), "{e}: {why}");
        let e = decompress(Compression::Lz4, &lie, LIMIT).unwrap_err();
        assert!(matches!(e, CodecError::DecompressedTooLarge { .. }), "{e}");
        // Shorter than the size prefix.
        assert!(decompress(Compression::Lz4, &[1, 0], LIMIT).is_err());
        // Announces more than it holds.
        let mut short = compress(Compression::Lz4, &sample()).unwrap();
        short.truncate(short.len() / 2);
        assert!(decompress(Compression::Lz4, &short, LIMIT).is_err());
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors() {
        assert!(decompress(Compression::Zstd, b"not zstd at all", LIMIT).is_err());
        let mut two = compress(Compression::Zstd, b"hello hello hello").unwrap();
        two.extend_from_slice(b"tail");
        let e = decompress(Compression::Zstd, &two, LIMIT).unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
    }

    #[test]
    fn frames_below_the_threshold_or_incompressible_stay_plain() {
        let frame = crate::encode_response(7, rpc_core::SerializerKind::Postcard, &sample(), LIMIT)
            .unwrap();
        let plain = frame.clone();
        assert_eq!(compress_frame(frame.clone(), Compression::None, 0), plain);
        assert_eq!(
            compress_frame(frame.clone(), Compression::Lz4, frame.len()),
            plain
        );
        let packed = compress_frame(frame, Compression::Lz4, 1024);
        assert!(packed.len() < plain.len());
        let h = Header::parse(&packed, LIMIT).unwrap().unwrap();
        assert_eq!(h.request_id, 7);
        assert_eq!(h.body_len as usize, packed.len() - HEADER_LEN);
        let (id, body) = open_body(
            h.serializer,
            Bytes::copy_from_slice(&packed[HEADER_LEN..]),
            LIMIT,
        )
        .unwrap();
        assert_eq!(
            id,
            crate::serializer::id_of(rpc_core::SerializerKind::Postcard)
        );
        assert_eq!(&body[..], &plain[HEADER_LEN..]);
        // Random bytes do not shrink: sent as they are.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                // xorshift64: no repeats for LZ4 to find.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let frame =
            crate::encode_response(8, rpc_core::SerializerKind::Postcard, &noise, LIMIT).unwrap();
        let before = frame.clone();
        assert!(compress_frame(frame, Compression::Lz4, 16) == before);
    }
}
