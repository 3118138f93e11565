//! Body decompression (lz4 and zstd) over arbitrary bytes: never a panic,
//! never more output than the limit, and what is compressed comes back.
//! The first byte picks the algorithm; the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_codec::compression::{compress, decompress};
use rpc_core::Compression;

/// Small, so inputs that expand past it are common.
const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let c = if pick & 1 == 0 {
        Compression::Lz4
    } else {
        Compression::Zstd
    };
    if let Ok(out) = decompress(c, body, LIMIT) {
        assert!(out.len() <= LIMIT);
    }
    // Round trip of the input as a plain body (bounded: zstd's encoder is
    // slow on large inputs, and libFuzzer's inputs stay small anyway).
    if body.len() <= 4096 {
        let packed = compress(c, body).expect("compresses");
        let back = decompress(c, &packed, body.len()).expect("own output decodes");
        assert_eq!(back, body);
    }
});
