//! The request envelope parser (deadline, service, method, metadata,
//! arguments) over arbitrary bodies, and the metadata it yields: never a
//! panic, and what it accepts round-trips through `Metadata::from_wire`
//! or is refused there.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_codec::RequestEnvelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = RequestEnvelope::parse(data) {
        assert!(env.args.len() <= data.len());
        let _ = rpc_core::Metadata::from_wire(env.metadata.iter().copied());
    }
});
