//! [`ServiceClient`]: the untyped proxy for one service, generic over its
//! call stack.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rpc_core::{CallPolicy, FaultTolerance, RpcError, SerializerKind};
use rpc_transport::{Endpoint, RawReply, encode_args_sized};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

use super::balance::{self, Tried};
use super::discover::Route;
use super::retry::RetryBudget;
use super::{Call, CallOptions, ClientContext, DefaultStack, MethodInfo};

/// Builds the same client again with another policy (`with_policy`).
type Rebuild<S> = Box<dyn Fn(&str, &str, CallPolicy) -> ServiceClient<S> + Send + Sync>;

pub(crate) struct ClientInner<S> {
    pub(crate) stack: S,
    pub(crate) service_key: String,
    pub(crate) policy: CallPolicy,
    /// Typical encoded argument size (a power of two), to size buffers.
    pub(crate) args_hint: AtomicUsize,
    pub(crate) route: Option<Arc<Route>>,
    pub(crate) budget: Option<Arc<RetryBudget>>,
    pub(crate) rebuild: Option<Rebuild<S>>,
}

/// A proxy for one service; generated clients wrap it.
///
/// `S` is the call stack ([`crate::client`] docs): [`DefaultStack`] for a
/// plain consumer's clients, something else for a consumer with layers or
/// for a test driving a stub ([`ServiceClient::from_stack`]). Cheap to
/// clone: clones (and [`with`](Self::with) copies) share the stack and its
/// state: instance set, balancer, retry budget, connections.
pub struct ServiceClient<S = DefaultStack> {
    inner: Arc<ClientInner<S>>,
    options: Option<Arc<CallOptions>>,
}

impl<S> Clone for ServiceClient<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            options: self.options.clone(),
        }
    }
}

impl<S> fmt::Debug for ServiceClient<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClient")
            .field("service", &self.inner.service_key)
            .field("policy", &self.inner.policy)
            .field("options", &self.options)
            .finish()
    }
}

impl<S> ServiceClient<S> {
    pub(crate) fn from_inner(inner: ClientInner<S>) -> Self {
        Self {
            inner: Arc::new(inner),
            options: None,
        }
    }

    /// A client of `service_key` (`name:version`) over any stack, with no
    /// consumer or registry behind it: for tests that drive a stub, and
    /// for custom transports. `policy` gives the default timeout, the
    /// serializer and fail-safe defaults; `instances`, `next_endpoint` and
    /// `with_policy` report that there is no registry. Timeouts (per-call,
    /// per-method, propagated) are applied by a [`Deadline`](super::Deadline)
    /// layer: a stack without one sees only `policy.timeout`.
    pub fn from_stack(service_key: impl Into<String>, policy: CallPolicy, stack: S) -> Self {
        Self::from_inner(ClientInner {
            stack,
            service_key: service_key.into(),
            policy,
            args_hint: AtomicUsize::new(128),
            route: None,
            budget: None,
            rebuild: None,
        })
    }

    /// `name:version` of the service.
    pub fn service_key(&self) -> &str {
        &self.inner.service_key
    }

    /// The policy calls use.
    pub fn policy(&self) -> &CallPolicy {
        &self.inner.policy
    }

    /// The call stack.
    pub fn stack(&self) -> &S {
        &self.inner.stack
    }

    /// The per-call options this proxy sends with.
    pub fn options(&self) -> Option<&CallOptions> {
        self.options.as_deref()
    }

    /// This proxy with `options` for its calls (on top of any it already
    /// has). Shares everything else; costs one allocation here and none per
    /// call (the options' metadata is borrowed by each call).
    pub fn with(&self, options: CallOptions) -> Self {
        let options = match &self.options {
            Some(o) => o.merged(options),
            None => options,
        };
        Self {
            inner: self.inner.clone(),
            options: Some(Arc::new(options)),
        }
    }

