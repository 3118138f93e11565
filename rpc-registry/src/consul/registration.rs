//! The keeper task: passes every TTL check, re-registers what the agent forgot,
//! deregisters.

use super::*;

pub(super) struct ConsulDeregister {
    pub(super) id: String,
    pub(super) meta: ServiceMetaInfo,
    pub(super) registry: ConsulRegistry,
}

impl Deregister for ConsulDeregister {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        Box::pin(async move {
            let inner = &self.registry.inner;
            let (done, rx) = oneshot::channel();
            let cmd = Command::Deregister {
                key: self.id.clone(),
                done: Some(done),
            };
            if inner.commands.send(cmd).await.is_err() {
                // The keeper is gone: it deregistered everything on its way out.
                return Ok(());
            }
            timeout(inner.timeout * 2, rx)
                .await
                .map_err(|_| timed_out("deregister", inner.timeout * 2))?
                .unwrap_or(Ok(()))?;
            self.registry.settle(&self.meta, false).await;
            Ok(())
        })
    }

    fn deregister_on_drop(self: Box<Self>) {
        let commands = self.registry.inner.commands.clone();
        let cmd = Command::Deregister {
            key: self.id,
            done: None,
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = commands.try_send(cmd) {
            // A burst of drops: hand the send to the runtime rather than lose it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = commands.send(cmd).await;
                });
            }
        }
    }
}

/// One registered instance, as the keeper holds it.
pub(super) struct Entry {
    pub(super) check: String,
    pub(super) body: Vec<u8>,
    /// What the agent must hold for it: address, port and record tag.
    pub(super) expected: Expected,
    /// Another process holds this ID with another record (logged once),
    /// since when.
    pub(super) conflict: Option<Instant>,
    pub(super) state: watch::Sender<RegistrationState>,
    pub(super) generation: u64,
    /// The agent forgot it: re-register at the next retry.
    pub(super) lost: bool,
}

/// The parts of a registration that consumers depend on.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Expected {
    pub(super) address: String,
    pub(super) port: u64,
    pub(super) record: Option<String>,
}

impl Expected {
    /// From an agent registration body or an agent service entry (the same
    /// field names).
    pub(super) fn of(v: &serde_json::Value) -> Self {
        Self {
            address: v["Address"].as_str().unwrap_or_default().to_owned(),
            port: v["Port"].as_u64().unwrap_or(0),
            record: v["Tags"].as_array().and_then(|tags| {
                tags.iter()
                    .filter_map(|t| t.as_str())
                    .find(|t| t.starts_with(RECORD_TAG))
                    .map(str::to_owned)
            }),
        }
    }

    pub(super) fn from_body(body: &[u8]) -> Self {
        serde_json::from_slice(body)
            .map(|v| Self::of(&v))
            .unwrap_or_default()
    }
}

/// Heartbeats every registration of one registry and restores lost ones.
pub(super) struct Keeper {
    pub(super) agent: Agent,
    pub(super) timeout: Duration,
    pub(super) beat: Duration,
    pub(super) entries: HashMap<String, Entry>,
    /// Set while some entry is lost: when to re-register next.
    pub(super) retry_at: Option<Instant>,
    pub(super) backoff: Backoff,
    /// The agent did not answer the last beat (logged once per outage).
    pub(super) unreachable: bool,
}

impl keeper::Keeps<(String, String, Vec<u8>)> for Keeper {
    async fn keep(
        &mut self,
        (id, check, body): (String, String, Vec<u8>),
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        self.register(id, check, body, state).await
    }

    async fn release(&mut self, key: &str) -> Result<(), RegistryError> {
        self.deregister(key).await
    }

    async fn release_all(&mut self) {
        self.deregister_all().await;
    }
}

