//! A service followed for one watch: breaks reported, rechecks, diffs. The
//! empty-push policy is the cache's (`cache::protection`); this file only
//! reports what it saw.

use super::*;
use crate::support::follow::Emitter;

/// Follows one service for one watch.
pub(super) struct Follower {
    pub(super) discovery: Arc<Discovery>,
    pub(super) health: watch::Receiver<Health>,
    /// `Health::reconnects` as last handled: a higher count is a break,
    /// even if this watch never saw the connection down.
    pub(super) reconnects: u64,
    pub(super) key: String,
    /// The Nacos service name.
    pub(super) service: String,
    pub(super) emit: Emitter,
    pub(super) pokes: watch::Receiver<u64>,
    /// What the consumer holds, by node key.
    pub(super) current: BTreeMap<String, ServiceMetaInfo>,
    /// When to read the service again (after a failure or a held empty list).
    pub(super) recheck_at: Option<Instant>,
    pub(super) backoff: Backoff,
    /// Until when to read the service every second whatever happens: after
    /// (re)subscribing, until the server surely pushes to this client again.
    pub(super) settle_until: Instant,
    pub(super) _guard: SubscriptionGuard,
}

impl Follower {
    pub(super) async fn run(mut self) {
        self.pokes.mark_unchanged();
        self.health.mark_unchanged();
        loop {
            let recheck_at = self.recheck_at;
            let open = tokio::select! {
                _ = self.emit.closed() => return,
                r = self.pokes.changed() => match r {
                    Ok(()) => self.refresh().await,
                    Err(_) => return,
                },
                r = self.health.changed() => match r {
                    Ok(()) => {
                        let h = *self.health.borrow_and_update();
                        let reconnected = std::mem::replace(&mut self.reconnects, h.reconnects) != h.reconnects;
                        if h.up && reconnected && self.emit.connected() {
                            // The break came and went between two looks at
                            // the health: report it, so the snapshot that
                            // follows reads as the registry coming back (the
                            // cache's empty-push grace starts there).
                            if !self.set_connected(false).await {
                                return;
                            }
                        }
                        if h.up {
                            // A new connection has no subscription on the
                            // server until the SDK's redo (up to 3 s): send
                            // it now, and read every second meanwhile.
                            self.discovery.resubscribe(&self.service).await;
                            self.settle_until = Instant::now() + SETTLE;
                            self.refresh().await
                        } else {
                            self.set_connected(false).await
                        }
                    }
                    Err(_) => return,
                },
                _ = sleep_until_opt(recheck_at), if recheck_at.is_some() => {
                    self.recheck_at = None;
                    self.refresh().await
                }
            };
            if !open {
                return;
            }
        }
    }

    pub(super) async fn set_connected(&mut self, up: bool) -> bool {
        if !up && self.emit.connected() {
            debug!(service = %self.key, "nacos watch lost its connection; keeping the list");
        }
        self.emit.set_connected(up).await
    }

    pub(super) fn retry_later(&mut self) {
        self.recheck_at = Some(Instant::now() + self.backoff.next_pause());
    }

    /// Reads the service and delivers the difference. `false`: consumer gone.
    pub(super) async fn refresh(&mut self) -> bool {
        let open = self.read_and_deliver().await;
        let now = Instant::now();
        if self.settle_until > now {
            let soon = now + SETTLE_RECHECK;
            self.recheck_at = Some(self.recheck_at.map_or(soon, |at| at.min(soon)));
        }
        open
    }

    pub(super) async fn read_and_deliver(&mut self) -> bool {
        let list = match self.discovery.query(&self.key).await {
            Ok(list) => list,
            Err(e) => {
                debug!(service = %self.key, error = %e, "nacos watch cannot read the service");
                self.retry_later();
                return self.set_connected(false).await;
            }
        };
        if list.is_empty() && !self.current.is_empty() && !self.health.borrow().up {
            // The server answered, but the connection is known to be broken
            // (a probe timed out): wait for it rather than believe the
            // answer of a server that may have just restarted empty.
            self.retry_later();
            return self.set_connected(false).await;
        }
        self.backoff.reset();
        self.recheck_at = None;
        self.emit
            .deliver(&mut self.current, diff::nodes(list))
            .await
    }
}
