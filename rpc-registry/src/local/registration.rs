//! A registration: its record, its heartbeat task, and its removal.

use super::*;

/// One registration's record, shared by its heartbeat and its guard.
pub(super) struct Provider {
    pub(super) meta: ServiceMetaInfo,
    pub(super) path: PathBuf,
    pub(super) ttl: Duration,
    pub(super) owner: String,
    // Held across every write and the final delete, so a heartbeat write in
    // flight cannot resurrect the record after deregistration.
    pub(super) stopped: Mutex<bool>,
    pub(super) state: watch::Sender<RegistrationState>,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Published {
    /// The record was there and is refreshed.
    Refreshed,
    /// The record was gone and is written again.
    Recreated,
    /// The registration has been withdrawn; nothing written.
    Stopped,
}

impl Provider {
    /// Writes the record with a fresh heartbeat (blocking). On error, also
    /// says whether the record was still there.
    pub(super) fn publish(&self) -> Result<Published, (bool, io::Error)> {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return Ok(Published::Stopped);
        }
        let existed = self.path.is_file();
        let record = Record {
            meta: self.meta.clone(),
            heartbeat_ms: now_ms(),
            ttl_ms: millis(self.ttl),
            pid: std::process::id(),
            owner: self.owner.clone(),
            written_at: None,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| (existed, io::Error::other(e)))?;
        let write = || {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir)?;
            }
            write_atomic(&self.path, &bytes)
        };
        write().map_err(|e| (existed, e))?;
        Ok(if existed {
            Published::Refreshed
        } else {
            Published::Recreated
        })
    }

    /// Stops publishing and deletes the record if it is still ours (blocking).
    pub(super) fn withdraw(&self) -> io::Result<()> {
        let mut stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return Ok(());
        }
        *stopped = true;
        self.state.send_replace(RegistrationState::Deregistered);
        match read_record(&self.path) {
            Ok(Some(record)) if record.owner != self.owner => {
                // A newer registration of the same node took the file over.
                tracing::debug!(path = %self.path.display(), "record owned by another registration; left in place");
                return Ok(());
            }
            Ok(None) => return Ok(()),
            _ => {}
        }
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

pub(super) async fn heartbeat(provider: Arc<Provider>) {
    let period = provider.ttl / 3;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    let mut generation = 0u64;
    let mut last_ok = tokio::time::Instant::now();
    let mut lost = false;
    loop {
        tick.tick().await;
        let p = Arc::clone(&provider);
        let outcome = match tokio::task::spawn_blocking(move || p.publish()).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, "local registry heartbeat task failed");
                continue;
            }
        };
        let node = provider.meta.node_key();
        match outcome {
            Ok(Published::Stopped) => return,
            Ok(published) => {
                // A record that expired counts as lost too: consumers have
                // already dropped it, even if the file was still there.
                let expired = last_ok.elapsed() > provider.ttl;
                last_ok = tokio::time::Instant::now();
                if lost || expired || published == Published::Recreated {
                    generation += 1;
                    lost = false;
                    tracing::warn!(
                        node = %node,
                        path = %provider.path.display(),
                        generation,
                        reason = if published == Published::Recreated { "record was deleted" } else { "record had expired" },
                        "local registry lost the registration; registered again"
                    );
                    provider
                        .state
                        .send_replace(RegistrationState::Registered { generation });
                }
            }
            Err((existed, e)) => {
                tracing::warn!(node = %node, path = %provider.path.display(), error = %e, "local registry heartbeat failed");
                if !existed && !lost {
                    lost = true;
                    provider
                        .state
                        .send_replace(RegistrationState::Reregistering);
                }
            }
        }
    }
}

pub(super) struct LocalDeregister {
    pub(super) provider: Arc<Provider>,
    pub(super) heartbeat: AbortOnDrop,
}

impl Deregister for LocalDeregister {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        let Self {
            provider,
            heartbeat,
        } = *self;
        drop(heartbeat);
        Box::pin(blocking(move || {
            provider.withdraw().map_err(|source| RegistryError::Io {
                path: provider.path.clone(),
                source,
            })
        }))
    }

    fn deregister_on_drop(self: Box<Self>) {
        let Self {
            provider,
            heartbeat,
        } = *self;
        drop(heartbeat);
        // Deleting inline rather than in a spawned task: one unlink of a
        // local file is quick, and it must happen even while the runtime is
        // shutting down (a provider dropping its registration on exit).
        if let Err(e) = provider.withdraw() {
            tracing::warn!(path = %provider.path.display(), error = %e, "cannot delete the local registry record");
        }
    }
}
