//! Golden frames: checked-in bytes pin the wire format. A change that alters
//! any of them changes the protocol: bump `VERSION` and explain it in
//! `docs/protocol.md`. Regenerate deliberately with `UPDATE_GOLDEN=1`.

use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use rpc_codec::{
    FrameCodec, HEADER_LEN, MessageType, RequestEnvelope, RequestHead, encode_empty, encode_error,
    encode_request, encode_response,
};
use rpc_core::{SerializerKind, StatusCode};
use tokio_util::codec::Decoder;

fn golden(name: &str, bytes: &[u8]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        bytes,
        &want[..],
        "{name} differs from the checked-in golden frame: the wire format changed"
    );
    // And the checked-in bytes decode to exactly one frame.
    let mut buf = BytesMut::from(&want[..]);
    let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(frame.body.len() + HEADER_LEN, want.len());
}

static TRACE: std::sync::LazyLock<rpc_core::Metadata> =
    std::sync::LazyLock::new(|| [("trace-id", "t1")].into_iter().collect());

fn head(serializer: SerializerKind) -> RequestHead<'static> {
    RequestHead {
        request_id: 1,
        serializer,
        deadline: Some(Duration::from_millis(1500)),
        service: "UserService:1.0",
        method: "get_user",
        metadata: &TRACE,
    }
}

