//! Body serializers: one trait, chosen per call and carried in the header.
//!
//! Ids are part of the wire format: `0` = bincode 2 (standard config:
//! little-endian, varint integers), `1` = JSON. A server answers in the
//! serializer the request used.

use bytes::{BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;
use rpc_core::SerializerKind;

/// A body serializer with a fixed wire id.
pub trait Serializer {
    /// Id carried in the header's serializer byte.
    const ID: u8;
    /// Human-readable name, for errors.
    const NAME: &'static str;
    /// Appends the encoding of `value` to `dst`.
    fn encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), CodecError>;
    /// Decodes a value that must span all of `src` (trailing bytes are an error).
    fn decode<T: DeserializeOwned>(src: &[u8]) -> Result<T, CodecError>;
}

/// bincode 2 with its standard configuration. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bincode;

/// JSON via serde_json.
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// How many bytes of containers a decode may claim per input byte. bincode
/// trusts the length prefixes it reads: without a limit, a 10-byte body
/// claiming a 2^60-byte string aborts the process on allocation. Varint
/// encoding makes small integers 1 byte on the wire but 8 in memory, so the
/// budget is a multiple of the input, not the input length itself.
const BINCODE_CLAIM_FACTOR: u64 = 64;

fn bincode_decode_limited<T: DeserializeOwned>(
    src: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    let budget = (src.len() as u64)
        .saturating_mul(BINCODE_CLAIM_FACTOR)
        .max(4096);
    // bincode 2 takes its limit as a const generic: pick the smallest tier
    // that fits the budget.
    macro_rules! tiers {
        ($($bits:literal),*) => {
            $(
                if budget <= (1u64 << $bits) {
                    return bincode::serde::decode_from_slice(
                        src,
                        bincode_config().with_limit::<{ 1usize << $bits }>(),
                    );
                }
            )*
        };
    }
    tiers!(12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36);
    bincode::serde::decode_from_slice(src, bincode_config().with_limit::<{ 1usize << 38 }>())
}

impl Serializer for Bincode {
    const ID: u8 = 0;
    const NAME: &'static str = "bincode";

    fn encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let mut w = dst.writer();
        bincode::serde::encode_into_std_write(value, &mut w, bincode_config())
            .map(|_| ())
            .map_err(|e| CodecError::Encode {
                serializer: Self::NAME,
                source: Box::new(e),
            })
    }

    fn decode<T: DeserializeOwned>(src: &[u8]) -> Result<T, CodecError> {
        let (value, used) = bincode_decode_limited(src).map_err(|e| CodecError::Decode {
            serializer: Self::NAME,
            source: Box::new(e),
        })?;
        if used != src.len() {
            return Err(CodecError::Decode {
                serializer: Self::NAME,
                source: format!("{} trailing bytes", src.len() - used).into(),
            });
        }
        Ok(value)
    }
}

impl Serializer for Json {
    const ID: u8 = 1;
    const NAME: &'static str = "json";

    fn encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        serde_json::to_writer(dst.writer(), value).map_err(|e| CodecError::Encode {
            serializer: Self::NAME,
            source: Box::new(e),
        })
    }

    fn decode<T: DeserializeOwned>(src: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(src).map_err(|e| CodecError::Decode {
            serializer: Self::NAME,
            source: Box::new(e),
        })
    }
}

/// The wire id of a configured serializer.
pub fn id_of(kind: SerializerKind) -> u8 {
    match kind {
        SerializerKind::Bincode => Bincode::ID,
        SerializerKind::Json => Json::ID,
    }
}

/// The serializer a header's id names.
pub fn from_id(id: u8) -> Result<SerializerKind, CodecError> {
    match id {
        Bincode::ID => Ok(SerializerKind::Bincode),
        Json::ID => Ok(SerializerKind::Json),
        other => Err(CodecError::UnknownSerializer(other)),
    }
}

/// Encodes with the serializer chosen at run time.
pub fn encode<T: Serialize + ?Sized>(
    kind: SerializerKind,
    value: &T,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    match kind {
        SerializerKind::Bincode => Bincode::encode(value, dst),
        SerializerKind::Json => Json::encode(value, dst),
    }
}

/// Decodes with the serializer chosen at run time.
pub fn decode<T: DeserializeOwned>(kind: SerializerKind, src: &[u8]) -> Result<T, CodecError> {
    match kind {
        SerializerKind::Bincode => Bincode::decode(src),
        SerializerKind::Json => Json::decode(src),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u64,
        b: String,
        c: Option<Vec<u8>>,
    }

    #[test]
    fn both_serializers_round_trip() {
        let v = S {
            a: 7,
            b: "x".into(),
            c: Some(vec![1, 2]),
        };
        for kind in [SerializerKind::Bincode, SerializerKind::Json] {
            let mut buf = BytesMut::new();
            encode(kind, &v, &mut buf).unwrap();
            let back: S = decode(kind, &buf).unwrap();
            assert_eq!(back, v);
            assert_eq!(from_id(id_of(kind)).unwrap(), kind);
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut buf = BytesMut::new();
        Bincode::encode(&5u32, &mut buf).unwrap();
        buf.put_u8(0);
        assert!(Bincode::decode::<u32>(&buf).is_err());
    }

    #[test]
    fn hostile_length_prefixes_do_not_allocate() {
        // A varint claiming a 2^62-byte string, then nothing.
        let body = [0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F];
        assert!(Bincode::decode::<String>(&body).is_err());
        assert!(Bincode::decode::<Vec<u64>>(&body).is_err());
    }

    #[test]
    fn many_small_varints_still_decode() {
        let v: Vec<u64> = (0..10_000).map(|i| i % 100).collect();
        let mut buf = BytesMut::new();
        Bincode::encode(&v, &mut buf).unwrap();
        assert!(buf.len() < 10_100, "varints are 1 byte each");
        assert_eq!(Bincode::decode::<Vec<u64>>(&buf).unwrap(), v);
    }

    #[test]
    fn unknown_id_is_an_error() {
        assert!(matches!(from_id(9), Err(CodecError::UnknownSerializer(9))));
    }
}
