//! [`LocalRegistry`]: the default backend. Cross-process on one host, no
//! server: a directory of small JSON files.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/<service key, encoded>/<host:port, encoded>.json
//! ```
//!
//! Names are percent-encoded (`UserService:1.0` → `UserService%3A1.0`);
//! over-long ones are cut and suffixed with a hash. The authoritative keys are
//! inside the record, so readers check them instead of decoding names.
//!
//! A record is the instance's [`ServiceMetaInfo`] JSON (Java field names)
//! plus `heartbeatMs` (wall clock, ms since the Unix epoch), `ttlMs`, `pid`
//! and `owner` (a token naming the registration). Every write goes to a
//! dot-prefixed temp file in the same directory and is renamed over the
//! record, so readers never see half a file.
//!
//! # Liveness
//!
//! A registration rewrites its record every `ttl / 3`. A record whose
//! heartbeat is older than its `ttlMs` is dead: readers ignore it, and delete
//! it once it is [`LocalOptions::gc_after_ttls`] TTLs old. A provider killed
//! with SIGKILL therefore vanishes from discovery within its TTL plus one
//! poll interval. If the heartbeat finds its record gone (deleted, or garbage
//! collected after the process was suspended) or expired, it writes it again,
//! bumps the generation in [`RegistrationState`] and logs a warning.
//!
//! # Watching
//!
//! A watch polls the service directory every [`LocalOptions::poll_interval`]
//! and emits the difference. A missing root directory means the registry is
//! unreachable (the directory was moved away, a mount went away): the watch
//! reports [`WatchEvent::Connected`]`(false)` and keeps its last state until
//! the directory is back, whereas a missing service directory is simply a
//! service with no instances.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rpc_core::discover::WATCH_CHANNEL_CAPACITY;
use rpc_core::{
    BoxFuture, Deregister, Discover, Registration, RegistrationState, RegistryConfig,
    RegistryError, ServiceMetaInfo, Watch, WatchEvent,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

use crate::support::diff;
use crate::support::fs::write_atomic;
use crate::support::task::AbortOnDrop;

mod follow;
mod registration;
mod scan;

use follow::*;
use registration::*;
use scan::*;

const BACKEND: &str = "local";
/// Records larger than this are not read: a real one is a few hundred bytes.
pub const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// Default directory name under the system temp dir.
pub const DEFAULT_DIR_NAME: &str = "rpc-local-registry";
/// Longest encoded file name component before it is cut and hashed.
const MAX_NAME_LEN: usize = 180;
/// Garbage paths a watch remembers having warned about, so a bad file is
/// logged once rather than on every poll.
const MAX_REPORTED_GARBAGE: usize = 1024;
const MIN_TTL: Duration = Duration::from_millis(30);
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Tuning for [`LocalRegistry::with_options`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalOptions {
    /// How long a record outlives its last heartbeat. Heartbeats run every
    /// third of it. Clamped to at least 30 ms.
    pub ttl: Duration,
    /// How often a watch rereads its service directory. `None`:
    /// `min(ttl / 4, 250 ms)`.
    pub poll_interval: Option<Duration>,
    /// Dead records are deleted by readers once their heartbeat is this many
    /// TTLs old (at least 2).
    pub gc_after_ttls: u32,
}

impl LocalOptions {
    /// Defaults for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            poll_interval: None,
            gc_after_ttls: 5,
        }
    }
}

/// The directory-backed registry. Cheap to clone.
#[derive(Clone)]
pub struct LocalRegistry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    ttl: Duration,
    poll_interval: Duration,
    gc_after: Duration,
}

impl fmt::Debug for LocalRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRegistry")
            .field("dir", &self.inner.root)
            .field("ttl", &self.inner.ttl)
            .field("poll_interval", &self.inner.poll_interval)
            .finish()
    }
}

/// The directory used when the configuration names none.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join(DEFAULT_DIR_NAME)
}

impl LocalRegistry {
    /// A registry in `dir` (created if missing) with default options for `ttl`.
    pub fn new(dir: impl Into<PathBuf>, ttl: Duration) -> Result<Self, RegistryError> {
        Self::with_options(dir, LocalOptions::new(ttl))
    }

