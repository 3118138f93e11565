//! What the backends share, so that each fix lands once.
//!
//! * `diff`: the events between two instance lists (local, Consul, Nacos).
//! * `follow`: a follower's side of a watch: events, connection state,
//!   pauses, whole lists delivered as snapshots or changes.
//! * `fs`: files written whole (temp file, then rename).
//! * `keeper`: the command protocol of the backends' keeper tasks (etcd,
//!   ZooKeeper, Consul, Nacos) and deregistration through it.
//! * `task`: abort-on-drop ownership of spawned tasks.
//! * `tls`: reading the `registry.tls` files (etcd, ZooKeeper, Consul).
//! * `skip`: a skipped registry entry is logged once, with why.
//! * [`sleep_until_opt`]: a timer arm of `select!` that may be unset.
//! * `backend_errors!`: a backend's error constructors, bound to its name.
//!
//! Reconnect backoff is `rpc_core::backoff::Backoff` (jittered), shared
//! with the transport.

pub(crate) mod diff;
#[cfg(any(
    feature = "etcd",
    feature = "zookeeper",
    feature = "consul",
    feature = "nacos"
))]
pub(crate) mod follow;
pub(crate) mod fs;
#[cfg(any(
    feature = "etcd",
    feature = "zookeeper",
    feature = "consul",
    feature = "nacos"
))]
pub(crate) mod keeper;
#[cfg(any(feature = "etcd", feature = "consul"))]
pub(crate) mod skip;
pub(crate) mod task;
#[cfg(any(feature = "etcd", feature = "zookeeper", feature = "consul"))]
pub(crate) mod tls;

use tokio::time::Instant;

/// Defines a backend's `invalid(key, message)` (a `[registry]` setting it
/// cannot use: `registry.{key}`), `failed(message)` (unavailable, no source)
/// and `timed_out(what, after)`, bound to its name `$backend`. A macro
/// rather than a type so call sites stay short; each backend keeps its own
/// `unavailable`, which maps its client's errors to kinds.
#[cfg(any(
    feature = "etcd",
    feature = "zookeeper",
    feature = "consul",
    feature = "nacos"
))]
macro_rules! backend_errors {
    ($backend:expr) => {
        #[allow(dead_code)]
        fn invalid(key: &str, message: impl Into<String>) -> rpc_core::RegistryError {
            rpc_core::RegistryError::invalid_config($backend, key, message)
        }

        #[allow(dead_code)]
        fn failed(message: impl Into<String>) -> rpc_core::RegistryError {
            rpc_core::RegistryError::unavailable_because($backend, message)
        }

        fn timed_out(what: &str, after: std::time::Duration) -> rpc_core::RegistryError {
            rpc_core::RegistryError::timed_out($backend, what, after)
        }
    };
}
#[cfg(any(
    feature = "etcd",
    feature = "zookeeper",
    feature = "consul",
    feature = "nacos"
))]
pub(crate) use backend_errors;

/// Sleeps until `at`, or forever when there is no `at`: the arm of a
/// `select!` loop whose timer is not always armed.
pub(crate) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
