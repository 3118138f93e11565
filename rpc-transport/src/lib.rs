//! Tokio TCP transport (work in progress).
#![allow(missing_docs)]
pub mod server;
