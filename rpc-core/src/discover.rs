//! The discovering half of the registry seam.

use std::any::Any;
use std::fmt;
use std::future::Future;

use tokio::sync::mpsc;

use crate::error::RegistryError;
use crate::meta::ServiceMetaInfo;

/// Capacity of a watch channel; a slow consumer back-pressures the backend.
pub const WATCH_CHANNEL_CAPACITY: usize = 64;

/// Finds provider instances and follows their changes.
pub trait Discover: Send + Sync + 'static {
    /// The instances currently registered under `service_key` (`name:version`).
    /// An unknown service is an empty list, not an error.
    fn discover(
        &self,
        service_key: &str,
    ) -> impl Future<Output = Result<Vec<ServiceMetaInfo>, RegistryError>> + Send;

    /// Every service key (`name:version`) the registry has entries for,
    /// sorted, each once: what an operator lists (`rpc services`). It may
    /// include a service whose last instance just left (ZooKeeper keeps the
    /// service's persistent node), so a key here can [`discover`] empty.
    /// Records that are not ours (other Nacos or Consul clients) count when
    /// discovery would also list them.
    ///
    /// [`discover`]: Discover::discover
    fn services(&self) -> impl Future<Output = Result<Vec<String>, RegistryError>> + Send;

    /// Follows `service_key`. The first event is a [`WatchEvent::Snapshot`];
    /// then changes, in order. Dropping the [`Watch`] stops the backend's work.
    fn watch(&self, service_key: &str)
    -> impl Future<Output = Result<Watch, RegistryError>> + Send;
}

/// One change to a service's instance list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The complete list (first event, and after any resynchronisation).
    /// Consumers diff it against what they hold.
    Snapshot(Vec<ServiceMetaInfo>),
    /// An instance appeared or its record changed.
    Upsert(ServiceMetaInfo),
    /// The instance with this node key (`name:version/host:port`) went away.
    Remove(String),
    /// The backend lost (`false`) or regained (`true`) its registry
    /// connection. No list change is implied: consumers keep what they have.
    Connected(bool),
}

/// A stream of [`WatchEvent`]s for one service.
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl Watch {
    /// A watch fed by `rx`. The backend task should stop when `rx` is dropped
    /// (`Sender::closed`).
    pub fn new(rx: mpsc::Receiver<WatchEvent>) -> Self {
        Self { rx, _guard: None }
    }

    /// A watch that also owns `guard`, dropped with it (e.g. a task handle
    /// that aborts on drop).
    pub fn with_guard(rx: mpsc::Receiver<WatchEvent>, guard: impl Any + Send + Sync) -> Self {
        Self {
            rx,
            _guard: Some(Box::new(guard)),
        }
    }

    /// The next event; `None` once the backend has stopped.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}
