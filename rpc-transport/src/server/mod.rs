//! Server.
mod handler;
pub use handler::*;
