//! Body serializers: one trait, chosen per call and carried in the header.
//!
//! Ids are part of the wire format: `0` = bincode 2 (standard config:
//! little-endian, varint integers), `1` = JSON, `2` = postcard 1, `3` =
//! MessagePack (structs as maps with field names). A server answers in the
//! serializer the request used.
//!
//! Every decoder refuses trailing bytes, and none allocates from a length
//! prefix it has not checked against the input: bincode through a claim
//! budget, postcard because it borrows strings and bytes from the input (a
//! prefix longer than what is left is an error), MessagePack because its
//! reader copies only the bytes that are there; and serde caps a sequence's
//! preallocation (`size_hint::cautious`).

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

/// bincode 2 with its standard configuration (the default before postcard).
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

/// The decoded `value`, if `used` bytes were all of `src` (the binary
/// serializers refuse trailing bytes: a body is exactly one value).
fn whole<T>(name: &'static str, value: T, src: &[u8], used: usize) -> Result<T, CodecError> {
    if used == src.len() {
        return Ok(value);
    }
    Err(CodecError::Decode {
        serializer: name,
        source: format!("{} trailing bytes", src.len().saturating_sub(used)).into(),
    })
}

fn encode_failed(
    name: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> CodecError {
    CodecError::Encode {
        serializer: name,
        source: Box::new(e),
    }
}

fn decode_error(
    name: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> CodecError {
    CodecError::Decode {
        serializer: name,
        source: Box::new(e),
    }
}

impl Serializer for Bincode {
    const ID: u8 = 0;
    const NAME: &'static str = "bincode";

    fn encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        bincode::serde::encode_into_writer(value, IntoBytesMut(dst), bincode_config())
            .map_err(|e| encode_failed(Self::NAME, e))
    }

    fn decode<T: DeserializeOwned>(src: &[u8]) -> Result<T, CodecError> {
        let (value, used) = bincode_decode_limited(src).map_err(|e| decode_error(Self::NAME, e))?;
        whole(Self::NAME, value, src, used)
    }
}

impl Serializer for Json {
    const ID: u8 = 1;
    const NAME: &'static str = "json";

    fn encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        serde_json::to_writer(dst.writer(), value).map_err(|e| encode_failed(Self::NAME, e))
    }

    fn decode<T: DeserializeOwned>(src: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(src).map_err(|e| decode_error(Self::NAME, e))
    }
}

/// postcard 1: varint integers, no field names; maintained, serde-native.
#[derive(Clone, Copy, Debug, Default)]
pub struct Postcard;

/// MessagePack via rmp-serde, structs written as maps with their field
/// names so that other languages can read them.
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgPack;

impl Serializer for Postcard {
    const ID: u8 = 2;
    const NAME: &'static str = "postcard";

    fn encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        postcard::serialize_with_flavor(value, IntoBytesMut(dst))
            .map_err(|e| encode_failed(Self::NAME, e))
    }

    fn decode<T: DeserializeOwned>(src: &[u8]) -> Result<T, CodecError> {
        let (value, rest) =
            postcard::take_from_bytes(src).map_err(|e| decode_error(Self::NAME, e))?;
        whole(Self::NAME, value, src, src.len() - rest.len())
    }
}

/// Serializer output written straight into the frame buffer (postcard's
/// `Flavor`, bincode's `Writer`).
///
/// Why not `dst.writer()` (`io::Write`): through it every byte and every
/// varint became an out-of-line `memcpy` call of 1–10 bytes, 4–5% of a
/// consumer's CPU at 32 calls in flight with postcard (`perf record` of
/// `rpc-bench client`, 580-byte message: `memmove` fell from 11.9% to 7.3%
/// of samples with this adapter). Here short runs are a loop of stores.
/// Its QPS A/B against the commit before it was even within the noise
/// (+1.7 / −0.1 / +3.0% multi_thread, +0.2 / −1.7 / −1.9% current_thread
/// at 1 / 32 / 256 in flight): the encode is a small part of a call.
struct IntoBytesMut<'a>(&'a mut BytesMut);

impl IntoBytesMut<'_> {
    #[inline]
    fn put(&mut self, data: &[u8]) {
        // A varint or fixed integer is at most 16 bytes; longer runs are
        // strings and byte arrays, where one `memcpy` is the right tool.
        if data.len() <= 16 {
            self.0.reserve(data.len());
            for &b in data {
                self.0.put_u8(b);
            }
        } else {
            self.0.extend_from_slice(data);
        }
    }
}

