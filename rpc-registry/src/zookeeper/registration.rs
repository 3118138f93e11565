//! The keeper task: one session, its ephemeral nodes, and publishing them again
//! in a new session after an expiry.

use super::*;

/// Owns the session and the ephemeral nodes published through it.
pub(super) struct Keeper {
    pub(super) spec: Spec,
    pub(super) client: Option<Client>,
    pub(super) states: Option<StateWatcher>,
    pub(super) epoch: u64,
    pub(super) session: watch::Sender<Option<Session>>,
    pub(super) nodes: HashMap<String, (Vec<u8>, watch::Sender<RegistrationState>)>,
    /// One exists-watch per own node: fires when the node is deleted,
    /// changed or created, and the keeper then checks it (`verify`).
    pub(super) watches: FuturesUnordered<futures_util::future::BoxFuture<'static, (u64, String)>>,
    /// Paths with a watch armed in the current session.
    pub(super) armed: HashSet<String>,
    /// Own paths held by another live session, with that session: logged
    /// once per session.
    pub(super) conflicts: HashMap<String, i64>,
    pub(super) generation: u64,
    /// Set while the session is lost: when to try to open a new one next.
    pub(super) retry_at: Option<Instant>,
    pub(super) backoff: Backoff,
}

impl keeper::Keeps<(String, Vec<u8>)> for Keeper {
    async fn keep(
        &mut self,
        (path, data): (String, Vec<u8>),
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        self.register(path, data, state).await
    }

    async fn release(&mut self, key: &str) -> Result<(), RegistryError> {
        self.deregister(key).await
    }

    async fn release_all(&mut self) {
        self.close().await;
    }
}

