//! [`AnyRegistry`]: the backend named in `[registry]`, behind one type.
//!
//! A closed enum rather than a trait object: `Registry` and `Discover` use
//! `async fn`, which is not object safe, and a `match` costs nothing. Remote
//! backends become variants behind their cargo features as they land.

use rpc_core::{
    Discover, Registration, RegistryConfig, RegistryError, RegistryKind, ServiceMetaInfo, Watch,
};

#[cfg(feature = "consul")]
use crate::consul::ConsulRegistry;
#[cfg(feature = "etcd")]
use crate::etcd::EtcdRegistry;
use crate::local::LocalRegistry;
use crate::memory::MemoryRegistry;
#[cfg(feature = "nacos")]
use crate::nacos::NacosRegistry;
#[cfg(feature = "zookeeper")]
use crate::zookeeper::ZookeeperRegistry;

/// Name of the [`MemoryRegistry::shared`] instance used when the
/// configuration gives no address.
pub const DEFAULT_MEMORY_NAME: &str = "default";

/// Any compiled-in registry backend. Cheap to clone.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum AnyRegistry {
    /// In-process ([`MemoryRegistry`]).
    Memory(MemoryRegistry),
    /// Directory on this host ([`LocalRegistry`]).
    Local(LocalRegistry),
    /// etcd v3 ([`EtcdRegistry`], feature `etcd`).
    #[cfg(feature = "etcd")]
    Etcd(EtcdRegistry),
    /// Nacos 2.x ([`NacosRegistry`], feature `nacos`).
    #[cfg(feature = "nacos")]
    Nacos(NacosRegistry),
    /// A Consul agent ([`ConsulRegistry`], feature `consul`).
    #[cfg(feature = "consul")]
    Consul(ConsulRegistry),
    /// Apache ZooKeeper ([`ZookeeperRegistry`], feature `zookeeper`).
    #[cfg(feature = "zookeeper")]
    Zookeeper(ZookeeperRegistry),
}

impl AnyRegistry {
    /// Builds the backend `config.kind` names.
    ///
    /// * `local`: [`LocalRegistry::from_config`] (the first address is the
    ///   directory).
    /// * `memory`: the process-wide [`MemoryRegistry::shared`] instance named
    ///   by the first address (or [`DEFAULT_MEMORY_NAME`]), so a provider and
    ///   a consumer built from one configuration in one process meet.
    /// * others: [`RegistryError::NotCompiled`] until their backends exist.
    ///
    /// Async so that backends that must connect first fit the same call.
    pub async fn from_config(config: &RegistryConfig) -> Result<Self, RegistryError> {
        match config.kind {
            RegistryKind::Local => Ok(Self::Local(LocalRegistry::from_config(config)?)),
            RegistryKind::Memory => Ok(Self::Memory(MemoryRegistry::shared(
                config.address.first().unwrap_or(DEFAULT_MEMORY_NAME),
            ))),
            #[cfg(feature = "etcd")]
            RegistryKind::Etcd => Ok(Self::Etcd(EtcdRegistry::connect(config).await?)),
            #[cfg(not(feature = "etcd"))]
            RegistryKind::Etcd => Err(RegistryError::NotCompiled("etcd")),
            #[cfg(feature = "consul")]
            RegistryKind::Consul => Ok(Self::Consul(ConsulRegistry::connect(config).await?)),
            #[cfg(not(feature = "consul"))]
            RegistryKind::Consul => Err(RegistryError::NotCompiled("consul")),
            #[cfg(feature = "zookeeper")]
            RegistryKind::Zookeeper => {
                Ok(Self::Zookeeper(ZookeeperRegistry::connect(config).await?))
            }
            #[cfg(not(feature = "zookeeper"))]
            RegistryKind::Zookeeper => Err(RegistryError::NotCompiled("zookeeper")),
            #[cfg(feature = "nacos")]
            RegistryKind::Nacos => Ok(Self::Nacos(NacosRegistry::connect(config).await?)),
            #[cfg(not(feature = "nacos"))]
            RegistryKind::Nacos => Err(RegistryError::NotCompiled("nacos")),
        }
    }

    /// Which backend this is.
    pub fn kind(&self) -> RegistryKind {
        match self {
            Self::Memory(_) => RegistryKind::Memory,
            Self::Local(_) => RegistryKind::Local,
            #[cfg(feature = "etcd")]
            Self::Etcd(_) => RegistryKind::Etcd,
            #[cfg(feature = "nacos")]
            Self::Nacos(_) => RegistryKind::Nacos,
            #[cfg(feature = "consul")]
            Self::Consul(_) => RegistryKind::Consul,
            #[cfg(feature = "zookeeper")]
            Self::Zookeeper(_) => RegistryKind::Zookeeper,
        }
    }

    /// Ends this registry's sessions: backends with a lease or session
    /// release it, removing every instance published through it at once.
    /// Registrations are removed either way when their handles drop.
    pub async fn shutdown(&self) {
        match self {
            Self::Memory(_) | Self::Local(_) => {}
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.shutdown().await,
            #[cfg(feature = "nacos")]
            Self::Nacos(r) => r.shutdown().await,
            #[cfg(feature = "consul")]
            Self::Consul(r) => r.shutdown().await,
            #[cfg(feature = "zookeeper")]
            Self::Zookeeper(r) => r.shutdown().await,
        }
    }
}

