//! The conformance suite against the two built-in backends.
//!
//! * `local`: providers write to `<tmp>/registry`; consumers read it through
//!   the symlink `<tmp>/view`. The outage renames the symlink away, so
//!   consumers lose the directory while providers keep heartbeating, like a
//!   consumer partitioned from a registry server. Losing a registration
//!   deletes the record file behind the provider's back. The SIGKILL case
//!   runs for real, in a child process.
//! * `memory`: one in-process registry. SIGKILL is skipped: a child process
//!   cannot share its state. Losing a registration is
//!   `MemoryRegistry::evict`; the outage is `set_reachable(false)`.

#[macro_use]
#[allow(unused_macros, dead_code)]
mod common;
#[macro_use]
mod conformance;

use std::path::PathBuf;
use std::time::Duration;

use conformance::{Backend, Unsupported};
use rpc_core::ServiceMetaInfo;
use rpc_registry::{LocalOptions, LocalRegistry, MemoryRegistry};

const TTL: Duration = Duration::from_secs(1);
const DIR_VAR: &str = "RPC_CONFORMANCE_LOCAL_DIR";
const TTL_VAR: &str = "RPC_CONFORMANCE_LOCAL_TTL_MS";

pub struct LocalBackend {
    _tmp: tempfile::TempDir,
    registry_dir: PathBuf,
    view: PathBuf,
    away: PathBuf,
    provider: LocalRegistry,
    consumer: LocalRegistry,
}

impl LocalBackend {
    fn open(dir: PathBuf, ttl: Duration) -> LocalRegistry {
        LocalRegistry::with_options(dir, LocalOptions::new(ttl)).unwrap()
    }
}

impl Backend for LocalBackend {
    type Provider = LocalRegistry;
    type Consumer = LocalRegistry;
    const NAME: &'static str = "local";

    async fn setup() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let registry_dir = tmp.path().join("registry");
        let view = tmp.path().join("view");
        let away = tmp.path().join("view-away");
        let provider = Self::open(registry_dir.clone(), TTL);
        std::os::unix::fs::symlink(&registry_dir, &view).unwrap();
        let consumer = Self::open(view.clone(), TTL);
        Self {
            _tmp: tmp,
            registry_dir,
            view,
            away,
            provider,
            consumer,
        }
    }

    fn provider(&self) -> LocalRegistry {
        self.provider.clone()
    }

    fn consumer(&self) -> LocalRegistry {
        self.consumer.clone()
    }

    fn ttl(&self) -> Duration {
        TTL
    }

    fn propagation(&self) -> Duration {
        self.consumer.poll_interval()
    }

    fn child_env(&self) -> Result<Vec<(String, String)>, Unsupported> {
        Ok(vec![
            (DIR_VAR.into(), self.registry_dir.display().to_string()),
            (TTL_VAR.into(), TTL.as_millis().to_string()),
        ])
    }

    async fn provider_from_env() -> LocalRegistry {
        let dir = std::env::var(DIR_VAR).unwrap();
        let ttl: u64 = std::env::var(TTL_VAR).unwrap().parse().unwrap();
        Self::open(dir.into(), Duration::from_millis(ttl))
    }

    async fn lose_registration(&self, meta: &ServiceMetaInfo) -> Result<(), Unsupported> {
        std::fs::remove_file(self.provider.instance_path(meta)).unwrap();
        Ok(())
    }

    async fn cut_consumers(&self) -> Result<(), Unsupported> {
        std::fs::rename(&self.view, &self.away).unwrap();
        Ok(())
    }

    async fn restore_consumers(&self) {
        std::fs::rename(&self.away, &self.view).unwrap();
    }
}

pub struct MemoryBackend {
    registry: MemoryRegistry,
}

impl Backend for MemoryBackend {
    type Provider = MemoryRegistry;
    type Consumer = MemoryRegistry;
    const NAME: &'static str = "memory";

    async fn setup() -> Self {
        Self {
            registry: MemoryRegistry::new(),
        }
    }

    fn provider(&self) -> MemoryRegistry {
        self.registry.clone()
    }

    fn consumer(&self) -> MemoryRegistry {
        self.registry.clone()
    }

    fn ttl(&self) -> Duration {
        // No liveness timeout: registrations end with their handle.
        Duration::ZERO
    }

    fn propagation(&self) -> Duration {
        Duration::ZERO
    }

    fn child_env(&self) -> Result<Vec<(String, String)>, Unsupported> {
        Err(Unsupported(
            "in-process backend: a provider process cannot share its state, so there is nothing to kill",
        ))
    }

    async fn provider_from_env() -> MemoryRegistry {
        // Never reached: `child_env` is unsupported, so no child is started.
        MemoryRegistry::new()
    }

    async fn lose_registration(&self, meta: &ServiceMetaInfo) -> Result<(), Unsupported> {
        assert!(self.registry.evict(&meta.node_key()));
        Ok(())
    }

    async fn cut_consumers(&self) -> Result<(), Unsupported> {
        self.registry.set_reachable(false);
        Ok(())
    }

    async fn restore_consumers(&self) {
        self.registry.set_reachable(true);
    }
}

mod local {
    conformance_suite!(crate::LocalBackend);
}

mod memory {
    conformance_suite!(crate::MemoryBackend);
}