impl Keeper {
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        // A safety net under the watches: every own node is checked each
        // session timeout / 3 as well.
        let mut check =
            tokio::time::interval((self.spec.session_timeout / 3).max(Duration::from_millis(300)));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                cmd = commands.recv() => {
                    if !keeper::serve(&mut self, cmd, &mut commands).await {
                        return;
                    }
                }
                state = next_state(&mut self.states) => self.on_state(state),
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => self.restore().await,
                Some((epoch, path)) = self.watches.next(), if !self.watches.is_empty() => {
                    // A watch of an older session says nothing about the
                    // one armed in this session.
                    if epoch == self.epoch {
                        self.armed.remove(&path);
                    }
                    self.verify(&path).await;
                }
                _ = check.tick(), if retry_at.is_none() => {
                    let paths: Vec<String> = self.nodes.keys().cloned().collect();
                    for path in paths {
                        self.verify(&path).await;
                    }
                }
            }
        }
    }

    /// Compares the node at `path` with what was registered, re-arming its
    /// watch, and repairs it (issue 12, faults 3 and 4): a node deleted by
    /// someone else is created again, a changed one is set back, and a
    /// persistent node put in its place (it would outlive this process) is
    /// replaced by an ephemeral one. A node of another live session (a
    /// second process publishing the same address) is left to it, logged
    /// once as a conflict; the watch then brings this keeper back when it
    /// is gone.
    pub(super) async fn verify(&mut self, path: &str) {
        if self.retry_at.is_some() {
            return;
        }
        let (Some(client), Some((data, _))) = (self.client.clone(), self.nodes.get(path)) else {
            return;
        };
        let data = data.clone();
        let t = self.spec.timeout;
        let stat = match timeout(t, client.check_and_watch_stat(path)).await {
            Ok(Ok((stat, watcher))) => {
                if self.armed.insert(path.to_owned()) {
                    let owned = path.to_owned();
                    let epoch = self.epoch;
                    self.watches.push(Box::pin(async move {
                        watcher.changed().await;
                        (epoch, owned)
                    }));
                }
                stat
            }
            Ok(Err(e)) => {
                debug!(%path, error = %e, "zookeeper: cannot check an own node");
                return;
            }
            Err(_) => return,
        };
        let own = client.session_id().0;
        let repaired = match stat {
            None => match claim(&self.spec, &client, path, &data).await {
                Ok(true) => Some("it was deleted by someone else"),
                Ok(false) => None,
                Err(e) => {
                    debug!(%path, error = %e, "zookeeper: cannot re-create an own node");
                    None
                }
            },
            Some(stat) if stat.ephemeral_owner == own => {
                self.conflicts.remove(path);
                match timeout(t, client.get_data(path)).await {
                    Ok(Ok((held, stat))) if held != data => {
                        match timeout(t, client.set_data(path, &data, Some(stat.version))).await {
                            Ok(Ok(_)) => Some("its data was changed"),
                            _ => None,
                        }
                    }
                    _ => None,
                }
            }
            Some(stat) if stat.ephemeral_owner == 0 => {
                // A persistent node at our path never goes away on its own.
                match timeout(t, client.delete(path, Some(stat.version))).await {
                    Ok(Ok(())) => match claim(&self.spec, &client, path, &data).await {
                        Ok(true) => Some("a persistent node had replaced it"),
                        _ => None,
                    },
                    _ => None,
                }
            }
            Some(stat) => {
                let other = stat.ephemeral_owner;
                if self.conflicts.insert(path.to_owned(), other) != Some(other) {
                    warn!(%path, own_session = %format!("{own:#x}"), other_session = %format!("{other:#x}"), "zookeeper registration conflict: another live session publishes the same address; standing by until its node is gone");
                }
                None
            }
        };
        if let Some(why) = repaired {
            self.conflicts.remove(path);
            self.generation += 1;
            if let Some((_, state)) = self.nodes.get(path) {
                state.send_replace(RegistrationState::Registered {
                    generation: self.generation,
                });
            }
            warn!(%path, reason = why, "zookeeper registration drifted from what this provider registered; restored");
        }
    }

    pub(super) fn session_id(&self) -> String {
        self.client
            .as_ref()
            .map_or_else(|| "none".to_owned(), |c| c.session_id().to_string())
    }

    pub(super) fn on_state(&mut self, state: SessionState) {
        match state {
            SessionState::Disconnected => info!(
                session = %self.session_id(),
                "zookeeper connection lost; the session and its nodes live on while the client reconnects"
            ),
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => info!(
                session = %self.session_id(),
                "zookeeper reconnected within the session; nothing to re-register"
            ),
            SessionState::Expired | SessionState::Closed | SessionState::AuthFailed => {
                self.lost(&format!("session {state}"));
            }
        }
    }

    /// Drops the dead session: the next `restore` opens a new one.
    pub(super) fn lost(&mut self, why: &str) {
        let session = self.session_id();
        self.client = None;
        self.states = None;
        self.session.send_replace(None);
        if self.retry_at.is_some() {
            return;
        }
        warn!(%session, nodes = self.nodes.len(), reason = why, "zookeeper session lost; opening a new session and re-registering");
        for (_, state) in self.nodes.values() {
            state.send_replace(RegistrationState::Reregistering);
        }
        self.retry_at = Some(Instant::now());
    }

    /// Tries once to get a live session and republish every node in it.
    pub(super) async fn restore(&mut self) {
        match self.republish().await {
            Ok(()) => {
                self.retry_at = None;
                self.backoff.reset();
                // Watch the nodes in the new session (the old session's
                // watches ended with it).
                let paths: Vec<String> = self.nodes.keys().cloned().collect();
                for path in paths {
                    self.verify(&path).await;
                }
            }
            Err(e) => {
                if self
                    .client
                    .as_ref()
                    .is_some_and(|c| c.state().is_terminated())
                {
                    self.client = None;
                    self.states = None;
                    self.session.send_replace(None);
                }
                let pause = self.backoff.next_pause();
                warn!(error = %e, ?pause, "zookeeper re-registration failed; retrying");
                self.retry_at = Some(Instant::now() + pause);
            }
        }
    }

    pub(super) async fn republish(&mut self) -> Result<(), RegistryError> {
        let client = match &self.client {
            Some(c) => c.clone(),
            None => {
                let c = self.spec.open().await?;
                self.epoch += 1;
                info!(session = %c.session_id(), timeout = ?c.session_timeout(), epoch = self.epoch, "zookeeper session opened");
                self.states = Some(c.state_watcher());
                self.client = Some(c.clone());
                self.session.send_replace(Some(Session {
                    client: c.clone(),
                    epoch: self.epoch,
                }));
                c
            }
        };
        // Watches of the old session ended with it.
        self.armed.clear();
        if self.nodes.is_empty() {
            return Ok(());
        }
        let nodes: Vec<(String, Vec<u8>)> = self
            .nodes
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        for (path, data) in &nodes {
            publish(&self.spec, &client, path, data).await?;
        }
        self.generation += 1;
        for (_, state) in self.nodes.values() {
            state.send_replace(RegistrationState::Registered {
                generation: self.generation,
            });
        }
        info!(
            session = %client.session_id(),
            nodes = nodes.len(),
            generation = self.generation,
            "zookeeper registrations restored in a new session"
        );
        Ok(())
    }

    pub(super) async fn register(
        &mut self,
        path: String,
        data: Vec<u8>,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        let Some(client) = self.client.clone().filter(|_| self.retry_at.is_none()) else {
            return Err(failed(
                "the zookeeper session is lost and being restored; try again",
            ));
        };
        publish(&self.spec, &client, &path, &data).await?;
        state.send_replace(RegistrationState::Registered {
            generation: self.generation,
        });
        self.nodes.insert(path.clone(), (data, state));
        self.verify(&path).await;
        Ok(())
    }

    pub(super) async fn deregister(&mut self, path: &str) -> Result<(), RegistryError> {
        let Some((_, state)) = self.nodes.remove(path) else {
            return Ok(());
        };
        state.send_replace(RegistrationState::Deregistered);
        self.conflicts.remove(path);
        match &self.client {
            // Without a session the node is already gone with the old one.
            Some(client) => remove_own(&self.spec, client, path).await,
            None => Ok(()),
        }
    }

    /// Deletes every node and ends the session.
    pub(super) async fn close(&mut self) {
        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
        for (_, state) in self.nodes.values() {
            state.send_replace(RegistrationState::Deregistered);
        }
        self.nodes.clear();
        self.retry_at = None;
        if let Some(client) = self.client.take() {
            for path in &nodes {
                if let Err(e) = remove_own(&self.spec, &client, path).await {
                    warn!(%path, error = %e, "zookeeper delete failed; the node goes with the session");
                }
            }
            info!(session = %client.session_id(), nodes = nodes.len(), "zookeeper registry shut down; closing the session");
        }
        self.states = None;
        // Dropping the last client closes the session; discovery tasks drop
        // theirs when they see it gone.
        self.session.send_replace(None);
    }
}

