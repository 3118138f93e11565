//! Property tests: the decoder never panics on arbitrary input, and every
//! encoded frame decodes to itself.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rpc_codec::{
    CodecError, Frame, FrameCodec, HEADER_LEN, Header, MessageType, RequestEnvelope, RequestHead,
    encode_request,
};
use rpc_core::{SerializerKind, StatusCode};
use tokio_util::codec::{Decoder, Encoder};

fn message_type() -> impl Strategy<Value = MessageType> {
    prop_oneof![
        Just(MessageType::Request),
        Just(MessageType::Response),
        Just(MessageType::Heartbeat),
        Just(MessageType::Cancel),
        Just(MessageType::GoAway),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes, fed in arbitrary chunks, never panic the decoder and
    /// never make it buffer past the maximum frame length.
    #[test]
    fn arbitrary_streams_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        chunk in 1usize..512,
        max in 18usize..2048,
        valid_prefix in any::<bool>(),
    ) {
        let mut data = data;
        if valid_prefix && data.len() >= 3 {
            // Steer half the cases past the magic/version checks.
            data[0] = 0x4D; data[1] = 0x52; data[2] = 1;
        }
        let mut codec = FrameCodec::new(max);
        let mut buf = BytesMut::new();
        'outer: for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.body.len() + HEADER_LEN <= max);
                        let _ = RequestEnvelope::parse(&frame.body);
                    }
                    Ok(None) => break,
                    Err(e) => { prop_assert!(e.is_fatal()); break 'outer; }
                }
            }
        }
    }

    /// Every envelope body parser input is handled without panicking.
    #[test]
    fn arbitrary_envelopes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = RequestEnvelope::parse(&body);
    }

    /// Arbitrary bytes as arguments never panic the serializers.
    #[test]
    fn arbitrary_argument_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        for kind in SerializerKind::ALL {
            let _ = rpc_codec::serializer::decode::<(u64, String, Vec<String>, Option<Vec<u8>>)>(kind, &body);
        }
    }

    /// Frame encode then decode is the identity, also when split across reads.
    #[test]
    fn frames_round_trip(
        ser in any::<u8>(),
        mt in message_type(),
        status in 0u8..=8,
        id in any::<u64>(),
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        split in any::<proptest::sample::Index>(),
    ) {
        let frame = Frame {
            header: Header {
                serializer: ser,
                message_type: mt,
                status: StatusCode::from_u8(status),
                request_id: id,
                body_len: body.len() as u32,
            },
            body: Bytes::from(body),
        };
        let mut codec = FrameCodec::new(4096);
        let mut wire = BytesMut::new();
        codec.encode(&frame, &mut wire).unwrap();
        let cut = split.index(wire.len() + 1);
        let mut buf = BytesMut::from(&wire[..cut]);
        let first = codec.decode(&mut buf).unwrap();
        let decoded = match first {
            Some(f) => f,
            None => {
                buf.extend_from_slice(&wire[cut..]);
                codec.decode(&mut buf).unwrap().unwrap()
            }
        };
        prop_assert_eq!(decoded, frame);
    }

    /// Request envelopes round trip with arbitrary names, metadata and deadlines.
    #[test]
    fn requests_round_trip(
        service in ".{0,64}",
        method in "[a-z_]{0,32}",
        meta in proptest::collection::vec((".{0,16}", ".{0,16}"), 0..8),
        deadline_us in proptest::option::of(1u64..u64::MAX / 2),
        args in (any::<u64>(), ".{0,64}"),
        which in 0..SerializerKind::ALL.len(),
    ) {
        let serializer = SerializerKind::ALL[which];
        let md: rpc_core::Metadata = meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let wire_meta: Vec<(String, String)> =
            md.wire_entries().map(|(k, v)| (k.to_owned(), v.into_owned())).collect();
        let meta_refs: Vec<(&str, &str)> =
            wire_meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let head = RequestHead {
            request_id: 5,
            serializer,
            deadline: deadline_us.map(Duration::from_micros),
            service: &service,
            method: &method,
            metadata: &md,
        };
        let wire = encode_request(&head, &args, 1 << 20).unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        let frame = FrameCodec::new(1 << 20).decode(&mut buf).unwrap().unwrap();
        let env = RequestEnvelope::parse(&frame.body).unwrap();
        prop_assert_eq!(env.service, service.as_str());
        prop_assert_eq!(env.method, method.as_str());
        prop_assert_eq!(&env.metadata, &meta_refs);
        prop_assert_eq!(&rpc_core::Metadata::from_wire(env.metadata.iter().copied()).unwrap(), &md);
        prop_assert_eq!(env.deadline, head.deadline);
        let back: (u64, String) = rpc_codec::serializer::decode(serializer, env.args).unwrap();
        prop_assert_eq!(back, args);
    }
}

#[test]
fn oversized_header_is_refused_before_buffering() {
    let mut wire = BytesMut::new();
    let header = Header {
        serializer: 0,
        message_type: MessageType::Request,
        status: StatusCode::Ok,
        request_id: 1,
        body_len: u32::MAX,
    };
    wire.resize(HEADER_LEN, 0);
    header.write_to(&mut wire);
    let cap_before = wire.capacity();
    let err = FrameCodec::new(8 * 1024 * 1024)
        .decode(&mut wire)
        .unwrap_err();
    assert!(matches!(err, CodecError::FrameTooLarge { .. }), "{err}");
    assert_eq!(
        wire.capacity(),
        cap_before,
        "no buffer was sized from the bad length"
    );
}

#[test]
fn bad_magic_and_version_are_fatal() {
    let mut wire = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
    let err = FrameCodec::default().decode(&mut wire).unwrap_err();
    assert!(matches!(err, CodecError::BadMagic(_)) && err.is_fatal());
    let mut v2 = BytesMut::from(&[0x4D, 0x52, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0][..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut v2),
        Err(CodecError::UnsupportedVersion(2))
    ));
}

fn compression() -> impl Strategy<Value = rpc_core::Compression> {
    prop_oneof![
        Just(rpc_core::Compression::Lz4),
        Just(rpc_core::Compression::Zstd),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every body, repetitive or not, comes back as it went in.
    #[test]
    fn compressed_bodies_round_trip(
        c in compression(),
        body in proptest::collection::vec(any::<u8>(), 0..8192),
        repeat in 1usize..8,
    ) {
        let body = body.repeat(repeat);
        let packed = rpc_codec::compression::compress(c, &body).unwrap();
        let back = rpc_codec::compression::decompress(c, &packed, body.len()).unwrap();
        prop_assert_eq!(back, body);
    }

    /// Arbitrary (or damaged) compressed bodies never panic the decoder and
    /// never yield more than the limit.
    #[test]
    fn arbitrary_compressed_bodies_never_panic(
        c in compression(),
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        damage in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        from_real in any::<bool>(),
        max in 0usize..65536,
    ) {
        let mut data = if from_real {
            rpc_codec::compression::compress(c, &data.repeat(4)).unwrap()
        } else {
            data
        };
        for (at, byte) in damage {
            if !data.is_empty() {
                let i = at % data.len();
                data[i] = byte;
            }
        }
        if let Ok(out) = rpc_codec::compression::decompress(c, &data, max) {
            prop_assert!(out.len() <= max);
        }
    }
}
