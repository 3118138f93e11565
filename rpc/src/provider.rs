//! Providers: bind, register, serve, shut down in order.

/// Serves services and registers them.
#[derive(Debug)]
pub struct Provider {}
