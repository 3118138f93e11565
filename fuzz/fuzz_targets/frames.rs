//! The frame decoder over arbitrary bytes, fed in arbitrary chunks (the
//! first input byte picks the chunk size): it must return frames, ask for
//! more, or refuse, and never panic, loop or buffer past its limit.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rpc_codec::FrameCodec;
use tokio_util::codec::Decoder;

/// Small, so the limit is reached often.
const MAX_FRAME: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => assert!(frame.body.len() + rpc_codec::HEADER_LEN <= MAX_FRAME),
                Ok(None) => break,
                // A refused stream closes the connection: stop here.
                Err(_) => return,
            }
        }
    }
});
