//! The keeper task: publishes instances, re-registers them after a break,
//! deregisters.

use super::*;

/// One published instance.
pub(super) struct Entry {
    pub(super) service: String,
    pub(super) instance: ServiceInstance,
    pub(super) lane: usize,
    pub(super) state: watch::Sender<RegistrationState>,
    pub(super) generation: u64,
    /// The server has (or may have) lost it; re-register when the lane is up.
    pub(super) lost: bool,
    /// Another record is registered at its address (logged once).
    pub(super) conflict: bool,
}

/// An instance whose deregistration failed: the SDK still holds it for its
/// redo, so it is deregistered again once its lane answers.
pub(super) struct Tombstone {
    pub(super) service: String,
    pub(super) instance: ServiceInstance,
    pub(super) lane: usize,
}

pub(super) struct KeeperLane {
    pub(super) lane: Lane,
    /// `reconnects` as last handled.
    pub(super) seen: u64,
    pub(super) retry_at: Instant,
    pub(super) backoff: Backoff,
}

impl KeeperLane {
    pub(super) fn new(lane: Lane) -> Self {
        let seen = lane.health.borrow().reconnects;
        Self {
            lane,
            seen,
            retry_at: Instant::now(),
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        }
    }
}

/// Owns the lanes and the published instances.
pub(super) struct Keeper {
    pub(super) settings: Arc<Settings>,
    pub(super) lanes: Vec<KeeperLane>,
    pub(super) entries: HashMap<String, Entry>,
    pub(super) tombstones: Vec<Tombstone>,
}

impl Keeper {
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(KEEPER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconcile = tokio::time::interval(self.settings.reconcile);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every handle gone: nothing more to answer.
        let mut open = true;
        // Shut down: everything deregistered, new registrations refused.
        let mut shut = false;
        loop {
            if !open && self.tombstones.is_empty() {
                return;
            }
            tokio::select! {
                cmd = commands.recv(), if open => match cmd {
                    Some(Command::Register { done, .. }) if shut => {
                        let _ = done.send(Err(RegistryError::Shutdown));
                    }
                    Some(Command::Register { request: meta, state, done }) => {
                        let node = meta.node_key();
                        let r = self.register(meta, state).await;
                        if let Err(Ok(())) = done.send(r) {
                            // The caller stopped waiting: no handle owns it.
                            let _ = self.deregister(&node).await;
                        }
                    }
                    Some(Command::Deregister { key: node, done }) => {
                        let r = self.deregister(&node).await;
                        if let Some(done) = done {
                            let _ = done.send(r);
                        }
                    }
                    Some(Command::Shutdown { done }) => {
                        if !shut {
                            self.deregister_all().await;
                            shut = true;
                        }
                        let _ = done.send(());
                    }
                    None => {
                        if !shut {
                            self.deregister_all().await;
                            shut = true;
                        }
                        open = false;
                        if !self.tombstones.is_empty() {
                            // The SDK would register them again after
                            // reconnecting (its redo): stay until they are
                            // deregistered for good.
                            warn!(left = self.tombstones.len(), "nacos registry dropped with instances it could not deregister; retrying until the server answers");
                        }
                    }
                },
                _ = tick.tick() => self.check_lanes().await,
                _ = reconcile.tick(), if !shut => self.reconcile().await,
            }
        }
    }

    pub(super) fn group(&self) -> Option<String> {
        Some(self.settings.group.clone())
    }

    /// A lane with no instance of `service` (other than `node`), opening a
    /// new connection if every lane has one.
    pub(super) async fn lane_for(
        &mut self,
        service: &str,
        node: &str,
    ) -> Result<usize, RegistryError> {
        if let Some(entry) = self.entries.get(node) {
            return Ok(entry.lane);
        }
        let busy: Vec<usize> = self
            .entries
            .values()
            .filter(|e| e.service == service)
            .map(|e| e.lane)
            .collect();
        if let Some(free) = (0..self.lanes.len()).find(|i| !busy.contains(i)) {
            return Ok(free);
        }
        let naming = self.settings.connect().await?;
        self.lanes
            .push(KeeperLane::new(Lane::start(naming, &self.settings)?));
        debug!(lanes = self.lanes.len(), service, "nacos lane opened");
        Ok(self.lanes.len() - 1)
    }

