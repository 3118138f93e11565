//! `#[rpc::service]` without a network: the generated `ServiceHandler` is
//! driven directly with argument payloads encoded the way a client encodes
//! them, and the generated client is checked for its signatures (and, over
//! an in-process memory registry, for its service key and error path).
//!
//! Request arguments and response values are both plain serializer output,
//! so `Replier::encode` (which writes a response frame: 18-byte header, then
//! the value) doubles as the argument encoder, and `Call::decode_args`
//! decodes response bodies.

// Generated code must be warning-free and documented in crates that are
// strict about it.
#![deny(warnings, missing_docs, missing_debug_implementations)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rpc::serde::de::DeserializeOwned;
use rpc::serde::{Deserialize, Serialize};
use rpc::transport::server::{Call, CallError, Replier, ServiceHandler};
use rpc::{RpcConfig, RpcError, SerializerKind, StatusCode};

/// A user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "rpc::serde")]
pub struct User {
    /// Id.
    pub id: u64,
    /// Name.
    pub name: String,
}

/// Application errors: values, not RPC failures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "rpc::serde")]
pub enum AppError {
    /// The name was empty.
    EmptyName,
}

/// Users, by id.
#[rpc::service(version = "1.0")]
pub trait UserService {
    /// The user with this id.
    async fn get_user(&self, id: u64) -> User;

    /// Renames `user`; user errors come back as `Ok(Err(..))`.
    async fn rename(&self, user: User, new_name: String) -> Result<User, AppError>;

    /// Does nothing.
    async fn ping(&self);

    /// `a + b + c`.
    async fn add(&self, a: i32, b: i32, c: i32) -> i32;

    /// A raw identifier: named `type` on the wire.
    async fn r#type(&self) -> String;

    /// Kept for old clients.
    #[deprecated(note = "use `get_user`")]
    async fn old_get_user(&self, id: u64) -> User;
}

/// Implemented with plain `async fn`s, awaiting in between so the futures
/// really are multi-step state machines.
#[derive(Debug, Default)]
struct Users {
    calls: AtomicUsize,
}

impl Users {
    async fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
    }
}

impl UserService for Users {
    async fn get_user(&self, id: u64) -> User {
        self.count().await;
        User {
            id,
            name: format!("user-{id}"),
        }
    }

    async fn rename(&self, user: User, new_name: String) -> Result<User, AppError> {
        self.count().await;
        if new_name.is_empty() {
            return Err(AppError::EmptyName);
        }
        Ok(User {
            name: new_name,
            ..user
        })
    }

    async fn ping(&self) {
        self.count().await;
    }

    async fn add(&self, a: i32, b: i32, c: i32) -> i32 {
        self.count().await;
        a + b + c
    }

    async fn r#type(&self) -> String {
        self.count().await;
        "users".to_owned()
    }

    async fn old_get_user(&self, id: u64) -> User {
        self.get_user(id).await
    }
}

/// Name override, default version, a non-`pub` trait, a user type called
/// `S`, and arguments named like the locals of the generated dispatch.
mod hygiene {
    use rpc::serde::{Deserialize, Serialize};

    /// Shadowing bait for the server's type parameter.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(crate = "rpc::serde")]
    pub(crate) struct S(pub(crate) u32);

    /// Sums its arguments.
    #[rpc::service(name = "com.example.Hygiene")]
    pub(crate) trait Hygiene: std::fmt::Debug {
        /// The sum.
        async fn sum(
            &self,
            call: u32,
            args: u32,
            service: S,
            replier: u32,
            output: u32,
            future: u32,
        ) -> u32;
    }

    #[derive(Debug)]
    pub(crate) struct Summer;

    impl Hygiene for Summer {
        async fn sum(
            &self,
            call: u32,
            args: u32,
            service: S,
            replier: u32,
            output: u32,
            future: u32,
        ) -> u32 {
            call + args + service.0 + replier + output + future
        }
    }
}

