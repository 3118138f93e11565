//! The payload: modelled on rpcx's `BenchmarkMessage` (the protobuf message
//! of the rpcx/gRPC Go benchmarks): many small string, integer and boolean
//! fields, filled the way rpcx's `prepareArgs` fills them (every integer
//! 100000, every bool true, every string the same short text).

use serde::{Deserialize, Serialize};

/// The string every string field holds: 57 bytes of UTF-8, so that the whole
/// message is 580 bytes with bincode 2's standard (varint) configuration.
pub const FIELD_TEXT: &str = "tiny strings, many roundtrips 许多往返的小字符串";

/// The value of every integer field (rpcx uses 100000 too).
pub const FIELD_INT: i32 = 100_000;

/// rpcx's `BenchmarkMessage`, field for field (same names, same types;
/// `field5`, a repeated fixed64 rpcx leaves empty, is an empty vector).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchmarkMessage {
    pub field1: String,
    pub field9: String,
    pub field18: String,
    pub field80: bool,
    pub field81: bool,
    pub field2: i32,
    pub field3: i32,
    pub field280: i32,
    pub field6: i32,
    pub field22: i64,
    pub field4: String,
    pub field5: Vec<u64>,
    pub field59: bool,
    pub field7: String,
    pub field16: i32,
    pub field130: i32,
    pub field12: bool,
    pub field17: bool,
    pub field13: bool,
    pub field14: bool,
    pub field104: i32,
    pub field100: i32,
    pub field101: i32,
    pub field102: String,
    pub field103: String,
    pub field29: i32,
    pub field30: bool,
    pub field60: i32,
    pub field271: i32,
    pub field272: i32,
    pub field150: i32,
    pub field23: i32,
    pub field24: bool,
    pub field25: i32,
    pub field78: bool,
    pub field67: i32,
    pub field68: i32,
    pub field128: i32,
    pub field129: String,
    pub field131: i32,
}

impl BenchmarkMessage {
    /// The message every system sends.
    pub fn sample() -> Self {
        let s = || FIELD_TEXT.to_owned();
        let i = FIELD_INT;
        Self {
            field1: s(),
            field9: s(),
            field18: s(),
            field80: true,
            field81: true,
            field2: i,
            field3: i,
            field280: i,
            field6: i,
            field22: i64::from(i),
            field4: s(),
            field5: Vec::new(),
            field59: true,
            field7: s(),
            field16: i,
            field130: i,
            field12: true,
            field17: true,
            field13: true,
            field14: true,
            field104: i,
            field100: i,
            field101: i,
            field102: s(),
            field103: s(),
            field29: i,
            field30: true,
            field60: i,
            field271: i,
            field272: i,
            field150: i,
            field23: i,
            field24: true,
            field25: i,
            field78: true,
            field67: i,
            field68: i,
            field128: i,
            field129: s(),
            field131: i,
        }
    }
}

/// Size of `msg` encoded with bincode 2 serde, standard configuration.
pub fn encoded_len(msg: &BenchmarkMessage) -> Result<usize, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(msg, bincode::config::standard()).map(|v| v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_about_580_bytes() {
        let len = encoded_len(&BenchmarkMessage::sample()).expect("encodes");
        assert!((560..=600).contains(&len), "encoded length {len}");
    }

    #[test]
    fn round_trips() {
        let msg = BenchmarkMessage::sample();
        let bytes =
            bincode::serde::encode_to_vec(&msg, bincode::config::standard()).expect("encodes");
        let (back, used): (BenchmarkMessage, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                .expect("decodes");
        assert_eq!(used, bytes.len());
        assert_eq!(back, msg);
    }
}
