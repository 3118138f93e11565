//! Per-call options: `client.with(CallOptions::new().timeout(..))`.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use rpc_core::Metadata;

/// Options for the calls of one proxy value, set without rebuilding
/// anything: `client.with(options)` returns a proxy that shares the
/// original's connections, instance set, balancer, retry budget and
/// outlier state, and differs only in these. Unset fields keep the
/// configured behaviour.
///
/// ```ignore
/// let reply = users
///     .with(CallOptions::new().timeout(Duration::from_millis(200)).metadata("tenant", "acme"))
///     .get_user(7)
///     .await?;
/// ```
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) metadata: Metadata,
    pub(crate) hash_key: Option<u64>,
}

impl CallOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// The call's timeout: it wins over `rpc.toml` and `#[rpc(timeout_ms)]`
    /// (the README's precedence table). Still capped by what is left of
    /// the deadline of a call being served.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends `key: value` with the call (text; see [`Metadata::insert`]).
    pub fn metadata(
        mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Sends binary metadata (the key gets a `-bin` suffix).
    pub fn metadata_bin(
        mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<Bytes>,
    ) -> Self {
        self.metadata.insert_bin(key, value);
        self
    }

    /// Replaces the metadata sent with the call.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The consistent-hash key (bytes of a user id, a session): calls with
    /// the same key go to the same instance under `consistent_hash`.
    /// Without one, the key is a hash of the method and its arguments.
    pub fn hash_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.hash_key = Some(super::balance::key_hash(key.as_ref()));
        self
    }

    /// These options with `other`'s set fields on top (metadata merged,
    /// `other`'s keys winning).
    pub(crate) fn merged(&self, other: CallOptions) -> CallOptions {
        let mut metadata = other.metadata;
        metadata.merge_missing(&self.metadata);
        CallOptions {
            timeout: other.timeout.or(self.timeout),
            metadata,
            hash_key: other.hash_key.or(self.hash_key),
        }
    }
}