    /// A registry in `dir` (created if missing).
    pub fn with_options(
        dir: impl Into<PathBuf>,
        options: LocalOptions,
    ) -> Result<Self, RegistryError> {
        let root = dir.into();
        fs::create_dir_all(&root).map_err(|source| RegistryError::Io {
            path: root.clone(),
            source,
        })?;
        let ttl = options.ttl.max(MIN_TTL);
        let poll_interval = options
            .poll_interval
            .unwrap_or_else(|| (ttl / 4).min(MAX_POLL_INTERVAL))
            .max(MIN_POLL_INTERVAL);
        let gc_after = ttl.saturating_mul(options.gc_after_ttls.max(2));
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                ttl,
                poll_interval,
                gc_after,
            }),
        })
    }

    /// From `[registry]`: the first address is the directory (empty: the
    /// [`default_dir`]), `ttl_secs` the TTL.
    pub fn from_config(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let dir = config
            .address
            .first()
            .map(PathBuf::from)
            .unwrap_or_else(default_dir);
        Self::new(dir, config.ttl())
    }

    /// The registry directory.
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    /// The TTL this registry's registrations publish.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// How often watches poll.
    pub fn poll_interval(&self) -> Duration {
        self.inner.poll_interval
    }

    /// The directory holding `service_key`'s records.
    pub fn service_dir(&self, service_key: &str) -> PathBuf {
        self.inner.root.join(encode_name(service_key))
    }

    /// The file holding `meta`'s record.
    pub fn instance_path(&self, meta: &ServiceMetaInfo) -> PathBuf {
        self.service_dir(&meta.service_key())
            .join(format!("{}.json", encode_name(&meta.address())))
    }
}

/// Percent-encodes everything but `[A-Za-z0-9_-]` and non-leading dots, so
/// the result is one safe path component that never starts with a dot (dot
/// files are temp files) and never is empty, `.` or `..`.
pub(crate) fn encode_name(s: &str) -> String {
    if s.is_empty() {
        // No non-empty input encodes to a lone '%'.
        return "%".to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push_str(&format!("{b:02X}"));
        }
    }
    if out.len() > MAX_NAME_LEN {
        // Encoded output is ASCII, so any byte index is a char boundary.
        out.truncate(MAX_NAME_LEN - 17);
        out.push('~');
        out.push_str(&format!("{:016x}", fnv1a(s.as_bytes())));
    }
    out
}

/// FNV-1a: stable across Rust versions and processes, unlike `DefaultHasher`,
/// which matters because different binaries must agree on file names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What is stored in an instance file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Record {
    #[serde(flatten)]
    pub(crate) meta: ServiceMetaInfo,
    pub(crate) heartbeat_ms: u64,
    #[serde(default)]
    pub(crate) ttl_ms: u64,
    #[serde(default)]
    pub(crate) pid: u32,
    #[serde(default)]
    pub(crate) owner: String,
    /// When this host's file system says the file was last written; not
    /// stored.
    #[serde(skip)]
    pub(crate) written_at: Option<SystemTime>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl rpc_core::Registry for LocalRegistry {
    async fn register(&self, meta: ServiceMetaInfo) -> Result<Registration, RegistryError> {
        static OWNERS: AtomicU64 = AtomicU64::new(0);
        let (state, state_rx) = watch::channel(RegistrationState::Registered { generation: 0 });
        let provider = Arc::new(Provider {
            path: self.instance_path(&meta),
            ttl: self.inner.ttl,
            owner: format!(
                "{}-{}-{}",
                std::process::id(),
                now_ms(),
                OWNERS.fetch_add(1, Ordering::Relaxed)
            ),
            meta: meta.clone(),
            stopped: Mutex::new(false),
            state,
        });
        let first = Arc::clone(&provider);
        blocking(move || {
            first
                .publish()
                .map(|_| ())
                .map_err(|(_, source)| RegistryError::Io {
                    path: first.path.clone(),
                    source,
                })
        })
        .await?;
        tracing::debug!(node = %meta.node_key(), path = %provider.path.display(), "registered");
        let Some(heartbeat) = AbortOnDrop::spawn(heartbeat(Arc::clone(&provider))) else {
            // Registered but nothing would keep it alive: take it back.
            let _ = provider.withdraw();
            return Err(no_runtime("no runtime for the heartbeat task".into()));
        };
        Ok(Registration::new(
            meta,
            state_rx,
            LocalDeregister {
                provider,
                heartbeat,
            },
        ))
    }
}

