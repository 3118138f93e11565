//! The instance snapshot file: the last good lists, for starting while
//! the registry is down.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rpc_core::ServiceMetaInfo;
use serde::{Deserialize, Serialize};

use super::Slot;

/// Writes happen at most this often, however busy discovery is.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    saved_at_ms: u64,
    services: BTreeMap<String, Vec<ServiceMetaInfo>>,
}

/// Reads the file; a missing or unreadable file is an empty seed (logged).
pub(super) fn load(path: &Path) -> HashMap<String, Vec<ServiceMetaInfo>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the instance snapshot file");
            return HashMap::new();
        }
    };
    match serde_json::from_slice::<File>(&bytes) {
        Ok(f) => f.services.into_iter().collect(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a malformed instance snapshot file");
            HashMap::new()
        }
    }
}

pub(super) async fn writer(
    path: PathBuf,
    services: Arc<ArcSwap<HashMap<String, Slot>>>,
    notify: Arc<tokio::sync::Notify>,
) {
    loop {
        notify.notified().await;
        let file = File {
            saved_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            services: services
                .load()
                .iter()
                .filter(|(_, slot)| slot.entry.ready.load(std::sync::atomic::Ordering::Acquire))
                .map(|(k, slot)| (k.clone(), slot.entry.list.load().to_vec()))
                .collect(),
        };
        if let Err(e) = write_atomically(&path, &file) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the instance snapshot file");
        }
        tokio::time::sleep(MIN_INTERVAL).await;
    }
}

fn write_atomically(path: &Path, file: &File) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    crate::support::fs::write_atomic(path, &json)
}