    /// A proxy whose calls have another timeout: `with(CallOptions::new().timeout(..))`.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        self.with(CallOptions::new().timeout(timeout))
    }

    /// Whether `other` shares this proxy's stack and state (it is a clone
    /// or a [`with`](Self::with) copy).
    pub fn shares_stack_with(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The retry budget calls draw from (for stats and tests).
    #[doc(hidden)]
    pub fn retry_budget(&self) -> Option<&RetryBudget> {
        self.inner.budget.as_deref()
    }

    fn no_registry(&self) -> RpcError {
        RpcError::NoProvider {
            service: self.inner.service_key.clone(),
        }
    }

    /// A proxy with another policy: a stack of its own (a fresh instance
    /// set, balancer and retry budget; the same connections). A changed
    /// `policy.timeout` is this service's timeout from then on: it wins over
    /// `#[rpc(timeout_ms)]` and the configured one, as
    /// `[client.services."S"].timeout_ms` would. Fails with `NoProvider`
    /// for a client built with [`from_stack`](Self::from_stack).
    pub fn with_policy(&self, mut policy: CallPolicy) -> Result<Self, RpcError> {
        if policy.timeout != self.inner.policy.timeout {
            policy.service_timeout = Some(policy.timeout);
        }
        let Some(rebuild) = &self.inner.rebuild else {
            return Err(self.no_registry());
        };
        let key = rpc_core::ServiceKey::parse(&self.inner.service_key);
        let mut fresh = rebuild(key.name(), key.version(), policy);
        fresh.options = self.options.clone();
        Ok(fresh)
    }

    /// A proxy that encodes with another serializer (see [`with_policy`](Self::with_policy)).
    pub fn with_serializer(&self, serializer: SerializerKind) -> Result<Self, RpcError> {
        self.with_policy(CallPolicy {
            serializer,
            ..self.inner.policy.clone()
        })
    }

    /// The providers currently known for this service, in node-key order.
    pub async fn instances(&self) -> Result<Arc<Vec<rpc_core::ServiceMetaInfo>>, RpcError> {
        let Some(route) = &self.inner.route else {
            return Err(self.no_registry());
        };
        Ok(route.handle().await?.instances())
    }

    /// The endpoint the next call would go to: discovery lookup and load
    /// balancing exactly as a call does them (ejected instances skipped),
    /// without the call. It does not take an ejected instance's single probe
    /// slot, since it reports no outcome. For debugging, and for measuring
    /// that hot path (it takes no lock and allocates nothing).
    pub async fn next_endpoint(&self) -> Result<Arc<Endpoint>, RpcError> {
        let Some(route) = &self.inner.route else {
            return Err(self.no_registry());
        };
        let versioned = route.instances().await?;
        let set = &versioned.set;
        let idx = balance::pick(&*route.balancer, set, 0, Tried::default())
            .ok_or_else(|| self.no_registry())?;
        Ok(Arc::clone(&set.instances[idx].endpoint))
    }
}

impl<S: Call> ServiceClient<S> {
    /// Calls `method` (a wire name, no attributes) with the argument tuple
    /// `args`; see [`call_method`](Self::call_method).
    pub async fn call<A, R>(&self, method: &str, args: &A) -> Result<R, RpcError>
    where
        A: Serialize + Sync + ?Sized,
        R: DeserializeOwned,
    {
        self.call_method(MethodInfo::new(method), args).await
    }

