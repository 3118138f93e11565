//! Connection metrics: bytes each way and connections open, through the
//! `metrics` facade (names in `rpc_core::metric_names`).
//!
//! The connection loops keep plain counters and hand their totals to a
//! [`Meter`] on their periodic tick and when they close, so the per-frame
//! cost is an add to a local; with no recorder installed the handles are
//! no-ops.

use metrics::{Counter, Gauge};
use rpc_core::metric_names::{
    CLIENT_CONNECTIONS, CLIENT_RECEIVED_BYTES, CLIENT_SENT_BYTES, SERVER_CONNECTIONS,
    SERVER_RECEIVED_BYTES, SERVER_SENT_BYTES,
};

/// One connection's meter. Counts the connection as open from creation to
/// drop.
pub(crate) struct Meter {
    sent: Counter,
    received: Counter,
    open: Gauge,
    reported_sent: u64,
    reported_received: u64,
}

impl Meter {
    /// A consumer's connection to a provider.
    pub(crate) fn client() -> Self {
        Self::new(
            metrics::counter!(CLIENT_SENT_BYTES),
            metrics::counter!(CLIENT_RECEIVED_BYTES),
            metrics::gauge!(CLIENT_CONNECTIONS),
        )
    }

    /// A provider's connection from a consumer.
    pub(crate) fn server() -> Self {
        Self::new(
            metrics::counter!(SERVER_SENT_BYTES),
            metrics::counter!(SERVER_RECEIVED_BYTES),
            metrics::gauge!(SERVER_CONNECTIONS),
        )
    }

    fn new(sent: Counter, received: Counter, open: Gauge) -> Self {
        open.increment(1.0);
        Self {
            sent,
            received,
            open,
            reported_sent: 0,
            reported_received: 0,
        }
    }

    /// Records the connection's byte totals so far (frame bytes, headers
    /// included).
    pub(crate) fn report(&mut self, sent: u64, received: u64) {
        self.sent.increment(sent.saturating_sub(self.reported_sent));
        self.received
            .increment(received.saturating_sub(self.reported_received));
        self.reported_sent = sent;
        self.reported_received = received;
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}
