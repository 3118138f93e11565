//! What backends with a keeper task share (etcd, ZooKeeper, Consul, Nacos):
//! one task owns the lease, session or connection and every registration
//! made through it, and takes [`Command`]s over a bounded channel. A
//! [`Registration`](rpc_core::Registration) of such a backend deregisters by
//! asking that task ([`KeeperDeregister`]).

use rpc_core::{RegistrationState, RegistryError};
use tokio::sync::{oneshot, watch};

#[cfg(any(feature = "etcd", feature = "zookeeper", feature = "nacos"))]
pub(crate) use deregister::KeeperDeregister;

/// Where a keeper answers a command.
pub(crate) type Reply = oneshot::Sender<Result<(), RegistryError>>;

/// What a keeper task is asked to do. `R` is the backend's registration
/// request (key and record, in whatever form it publishes them).
pub(crate) enum Command<R> {
    Register {
        request: R,
        state: watch::Sender<RegistrationState>,
        done: Reply,
    },
    Deregister {
        key: String,
        done: Option<Reply>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Hands a registration `request` to the keeper behind `commands` and waits
/// up to `wait` for it to be published. The returned receiver follows the
/// registration from then on (re-registrations, loss).
pub(crate) async fn submit_registration<R>(
    commands: &tokio::sync::mpsc::Sender<Command<R>>,
    request: R,
    wait: std::time::Duration,
    backend: &'static str,
) -> Result<watch::Receiver<RegistrationState>, RegistryError> {
    let (state, state_rx) = watch::channel(RegistrationState::Reregistering);
    let (done, rx) = oneshot::channel();
    commands
        .send(Command::Register {
            request,
            state,
            done,
        })
        .await
        .map_err(|_| RegistryError::Shutdown)?;
    tokio::time::timeout(wait, rx)
        .await
        .map_err(|_| RegistryError::timed_out(backend, "register", wait))?
        .map_err(|_| RegistryError::Shutdown)??;
    Ok(state_rx)
}

/// Asks the keeper to shut down (deregister everything it keeps) and
/// waits for it, at most `limit`; a keeper already gone is shut down.
pub(crate) async fn shutdown<R>(
    commands: &tokio::sync::mpsc::Sender<Command<R>>,
    limit: std::time::Duration,
) {
    let (done, rx) = oneshot::channel();
    if commands.send(Command::Shutdown { done }).await.is_ok() {
        let _ = tokio::time::timeout(limit, rx).await;
    }
}

/// What a keeper task does for each [`Command`]; [`serve`] drives it.
#[cfg(any(feature = "etcd", feature = "zookeeper", feature = "consul"))]
pub(crate) trait Keeps<R> {
    /// Publishes a registration and keeps it; `state` follows it from then on.
    async fn keep(
        &mut self,
        request: R,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError>;
    /// Stops keeping `key` and removes it.
    async fn release(&mut self, key: &str) -> Result<(), RegistryError>;
    /// Removes everything kept (shutdown, or every handle dropped).
    async fn release_all(&mut self);
}

/// Carries out one command (`None`: every handle is gone). Returns `false`
/// once the keeper is finished: everything released and, after an explicit
/// shutdown, every later command answered until the last handle dropped.
#[cfg(any(feature = "etcd", feature = "zookeeper", feature = "consul"))]
pub(crate) async fn serve<R, K: Keeps<R>>(
    keeper: &mut K,
    cmd: Option<Command<R>>,
    commands: &mut tokio::sync::mpsc::Receiver<Command<R>>,
) -> bool {
    match cmd {
        Some(Command::Register {
            request,
            state,
            done,
        }) => {
            let _ = done.send(keeper.keep(request, state).await);
            true
        }
        Some(Command::Deregister { key, done }) => {
            let r = keeper.release(&key).await;
            if let Some(done) = done {
                let _ = done.send(r);
            }
            true
        }
        Some(Command::Shutdown { done }) => {
            keeper.release_all().await;
            let _ = done.send(());
            answer_after_shutdown(commands).await;
            false
        }
        None => {
            keeper.release_all().await;
            false
        }
    }
}

#[cfg(any(feature = "etcd", feature = "zookeeper", feature = "consul"))]
/// For a keeper that has shut down (everything it kept is gone): answers
/// commands until every handle is dropped. Registrations are refused;
/// deregistrations and further shutdowns succeed, there being nothing left.
async fn answer_after_shutdown<R>(commands: &mut tokio::sync::mpsc::Receiver<Command<R>>) {
    while let Some(cmd) = commands.recv().await {
        match cmd {
            Command::Register { done, .. } => {
                let _ = done.send(Err(RegistryError::Shutdown));
            }
            Command::Deregister { done, .. } => {
                if let Some(done) = done {
                    let _ = done.send(Ok(()));
                }
            }
            Command::Shutdown { done } => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(any(feature = "etcd", feature = "zookeeper", feature = "nacos"))]
mod deregister {
    use std::time::Duration;

    use rpc_core::{BoxFuture, Deregister, RegistryError};
    use tokio::sync::{mpsc, oneshot};
    use tokio::time::timeout;

    use super::Command;

    /// Deregisters `key` through the keeper task behind `commands`.
    pub(crate) struct KeeperDeregister<R> {
        pub(crate) key: String,
        pub(crate) commands: mpsc::Sender<Command<R>>,
        pub(crate) timeout: Duration,
        pub(crate) backend: &'static str,
    }

    impl<R: Send + 'static> Deregister for KeeperDeregister<R> {
        fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
            Box::pin(async move {
                let (done, rx) = oneshot::channel();
                if self
                    .commands
                    .send(Command::Deregister {
                        key: self.key,
                        done: Some(done),
                    })
                    .await
                    .is_err()
                {
                    // The keeper is gone, and everything it kept with it (lease
                    // revoked, session closed, instances deregistered).
                    return Ok(());
                }
                timeout(self.timeout, rx)
                    .await
                    .map_err(|_| {
                        RegistryError::timed_out(self.backend, "deregister", self.timeout)
                    })?
                    .unwrap_or(Ok(()))
            })
        }

        fn deregister_on_drop(self: Box<Self>) {
            let cmd = Command::Deregister {
                key: self.key,
                done: None,
            };
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
}