impl Discover for LocalRegistry {
    async fn discover(&self, service_key: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        let inner = Arc::clone(&self.inner);
        let key = service_key.to_owned();
        // A one-off read has no history: a record with a heartbeat from the
        // future is judged by its file's age.
        let scan = blocking(move || inner.scan(&key, false, Observed::default())).await?;
        log_garbage(&scan.garbage);
        Ok(scan.live.into_values().collect())
    }

    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.service_keys()).await
    }

    async fn watch(&self, service_key: &str) -> Result<Watch, RegistryError> {
        let inner = Arc::clone(&self.inner);
        let key = service_key.to_owned();
        let scan = blocking(move || inner.scan(&key, false, Observed::default())).await?;
        let mut reported = HashSet::new();
        report_new_garbage(&mut reported, &scan.garbage);
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let snapshot = WatchEvent::Snapshot(scan.live.values().cloned().collect());
        if tx.try_send(snapshot).is_err() {
            return Err(RegistryError::Shutdown);
        }
        let task = AbortOnDrop::spawn(poll(
            Arc::clone(&self.inner),
            service_key.to_owned(),
            scan,
            reported,
            tx,
        ));
        let task = task.ok_or_else(|| no_runtime("no runtime for the poll task".into()))?;
        Ok(Watch::with_guard(rx, task))
    }
}

#[cfg(test)]
mod tests {
    use rpc_core::Registry;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    async fn next(w: &mut Watch) -> WatchEvent {
        tokio::time::timeout(WAIT, w.next())
            .await
            .expect("timed out waiting for a watch event")
            .expect("watch ended")
    }

    fn meta(port: u16) -> ServiceMetaInfo {
        let mut m = ServiceMetaInfo::new("Echo", "1.0", "127.0.0.1", port);
        m.metadata.insert("zone".into(), "a".into());
        m
    }

    fn registry(dir: &Path, ttl_ms: u64) -> LocalRegistry {
        LocalRegistry::with_options(
            dir,
            LocalOptions {
                poll_interval: Some(Duration::from_millis(20)),
                ..LocalOptions::new(Duration::from_millis(ttl_ms))
            },
        )
        .unwrap()
    }

    /// A pid no process has (above the kernel's pid_max).
    const DEAD_PID: u32 = 0x7FFF_FFF0;

    fn write_record(reg: &LocalRegistry, meta: &ServiceMetaInfo, heartbeat_ms: u64) -> PathBuf {
        write_record_of(reg, meta, heartbeat_ms, DEAD_PID)
    }

    fn write_record_of(
        reg: &LocalRegistry,
        meta: &ServiceMetaInfo,
        heartbeat_ms: u64,
        pid: u32,
    ) -> PathBuf {
        let path = reg.instance_path(meta);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let record = Record {
            meta: meta.clone(),
            heartbeat_ms,
            ttl_ms: millis(reg.ttl()),
            pid,
            owner: "test".into(),
            written_at: None,
        };
        // Atomically, as a provider writes: a reader must never see half a
        // record (a test rewriting records would see spurious removals).
        write_atomic(&path, &serde_json::to_vec(&record).unwrap()).unwrap();
        path
    }

    #[test]
    fn names_are_safe_path_components() {
        assert_eq!(encode_name("UserService:1.0"), "UserService%3A1.0");
        assert_eq!(encode_name("127.0.0.1:80"), "127.0.0.1%3A80");
        assert_eq!(encode_name("."), "%2E");
        assert_eq!(encode_name(".."), "%2E.");
        assert_eq!(encode_name("a/b\\c"), "a%2Fb%5Cc");
        assert_eq!(encode_name(""), "%");
        assert_eq!(encode_name("[::1]:9"), "%5B%3A%3A1%5D%3A9");
        let long = "x".repeat(1000);
        let encoded = encode_name(&long);
        assert!(encoded.len() <= MAX_NAME_LEN);
        assert_ne!(encoded, encode_name(&format!("{long}y")));
        assert_eq!(encoded, encode_name(&long));
    }

