//! Tokio TCP transport: multiplexed client and concurrent server
