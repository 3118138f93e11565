//! What backends with a keeper task share: one task owns the lease, session
//! or connection and every registration made through it, and takes commands
//! over a bounded channel. A [`Registration`](rpc_core::Registration) of such
//! a backend deregisters by asking that task.

use std::time::Duration;

use rpc_core::{BoxFuture, Deregister, RegistryError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// Where a keeper answers a command.
pub(crate) type Reply = oneshot::Sender<Result<(), RegistryError>>;

/// Deregisters `key` through the keeper task behind `commands`; `make`
/// builds the backend's deregister command.
pub(crate) struct KeeperDeregister<C> {
    pub(crate) key: String,
    pub(crate) commands: mpsc::Sender<C>,
    pub(crate) timeout: Duration,
    pub(crate) backend: &'static str,
    pub(crate) make: fn(String, Option<Reply>) -> C,
}

impl<C: Send + 'static> Deregister for KeeperDeregister<C> {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        Box::pin(async move {
            let (done, rx) = oneshot::channel();
            if self
                .commands
                .send((self.make)(self.key, Some(done)))
                .await
                .is_err()
            {
                // The keeper is gone, and everything it kept with it (lease
                // revoked, session closed, instances deregistered).
                return Ok(());
            }
            timeout(self.timeout, rx)
                .await
                .map_err(|_| RegistryError::Unavailable {
                    backend: self.backend,
                    message: format!("deregister timed out after {:?}", self.timeout),
                    source: None,
                })?
                .unwrap_or(Ok(()))
        })
    }

    fn deregister_on_drop(self: Box<Self>) {
        let cmd = (self.make)(self.key, None);
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.commands.try_send(cmd) {
            // A burst of drops: hand the send to the runtime rather than lose it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let commands = self.commands.clone();
                rt.spawn(async move {
                    let _ = commands.send(cmd).await;
                });
            }
        }
    }
}