/// Creates the ephemeral node `path` in `client`'s session, creating the
/// parents if needed. A node left by another session (an older session of
/// this process, or of a previous process at the same address, not expired
/// yet) is deleted and created again: left alone it would vanish when that
/// session expires.
pub(super) async fn publish(
    spec: &Spec,
    client: &Client,
    path: &str,
    data: &[u8],
) -> Result<(), RegistryError> {
    let t = spec.timeout;
    let deadline = Instant::now() + t;
    let own = client.session_id().0;
    let mut last = None;
    let mut replaced = false;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let created = match timeout(left, client.create(path, data, &spec.ephemeral())).await {
            Ok(r) => r,
            Err(_) => break,
        };
        match created {
            Ok(_) => return Ok(()),
            Err(ZkError::NoNode) => {
                let parent = path.rsplit_once('/').map_or(path, |(p, _)| p);
                bounded(
                    left,
                    format!("creating {parent}"),
                    client.mkdir(parent, &spec.persistent()),
                )
                .await?;
            }
            Err(ZkError::NodeExists) => {
                let (old, stat) = match timeout(left, client.get_data(path)).await {
                    Ok(Ok(v)) => v,
                    Ok(Err(ZkError::NoNode)) => continue,
                    Ok(Err(e)) => return Err(unavailable(format!("read {path}"), e)),
                    Err(_) => break,
                };
                if stat.ephemeral_owner == own {
                    // Ours already (a retried create, or registered twice).
                    if old != data {
                        bounded(
                            left,
                            format!("update {path}"),
                            client.set_data(path, data, Some(stat.version)),
                        )
                        .await?;
                    }
                    return Ok(());
                }
                if replaced {
                    // Replaced once and taken again at once: another live
                    // process publishes this address. Leave it; the
                    // keeper's watch takes the node back when it is gone.
                    warn!(
                        %path,
                        owner = %format!("{:#x}", stat.ephemeral_owner),
                        session = %client.session_id(),
                        "zookeeper registration conflict: another live session publishes the same address; standing by"
                    );
                    return Ok(());
                }
                replaced = true;
                // Usually an older session of a process that restarted on
                // this address, not expired yet: left alone, the node would
                // vanish when that session expires. If it is a live second
                // process instead, this is a conflict it will log.
                warn!(
                    %path,
                    owner = %format!("{:#x}", stat.ephemeral_owner),
                    session = %client.session_id(),
                    "replacing a node of another session (a conflict if that session is a live process)"
                );
                match timeout(left, client.delete(path, Some(stat.version))).await {
                    Ok(Ok(()) | Err(ZkError::NoNode | ZkError::BadVersion)) => {}
                    Ok(Err(e)) => return Err(unavailable(format!("delete stale {path}"), e)),
                    Err(_) => break,
                }
            }
            // Ambiguous: the create may have been applied. Retry; a node of
            // ours then shows as NodeExists with our session as owner.
            Err(ZkError::ConnectionLoss) => {
                last = Some(ZkError::ConnectionLoss);
                sleep(BACKOFF_MIN.min(left)).await;
            }
            Err(e) => return Err(unavailable(format!("create {path}"), e)),
        }
    }
    match last {
        Some(e) => Err(unavailable(format!("create {path}"), e)),
        None => Err(timed_out(&format!("create {path}"), t)),
    }
}

