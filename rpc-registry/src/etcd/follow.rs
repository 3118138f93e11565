//! A service prefix followed: a get, then a watch from its revision; a fresh
//! get after every break.

use super::*;
use crate::support::follow::Emitter;

/// Follows one service prefix.
pub(super) struct Follower {
    pub(super) client: Client,
    pub(super) skips: Arc<SkipLog>,
    pub(super) root: String,
    pub(super) prefix: String,
    pub(super) timeout: Duration,
    pub(super) emit: Emitter,
    /// Last revision whose events were delivered.
    pub(super) revision: i64,
}

pub(super) enum WatchEnd {
    /// The consumer is gone.
    Closed,
    /// The connection failed: back off, then resynchronise.
    Broken(String),
    /// Resynchronise with a fresh get first.
    Resync(String),
}

impl Follower {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            match self.follow().await {
                WatchEnd::Closed => return,
                WatchEnd::Resync(why) => {
                    info!(prefix = %self.prefix, reason = why, "etcd watch resynchronising");
                }
                WatchEnd::Broken(why) => {
                    debug!(prefix = %self.prefix, reason = why, "etcd watch broken");
                    if !self.emit.set_connected(false).await || !self.emit.pause(&mut backoff).await
                    {
                        return;
                    }
                }
            }
            // Every re-established watch starts from a fresh get (module docs).
            loop {
                match self.snapshot().await {
                    Ok(true) => break,
                    Ok(false) => return,
                    Err(e) => {
                        debug!(prefix = %self.prefix, error = %rpc_core::error::report(&e), "etcd resync failed");
                        if !self.emit.set_connected(false).await
                            || !self.emit.pause(&mut backoff).await
                        {
                            return;
                        }
                    }
                }
            }
            backoff.reset();
        }
    }

    /// A fresh get, delivered as a snapshot. `Ok(false)`: consumer gone.
    pub(super) async fn snapshot(&mut self) -> Result<bool, RegistryError> {
        let (list, revision) =
            EtcdRegistry::get_prefix(&mut self.client, &self.prefix, self.timeout, &self.skips)
                .await?;
        self.revision = revision;
        if !self.emit.send(WatchEvent::Snapshot(list)).await {
            return Ok(false);
        }
        Ok(self.emit.set_connected(true).await)
    }

    pub(super) async fn follow(&mut self) -> WatchEnd {
        // Fragmented: a burst of events (a catch-up after a break) comes in
        // several messages instead of one over the receive limit.
        let options = WatchOptions::new()
            .with_prefix()
            .with_fragment()
            .with_start_revision(self.revision + 1);
        let mut stream = tokio::select! {
            _ = self.emit.closed() => return WatchEnd::Closed,
            s = timeout(self.timeout, self.client.watch(self.prefix.as_str(), Some(options))) => match s {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return WatchEnd::Broken(e.to_string()),
                Err(_) => return WatchEnd::Broken("watch request timed out".into()),
            },
        };
        loop {
            let msg = tokio::select! {
                _ = self.emit.closed() => return WatchEnd::Closed,
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return WatchEnd::Broken("watch stream ended".into()),
                Err(e) => return WatchEnd::Broken(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                return WatchEnd::Resync(format!(
                    "revision {} was compacted (oldest kept: {})",
                    self.revision + 1,
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                return WatchEnd::Resync(format!("watch cancelled: {}", resp.cancel_reason()));
            }
            if resp.created() {
                let now = resp.header().map(|h| h.revision()).unwrap_or(0);
                if now < self.revision {
                    // etcd lost its history (restarted from an empty data dir):
                    // our revision means nothing there any more.
                    return WatchEnd::Resync(format!(
                        "cluster revision went back from {} to {now}",
                        self.revision
                    ));
                }
                if !self.emit.set_connected(true).await {
                    return WatchEnd::Closed;
                }
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                self.revision = self.revision.max(kv.mod_revision());
                let key = String::from_utf8_lossy(kv.key());
                let event = match ev.event_type() {
                    EventType::Put => match ServiceMetaInfo::from_json(kv.value()) {
                        Ok(m) => {
                            self.skips.usable(&key);
                            WatchEvent::Upsert(m)
                        }
                        Err(e) => {
                            self.skips.skipped(
                                BACKEND,
                                &key,
                                &format!("not an instance record: {e}"),
                            );
                            continue;
                        }
                    },
                    EventType::Delete => match key.strip_prefix(self.root.as_str()) {
                        Some(node) => WatchEvent::Remove(node.to_owned()),
                        None => continue,
                    },
                };
                if !self.emit.send(event).await {
                    return WatchEnd::Closed;
                }
            }
        }
    }
}