    /// Calls `method` with the argument tuple `args` through the whole
    /// stack, decoding the reply. Under `fail_safe`, a failure returns the
    /// method's configured default instead, if it has one.
    pub async fn call_method<A, R>(&self, method: MethodInfo<'_>, args: &A) -> Result<R, RpcError>
    where
        A: Serialize + Sync + ?Sized,
        R: DeserializeOwned,
    {
        let inner = &*self.inner;
        let policy = &inner.policy;
        let key = &inner.service_key;
        let name = method.name;
        // Size the buffer for what this service's calls usually take.
        let hint = inner.args_hint.load(Ordering::Relaxed);
        let outcome = match encode_args_sized(policy.serializer, args, key, name, hint) {
            Ok(encoded) => {
                if encoded.len() > hint || encoded.len() * 4 < hint {
                    inner
                        .args_hint
                        .store(encoded.len().next_power_of_two(), Ordering::Relaxed);
                }
                self.call_raw_method(method, &encoded).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(reply) => reply.decode(key, name),
            Err(e) => fail_safe(policy, key, name, e),
        }
    }

    /// Generic invocation: calls `method`, a name known only at run time,
    /// without the service's Rust types. `args` is the argument list, each
    /// argument as JSON (an empty list for a method without arguments); the
    /// reply comes back as JSON. The provider decodes the arguments into its
    /// own types, so a wrong count or shape is a `bad request` or
    /// `serialization failure` status from it, an unknown method a
    /// `method not found`.
    ///
    /// Needs a client that uses the JSON serializer
    /// ([`Consumer::generic_service`](super::consumer::Consumer::generic_service));
    /// any other fails with [`RpcError::Config`] before anything is sent.
    /// Goes through the whole stack (deadline, discovery, retry, balancing).
    /// `serde_json` is not re-exported (a re-export makes rustc spell
    /// `String` as `std::string::String` in every user's diagnostics):
    /// depend on `serde_json` 1 to build the values.
    /// A method's own `Result` comes back as JSON too: `{"Ok": ..}` or
    /// `{"Err": ..}` (serde's form).
    pub async fn call_generic(
        &self,
        method: &str,
        args: &[serde_json::Value],
    ) -> Result<serde_json::Value, RpcError> {
        if self.inner.policy.serializer != SerializerKind::Json {
            return Err(RpcError::Config(rpc_core::ConfigError::new(
                "generic invocation",
                "client.serializer",
                format!(
                    "generic invocation needs the json serializer, this client uses {}",
                    self.inner.policy.serializer.as_str()
                ),
            )));
        }
        let method = MethodInfo::new(method);
        if args.is_empty() {
            // The provider decodes a method without arguments as `()`,
            // which JSON writes as `null`, not as an empty list.
            self.call_method(method, &()).await
        } else {
            self.call_method(method, args).await
        }
    }

    /// The stack below encoding, for a method without attributes.
    pub async fn call_raw(&self, method: &str, args: &[u8]) -> Result<RawReply, RpcError> {
        self.call_raw_method(MethodInfo::new(method), args).await
    }

    /// The stack below encoding ([`crate::client`] docs). `args` is the
    /// argument tuple encoded with the policy's serializer.
    pub async fn call_raw_method(
        &self,
        method: MethodInfo<'_>,
        args: &[u8],
    ) -> Result<RawReply, RpcError> {
        let inner = &*self.inner;
        let mut cx = ClientContext::new(&inner.service_key, method, inner.policy.timeout)
            .with_options(self.options.as_deref());
        inner.stack.call(&mut cx, args).await
    }
}

/// The fail-safe step, outermost, where the return type is known: under
/// `fail_safe`, the method's configured default instead of the error.
fn fail_safe<R: DeserializeOwned>(
    policy: &CallPolicy,
    service: &str,
    method: &str,
    e: RpcError,
) -> Result<R, RpcError> {
    // A refusal by the provider's auth is an answer, not a failure to
    // paper over with a default.
    if policy.fault_tolerance != FaultTolerance::FailSafe
        || e.is_unauthenticated()
        || e.is_permission_denied()
    {
        return Err(e);
    }
    let Some(json) = policy.fail_safe.get(method) else {
        return Err(e);
    };
    match serde_json::from_str::<R>(json) {
        Ok(v) => {
            warn!(service, method, error = %crate::error::report(&e), "call failed: returning the fail-safe default");
            Ok(v)
        }
        Err(de) => {
            warn!(service, method, error = %de, "fail-safe default does not fit the return type");
            Err(e)
        }
    }
}