    pub(super) async fn register_on(
        &self,
        lane: usize,
        service: &str,
        instance: &ServiceInstance,
    ) -> Result<(), RegistryError> {
        let Some(l) = self.lanes.get(lane) else {
            return Err(failed("no such lane"));
        };
        let t = self.settings.timeout;
        timeout(
            t,
            l.lane
                .naming
                .register_instance(service.to_owned(), self.group(), instance.clone()),
        )
        .await
        .map_err(|_| timed_out("register", t))?
        .map_err(|e| unavailable(format!("register {service} {}", instance.ip_and_port()), e))
    }

    pub(super) async fn deregister_on(
        &self,
        lane: usize,
        service: &str,
        instance: &ServiceInstance,
    ) -> Result<(), RegistryError> {
        let Some(l) = self.lanes.get(lane) else {
            return Ok(());
        };
        let t = self.settings.timeout;
        timeout(
            t,
            l.lane
                .naming
                .deregister_instance(service.to_owned(), self.group(), instance.clone()),
        )
        .await
        .map_err(|_| timed_out("deregister", t))?
        .map_err(|e| {
            unavailable(
                format!("deregister {service} {}", instance.ip_and_port()),
                e,
            )
        })
    }

    pub(super) async fn register(
        &mut self,
        meta: ServiceMetaInfo,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        let service = service_name(&meta.service_key())?;
        let node = meta.node_key();
        let instance = to_instance(&meta);
        let lane = self.lane_for(&service, &node).await?;
        // A pending deregistration of the same instance must not undo this one.
        self.tombstones.retain(|t| {
            !(t.service == service && t.instance.ip_and_port() == instance.ip_and_port())
        });
        if let Err(e) = self.register_on(lane, &service, &instance).await {
            // The SDK keeps a failed registration for its redo: make sure it
            // does not come alive later with no handle to remove it.
            if !self.entries.contains_key(&node) {
                self.tombstones.push(Tombstone {
                    service,
                    instance,
                    lane,
                });
            }
            return Err(e);
        }
        state.send_replace(RegistrationState::Registered { generation: 0 });
        debug!(%node, lane, "nacos instance registered");
        if let Some(old) = self.entries.insert(
            node,
            Entry {
                service,
                instance,
                lane,
                state,
                generation: 0,
                lost: false,
                conflict: false,
            },
        ) {
            // Registered again under the same node key: the new handle owns it.
            old.state.send_replace(RegistrationState::Deregistered);
        }
        Ok(())
    }

    pub(super) async fn deregister(&mut self, node: &str) -> Result<(), RegistryError> {
        let Some(entry) = self.entries.remove(node) else {
            return Ok(());
        };
        entry.state.send_replace(RegistrationState::Deregistered);
        match self
            .deregister_on(entry.lane, &entry.service, &entry.instance)
            .await
        {
            Ok(()) => {
                debug!(%node, "nacos instance deregistered");
                Ok(())
            }
            Err(e) => {
                warn!(%node, error = %e, "nacos deregistration failed; retrying when the server answers");
                self.tombstones.push(Tombstone {
                    service: entry.service,
                    instance: entry.instance,
                    lane: entry.lane,
                });
                Err(e)
            }
        }
    }

    pub(super) async fn deregister_all(&mut self) {
        let nodes: Vec<String> = self.entries.keys().cloned().collect();
        for node in nodes {
            let _ = self.deregister(&node).await;
        }
        if self.tombstones.is_empty() {
            info!("nacos registry shut down; its instances are deregistered");
        } else {
            warn!(
                left = self.tombstones.len(),
                "nacos registry shut down; some instances could not be deregistered yet (retrying)"
            );
        }
    }

    pub(super) fn mark_lost(&mut self, lane: usize, why: &str) {
        for (node, e) in self.entries.iter_mut().filter(|(_, e)| e.lane == lane) {
            if !e.lost {
                e.lost = true;
                e.state.send_replace(RegistrationState::Reregistering);
                warn!(%node, reason = why, "nacos registration lost; re-registering");
            }
        }
    }

