//! The #[service] attribute macro.
