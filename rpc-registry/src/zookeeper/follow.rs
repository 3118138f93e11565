//! A service node followed with a persistent recursive watch, re-armed and re-
//! read after every reconnection.

use super::*;
use crate::support::follow::Emitter;

/// Follows one service node.
pub(super) struct Follower {
    pub(super) sessions: watch::Receiver<Option<Session>>,
    /// Keeps the keeper (and so new sessions) alive while the watch is.
    pub(super) _registry: ZookeeperRegistry,
    /// `{root}/`, stripped from paths to get node keys.
    pub(super) prefix: String,
    /// `{root}/{service_key}`.
    pub(super) path: String,
    pub(super) timeout: Duration,
    pub(super) emit: Emitter,
}

pub(super) enum FollowEnd {
    /// The consumer (or the keeper) is gone.
    Closed,
    /// The session ended: follow the next one.
    SessionGone,
}

impl Follower {
    pub(super) async fn run(mut self, session: Session, watcher: PersistentWatcher) {
        let mut current = Some((session, watcher));
        let mut dead_epoch = None;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            let (session, mut watcher) = match current.take() {
                Some(c) => c,
                None => match self.establish(dead_epoch, &mut backoff).await {
                    Some(c) => c,
                    None => return,
                },
            };
            backoff.reset();
            match self.follow(&session, &mut watcher).await {
                FollowEnd::Closed => return,
                FollowEnd::SessionGone => {
                    // Never poll a watcher past its session's end.
                    drop(watcher);
                    dead_epoch = Some(session.epoch);
                    debug!(path = %self.path, "zookeeper session gone; waiting for the next one");
                    if !self.emit.set_connected(false).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits for a session newer than `dead_epoch`, arms the watch and sends
    /// a fresh snapshot. `None`: the consumer is gone.
    pub(super) async fn establish(
        &mut self,
        dead_epoch: Option<u64>,
        backoff: &mut Backoff,
    ) -> Option<(Session, PersistentWatcher)> {
        loop {
            let session = {
                let newer = |s: &Option<Session>| {
                    s.as_ref()
                        .is_some_and(|s| dead_epoch.is_none_or(|d| s.epoch > d))
                };
                let tx = self.emit.sender();
                tokio::select! {
                    _ = tx.closed() => return None,
                    s = self.sessions.wait_for(newer) => match s {
                        Ok(s) => s.clone()?,
                        Err(_) => return None,
                    },
                }
            };
            let armed = bounded(
                self.timeout,
                format!("watch {}", self.path),
                session
                    .client
                    .watch(&self.path, AddWatchMode::PersistentRecursive),
            )
            .await;
            match armed {
                Ok(watcher) => match self.snapshot(&session.client).await {
                    Ok(true) => return Some((session, watcher)),
                    Ok(false) => return None,
                    Err(e) => debug!(path = %self.path, error = %e, "zookeeper resync failed"),
                },
                Err(e) => debug!(path = %self.path, error = %e, "zookeeper watch failed"),
            }
            if !self.emit.set_connected(false).await || !self.emit.pause(backoff).await {
                return None;
            }
        }
    }

    /// A fresh read, delivered as a snapshot. `Ok(false)`: consumer gone.
    pub(super) async fn snapshot(&mut self, client: &Client) -> Result<bool, RegistryError> {
        let list = read_service(client, &self.path, self.timeout).await?;
        if !self.emit.send(WatchEvent::Snapshot(list)).await {
            return Ok(false);
        }
        Ok(self.emit.set_connected(true).await)
    }

    /// The node key of a direct child's path, if it is one.
    pub(super) fn child_key<'a>(&self, path: &'a str) -> Option<&'a str> {
        let name = path.strip_prefix(self.path.as_str())?.strip_prefix('/')?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        path.strip_prefix(self.prefix.as_str())
    }

    pub(super) async fn follow(
        &mut self,
        session: &Session,
        watcher: &mut PersistentWatcher,
    ) -> FollowEnd {
        let client = &session.client;
        let mut resync_at: Option<Instant> = None;
        // Whether the server still has our watch (not after a reconnection).
        let mut armed = true;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut sessions = self.sessions.clone();
        loop {
            let tx = self.emit.sender();
            let event = tokio::select! {
                _ = tx.closed() => return FollowEnd::Closed,
                changed = sessions.changed() => {
                    if changed.is_err() {
                        return FollowEnd::Closed;
                    }
                    let same = sessions
                        .borrow_and_update()
                        .as_ref()
                        .is_some_and(|s| s.epoch == session.epoch);
                    if !same {
                        return FollowEnd::SessionGone;
                    }
                    continue;
                }
                _ = sleep_until_opt(resync_at), if resync_at.is_some() => {
                    resync_at = None;
                    let rearmed = if armed {
                        Ok(())
                    } else {
                        // The new watcher goes in before the old one is
                        // dropped, so the client keeps the path watched.
                        bounded(
                            self.timeout,
                            format!("watch {}", self.path),
                            client.watch(&self.path, AddWatchMode::PersistentRecursive),
                        )
                        .await
                        .map(|w| {
                            *watcher = w;
                            armed = true;
                        })
                    };
                    let outcome = match rearmed {
                        Ok(()) => self.snapshot(client).await,
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Ok(true) => {
                            backoff.reset();
                            continue;
                        }
                        Ok(false) => return FollowEnd::Closed,
                        Err(e) => debug!(path = %self.path, error = %e, "zookeeper resync failed"),
                    }
                    if client.state().is_terminated() {
                        return FollowEnd::SessionGone;
                    }
                    if !self.emit.set_connected(false).await {
                        return FollowEnd::Closed;
                    }
                    resync_at = Some(Instant::now() + backoff.next_pause());
                    continue;
                }
                e = watcher.changed() => e,
            };
            let change = match event.event_type {
                EventType::Session => {
                    match event.session_state {
                        SessionState::Disconnected => {
                            debug!(path = %self.path, "zookeeper disconnected; resynchronising on reconnection");
                            resync_at = None;
                            if !self.emit.set_connected(false).await {
                                return FollowEnd::Closed;
                            }
                        }
                        // Events during the disconnect are not replayed:
                        // read what is there now.
                        SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                            armed = false;
                            resync_at = Some(Instant::now());
                        }
                        SessionState::Expired | SessionState::Closed | SessionState::AuthFailed => {
                            return FollowEnd::SessionGone;
                        }
                    }
                    continue;
                }
                EventType::NodeCreated | EventType::NodeDataChanged => {
                    let Some(key) = self.child_key(&event.path) else {
                        continue;
                    };
                    match timeout(self.timeout, client.get_data(&event.path)).await {
                        Ok(Ok((data, _))) => match ServiceMetaInfo::from_json(&data) {
                            Ok(m) => WatchEvent::Upsert(m),
                            Err(e) => {
                                warn!(path = %event.path, error = %e, "skipping malformed instance record");
                                continue;
                            }
                        },
                        // Gone again: its delete event follows.
                        Ok(Err(ZkError::NoNode)) => continue,
                        Ok(Err(e)) => {
                            debug!(%key, error = %e, "zookeeper read failed; resynchronising");
                            resync_at.get_or_insert_with(|| Instant::now() + backoff.next_pause());
                            continue;
                        }
                        Err(_) => {
                            debug!(%key, "zookeeper read timed out; resynchronising");
                            resync_at.get_or_insert_with(|| Instant::now() + backoff.next_pause());
                            continue;
                        }
                    }
                }
                EventType::NodeDeleted => match self.child_key(&event.path) {
                    Some(key) => WatchEvent::Remove(key.to_owned()),
                    None => continue,
                },
                EventType::NodeChildrenChanged => continue,
            };
            if !self.emit.send(change).await {
                return FollowEnd::Closed;
            }
        }
    }
}