impl postcard::ser_flavors::Flavor for IntoBytesMut<'_> {
    type Output = ();

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.put(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

impl bincode::enc::write::Writer for IntoBytesMut<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.put(bytes);
        Ok(())
    }
}

impl Serializer for MsgPack {
    const ID: u8 = 3;
    const NAME: &'static str = "msgpack";

    fn encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let mut w = dst.writer();
        value
            .serialize(&mut rmp_serde::Serializer::new(&mut w).with_struct_map())
            .map_err(|e| encode_failed(Self::NAME, e))
    }

    fn decode<T: DeserializeOwned>(src: &[u8]) -> Result<T, CodecError> {
        // Over a cursor, so the bytes used are known. Its reader copies a
        // string with `take(len).read_to_end`, which grows with the bytes
        // actually there: a hostile length prefix cannot make it allocate.
        let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(src));
        let value = T::deserialize(&mut de).map_err(|e| decode_error(Self::NAME, e))?;
        let used = usize::try_from(de.position()).unwrap_or(usize::MAX);
        whole(Self::NAME, value, src, used)
    }
}

/// The wire id of a configured serializer.
pub fn id_of(kind: SerializerKind) -> u8 {
    match kind {
        SerializerKind::Bincode => Bincode::ID,
        SerializerKind::Json => Json::ID,
        SerializerKind::Postcard => Postcard::ID,
        SerializerKind::MsgPack => MsgPack::ID,
    }
}

/// The serializer a header's id names.
pub fn from_id(id: u8) -> Result<SerializerKind, CodecError> {
    match id {
        Bincode::ID => Ok(SerializerKind::Bincode),
        Json::ID => Ok(SerializerKind::Json),
        Postcard::ID => Ok(SerializerKind::Postcard),
        MsgPack::ID => Ok(SerializerKind::MsgPack),
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
        SerializerKind::Postcard => Postcard::encode(value, dst),
        SerializerKind::MsgPack => MsgPack::encode(value, dst),
    }
}

/// Decodes with the serializer chosen at run time.
pub fn decode<T: DeserializeOwned>(kind: SerializerKind, src: &[u8]) -> Result<T, CodecError> {
    match kind {
        SerializerKind::Bincode => Bincode::decode(src),
        SerializerKind::Json => Json::decode(src),
        SerializerKind::Postcard => Postcard::decode(src),
        SerializerKind::MsgPack => MsgPack::decode(src),
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
    fn every_serializer_round_trips() {
        let v = S {
            a: 7,
            b: "x".into(),
            c: Some(vec![1, 2]),
        };
        for kind in SerializerKind::ALL {
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
        // postcard: a varint length of 2^63 - 1.
        let body = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
        assert!(Postcard::decode::<String>(&body).is_err());
        assert!(Postcard::decode::<Vec<u8>>(&body).is_err());
        assert!(Postcard::decode::<Vec<String>>(&body).is_err());
        // MessagePack: str32, bin32 and array32 claiming 4 GiB, then nothing.
        for head in [0xDB, 0xC6, 0xDD] {
            let body = [head, 0xFF, 0xFF, 0xFF, 0xFF];
            assert!(MsgPack::decode::<String>(&body).is_err());
            assert!(MsgPack::decode::<Vec<u8>>(&body).is_err());
            assert!(MsgPack::decode::<Vec<String>>(&body).is_err());
        }
    }

    #[test]
    fn trailing_bytes_are_rejected_by_every_binary_serializer() {
        for kind in [SerializerKind::Postcard, SerializerKind::MsgPack] {
            let mut buf = BytesMut::new();
            encode(kind, &5u32, &mut buf).unwrap();
            buf.put_u8(0);
            assert!(decode::<u32>(kind, &buf).is_err(), "{kind:?}");
        }
    }

    #[test]
    fn msgpack_writes_field_names() {
        let mut buf = BytesMut::new();
        MsgPack::encode(
            &S {
                a: 1,
                b: "x".into(),
                c: None,
            },
            &mut buf,
        )
        .unwrap();
        // fixmap of 3, then "a" as fixstr.
        assert_eq!(&buf[..3], &[0x83, 0xA1, b'a']);
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
