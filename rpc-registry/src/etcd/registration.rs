//! The keeper task: one lease, every published key, the keep-alive stream, and
//! putting the keys back when the lease is gone.

use super::*;

/// Owns the lease and the set of published keys.
pub(super) struct Keeper {
    pub(super) client: Client,
    pub(super) ttl: Duration,
    pub(super) timeout: Duration,
    pub(super) lease: Option<i64>,
    pub(super) stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    pub(super) keys: HashMap<String, (String, watch::Sender<RegistrationState>)>,
    /// Keys this keeper took over from another live lease at registration
    /// (two processes publishing one address): the value and lease it
    /// displaced, handed back when this keeper deregisters the key.
    pub(super) displaced: HashMap<String, (Vec<u8>, i64)>,
    /// Keys held by another live lease that this keeper stands by for, with
    /// that lease: logged once per lease, not on every check.
    pub(super) conflicts: HashMap<String, i64>,
    pub(super) generation: u64,
    /// Set while the keep-alive is interrupted: when to try to restore it next.
    pub(super) retry_at: Option<Instant>,
    /// etcd said the lease is gone (rather than the stream just breaking).
    pub(super) gone: bool,
    pub(super) backoff: Backoff,
}

impl keeper::Keeps<(String, String)> for Keeper {
    async fn keep(
        &mut self,
        (key, value): (String, String),
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        self.register(key, value, state).await
    }

    async fn release(&mut self, key: &str) -> Result<(), RegistryError> {
        self.deregister(key).await
    }

    async fn release_all(&mut self) {
        self.revoke().await;
    }
}

