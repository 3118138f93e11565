//! Every serializer decoding an argument tuple from arbitrary bytes (the
//! first byte picks the serializer): never a panic, and never an
//! allocation the input does not pay for (libFuzzer's -rss_limit_mb and
//! -malloc_limit_mb catch a bomb).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_core::SerializerKind;

type Args = (u64, String, Vec<String>, Option<Vec<u8>>, (i32, bool), Vec<(u8, f64)>);

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let kind = SerializerKind::ALL[usize::from(which) % SerializerKind::ALL.len()];
    let _ = rpc_codec::serializer::decode::<Args>(kind, body);
});
