//! Consumers: discovery, load balancing, pooled multiplexed connections.

use std::sync::Arc;

use rpc_core::{RpcConfig, RpcError};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Shared consumer state: one per process is typical.
#[derive(Clone, Debug)]
pub struct Consumer {
    inner: Arc<ConsumerInner>,
}

#[derive(Debug)]
struct ConsumerInner {
    config: RpcConfig,
}

impl Consumer {
    /// Builds a consumer from configuration (registry, client policy).
    pub async fn from_config(config: &RpcConfig) -> Result<Self, RpcError> {
        Ok(Self {
            inner: Arc::new(ConsumerInner {
                config: config.clone(),
            }),
        })
    }

    /// A proxy for one service.
    pub fn service(&self, name: &str, version: &str) -> ServiceClient {
        ServiceClient {
            consumer: self.clone(),
            service_key: Arc::from(rpc_core::service_key(name, version)),
        }
    }
}

/// An untyped proxy for one service; generated clients wrap it.
#[derive(Clone, Debug)]
pub struct ServiceClient {
    consumer: Consumer,
    service_key: Arc<str>,
}

impl ServiceClient {
    /// `name:version` of the service.
    pub fn service_key(&self) -> &str {
        &self.service_key
    }

    /// Calls `method` with the argument tuple `args`.
    pub async fn call<A, R>(&self, method: &'static str, args: &A) -> Result<R, RpcError>
    where
        A: Serialize + Sync + ?Sized,
        R: DeserializeOwned,
    {
        let _ = (method, args, &self.consumer.inner.config);
        Err(RpcError::NoProvider {
            service: self.service_key.to_string(),
        })
    }
}
