//! A service followed with blocking queries.

use super::*;

/// Follows one service with blocking queries.
pub(super) struct Follower {
    pub(super) registry: ConsulRegistry,
    pub(super) service_key: String,
    pub(super) tx: mpsc::Sender<WatchEvent>,
    /// Index for the next blocking query (0: answer at once).
    pub(super) index: u64,
    /// What the consumer was last told, by node key.
    pub(super) current: BTreeMap<String, ServiceMetaInfo>,
    pub(super) connected: bool,
}

impl Follower {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut last_query: Option<Instant> = None;
        loop {
            if let Some(at) = last_query {
                let next = at + MIN_QUERY_INTERVAL;
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = self.tx.closed() => return,
                }
            }
            last_query = Some(Instant::now());
            let index = (self.index > 0).then_some(self.index);
            let answer = tokio::select! {
                a = self.registry.health(&self.service_key, index, true) => a,
                _ = self.tx.closed() => return,
            };
            match answer {
                Ok((list, returned)) => {
                    if returned < self.index {
                        info!(service = %self.service_key, from = self.index, to = returned, "consul index went backwards; resetting");
                    }
                    self.index = next_index(self.index, returned);
                    backoff.reset();
                    if !self.deliver(list).await {
                        return;
                    }
                }
                Err(e) => {
                    debug!(service = %self.service_key, error = %e, "consul watch query failed");
                    // Resynchronise from scratch once the agent answers again.
                    self.index = 0;
                    if self.connected {
                        self.connected = false;
                        if self.tx.send(WatchEvent::Connected(false)).await.is_err() {
                            return;
                        }
                    }
                    let d = backoff.next_pause();
                    tokio::select! {
                        _ = sleep(d) => {}
                        _ = self.tx.closed() => return,
                    }
                }
            }
        }
    }

    /// Tells the consumer about `list`: a snapshot after an outage, else
    /// the differences. `false`: the consumer is gone.
    pub(super) async fn deliver(&mut self, list: Vec<ServiceMetaInfo>) -> bool {
        let next = diff::nodes(list);
        if !self.connected {
            let snapshot = next.values().cloned().collect();
            self.current = next;
            if self.tx.send(WatchEvent::Snapshot(snapshot)).await.is_err() {
                return false;
            }
            self.connected = true;
            return self.tx.send(WatchEvent::Connected(true)).await.is_ok();
        }
        let events = diff::diff(&self.current, &next);
        self.current = next;
        for event in events {
            if self.tx.send(event).await.is_err() {
                return false;
            }
        }
        true
    }
}