use hygiene::{HygieneClient, HygieneServer, S, Summer};

const HEADER_LEN: usize = 18;
const MAX_FRAME: usize = 1 << 20;
const REQUEST_ID: u64 = 0x0102_0304_0506_0708;
const KINDS: [SerializerKind; 2] = [SerializerKind::Bincode, SerializerKind::Json];

fn encode<T: Serialize + ?Sized>(kind: SerializerKind, value: &T) -> Vec<u8> {
    match Replier::new(0, kind, MAX_FRAME).encode(value) {
        Ok(frame) => frame[HEADER_LEN..].to_vec(),
        Err(e) => panic!("cannot encode: {e}"),
    }
}

fn decode<T: DeserializeOwned>(kind: SerializerKind, body: &[u8]) -> T {
    let call = Call {
        method: "(decoding a reply)",
        args: body,
        replier: Replier::new(0, kind, MAX_FRAME),
        context: &rpc::Context::new("test:1.0", "m"),
    };
    match call.decode_args() {
        Ok(v) => v,
        Err(e) => panic!("cannot decode the reply: {e}"),
    }
}

/// One call through the handler, as the server would make it.
async fn invoke<R: DeserializeOwned>(
    handler: &dyn ServiceHandler,
    kind: SerializerKind,
    method: &str,
    args: &(impl Serialize + ?Sized),
) -> Result<R, CallError> {
    let args = encode(kind, args);
    let call = Call {
        method,
        args: &args,
        replier: Replier::new(REQUEST_ID, kind, MAX_FRAME),
        context: &rpc::Context::new("test:1.0", "m"),
    };
    let frame = handler.call(call)?.await?;
    // The reply must be a whole response frame for this request.
    assert_eq!(&frame[..2], b"MR", "magic");
    assert_eq!(frame[4], 2, "message type: response");
    assert_eq!(frame[5], 0, "status: ok");
    assert_eq!(frame[6..14], REQUEST_ID.to_be_bytes(), "request id");
    let body_len = u32::from_be_bytes([frame[14], frame[15], frame[16], frame[17]]);
    assert_eq!(body_len as usize, frame.len() - HEADER_LEN, "body length");
    Ok(decode(kind, &frame[HEADER_LEN..]))
}

async fn ok<R: DeserializeOwned>(
    handler: &dyn ServiceHandler,
    kind: SerializerKind,
    method: &str,
    args: &(impl Serialize + ?Sized),
) -> R {
    match invoke(handler, kind, method, args).await {
        Ok(v) => v,
        Err(e) => panic!("{method} ({kind:?}) failed: {e}"),
    }
}

fn assert_send<T: Send>(_: &T) {}

#[test]
fn metadata_and_constants() {
    let server = UserServiceServer::new(Users::default());
    assert_eq!(server.service_name(), "UserService");
    assert_eq!(server.service_version(), "1.0");
    let methods = ["get_user", "rename", "ping", "add", "type", "old_get_user"];
    assert_eq!(server.methods(), methods);
    assert_eq!(UserServiceClient::SERVICE_NAME, "UserService");
    assert_eq!(UserServiceClient::SERVICE_VERSION, "1.0");
    assert_eq!(UserServiceClient::METHODS, methods);

    let hygiene = HygieneServer::new(Summer);
    assert_eq!(hygiene.service_name(), "com.example.Hygiene");
    assert_eq!(hygiene.service_version(), "1.0");
    assert_eq!(hygiene.methods(), ["sum"]);
    assert_eq!(HygieneClient::SERVICE_NAME, "com.example.Hygiene");

    let debug = format!("{server:?}");
    assert!(debug.starts_with("UserServiceServer"), "{debug}");
    assert!(debug.contains("UserService"), "{debug}");
}