impl Keeper {
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut beat = tokio::time::interval(self.beat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                cmd = commands.recv() => {
                    if !keeper::serve(&mut self, cmd, &mut commands).await {
                        return;
                    }
                }
                _ = beat.tick(), if !self.entries.is_empty() => self.beat_all().await,
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => self.restore().await,
            }
        }
    }

    /// Passes every live check once, concurrently.
    pub(super) async fn beat_all(&mut self) {
        // A pass must not outlive the beat: the other checks wait for it.
        let t = self.timeout.min(self.beat);
        let agent = &self.agent;
        let passes = self
            .entries
            .iter()
            .filter(|(_, e)| !e.lost)
            .map(|(id, e)| async move { (id.clone(), agent.pass(&e.check, t).await) });
        let results = futures_util::future::join_all(passes).await;
        let mut reached = false;
        let mut unreachable = None;
        for (id, result) in results {
            match result {
                Ok((StatusCode::OK, _)) => reached = true,
                Ok((status, body)) => {
                    reached = true;
                    let why = rejected("check pass", status, &body);
                    self.lost(&id, &why.to_string());
                }
                Err(e) => unreachable = Some(e),
            }
        }
        if reached {
            self.compare(t).await;
        }
        match unreachable {
            Some(e) if !self.unreachable => {
                warn!(error = %e, "consul agent unreachable; heartbeats go on");
                self.unreachable = true;
            }
            None if reached && self.unreachable => {
                info!("consul agent reachable again");
                self.unreachable = false;
            }
            _ => {}
        }
    }

    /// Compares what the agent holds with what was registered (issue 12,
    /// fault 4): a passing TTL check says nothing about the service it
    /// belongs to, which someone may have re-registered with another
    /// address or port, or without the record tag consumers read. Such an
    /// entry is registered again. One agent call per beat for all entries.
    pub(super) async fn compare(&mut self, t: Duration) {
        let held: serde_json::Value = match self
            .agent
            .ok(Method::GET, "/v1/agent/services", None, t)
            .await
        {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(e) => {
                debug!(error = %e, "consul: cannot read the agent's services");
                return;
            }
        };
        let drifted: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.lost)
            .filter_map(|(id, e)| {
                let there = held.get(id.as_str())?;
                let got = Expected::of(there);
                if got.address == e.expected.address
                    && got.port == e.expected.port
                    && got.record.is_some()
                    && got.record != e.expected.record
                {
                    // The same address with another record: a second live
                    // process publishing this address. Rewriting it each
                    // beat would only make the two take turns.
                    match e.conflict {
                        None => {
                            warn!(%id, "consul registration conflict: another process registered the same address with another record; leaving it");
                        }
                        // Both share one TTL check, which this keeper keeps
                        // passing: a second writer that died (SIGKILL)
                        // would stay listed for good. After three TTLs,
                        // register ours again; a live second writer then
                        // answers in kind, a few TTLs apart, not each beat.
                        Some(since) if since.elapsed() >= self.beat * 9 => {
                            return Some((
                                id.clone(),
                                "another record has held this address for three TTLs (its writer may be gone)".to_owned(),
                            ));
                        }
                        Some(_) => {}
                    }
                    return Some((id.clone(), String::new()));
                }
                (got != e.expected).then(|| {
                    (
                        id.clone(),
                        format!(
                            "the agent holds {}:{} ({}), registered {}:{} ({})",
                            got.address,
                            got.port,
                            if got.record.is_some() { "with a record" } else { "no record tag" },
                            e.expected.address,
                            e.expected.port,
                            if got.record == e.expected.record || got.record.is_none() {
                                "the record"
                            } else {
                                "another record"
                            }
                        ),
                    )
                })
            })
            .collect();
        let now = Instant::now();
        let in_conflict: std::collections::HashSet<&str> = drifted
            .iter()
            .filter(|(_, why)| why.is_empty())
            .map(|(id, _)| id.as_str())
            .collect();
        for (id, entry) in self.entries.iter_mut() {
            if in_conflict.contains(id.as_str()) {
                entry.conflict.get_or_insert(now);
            } else {
                entry.conflict = None;
            }
        }
        for (id, why) in drifted {
            if why.is_empty() {
                continue;
            }
            if let Some(e) = self.entries.get_mut(&id) {
                e.conflict = None;
            }
            self.lost(&id, &format!("the registration drifted: {why}"));
        }
    }

    pub(super) fn lost(&mut self, id: &str, why: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if entry.lost {
            return;
        }
        warn!(%id, reason = why, "consul agent lost the registration; re-registering");
        entry.lost = true;
        entry.state.send_replace(RegistrationState::Reregistering);
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now());
        }
    }

    /// Re-registers every lost entry once; backs off if any fails.
    pub(super) async fn restore(&mut self) {
        let t = self.timeout;
        let mut failure = None;
        for (id, entry) in self.entries.iter_mut().filter(|(_, e)| e.lost) {
            match self.agent.register(&entry.body, t).await {
                Ok(()) => {
                    entry.lost = false;
                    entry.generation += 1;
                    entry.state.send_replace(RegistrationState::Registered {
                        generation: entry.generation,
                    });
                    info!(%id, generation = entry.generation, "consul registration restored");
                }
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            None => {
                self.retry_at = None;
                self.backoff.reset();
            }
            Some(e) => {
                let pause = self.backoff.next_pause();
                debug!(error = %e, ?pause, "consul re-registration failed; retrying");
                self.retry_at = Some(Instant::now() + pause);
            }
        }
    }

    pub(super) async fn register(
        &mut self,
        id: String,
        check: String,
        body: Vec<u8>,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        self.agent.register(&body, self.timeout).await?;
        state.send_replace(RegistrationState::Registered { generation: 0 });
        debug!(%id, "consul service registered");
        self.entries.insert(
            id,
            Entry {
                check,
                expected: Expected::from_body(&body),
                conflict: None,
                body,
                state,
                generation: 0,
                lost: false,
            },
        );
        Ok(())
    }

    pub(super) async fn deregister(&mut self, id: &str) -> Result<(), RegistryError> {
        let Some(entry) = self.entries.remove(id) else {
            return Ok(());
        };
        entry.state.send_replace(RegistrationState::Deregistered);
        self.agent.deregister(id, self.timeout).await
    }

    pub(super) async fn deregister_all(&mut self) {
        let entries: Vec<(String, Entry)> = self.entries.drain().collect();
        let agent = &self.agent;
        let t = self.timeout;
        let calls = entries.iter().map(|(id, e)| async move {
            e.state.send_replace(RegistrationState::Deregistered);
            (id, agent.deregister(id, t).await)
        });
        for (id, r) in futures_util::future::join_all(calls).await {
            match r {
                Ok(()) => debug!(%id, "consul service deregistered"),
                Err(e) => {
                    warn!(%id, error = %e, "consul deregistration failed; the check expires with the TTL")
                }
            }
        }
    }
}
