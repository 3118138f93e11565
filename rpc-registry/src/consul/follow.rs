//! A service followed with blocking queries.

use super::*;
use crate::support::follow::Emitter;

/// Follows one service with blocking queries.
pub(super) struct Follower {
    pub(super) registry: ConsulRegistry,
    pub(super) service_key: String,
    pub(super) emit: Emitter,
    /// Index for the next blocking query (0: answer at once).
    pub(super) index: u64,
    /// What the consumer was last told, by node key.
    pub(super) current: BTreeMap<String, ServiceMetaInfo>,
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
                    _ = self.emit.closed() => return,
                }
            }
            last_query = Some(Instant::now());
            let index = (self.index > 0).then_some(self.index);
            let answer = tokio::select! {
                a = self.registry.health(&self.service_key, index, true) => a,
                _ = self.emit.closed() => return,
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
                    if !self.emit.set_connected(false).await {
                        return;
                    }
                    let d = backoff.next_pause();
                    tokio::select! {
                        _ = sleep(d) => {}
                        _ = self.emit.closed() => return,
                    }
                }
            }
        }
    }

    /// Tells the consumer about `list`: a snapshot after an outage, else
    /// the differences. `false`: the consumer is gone.
    pub(super) async fn deliver(&mut self, list: Vec<ServiceMetaInfo>) -> bool {
        self.emit
            .deliver(&mut self.current, diff::nodes(list))
            .await
    }
}