#[tokio::test]
async fn dispatches_every_method_in_both_serializers() {
    let server = UserServiceServer::new(Users::default());
    for kind in KINDS {
        let user: User = ok(&server, kind, "get_user", &(7u64,)).await;
        assert_eq!(
            user,
            User {
                id: 7,
                name: "user-7".into()
            }
        );

        let renamed: Result<User, AppError> =
            ok(&server, kind, "rename", &(user.clone(), "Ada")).await;
        assert_eq!(
            renamed,
            Ok(User {
                id: 7,
                name: "Ada".into()
            })
        );
        let rejected: Result<User, AppError> = ok(&server, kind, "rename", &(user, "")).await;
        assert_eq!(rejected, Err(AppError::EmptyName));

        let () = ok(&server, kind, "ping", &()).await;
        let sum: i32 = ok(&server, kind, "add", &(1, 20, 300)).await;
        assert_eq!(sum, 321);
        let name: String = ok(&server, kind, "type", &()).await;
        assert_eq!(name, "users");
        let old: User = ok(&server, kind, "old_get_user", &(8u64,)).await;
        assert_eq!(old.id, 8);

        let hygiene = HygieneServer::new(Summer);
        let sum: u32 = ok(
            &hygiene,
            kind,
            "sum",
            &(1u32, 2u32, S(4), 8u32, 16u32, 32u32),
        )
        .await;
        assert_eq!(sum, 63);
    }
    assert_eq!(server.service().calls.load(Ordering::SeqCst), 2 * 7);
}

