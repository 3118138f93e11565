//! The RPC framework facade: providers, consumers, the #[service] macro