    #[test]
    fn records_are_a_superset_of_the_java_json() {
        let record = Record {
            meta: meta(1),
            heartbeat_ms: 5,
            ttl_ms: 6,
            pid: 7,
            owner: "o".into(),
            written_at: None,
        };
        let json = serde_json::to_vec(&record).unwrap();
        assert_eq!(ServiceMetaInfo::from_json(&json).unwrap(), meta(1));
        let back: Record = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, record);
    }

    #[tokio::test]
    async fn garbage_files_are_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path(), 2_000);
        let _r = reg.register(meta(1)).await.unwrap();
        let svc = reg.service_dir("Echo:1.0");
        fs::write(svc.join("junk.json"), b"{not json").unwrap();
        fs::write(svc.join("empty.json"), b"").unwrap();
        fs::write(svc.join("notes.txt"), b"hello").unwrap();
        fs::write(svc.join("array.json"), b"[1,2,3]").unwrap();
        fs::write(
            svc.join("huge.json"),
            vec![b' '; MAX_RECORD_BYTES as usize + 1],
        )
        .unwrap();
        fs::create_dir(svc.join("sub.json")).unwrap();
        fs::write(svc.join(".half-written.tmp"), b"{").unwrap();
        // A valid record of another service in the wrong directory.
        let other = ServiceMetaInfo::new("Other", "1.0", "h", 2);
        let record = Record {
            meta: other,
            heartbeat_ms: now_ms(),
            ttl_ms: 2_000,
            pid: 1,
            owner: "x".into(),
            written_at: None,
        };
        fs::write(svc.join("h%3A2.json"), serde_json::to_vec(&record).unwrap()).unwrap();

        let inner = Arc::clone(&reg.inner);
        let scan = inner.scan("Echo:1.0", false, Observed::default()).unwrap();
        assert_eq!(
            scan.live.values().cloned().collect::<Vec<_>>(),
            vec![meta(1)]
        );
        assert_eq!(scan.garbage.len(), 7, "{:?}", scan.garbage);
        assert_eq!(reg.discover("Echo:1.0").await.unwrap(), vec![meta(1)]);
        let mut w = reg.watch("Echo:1.0").await.unwrap();
        assert_eq!(w.next().await, Some(WatchEvent::Snapshot(vec![meta(1)])));
    }

    #[tokio::test]
    async fn stale_records_are_hidden_then_collected() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path(), 1_000);
        let fresh = write_record(&reg, &meta(1), now_ms());
        let stale = write_record(&reg, &meta(2), now_ms() - 1_500);
        let ancient = write_record(&reg, &meta(3), now_ms() - 60_000);
        let future = write_record(&reg, &meta(4), now_ms() + 60_000);
        let found = reg.discover("Echo:1.0").await.unwrap();
        assert_eq!(found, vec![meta(1), meta(4)]);
        assert!(fresh.exists() && stale.exists() && future.exists());
        assert!(!ancient.exists(), "a record dead for many TTLs is deleted");
    }

    /// Issue 12, fault 7: a record whose heartbeat lies in the future (its
    /// writer's clock runs ahead) stays listed while its writer rewrites it,
    /// and goes within a TTL of the writer's death, not when its timestamp
    /// comes due.
    #[tokio::test]
    async fn a_heartbeat_from_the_future_is_judged_by_what_the_reader_observes() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path(), 1_500);
        // A writer an hour ahead, alive: it rewrites its record every
        // 100 ms (more often than TTL / 3, so a loaded machine's stalls do
        // not look like a death) with its own clock.
        let ahead = 3_600_000;
        write_record(&reg, &meta(1), now_ms() + ahead);
        let mut w = reg.watch("Echo:1.0").await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Snapshot(vec![meta(1)]));
        let writer = {
            let reg = reg.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    write_record(&reg, &meta(1), now_ms() + ahead);
                }
            })
        };
        // Listed for many TTLs while it is rewritten: the watch would have
        // removed it by now if it were judged dead. A poll runs every 20 ms.
        let kept = tokio::time::timeout(Duration::from_millis(4_000), w.next()).await;
        assert!(kept.is_err(), "a live writer's record changed: {kept:?}");
        // The writer dies; its last timestamp is still an hour ahead.
        writer.abort();
        assert_eq!(next(&mut w).await, WatchEvent::Remove(meta(1).node_key()));
        // A one-off read, with no history, judges it by its file's age.
        assert!(reg.discover("Echo:1.0").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn unknown_services_are_empty_but_a_missing_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("reg");
        let reg = registry(&root, 1_000);
        assert!(reg.discover("Nope:1.0").await.unwrap().is_empty());
        fs::rename(&root, dir.path().join("away")).unwrap();
        assert!(matches!(
            reg.discover("Nope:1.0").await,
            Err(RegistryError::Unavailable { .. })
        ));
        assert!(reg.watch("Nope:1.0").await.is_err());
    }

    #[tokio::test]
    async fn writes_leave_no_temp_files_and_deregister_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path(), 300);
        let r = reg.register(meta(1)).await.unwrap();
        let path = reg.instance_path(&meta(1));
        let first = read_record(&path).unwrap().unwrap();
        // Heartbeats carry no event to await: poll until one has rewritten
        // the file (100 ms apart).
        tokio::time::timeout(WAIT, async {
            loop {
                let now = read_record(&path).unwrap().unwrap();
                if now.heartbeat_ms > first.heartbeat_ms + 50 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(
            *r.state().borrow(),
            RegistrationState::Registered { generation: 0 }
        );
        r.deregister().await.unwrap();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_deleted_record_is_written_again_with_the_next_generation() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path(), 150);
        let r = reg.register(meta(1)).await.unwrap();
        let path = reg.instance_path(&meta(1));
        let mut state = r.state();
        fs::remove_file(&path).unwrap();
        tokio::time::timeout(
            WAIT,
            state.wait_for(|s| *s == RegistrationState::Registered { generation: 1 }),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(path.exists());
        drop(r);
        assert!(!path.exists(), "dropping deletes synchronously");
    }

    #[tokio::test]
    async fn an_older_registration_does_not_delete_a_newer_record() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path(), 1_000);
        let old = reg.register(meta(1)).await.unwrap();
        let new = reg.register(meta(1)).await.unwrap();
        drop(old);
        assert_eq!(reg.discover("Echo:1.0").await.unwrap(), vec![meta(1)]);
        drop(new);
        assert!(reg.discover("Echo:1.0").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn watch_reports_changes_and_outages() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("reg");
        // A TTL of 60 s: no heartbeat (every ttl/3) during the test, which
        // would make the moved-away root again and so break the rename back.
        let reg = registry(&root, 60_000);
        let mut w = reg.watch("Echo:1.0").await.unwrap();

        assert_eq!(next(&mut w).await, WatchEvent::Snapshot(vec![]));
        let r = reg.register(meta(1)).await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Upsert(meta(1)));
        fs::rename(&root, dir.path().join("away")).unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Connected(false));
        fs::rename(dir.path().join("away"), &root).unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Connected(true));
        r.deregister().await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Remove(meta(1).node_key()));
    }

    #[tokio::test]
    async fn the_record_of_a_live_process_is_hidden_when_stale_but_never_collected() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path(), 1_000);
        let mine = write_record_of(&reg, &meta(6), now_ms() - 60_000, std::process::id());
        assert!(
            reg.discover("Echo:1.0").await.unwrap().is_empty(),
            "stale: hidden"
        );
        assert!(mine.exists(), "its process lives: not garbage");
    }

    #[tokio::test]
    async fn a_lenient_scan_keeps_and_does_not_collect_stale_records() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path(), 1_000);
        let ancient = write_record(&reg, &meta(3), now_ms() - 60_000);
        let inner = Arc::clone(&reg.inner);
        let lenient = inner.scan("Echo:1.0", true, Observed::default()).unwrap();
        assert_eq!(
            lenient.live.values().cloned().collect::<Vec<_>>(),
            vec![meta(3)]
        );
        assert!(ancient.exists(), "a lenient scan collects nothing");
        assert!(
            inner
                .scan("Echo:1.0", false, Observed::default())
                .unwrap()
                .live
                .is_empty()
        );
    }

    #[tokio::test]
    async fn records_that_could_not_heartbeat_during_an_outage_survive_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("reg");
        let reg = registry(&root, 1_000);
        let mut w = reg.watch("Echo:1.0").await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Snapshot(vec![]));
        // A provider whose heartbeats lapsed (its last one 1.5 TTLs ago,
        // written while the directory was away).
        let lapsed = write_record(&reg, &meta(5), now_ms());
        assert_eq!(next(&mut w).await, WatchEvent::Upsert(meta(5)));
        fs::rename(&root, dir.path().join("away")).unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Connected(false));
        let record = Record {
            meta: meta(5),
            heartbeat_ms: now_ms() - 1_500,
            ttl_ms: 1_000,
            pid: 1,
            owner: "x".into(),
            written_at: None,
        };
        let away = dir
            .path()
            .join("away")
            .join(lapsed.strip_prefix(&root).unwrap());
        fs::write(&away, serde_json::to_vec(&record).unwrap()).unwrap();
        fs::rename(dir.path().join("away"), &root).unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Connected(true));
        // For a TTL after the directory is back the record stays listed (no
        // Remove) — it is only dropped after that if nobody refreshes it.
        let removed = tokio::time::timeout(Duration::from_millis(700), next(&mut w)).await;
        assert!(removed.is_err(), "dropped a record at once: {removed:?}");
        assert_eq!(next(&mut w).await, WatchEvent::Remove(meta(5).node_key()));
    }

    #[tokio::test]
    async fn a_directory_replaced_between_two_polls_is_reported_as_a_break() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("reg");
        let reg = registry(&root, 1_000);
        write_record(&reg, &meta(5), now_ms());
        let mut w = reg.watch("Echo:1.0").await.unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Snapshot(vec![meta(5)]));
        // Deleted and created again between two polls, as a registry reset
        // to an empty directory is (the inode number often comes back).
        fs::remove_dir_all(&root).unwrap();
        fs::create_dir(&root).unwrap();
        assert_eq!(next(&mut w).await, WatchEvent::Connected(false));
        assert_eq!(next(&mut w).await, WatchEvent::Connected(true));
        assert_eq!(next(&mut w).await, WatchEvent::Remove(meta(5).node_key()));
    }
}