#[test]
fn request_bincode() {
    let f = encode_request(&head(SerializerKind::Bincode), &(42u64,), 1 << 20).unwrap();
    // magic "MR", version 1, serializer 0, type 1 (request), status 0, id 1.
    assert_eq!(&f[..14], &[0x4D, 0x52, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    // deadline 1_500_000 us, then "UserService:1.0" with its u16 length.
    assert_eq!(&f[HEADER_LEN..HEADER_LEN + 8], &1_500_000u64.to_be_bytes());
    assert_eq!(&f[HEADER_LEN + 8..HEADER_LEN + 10], &[0, 15]);
    golden("request_bincode.bin", &f);
}

#[test]
fn request_json() {
    let f = encode_request(&head(SerializerKind::Json), &(42u64,), 1 << 20).unwrap();
    assert_eq!(f[3], 1, "serializer id 1 = JSON");
    assert!(f.ends_with(b"[42]"), "JSON args are a tuple array");
    golden("request_json.bin", &f);
}

#[test]
fn response_ok_bincode() {
    let f = encode_response(1, SerializerKind::Bincode, &(42u64, "alice"), 1 << 20).unwrap();
    assert_eq!(f[4], MessageType::Response as u8);
    assert_eq!(f[5], 0);
    golden("response_ok_bincode.bin", &f);
}

#[test]
fn request_and_response_postcard() {
    let f = encode_request(&head(SerializerKind::Postcard), &(42u64,), 1 << 20).unwrap();
    assert_eq!(f[3], 2, "serializer id 2 = postcard");
    assert!(f.ends_with(&[42]), "a varint 42");
    golden("request_postcard.bin", &f);
    let f = encode_response(1, SerializerKind::Postcard, &(42u64, "alice"), 1 << 20).unwrap();
    assert_eq!(&f[HEADER_LEN..], &[42, 5, b'a', b'l', b'i', b'c', b'e']);
    golden("response_ok_postcard.bin", &f);
}

#[test]
fn request_and_response_msgpack() {
    let f = encode_request(&head(SerializerKind::MsgPack), &(42u64,), 1 << 20).unwrap();
    assert_eq!(f[3], 3, "serializer id 3 = MessagePack");
    assert!(
        f.ends_with(&[0x91, 42]),
        "a fixarray of one positive fixint"
    );
    golden("request_msgpack.bin", &f);
    let f = encode_response(1, SerializerKind::MsgPack, &(42u64, "alice"), 1 << 20).unwrap();
    assert_eq!(
        &f[HEADER_LEN..],
        &[0x92, 42, 0xA5, b'a', b'l', b'i', b'c', b'e']
    );
    golden("response_ok_msgpack.bin", &f);
}

#[test]
fn response_error() {
    let f = encode_error(
        7,
        0,
        StatusCode::MethodNotFound,
        "no method `foo` on UserService:1.0",
    );
    assert_eq!(f[5], 2, "status 2 = method not found");
    assert_eq!(&f[HEADER_LEN..], b"no method `foo` on UserService:1.0");
    golden("response_error.bin", &f);
}

#[test]
fn heartbeat_and_cancel() {
    let mut f = BytesMut::new();
    encode_empty(&mut f, MessageType::Heartbeat, 9);
    assert_eq!(
        &f[..],
        &[0x4D, 0x52, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0]
    );
    golden("heartbeat.bin", &f);
    let mut c = BytesMut::new();
    encode_empty(&mut c, MessageType::Cancel, 9);
    golden("cancel.bin", &c);
    let mut g = BytesMut::new();
    encode_empty(&mut g, MessageType::GoAway, 41);
    assert_eq!(g[4], 5, "message type 5 = go-away");
    golden("goaway.bin", &g);
}

#[test]
fn golden_request_parses_back() {
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/request_bincode.bin"),
    )
    .unwrap();
    let mut buf = BytesMut::from(&bytes[..]);
    let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    let env = RequestEnvelope::parse(&frame.body).unwrap();
    assert_eq!(env.service, "UserService:1.0");
    assert_eq!(env.method, "get_user");
    assert_eq!(env.deadline, Some(Duration::from_millis(1500)));
    assert_eq!(env.metadata, vec![("trace-id", "t1")]);
    let (id,): (u64,) = rpc_codec::serializer::decode(SerializerKind::Bincode, env.args).unwrap();
    assert_eq!(id, 42);
}

/// A request and a response with a repetitive body, compressed with each
/// algorithm (threshold 0). These pin our encoders' output too: a new
/// lz4_flex or libzstd that compresses differently makes them fail, and is
/// then regenerated deliberately (every earlier frame must still decode).
#[test]
fn compressed_requests_and_responses() {
    use rpc_codec::compression::{compress_frame, open_body};
    use rpc_core::Compression;
    let names: Vec<String> = (0..24).map(|i| format!("user-{}", i % 3)).collect();
    for (c, flag, name) in [
        (Compression::Lz4, 0x40, "lz4"),
        (Compression::Zstd, 0x80, "zstd"),
    ] {
        let plain = encode_request(&head(SerializerKind::Postcard), &(&names,), 1 << 20).unwrap();
        let f = compress_frame(plain.clone(), c, 0);
        assert_eq!(
            f[3],
            flag | 2,
            "{name}: compression bits over postcard's id"
        );
        assert!(
            f.len() < plain.len(),
            "{name}: {} >= {}",
            f.len(),
            plain.len()
        );
        golden(&format!("request_postcard_{name}.bin"), &f);
        let frame = FrameCodec::default()
            .decode(&mut BytesMut::from(&f[..]))
            .unwrap()
            .unwrap();
        let (id, body) = open_body(frame.header.serializer, frame.body, 1 << 20).unwrap();
        assert_eq!(id, 2);
        let env = RequestEnvelope::parse(&body).unwrap();
        assert_eq!(env.method, "get_user");
        let (back,): (Vec<String>,) =
            rpc_codec::serializer::decode(SerializerKind::Postcard, env.args).unwrap();
        assert_eq!(back, names);

        let plain = encode_response(1, SerializerKind::Postcard, &names, 1 << 20).unwrap();
        let f = compress_frame(plain.clone(), c, 0);
        assert_eq!(f[3], flag | 2);
        assert_eq!(f[4], MessageType::Response as u8);
        golden(&format!("response_ok_postcard_{name}.bin"), &f);
        let (_, body) = open_body(
            f[3],
            bytes::Bytes::copy_from_slice(&f[HEADER_LEN..]),
            1 << 20,
        )
        .unwrap();
        assert_eq!(&body[..], &plain[HEADER_LEN..]);
    }
}

#[test]
fn error_replies_to_compressed_requests_stay_plain() {
    let f = encode_error(7, 0x42, StatusCode::BadRequest, "nope");
    assert_eq!(f[3], 2, "only the serializer id is echoed");
    assert_eq!(&f[HEADER_LEN..], b"nope");
}

/// A zstd frame from another encoder (the pure-Rust ruzstd, which writes
/// no content size and a 128 KiB window) still opens: the streamed path.
#[test]
fn a_zstd_frame_without_a_content_size_opens() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/request_postcard_zstd_streamed.bin");
    let f = std::fs::read(path).unwrap();
    let (id, body) = rpc_codec::compression::open_body(
        f[3],
        bytes::Bytes::copy_from_slice(&f[HEADER_LEN..]),
        1 << 20,
    )
    .unwrap();
    assert_eq!(id, 2);
    let env = RequestEnvelope::parse(&body).unwrap();
    let (names,): (Vec<String>,) =
        rpc_codec::serializer::decode(SerializerKind::Postcard, env.args).unwrap();
    assert_eq!(names.len(), 24);
    assert_eq!(names[4], "user-1");
    // The same frame with bytes behind it, or twice, is refused.
    for tail in [&b"junk"[..], &f[HEADER_LEN..]] {
        let mut body = f[HEADER_LEN..].to_vec();
        body.extend_from_slice(tail);
        let e =
            rpc_codec::compression::open_body(f[3], bytes::Bytes::from(body), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
    }
}
