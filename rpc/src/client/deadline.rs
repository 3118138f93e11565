//! The deadline layer: fixes the call's timeout and deadline once, and
//! brings in the deadline and metadata of the call being served.

use std::sync::Arc;
use std::time::Duration;

use rpc_core::{Context, RpcError};
use rpc_transport::RawReply;

use rpc_core::context::{MAX_TIMEOUT, deadline_after};

use super::{Call, ClientContext};

/// Outermost built-in layer. The call's timeout is, by precedence, the
/// per-call option, then `[client.services."S"].timeout_ms`, then the
/// method's `#[rpc(timeout_ms)]`, then `[client].timeout_ms`. A call made
/// while a handler runs (`Context::current()` is set) then takes the
/// smaller of that and what is left of the incoming call's deadline, as
/// tarpc does, and passes on the incoming metadata under the
/// [`rpc_core::context::PROPAGATE`] keys and `[client].propagate_metadata`
/// (keys the call sets itself win). The deadline still travels as time
/// remaining, so no clocks are compared across hosts.
#[derive(Debug)]
pub struct Deadline<S> {
    inner: S,
    timeout: Duration,
    service_timeout: Option<Duration>,
    propagate: Arc<[String]>,
}

impl<S> Deadline<S> {
    /// Around `inner`, with the configured default and per-service
    /// timeouts, propagating `propagate` besides the standard keys.
    pub fn new(
        inner: S,
        timeout: Duration,
        service_timeout: Option<Duration>,
        propagate: Arc<[String]>,
    ) -> Self {
        Self {
            inner,
            timeout,
            service_timeout,
            propagate,
        }
    }
}

impl<S: Call> Call for Deadline<S> {
    async fn call(&self, cx: &mut ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError> {
        let mut timeout = cx
            .options
            .and_then(|o| o.timeout)
            .or(self.service_timeout)
            .or(cx.method.timeout)
            .unwrap_or(self.timeout)
            // Longer means "no particular deadline"; it keeps sums of
            // instants and durations from overflowing.
            .min(MAX_TIMEOUT);
        // One thread-local read; nothing copied unless the incoming call
        // carries a key to pass on.
        let incoming = Context::with_current(|inc| {
            let md = if inc.metadata().is_empty() {
                None
            } else {
                Some(inc.metadata().propagated(&self.propagate))
            };
            (inc.deadline(), md)
        });
        if let Some((incoming_deadline, md)) = incoming {
            if let Some(md) = md.filter(|md| !md.is_empty()) {
                cx.metadata.to_mut().merge_missing(&md);
            }
            if let Some(d) = incoming_deadline {
                let left = d.saturating_duration_since(cx.started);
                if left < timeout {
                    timeout = left;
                }
                if left.is_zero() {
                    return Err(RpcError::Timeout {
                        service: cx.service.to_owned(),
                        method: cx.method.name.to_owned(),
                        timeout,
                    });
                }
            }
        }
        cx.timeout = timeout;
        cx.deadline = deadline_after(cx.started, timeout);
        cx.remaining = timeout;
        self.inner.call(cx, args).await
    }
}