impl Keeper {
    pub(super) fn beat_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(300))
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut beat = tokio::time::interval(self.beat_interval());
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                cmd = commands.recv() => {
                    if !keeper::serve(&mut self, cmd, &mut commands).await {
                        return;
                    }
                }
                _ = beat.tick(), if self.lease.is_some() && retry_at.is_none() => {
                    let sent = match &mut self.stream {
                        Some((keeper, _)) => timeout(self.timeout, keeper.keep_alive()).await,
                        None => Ok(Err(etcd_client::Error::WatchError("no keep-alive stream".into()))),
                    };
                    if !matches!(sent, Ok(Ok(()))) {
                        self.lost("keep-alive could not be sent");
                    } else {
                        self.verify().await;
                    }
                }
                reply = next_keep_alive(&mut self.stream), if self.stream.is_some() => match reply {
                    Ok(Some(ttl)) if ttl > 0 => {}
                    Ok(Some(_)) => {
                        // etcd itself says the lease is gone: re-grant.
                        self.gone = true;
                        self.lost("etcd reports the lease expired or unknown");
                    }
                    Ok(None) => self.lost("keep-alive stream closed"),
                    Err(e) => self.lost(&format!("keep-alive stream failed: {e}")),
                },
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => {
                    self.restore().await;
                }
            }
        }
    }

    /// The keep-alive broke. That alone does not mean the lease is lost: a
    /// member died (a leader election, a partition from one member) and the
    /// lease lives on in the cluster. `restore` first resumes keeping the
    /// SAME lease alive through whichever member answers; only when etcd
    /// says the lease is gone does it grant a new one and put every key
    /// again.
    pub(super) fn lost(&mut self, why: &str) {
        if self.retry_at.is_some() {
            return;
        }
        warn!(lease = ?self.lease, keys = self.keys.len(), reason = why, "etcd keep-alive interrupted; resuming");
        self.stream = None;
        self.retry_at = Some(Instant::now());
    }

    /// Tries once to resume the lease, or else to get a new one and
    /// republish every key under it.
    pub(super) async fn restore(&mut self) {
        if !self.gone {
            if let Some(lease) = self.lease {
                match self.resume(lease).await {
                    Ok(true) => {
                        info!(lease, "etcd keep-alive resumed; the lease survived");
                        self.retry_at = None;
                        self.backoff.reset();
                        return;
                    }
                    Ok(false) => {
                        warn!(
                            lease,
                            keys = self.keys.len(),
                            "etcd lease expired; re-registering"
                        );
                        self.gone = true;
                    }
                    Err(e) => {
                        let pause = self.backoff.next_pause();
                        debug!(error = %e, ?pause, "etcd unreachable; retrying");
                        self.retry_at = Some(Instant::now() + pause);
                        return;
                    }
                }
            }
        }
        for (_, state) in self.keys.values() {
            state.send_replace(RegistrationState::Reregistering);
        }
        match self.republish().await {
            Ok(()) => {
                self.retry_at = None;
                self.gone = false;
                self.backoff.reset();
            }
            Err(e) => {
                let pause = self.backoff.next_pause();
                debug!(error = %e, ?pause, "etcd re-registration failed; retrying");
                self.retry_at = Some(Instant::now() + pause);
            }
        }
    }

    /// Opens a keep-alive stream for `lease` and sends one beat: `Ok(true)`
    /// if etcd still holds the lease, `Ok(false)` if it does not, `Err` if
    /// etcd cannot be reached.
    pub(super) async fn resume(&mut self, lease: i64) -> Result<bool, RegistryError> {
        let t = self.timeout;
        let (mut keeper, mut stream) = match timeout(t, self.client.lease_keep_alive(lease)).await {
            Ok(Ok(pair)) => pair,
            // etcd-client checks the first reply itself and reports a lease
            // etcd does not know as this error.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                return Ok(false);
            }
            Ok(Err(e)) => return Err(unavailable("lease keep-alive", e)),
            Err(_) => return Err(timed_out("lease keep-alive", t)),
        };
        timeout(t, keeper.keep_alive())
            .await
            .map_err(|_| timed_out("keep-alive", t))?
            .map_err(|e| unavailable("keep-alive", e))?;
        let ttl = match timeout(t, stream.message()).await {
            Ok(Ok(Some(reply))) => reply.ttl(),
            Ok(Ok(None)) => return Err(unavailable("keep-alive", "stream closed at once")),
            Ok(Err(e)) => return Err(unavailable("keep-alive", e)),
            Err(_) => return Err(timed_out("keep-alive reply", t)),
        };
        if ttl <= 0 {
            return Ok(false);
        }
        self.stream = Some((keeper, stream));
        Ok(true)
    }

    pub(super) async fn republish(&mut self) -> Result<(), RegistryError> {
        self.lease = None;
        self.stream = None;
        if self.keys.is_empty() {
            // Nothing to keep alive: the next registration grants a lease.
            return Ok(());
        }
        let lease = self.grant().await?;
        self.generation += 1;
        let keys: Vec<(String, String)> = self
            .keys
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        for (key, value) in &keys {
            self.put(key, value, lease).await?;
        }
        for (_, state) in self.keys.values() {
            state.send_replace(RegistrationState::Registered {
                generation: self.generation,
            });
        }
        info!(
            lease,
            keys = keys.len(),
            generation = self.generation,
            "etcd registrations restored under a new lease"
        );
        Ok(())
    }

    pub(super) async fn grant(&mut self) -> Result<i64, RegistryError> {
        let t = self.timeout;
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let lease = timeout(t, self.client.lease_grant(ttl, None))
            .await
            .map_err(|_| timed_out("lease grant", t))?
            .map_err(|e| unavailable("lease grant", e))?
            .id();
        let stream = timeout(t, self.client.lease_keep_alive(lease))
            .await
            .map_err(|_| timed_out("lease keep-alive", t))?
            .map_err(|e| unavailable("lease keep-alive", e))?;
        self.lease = Some(lease);
        self.stream = Some(stream);
        debug!(lease, ttl, "etcd lease granted");
        Ok(lease)
    }

    /// Puts `key` under `lease`; the value and lease it replaced, if any.
    pub(super) async fn put(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Result<Option<(Vec<u8>, i64)>, RegistryError> {
        let client = &self.client;
        let resp = idempotent(self.timeout, &format!("put {key}"), || {
            let mut c = client.clone();
            async move {
                c.put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(lease).with_prev_key()),
                )
                .await
            }
        })
        .await?;
        Ok(resp.prev_key().map(|kv| (kv.value().to_vec(), kv.lease())))
    }

    /// Compares what etcd holds under every own key with what was
    /// registered, and repairs it (issue 12, faults 3 and 4): a key removed
    /// by someone else is put again, and a key rewritten without a lease
    /// (it would never expire after this process dies) or with another
    /// value is put again under the lease. A key held by another live lease
    /// (a second process publishing the same address) is left to it, logged
    /// once as a conflict, and taken back once it is gone. Runs on every
    /// keep-alive beat (TTL / 3).
    pub(super) async fn verify(&mut self) {
        let Some(own) = self.lease else { return };
        let keys: Vec<(String, String)> = self
            .keys
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        // One read transaction per 64 keys, all bounded together by half a
        // beat: the check must never delay the next keep-alive.
        let budget = self.beat_interval() / 2;
        let checked_by = Instant::now() + budget;
        let mut held: HashMap<String, Option<etcd_client::KeyValue>> = HashMap::new();
        for chunk in keys.chunks(64) {
            let reads: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, _)| TxnOp::get(k.as_str(), None))
                .collect();
            let left = checked_by.saturating_duration_since(Instant::now());
            let resp = match timeout(left, self.client.txn(Txn::new().and_then(reads))).await {
                Ok(Ok(r)) => r,
                // A failed check is tried again at the next beat; the
                // keep-alive notices a registry that is really gone.
                Ok(Err(e)) => {
                    debug!(error = %e, "etcd: cannot check the own keys");
                    return;
                }
                Err(_) => {
                    debug!(?budget, "etcd: checking the own keys took too long");
                    return;
                }
            };
            for ((key, _), op) in chunk.iter().zip(resp.op_responses()) {
                if let etcd_client::TxnOpResponse::Get(get) = op {
                    held.insert(key.clone(), get.kvs().first().cloned());
                }
            }
        }
        for (key, value) in keys {
            let Some(kv) = held.remove(&key) else {
                continue;
            };
            let why = match &kv {
                None => "it was removed by someone else",
                Some(kv) if kv.lease() == 0 => {
                    "it was rewritten without a lease (it would outlive this process)"
                }
                Some(kv) if kv.lease() != own => {
                    let other = kv.lease();
                    if self.conflicts.insert(key.clone(), other) != Some(other) {
                        warn!(
                            key,
                            own_lease = own,
                            other_lease = other,
                            "etcd registration conflict: another live process publishes the same address; standing by until its key is gone"
                        );
                    }
                    continue;
                }
                Some(kv) if kv.value() != value.as_bytes() => "its value was changed",
                Some(_) => {
                    self.conflicts.remove(&key);
                    continue;
                }
            };
            let t = self.timeout.min(budget);
            // Only if nobody changed it since the check.
            let unchanged = match &kv {
                Some(kv) => {
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(
                key.as_str(),
                value.as_str(),
                Some(PutOptions::new().with_lease(own)),
            )]);
            match timeout(t, self.client.txn(txn)).await {
                Ok(Ok(r)) if r.succeeded() => {
                    self.conflicts.remove(&key);
                    self.generation += 1;
                    if let Some((_, state)) = self.keys.get(&key) {
                        state.send_replace(RegistrationState::Registered {
                            generation: self.generation,
                        });
                    }
                    warn!(
                        key,
                        reason = why,
                        "etcd registration drifted from what this provider registered; restored"
                    );
                }
                Ok(Ok(_)) => debug!(
                    key,
                    "etcd: an own key changed while it was repaired; checking again next beat"
                ),
                Ok(Err(e)) => debug!(key, error = %e, "etcd: cannot repair an own key"),
                Err(_) => debug!(key, "etcd: repairing an own key timed out"),
            }
        }
    }

    pub(super) async fn register(
        &mut self,
        key: String,
        value: String,
        state: watch::Sender<RegistrationState>,
    ) -> Result<(), RegistryError> {
        // A keep-alive that just broke is usually resumed at once through
        // another member (a member died): try that now, a few times within
        // the timeout (the client may route the first tries to the dead
        // member again), instead of refusing the registration until the
        // next scheduled attempt.
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Backoff::new(QUICK_RETRY_MIN, QUICK_RETRY_MAX);
        while self.retry_at.is_some() {
            self.restore().await;
            let pause = backoff.next_pause();
            if self.retry_at.is_none() || Instant::now() + pause >= deadline {
                break;
            }
            sleep(pause).await;
        }
        if self.retry_at.is_some() {
            return Err(RegistryError::unavailable_because(
                BACKEND,
                "the etcd lease is lost and being restored; try again",
            ));
        }
        let lease = match self.lease {
            Some(l) => l,
            None => self.grant().await?,
        };
        // Who holds the key now, read before the put: the put's own record
        // of it is lost when the put is sent again after a lost reply (the
        // retry then sees this keeper's lease).
        let before = match timeout(self.timeout, self.client.get(key.as_str(), None)).await {
            Ok(Ok(r)) => r.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())),
            _ => None,
        };
        let replaced = self.put(&key, &value, lease).await?;
        let foreign = |p: &Option<(Vec<u8>, i64)>| {
            p.as_ref()
                .is_some_and(|(_, other)| *other != 0 && *other != lease)
        };
        let displaced = if foreign(&replaced) {
            replaced
        } else if foreign(&before) {
            before
        } else {
            None
        };
        if let Some((prev, other)) = displaced {
            // A key under a lease etcd still holds: another live process
            // publishes the same address. Take it (the address is served
            // either way), and hand it back when deregistering.
            warn!(
                key,
                own_lease = lease,
                other_lease = other,
                "etcd registration conflict: another live process publishes the same address; taking the key over until this registration ends"
            );
            self.displaced.insert(key.clone(), (prev, other));
        }
        state.send_replace(RegistrationState::Registered {
            generation: self.generation,
        });
        self.keys.insert(key, (value, state));
        Ok(())
    }

    pub(super) async fn deregister(&mut self, key: &str) -> Result<(), RegistryError> {
        let Some((_, state)) = self.keys.remove(key) else {
            return Ok(());
        };
        state.send_replace(RegistrationState::Deregistered);
        self.conflicts.remove(key);
        let displaced = self.displaced.remove(key);
        let Some(own) = self.lease else {
            // No lease: the key expired with it, or was never ours.
            return Ok(());
        };
        let ours = || Compare::lease(key, CompareOp::Equal, own);
        if let Some((value, other)) = displaced {
            // Handed back, or no longer ours: nothing to delete. Not done
            // (its lease is gone): delete as usual.
            if self.hand_back(key, value, other, own).await {
                return Ok(());
            }
        }
        // Only a key that is still ours: another process may have taken it.
        let client = &self.client;
        idempotent(self.timeout, &format!("delete {key}"), || {
            let mut c = client.clone();
            let txn = Txn::new()
                .when([ours()])
                .and_then([TxnOp::delete(key, None)]);
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(())
    }

    /// Puts `key` back under `other`, the live lease it was taken from, if
    /// it is still under `own`, so the other process's consumers see no gap.
    /// `true` if settled: handed back, or no longer ours and left alone;
    /// `false` if not done (the other lease is gone, or etcd did not answer).
    pub(super) async fn hand_back(&self, key: &str, value: Vec<u8>, other: i64, own: i64) -> bool {
        let back = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, own)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(other)),
            )]);
        match timeout(self.timeout, self.client.clone().txn(back)).await {
            Ok(Ok(r)) if r.succeeded() => {
                info!(
                    key,
                    other_lease = other,
                    "etcd key handed back to the process it was taken from"
                );
                true
            }
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                debug!(key, error = %e, "etcd: cannot hand the key back");
                false
            }
            Err(_) => {
                debug!(key, "etcd: handing the key back timed out");
                false
            }
        }
    }

    pub(super) async fn revoke(&mut self) {
        for (_, state) in self.keys.values() {
            state.send_replace(RegistrationState::Deregistered);
        }
        self.keys.clear();
        self.conflicts.clear();
        self.stream = None;
        if let Some(lease) = self.lease {
            // Keys taken over from another live process go back to it
            // before the revoke would delete them.
            for (key, (value, other)) in std::mem::take(&mut self.displaced) {
                self.hand_back(&key, value, other, lease).await;
            }
        }
        if let Some(lease) = self.lease.take() {
            let client = &self.client;
            let revoked = idempotent(self.timeout, "lease revoke", || {
                let mut c = client.clone();
                async move { c.lease_revoke(lease).await }
            })
            .await;
            match revoked {
                Ok(_) => info!(lease, "etcd lease revoked"),
                Err(e) => {
                    warn!(lease, error = %e, "etcd lease revoke failed; keys expire with the TTL")
                }
            }
        }
    }
}

pub(super) async fn next_keep_alive(
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<Option<i64>, etcd_client::Error> {
    match stream {
        Some((_, s)) => s.message().await.map(|m| m.map(|r| r.ttl())),
        None => std::future::pending().await,
    }
}