#[cfg(feature = "etcd")]
impl From<EtcdRegistry> for AnyRegistry {
    fn from(r: EtcdRegistry) -> Self {
        Self::Etcd(r)
    }
}

#[cfg(feature = "nacos")]
impl From<NacosRegistry> for AnyRegistry {
    fn from(r: NacosRegistry) -> Self {
        Self::Nacos(r)
    }
}

#[cfg(feature = "consul")]
impl From<ConsulRegistry> for AnyRegistry {
    fn from(r: ConsulRegistry) -> Self {
        Self::Consul(r)
    }
}

#[cfg(feature = "zookeeper")]
impl From<ZookeeperRegistry> for AnyRegistry {
    fn from(r: ZookeeperRegistry) -> Self {
        Self::Zookeeper(r)
    }
}

impl From<MemoryRegistry> for AnyRegistry {
    fn from(r: MemoryRegistry) -> Self {
        Self::Memory(r)
    }
}

impl From<LocalRegistry> for AnyRegistry {
    fn from(r: LocalRegistry) -> Self {
        Self::Local(r)
    }
}

impl rpc_core::Registry for AnyRegistry {
    async fn register(&self, meta: ServiceMetaInfo) -> Result<Registration, RegistryError> {
        match self {
            Self::Memory(r) => r.register(meta).await,
            Self::Local(r) => r.register(meta).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.register(meta).await,
            #[cfg(feature = "nacos")]
            Self::Nacos(r) => r.register(meta).await,
            #[cfg(feature = "consul")]
            Self::Consul(r) => r.register(meta).await,
            #[cfg(feature = "zookeeper")]
            Self::Zookeeper(r) => r.register(meta).await,
        }
    }
}

impl Discover for AnyRegistry {
    async fn discover(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        match self {
            Self::Memory(r) => r.discover(service_key).await,
            Self::Local(r) => r.discover(service_key).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.discover(service_key).await,
            #[cfg(feature = "nacos")]
            Self::Nacos(r) => r.discover(service_key).await,
            #[cfg(feature = "consul")]
            Self::Consul(r) => r.discover(service_key).await,
            #[cfg(feature = "zookeeper")]
            Self::Zookeeper(r) => r.discover(service_key).await,
        }
    }

    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        match self {
            Self::Memory(r) => r.services().await,
            Self::Local(r) => r.services().await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.services().await,
            #[cfg(feature = "nacos")]
            Self::Nacos(r) => r.services().await,
            #[cfg(feature = "consul")]
            Self::Consul(r) => r.services().await,
            #[cfg(feature = "zookeeper")]
            Self::Zookeeper(r) => r.services().await,
        }
    }

    async fn watch(&self, service_key: &str) -> Result<Watch, RegistryError> {
        match self {
            Self::Memory(r) => r.watch(service_key).await,
            Self::Local(r) => r.watch(service_key).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.watch(service_key).await,
            #[cfg(feature = "nacos")]
            Self::Nacos(r) => r.watch(service_key).await,
            #[cfg(feature = "consul")]
            Self::Consul(r) => r.watch(service_key).await,
            #[cfg(feature = "zookeeper")]
            Self::Zookeeper(r) => r.watch(service_key).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rpc_core::Registry;
    use rpc_core::config::Addresses;

    use super::*;

    #[tokio::test]
    async fn builds_the_configured_backend() {
        let dir = tempfile::tempdir().unwrap();
        let config = RegistryConfig {
            address: Addresses(vec![dir.path().display().to_string()]),
            ttl_secs: 7,
            ..RegistryConfig::default()
        };
        let AnyRegistry::Local(local) = AnyRegistry::from_config(&config).await.unwrap() else {
            panic!("expected the local backend by default");
        };
        assert_eq!(local.dir(), dir.path());
        assert_eq!(local.ttl(), Duration::from_secs(7));

        let memory = RegistryConfig {
            kind: RegistryKind::Memory,
            address: Addresses(vec!["factory-test".into()]),
            ..RegistryConfig::default()
        };
        let a = AnyRegistry::from_config(&memory).await.unwrap();
        let b = AnyRegistry::from_config(&memory).await.unwrap();
        assert_eq!(a.kind(), RegistryKind::Memory);
        let meta = ServiceMetaInfo::new("F", "1.0", "h", 1);
        let _r = a.register(meta.clone()).await.unwrap();
        assert_eq!(b.discover("F:1.0").await.unwrap(), vec![meta]);
    }

    #[tokio::test]
    async fn local_defaults_to_a_temp_directory() {
        let AnyRegistry::Local(local) = AnyRegistry::from_config(&RegistryConfig::default())
            .await
            .unwrap()
        else {
            panic!("expected the local backend by default");
        };
        assert_eq!(local.dir(), crate::local::default_dir());
        assert_eq!(local.ttl(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn missing_backends_say_so() {
        for kind in [
            #[cfg(not(feature = "etcd"))]
            RegistryKind::Etcd,
            #[cfg(not(feature = "zookeeper"))]
            RegistryKind::Zookeeper,
            #[cfg(not(feature = "consul"))]
            RegistryKind::Consul,
            #[cfg(not(feature = "nacos"))]
            RegistryKind::Nacos,
        ] {
            let config = RegistryConfig {
                kind,
                ..RegistryConfig::default()
            };
            match AnyRegistry::from_config(&config).await {
                Err(RegistryError::NotCompiled(name)) => assert_eq!(name, kind.as_str()),
                other => panic!("{kind}: unexpected {other:?}"),
            }
        }
    }
}
