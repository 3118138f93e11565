//! What a call carries down the client stack.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use rpc_core::Metadata;
use tokio::time::Instant;

use super::balance::{Instance, Tried};
use super::discover::Versioned;
use super::options::CallOptions;

/// What `#[service]` knows about a method: its wire name and attributes
/// (`#[rpc(idempotent, timeout_ms = ..)]`). Generated clients pass one per
/// call; [`MethodInfo::new`] has no attributes. The name borrows for `'a`:
/// `'static` in generated clients, any string for generic invocation
/// ([`ServiceClient::call_generic`](super::service::ServiceClient::call_generic)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodInfo<'a> {
    /// The wire name.
    pub name: &'a str,
    /// `#[rpc(idempotent)]`: fail-over may retry it after any provider
    /// failure (also when the call may have run).
    pub idempotent: bool,
    /// `#[rpc(timeout_ms = ..)]`: its default timeout.
    pub timeout: Option<Duration>,
}

impl<'a> MethodInfo<'a> {
    /// A method without attributes.
    pub const fn new(name: &'a str) -> Self {
        Self {
            name,
            idempotent: false,
            timeout: None,
        }
    }
}

/// One call on its way down the stack (module docs of [`crate::client`]).
///
/// User layers read the service, method, deadline and attempt, and read or
/// add [`metadata`](Self::metadata_mut). The built-in layers keep their
/// per-call state here (crate-private), so the layers themselves are
/// shared and immutable. The stack allocates nothing per call of its own;
/// metadata set with per-call options is borrowed, and copied only when a
/// layer adds to it (or a nested call merges propagated keys in).
#[derive(Debug)]
pub struct ClientContext<'a> {
    pub(crate) service: &'a str,
    pub(crate) method: MethodInfo<'a>,
    pub(crate) options: Option<&'a CallOptions>,
    pub(crate) metadata: Cow<'a, Metadata>,
    /// When the call started: the one clock read of a call that succeeds at once.
    pub(crate) started: Instant,
    pub(crate) timeout: Duration,
    pub(crate) deadline: Instant,
    pub(crate) attempt: u32,
    /// When the current attempt started, and its time left.
    pub(crate) attempt_start: Instant,
    pub(crate) remaining: Duration,
    /// Whether the call waited for a provider to be listed.
    pub(crate) waited: bool,
    pub(crate) hash_key: Option<u64>,
    pub(crate) set: Option<Arc<Versioned>>,
    pub(crate) tried: Tried,
    pub(crate) picked: Option<usize>,
    pub(crate) probe: bool,
    /// Whether `Outlier` recorded the attempt's outcome (a probe that an
    /// attempt layer cut short must give its slot back).
    pub(crate) recorded: bool,
}

impl<'a> ClientContext<'a> {
    /// A context for a call of `method` on `service`, starting now with
    /// `timeout` (the [`Deadline`](super::Deadline) layer settles the
    /// final timeout and deadline).
    pub fn new(service: &'a str, method: MethodInfo<'a>, timeout: Duration) -> Self {
        let started = Instant::now();
        Self {
            deadline: rpc_core::context::deadline_after(started, timeout),
            service,
            method,
            options: None,
            metadata: Cow::Borrowed(Metadata::empty()),
            started,
            timeout,
            attempt: 0,
            attempt_start: started,
            remaining: timeout,
            waited: false,
            hash_key: None,
            set: None,
            tried: Tried::default(),
            picked: None,
            probe: false,
            recorded: false,
        }
    }

    pub(crate) fn with_options(mut self, options: Option<&'a CallOptions>) -> Self {
        if let Some(o) = options {
            self.metadata = Cow::Borrowed(&o.metadata);
            self.hash_key = o.hash_key;
        }
        self.options = options;
        self
    }

    /// `name:version` of the service called.
    pub fn service(&self) -> &str {
        self.service
    }

    /// The method's wire name.
    pub fn method(&self) -> &str {
        self.method.name
    }

    /// The method's attributes.
    pub fn method_info(&self) -> &MethodInfo<'a> {
        &self.method
    }

    /// The metadata sent with the call.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The metadata, to add to (a token, a trace id).
    /// (Copies borrowed per-call metadata on the first change.)
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        self.metadata.to_mut()
    }

    /// The call's timeout (after per-call options, configuration, method
    /// attributes and an incoming deadline have had their say).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// When the call gives up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The attempt number, 0 for the first.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Time left for the current attempt when it started.
    pub fn attempt_remaining(&self) -> Duration {
        self.remaining
    }

    /// The instance picked for the current attempt (below `LoadBalance`).
    pub fn instance(&self) -> Option<&Instance> {
        let set = self.set.as_ref()?;
        set.set.instances.get(self.picked?)
    }
}
