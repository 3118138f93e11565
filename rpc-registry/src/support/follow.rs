//! What every follower (a backend's watch task) does towards its consumer:
//! send events while someone listens, say `Connected(false)` and
//! `Connected(true)` once per change, pause between attempts unless the
//! consumer leaves, and turn a whole list into a snapshot (after a break)
//! or into changes.

// Shared by the four remote backends; a build with only some of them
// uses only some of it.
#![cfg_attr(
    not(all(
        feature = "etcd",
        feature = "zookeeper",
        feature = "consul",
        feature = "nacos"
    )),
    allow(dead_code)
)]

use rpc_core::WatchEvent;
use rpc_core::backoff::Backoff;
use tokio::sync::mpsc;

use super::diff::{self, Nodes};

/// A watch's sending side and the connection state its consumer was last
/// told. Every method answers `false` once the consumer is gone.
#[derive(Debug)]
pub(crate) struct Emitter {
    tx: mpsc::Sender<WatchEvent>,
    connected: bool,
}

impl Emitter {
    /// For a watch whose first snapshot was just sent (connected).
    pub(crate) fn new(tx: mpsc::Sender<WatchEvent>) -> Self {
        Self {
            tx,
            connected: true,
        }
    }

    /// Sends one event.
    pub(crate) async fn send(&self, event: WatchEvent) -> bool {
        self.tx.send(event).await.is_ok()
    }

    /// Sends events in order.
    pub(crate) async fn send_all(&self, events: impl IntoIterator<Item = WatchEvent>) -> bool {
        for event in events {
            if !self.send(event).await {
                return false;
            }
        }
        true
    }

    /// Tells the consumer the connection state, if it changed.
    pub(crate) async fn set_connected(&mut self, up: bool) -> bool {
        if self.connected == up {
            return true;
        }
        self.connected = up;
        self.send(WatchEvent::Connected(up)).await
    }

    /// The state the consumer was last told.
    pub(crate) fn connected(&self) -> bool {
        self.connected
    }

    /// Resolves when the consumer is gone.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
    }

    /// A sender for `select!` arms that cannot borrow the follower.
    pub(crate) fn sender(&self) -> mpsc::Sender<WatchEvent> {
        self.tx.clone()
    }

    /// Waits the next pause of `backoff`, unless the consumer goes away
    /// first (`false`).
    pub(crate) async fn pause(&self, backoff: &mut Backoff) -> bool {
        let d = backoff.next_pause();
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.tx.closed() => false,
        }
    }

    /// Tells the consumer about a whole list `next`, which becomes
    /// `current`: a snapshot and `Connected(true)` after a break, else the
    /// changes.
    pub(crate) async fn deliver(&mut self, current: &mut Nodes, next: Nodes) -> bool {
        if !self.connected {
            let snapshot = next.values().cloned().collect();
            *current = next;
            return self.send(WatchEvent::Snapshot(snapshot)).await
                && self.set_connected(true).await;
        }
        let events = diff::diff(current, &next);
        *current = next;
        self.send_all(events).await
    }
}