    /// Follows each lane's health: a break loses its instances; a lane that
    /// answers gets its lost instances registered again.
    pub(super) async fn check_lanes(&mut self) {
        for i in 0..self.lanes.len() {
            let h = *self.lanes[i].lane.health.borrow();
            let reconnected = h.reconnects != self.lanes[i].seen;
            self.lanes[i].seen = h.reconnects;
            if !h.up {
                self.mark_lost(i, "the connection broke");
                continue;
            }
            if reconnected {
                self.mark_lost(i, "the connection was re-established");
            }
            if Instant::now() < self.lanes[i].retry_at {
                continue;
            }
            if self.restore_lane(i).await {
                self.lanes[i].backoff.reset();
            } else {
                let lane = &mut self.lanes[i];
                lane.retry_at = Instant::now() + lane.backoff.next_pause();
            }
        }
    }

    /// Registers the lane's lost instances again and retries its pending
    /// deregistrations. `false` if something failed.
    pub(super) async fn restore_lane(&mut self, lane: usize) -> bool {
        let mut ok = true;
        let tombstones: Vec<Tombstone> = {
            let (mine, others) = std::mem::take(&mut self.tombstones)
                .into_iter()
                .partition(|t| t.lane == lane);
            self.tombstones = others;
            mine
        };
        for t in tombstones {
            match self.deregister_on(lane, &t.service, &t.instance).await {
                Ok(()) => {
                    debug!(service = %t.service, instance = %t.instance.ip_and_port(), "nacos pending deregistration done")
                }
                Err(_) => {
                    ok = false;
                    self.tombstones.push(t);
                }
            }
        }
        let lost: Vec<(String, String, ServiceInstance)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.lane == lane && e.lost)
            .map(|(n, e)| (n.clone(), e.service.clone(), e.instance.clone()))
            .collect();
        for (node, service, instance) in lost {
            match self.register_on(lane, &service, &instance).await {
                Ok(()) => {
                    if let Some(e) = self.entries.get_mut(&node) {
                        e.lost = false;
                        e.generation += 1;
                        e.state.send_replace(RegistrationState::Registered {
                            generation: e.generation,
                        });
                        info!(%node, generation = e.generation, "nacos registration restored");
                    }
                }
                Err(e) => {
                    debug!(%node, error = %e, "nacos re-registration failed; retrying");
                    ok = false;
                }
            }
        }
        ok
    }

    /// Checks that every instance is still listed by the server; one that is
    /// not is marked lost (and registered again by the next check).
    pub(super) async fn reconcile(&mut self) {
        let mut wanted: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
        for (node, e) in &self.entries {
            if !e.lost {
                wanted
                    .entry((e.lane, e.service.clone()))
                    .or_default()
                    .push(node.clone());
            }
        }
        let t = self.settings.timeout;
        for ((lane, service), nodes) in wanted {
            let Some(l) = self.lanes.get(lane) else {
                continue;
            };
            if !l.lane.health.borrow().up {
                continue;
            }
            let listed = match timeout(
                t,
                l.lane
                    .naming
                    .get_all_instances(service.clone(), self.group(), Vec::new(), false),
            )
            .await
            {
                Ok(Ok(list)) => list,
                _ => continue, // the probe reports broken connections
            };
            for node in nodes {
                let Some(e) = self.entries.get_mut(&node) else {
                    continue;
                };
                let at_address = listed
                    .iter()
                    .find(|i| i.ip == e.instance.ip && i.port == e.instance.port);
                // What consumers read is the record (issue 12, faults 3 and
                // 4). The weight and the enabled flag are left alone: the
                // Nacos console edits them on purpose.
                let ours = e.instance.metadata.get(META_KEY);
                let why = match at_address {
                    None => Some("nacos no longer lists this instance"),
                    Some(i) => match i.metadata.get(META_KEY) {
                        held if held == ours => {
                            e.conflict = false;
                            None
                        }
                        Some(_) => {
                            // Another record at this address: a second live
                            // writer. Registering ours again each check would
                            // only make the two take turns.
                            if !e.conflict {
                                warn!(%node, "nacos registration conflict: another process registered the same address with another record; leaving it");
                                e.conflict = true;
                            }
                            None
                        }
                        None => Some("nacos holds this instance without its record (it drifted)"),
                    },
                };
                if let Some(why) = why
                    && !e.lost
                {
                    e.lost = true;
                    e.state.send_replace(RegistrationState::Reregistering);
                    warn!(%node, reason = why, "re-registering");
                }
            }
        }
    }
}