/// Creates the ephemeral node `path` only if nobody holds it: `Ok(true)` if
/// this call created it, `Ok(false)` if a node was there (someone was
/// faster; the caller's watch says what happens next).
pub(super) async fn claim(
    spec: &Spec,
    client: &Client,
    path: &str,
    data: &[u8],
) -> Result<bool, RegistryError> {
    let t = spec.timeout;
    for _ in 0..2 {
        match timeout(t, client.create(path, data, &spec.ephemeral())).await {
            Ok(Ok(_)) => return Ok(true),
            Ok(Err(ZkError::NodeExists)) => return Ok(false),
            Ok(Err(ZkError::NoNode)) => {
                let parent = path.rsplit_once('/').map_or(path, |(p, _)| p);
                bounded(
                    t,
                    format!("creating {parent}"),
                    client.mkdir(parent, &spec.persistent()),
                )
                .await?;
            }
            Ok(Err(e)) => return Err(unavailable(format!("create {path}"), e)),
            Err(_) => return Err(timed_out(&format!("create {path}"), t)),
        }
    }
    Ok(false)
}

/// Deletes `path` if this session owns it (a node that replaced ours is
/// left alone).
pub(super) async fn remove_own(
    spec: &Spec,
    client: &Client,
    path: &str,
) -> Result<(), RegistryError> {
    let t = spec.timeout;
    let stat = match timeout(t, client.check_stat(path)).await {
        Ok(Ok(Some(stat))) => stat,
        Ok(Ok(None)) | Ok(Err(ZkError::NoNode)) => return Ok(()),
        Ok(Err(e)) => return Err(unavailable(format!("stat {path}"), e)),
        Err(_) => return Err(timed_out(&format!("stat {path}"), t)),
    };
    if stat.ephemeral_owner != client.session_id().0 {
        debug!(%path, "not deleting a node owned by another session");
        return Ok(());
    }
    match timeout(t, client.delete(path, Some(stat.version))).await {
        Ok(Ok(()) | Err(ZkError::NoNode)) => Ok(()),
        Ok(Err(e)) => Err(unavailable(format!("delete {path}"), e)),
        Err(_) => Err(timed_out(&format!("delete {path}"), t)),
    }
}

pub(super) async fn next_state(states: &mut Option<StateWatcher>) -> SessionState {
    match states {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}
