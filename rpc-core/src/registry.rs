//! The registering half of the registry seam.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use crate::error::RegistryError;
use crate::meta::ServiceMetaInfo;

/// A boxed, sendable future, as returned by object-safe backend hooks.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Publishes provider instances.
///
/// `register` returns a [`Registration`] that keeps the instance alive
/// (heartbeats, leases, sessions are the backend's business) until it is
/// dropped or explicitly deregistered. A backend that loses the registration
/// (lease expired, session expired, server restarted) re-registers by itself
/// and reports it through [`Registration::state`].
pub trait Registry: Send + Sync + 'static {
    /// Publishes `meta` and keeps it published until the handle goes.
    fn register(
        &self,
        meta: ServiceMetaInfo,
    ) -> impl Future<Output = Result<Registration, RegistryError>> + Send;
}

/// Where a registration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistrationState {
    /// Published. `generation` counts how many times the backend had to
    /// publish it again after losing it (0 for the first publication).
    Registered {
        /// Re-registrations so far.
        generation: u64,
    },
    /// The backend lost the registration and is trying to publish it again.
    Reregistering,
    /// Removed on request; nothing keeps it alive any more.
    Deregistered,
}

/// Backend hook behind a [`Registration`]: how to remove the instance.
pub trait Deregister: Send + Sync + 'static {
    /// Removes the instance and waits for the registry to confirm.
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>>;
    /// Removes the instance without waiting (called from `Drop`; must not block).
    fn deregister_on_drop(self: Box<Self>);
}

/// A published instance. Dropping it deregisters (best effort, in the
/// background); [`Registration::deregister`] does it and waits.
#[must_use = "dropping a Registration deregisters the instance"]
pub struct Registration {
    meta: ServiceMetaInfo,
    state: watch::Receiver<RegistrationState>,
    guard: Option<Box<dyn Deregister>>,
}

impl Registration {
    /// Wraps a backend's registration.
    pub fn new(
        meta: ServiceMetaInfo,
        state: watch::Receiver<RegistrationState>,
        guard: impl Deregister,
    ) -> Self {
        Self {
            meta,
            state,
            guard: Some(Box::new(guard)),
        }
    }

    /// The published record.
    pub fn meta(&self) -> &ServiceMetaInfo {
        &self.meta
    }

    /// Follows the registration's state (re-registrations, loss).
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Removes the instance from the registry and waits for it.
    pub async fn deregister(mut self) -> Result<(), RegistryError> {
        match self.guard.take() {
            Some(guard) => guard.deregister().await,
            None => Ok(()),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            guard.deregister_on_drop();
        }
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("node", &self.meta.node_key())
            .field("state", &*self.state.borrow())
            .finish()
    }
}