#[tokio::test]
async fn json_arguments_are_a_tuple_array() {
    let server = UserServiceServer::new(Users::default());
    let args = br#"[{"id":3,"name":"x"},"Grace"]"#;
    let call = Call {
        method: "rename",
        args,
        replier: Replier::new(1, SerializerKind::Json, MAX_FRAME),
        context: &rpc::Context::new("test:1.0", "m"),
    };
    let frame = match server.call(call) {
        Ok(future) => future.await,
        Err(e) => panic!("dispatch failed: {e}"),
    };
    let body = frame.as_deref().map(|f| &f[HEADER_LEN..]);
    assert_eq!(body, Ok(&br#"{"Ok":{"id":3,"name":"Grace"}}"#[..]));
}

#[tokio::test]
async fn unknown_methods_are_method_not_found() {
    let server = UserServiceServer::new(Users::default());
    for kind in KINDS {
        let err = invoke::<()>(&server, kind, "get_users", &(7u64,)).await;
        let Err(err) = err else {
            panic!("an unknown method succeeded")
        };
        assert_eq!(err.status, StatusCode::MethodNotFound);
        assert!(err.message.contains("UserService"), "{err}");
        assert!(err.message.contains("get_users"), "{err}");
        // Wire names are the Rust names without `r#`.
        let err = invoke::<String>(&server, kind, "r#type", &()).await;
        assert_eq!(err.map_err(|e| e.status), Err(StatusCode::MethodNotFound));
    }
    assert_eq!(server.service().calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn undecodable_arguments_are_serialization_errors_before_running() {
    let server = UserServiceServer::new(Users::default());
    for kind in KINDS {
        // Too many arguments, too few, the wrong type, and not a tuple at all.
        let bad: [(&str, Vec<u8>); 4] = [
            ("get_user", encode(kind, &(7u64, 8u64))),
            ("add", encode(kind, &(1i32, 2i32))),
            ("get_user", encode(kind, &("seven",))),
            ("ping", vec![0xff, 0xfe, 0xfd]),
        ];
        for (method, args) in bad {
            let call = Call {
                method,
                args: &args,
                replier: Replier::new(1, kind, MAX_FRAME),
                context: &rpc::Context::new("test:1.0", "m"),
            };
            let Err(err) = server.call(call) else {
                panic!("{method} ({kind:?}) accepted {args:?}")
            };
            assert_eq!(err.status, StatusCode::Serialization, "{err}");
            assert!(err.message.contains(method), "{err}");
        }
    }
    assert_eq!(server.service().calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_futures_are_send_and_static() {
    let users = Arc::new(Users::default());
    let handler: Arc<dyn ServiceHandler> = Arc::new(UserServiceServer::from_arc(users.clone()));
    let kind = SerializerKind::Bincode;
    let mut tasks = Vec::new();
    for id in 0..32u64 {
        let args = encode(kind, &(id,));
        let call = Call {
            method: "get_user",
            args: &args,
            replier: Replier::new(id, kind, MAX_FRAME),
            context: &rpc::Context::new("test:1.0", "m"),
        };
        let future = match handler.call(call) {
            Ok(f) => f,
            Err(e) => panic!("dispatch failed: {e}"),
        };
        // The future owns what it needs: the request buffer can go.
        drop(args);
        tasks.push(tokio::spawn(future));
    }
    for (id, task) in (0..32u64).zip(tasks) {
        let frame = match task.await {
            Ok(Ok(frame)) => frame,
            other => panic!("call {id} failed: {other:?}"),
        };
        assert_eq!(frame[6..14], id.to_be_bytes());
        let user: User = decode(kind, &frame[HEADER_LEN..]);
        assert_eq!(user.id, id);
    }
    // `from_arc` serves the caller's instance, and clones share it.
    assert_eq!(users.calls.load(Ordering::SeqCst), 32);
    let server = UserServiceServer::from_arc(users.clone());
    assert!(Arc::ptr_eq(server.clone().service(), &users));
}

#[tokio::test]
async fn the_rewritten_trait_is_callable_directly() {
    let users = Users::default();
    assert_eq!(users.add(1, 2, 3).await, 6);
    assert_eq!(
        users.rename(users.get_user(1).await, String::new()).await,
        Err(AppError::EmptyName)
    );
    users.ping().await;
    assert_send(&users.get_user(1));
    assert_send(&users.ping());
}

#[tokio::test]
async fn client_over_an_empty_memory_registry() {
    let config = RpcConfig::from_toml_str(
        "[registry]\ntype = \"memory\"\naddress = \"service-macro-test\"\ntimeout_ms = 200\n",
        "test",
    );
    let config = match config {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let client = match UserServiceClient::from_config(&config).await {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(client.service_client().service_key(), "UserService:1.0");
    let again = UserServiceClient::from_service_client(client.service_client().clone());
    assert_eq!(again.service_client().service_key(), "UserService:1.0");

    let called = tokio::time::timeout(Duration::from_secs(10), client.get_user(1)).await;
    match called {
        Ok(Err(RpcError::NoProvider { service })) => assert_eq!(service, "UserService:1.0"),
        other => panic!("expected NoProvider, got {other:?}"),
    }
}

/// Never called: pins the generated client's signatures at compile time.
#[allow(dead_code, deprecated)]
async fn client_signatures(consumer: &rpc::Consumer, config: &RpcConfig, user: User) {
    let client: UserServiceClient = UserServiceClient::new(consumer);
    let _: Result<UserServiceClient, RpcError> = UserServiceClient::from_config(config).await;
    let _: &rpc::ServiceClient = client.service_client();
    let _: UserServiceClient = UserServiceClient::from_service_client(consumer.service("x", "1"));

    let get = client.get_user(1);
    // Clients are used from spawned tasks.
    assert_send(&get);
    let _: Result<User, RpcError> = get.await;
    let _: Result<Result<User, AppError>, RpcError> = client.rename(user, "n".into()).await;
    let _: Result<(), RpcError> = client.ping().await;
    let _: Result<i32, RpcError> = client.add(1, 2, 3).await;
    let _: Result<String, RpcError> = client.r#type().await;
    let _: Result<User, RpcError> = client.old_get_user(1).await;

    let hygiene: HygieneClient = HygieneClient::new(consumer);
    let _: Result<u32, RpcError> = hygiene.sum(1, 2, S(3), 4, 5, 6).await;
}
