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

/// The outcome of reading one service directory.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// What the reader has seen of records whose heartbeat it cannot trust,
    /// handed back for the next scan.
    pub(crate) observed: Observed,
    /// Live instances by node key.
    pub(crate) live: BTreeMap<String, ServiceMetaInfo>,
    /// Unreadable files and why (at most [`MAX_GARBAGE_PER_SCAN`]).
    pub(crate) garbage: Vec<(PathBuf, String)>,
    /// The root directory's identity while it was read.
    pub(crate) root: Identity,
}

const MAX_GARBAGE_PER_SCAN: usize = 64;

/// A heartbeat further ahead of the reader's clock than this was not written
/// by a clock the reader can compare with (a writer whose clock runs ahead,
/// or a record written by hand): its age is judged by observation instead.
/// On one host every process reads the same clock, so a second is plenty.
const FUTURE_SKEW_MS: u64 = 1_000;

/// Since when a reader has seen each record with an untrustworthy (future)
/// heartbeat unchanged, by its own monotonic clock. A live writer rewrites
/// its record every TTL / 3, whatever its clock says, so such a record is
/// live while it keeps changing and dead once it has not changed for a TTL
/// (issue 12, fault 7: a dead provider whose clock ran ahead stayed listed
/// until its timestamp came due). Holds only the records of the last scan.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    seen: std::collections::HashMap<PathBuf, (u64, std::time::Instant)>,
}

impl Observed {
    /// How long (ms) the record at `path` has gone unchanged, as far as
    /// this reader can tell. On first sight that is the age of the file by
    /// this host's file system, when it is in the past.
    fn unchanged_for(&mut self, path: &Path, record: &Record) -> u64 {
        let now = std::time::Instant::now();
        if let Some((heartbeat, since)) = self.seen.get(path)
            && *heartbeat == record.heartbeat_ms
        {
            return millis(now.saturating_duration_since(*since));
        }
        let first_sight = !self.seen.contains_key(path);
        let before = if first_sight {
            record
                .written_at
                .and_then(|at| SystemTime::now().duration_since(at).ok())
                .unwrap_or_default()
        } else {
            // It changed since the last scan: the writer is alive now.
            Duration::ZERO
        };
        let since = now.checked_sub(before).unwrap_or(now);
        self.seen
            .insert(path.to_path_buf(), (record.heartbeat_ms, since));
        millis(before)
    }
}

impl Scan {
    fn garbage(&mut self, path: PathBuf, why: impl fmt::Display) {
        if self.garbage.len() < MAX_GARBAGE_PER_SCAN {
            self.garbage.push((path, why.to_string()));
        }
    }
}

impl Inner {
    fn unreachable(&self, source: io::Error) -> RegistryError {
        RegistryError::unavailable(
            BACKEND,
            format!(
                "registry directory {} is not accessible",
                self.root.display()
            ),
            source,
        )
    }

    /// The root directory's identity, or why it is not usable.
    fn root_identity(&self) -> Result<Identity, RegistryError> {
        match fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(identity(&m)),
            Ok(_) => Err(self.unreachable(io::Error::other("not a directory"))),
            Err(e) => Err(self.unreachable(e)),
        }
    }

    /// Reads the live instances of `service_key` (blocking).
    ///
    /// `lenient`: keep records whose heartbeat is older than the TTL (and do
    /// not collect them). A watch that just regained the directory passes it
    /// for one TTL: providers could not heartbeat while it was gone, so every
    /// record looks dead until they have had a chance to.
    fn scan(
        &self,
        service_key: &str,
        lenient: bool,
        observed: Observed,
    ) -> Result<Scan, RegistryError> {
        let root = self.root_identity()?;
        let scan = self.scan_dir(service_key, lenient, observed);
        // The directory may have been moved away (or replaced) while we read
        // it: then "no service directory" or a vanished record means "cannot
        // see the registry", not "no instances". Only a root that is still
        // the one we started with vouches for what we read.
        if self.root_identity()? != root {
            return Err(self.unreachable(io::Error::other(
                "the registry directory was replaced while it was read",
            )));
        }
        scan.map(|scan| Scan { root, ..scan })
    }

    fn scan_dir(
        &self,
        service_key: &str,
        lenient: bool,
        mut observed: Observed,
    ) -> Result<Scan, RegistryError> {
        let dir = self.root.join(encode_name(service_key));
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Scan::default()),
            Err(source) => return Err(RegistryError::Io { path: dir, source }),
        };
        let now = now_ms();
        let mut scan = Scan::default();
        let mut untrusted: HashSet<PathBuf> = HashSet::new();
        let mut heartbeats: BTreeMap<String, u64> = BTreeMap::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(source) => return Err(RegistryError::Io { path: dir, source }),
            };
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                self.collect_temp_file(&path, name.ends_with(".tmp"));
                continue;
            }
            if !name.ends_with(".json") {
                scan.garbage(path, "not a .json file");
                continue;
            }
            let record = match read_record(&path) {
                Ok(Some(record)) => record,
                // Deleted between listing and reading: a deregistration.
                Ok(None) => continue,
                Err(why) => {
                    scan.garbage(path, why);
                    continue;
                }
            };
            if record.meta.service_key() != service_key {
                scan.garbage(
                    path,
                    format!("record belongs to `{}`", record.meta.service_key()),
                );
                continue;
            }
            let ttl = if record.ttl_ms == 0 {
                millis(self.ttl)
            } else {
                record.ttl_ms
            };
            let age = if record.heartbeat_ms > now.saturating_add(FUTURE_SKEW_MS) {
                untrusted.insert(path.clone());
                observed.unchanged_for(&path, &record)
            } else {
                now.saturating_sub(record.heartbeat_ms)
            };
            if age > ttl && !lenient {
                let gc_after = millis(self.gc_after).max(ttl.saturating_mul(2));
                // Only a record whose process is gone is garbage: a live
                // provider may just have been unable to heartbeat (the
                // directory was away), and deleting its record would hide it
                // from readers that are being lenient about exactly that.
                if age > gc_after && !process_alive(record.pid) {
                    self.collect_dead(&path, record.heartbeat_ms);
                }
                continue;
            }
            let node_key = record.meta.node_key();
            // Two files naming one node (a copied file): the fresher wins.
            if heartbeats
                .get(&node_key)
                .is_some_and(|&seen| seen >= record.heartbeat_ms)
            {
                continue;
            }
            heartbeats.insert(node_key.clone(), record.heartbeat_ms);
            scan.live.insert(node_key, record.meta);
        }
        observed.seen.retain(|path, _| untrusted.contains(path));
        scan.observed = observed;
        Ok(scan)
    }

    /// Deletes a record dead for long, unless it was refreshed meanwhile.
    fn collect_dead(&self, path: &Path, heartbeat_ms: u64) {
        // The owner may have come back between our read and now; it would
        // recreate the file anyway, but rereading keeps that window small.
        if let Ok(Some(again)) = read_record(path)
            && again.heartbeat_ms == heartbeat_ms
        {
            match fs::remove_file(path) {
                Ok(()) => tracing::debug!(path = %path.display(), "deleted a dead record"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "cannot delete a dead record")
                }
            }
        }
    }

    /// Deletes a writer's temp file left behind by a crash.
    fn collect_temp_file(&self, path: &Path, is_temp: bool) {
        if !is_temp {
            return;
        }
        let old = fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > self.gc_after.max(Duration::from_secs(10)));
        if old {
            let _ = fs::remove_file(path);
        }
    }
}

/// Reads and parses one record; `Ok(None)` if it no longer exists.
pub(crate) fn read_record(path: &Path) -> Result<Option<Record>, String> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_RECORD_BYTES {
        return Err(format!("larger than {MAX_RECORD_BYTES} bytes"));
    }
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut record: Record =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a registry record: {e}"))?;
    record.written_at = meta.modified().ok();
    Ok(Some(record))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| no_runtime(Box::new(e)))?;
    runtime.spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(RegistryError::unavailable(
            BACKEND,
            "file system task failed",
            e,
        ))
    })
}

fn no_runtime(source: rpc_core::BoxError) -> RegistryError {
    RegistryError::Unavailable {
        backend: BACKEND,
        message: "must be used within a Tokio runtime".into(),
        source: Some(source),
    }
}

fn log_garbage(garbage: &[(PathBuf, String)]) {
    for (path, why) in garbage {
        tracing::warn!(path = %path.display(), reason = %why, "skipping a file in the local registry");
    }
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

/// One registration's record, shared by its heartbeat and its guard.
struct Provider {
    meta: ServiceMetaInfo,
    path: PathBuf,
    ttl: Duration,
    owner: String,
    // Held across every write and the final delete, so a heartbeat write in
    // flight cannot resurrect the record after deregistration.
    stopped: Mutex<bool>,
    state: watch::Sender<RegistrationState>,
}

#[derive(Debug, PartialEq, Eq)]
enum Published {
    /// The record was there and is refreshed.
    Refreshed,
    /// The record was gone and is written again.
    Recreated,
    /// The registration has been withdrawn; nothing written.
    Stopped,
}

impl Provider {
    /// Writes the record with a fresh heartbeat (blocking). On error, also
    /// says whether the record was still there.
    fn publish(&self) -> Result<Published, (bool, io::Error)> {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return Ok(Published::Stopped);
        }
        let existed = self.path.is_file();
        let record = Record {
            meta: self.meta.clone(),
            heartbeat_ms: now_ms(),
            ttl_ms: millis(self.ttl),
            pid: std::process::id(),
            owner: self.owner.clone(),
            written_at: None,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| (existed, io::Error::other(e)))?;
        let write = || {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir)?;
            }
            write_atomic(&self.path, &bytes)
        };
        write().map_err(|e| (existed, e))?;
        Ok(if existed {
            Published::Refreshed
        } else {
            Published::Recreated
        })
    }

    /// Stops publishing and deletes the record if it is still ours (blocking).
    fn withdraw(&self) -> io::Result<()> {
        let mut stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return Ok(());
        }
        *stopped = true;
        self.state.send_replace(RegistrationState::Deregistered);
        match read_record(&self.path) {
            Ok(Some(record)) if record.owner != self.owner => {
                // A newer registration of the same node took the file over.
                tracing::debug!(path = %self.path.display(), "record owned by another registration; left in place");
                return Ok(());
            }
            Ok(None) => return Ok(()),
            _ => {}
        }
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

async fn heartbeat(provider: Arc<Provider>) {
    let period = provider.ttl / 3;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    let mut generation = 0u64;
    let mut last_ok = tokio::time::Instant::now();
    let mut lost = false;
    loop {
        tick.tick().await;
        let p = Arc::clone(&provider);
        let outcome = match tokio::task::spawn_blocking(move || p.publish()).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, "local registry heartbeat task failed");
                continue;
            }
        };
        let node = provider.meta.node_key();
        match outcome {
            Ok(Published::Stopped) => return,
            Ok(published) => {
                // A record that expired counts as lost too: consumers have
                // already dropped it, even if the file was still there.
                let expired = last_ok.elapsed() > provider.ttl;
                last_ok = tokio::time::Instant::now();
                if lost || expired || published == Published::Recreated {
                    generation += 1;
                    lost = false;
                    tracing::warn!(
                        node = %node,
                        path = %provider.path.display(),
                        generation,
                        reason = if published == Published::Recreated { "record was deleted" } else { "record had expired" },
                        "local registry lost the registration; registered again"
                    );
                    provider
                        .state
                        .send_replace(RegistrationState::Registered { generation });
                }
            }
            Err((existed, e)) => {
                tracing::warn!(node = %node, path = %provider.path.display(), error = %e, "local registry heartbeat failed");
                if !existed && !lost {
                    lost = true;
                    provider
                        .state
                        .send_replace(RegistrationState::Reregistering);
                }
            }
        }
    }
}

struct LocalDeregister {
    provider: Arc<Provider>,
    heartbeat: AbortOnDrop,
}

impl Deregister for LocalDeregister {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        let Self {
            provider,
            heartbeat,
        } = *self;
        drop(heartbeat);
        Box::pin(blocking(move || {
            provider.withdraw().map_err(|source| RegistryError::Io {
                path: provider.path.clone(),
                source,
            })
        }))
    }

    fn deregister_on_drop(self: Box<Self>) {
        let Self {
            provider,
            heartbeat,
        } = *self;
        drop(heartbeat);
        // Deleting inline rather than in a spawned task: one unlink of a
        // local file is quick, and it must happen even while the runtime is
        // shutting down (a provider dropping its registration on exit).
        if let Err(e) = provider.withdraw() {
            tracing::warn!(path = %provider.path.display(), error = %e, "cannot delete the local registry record");
        }
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

/// Whether process `pid` of this host still runs. The `local` registry is
/// single-host by design, so a record's pid names a process here. Where that
/// cannot be checked, the answer is "alive" (never collect by guess).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// What stays the same while a directory is the same directory, whatever
/// its path: (device, inode, birth time) on Unix. The birth time matters: a
/// directory deleted and created again right away often gets the same inode
/// number back (seen on ext4). Where the file system keeps no birth time,
/// (device, inode) alone.
type Identity = (u64, u64, u128);

#[cfg(unix)]
fn identity(m: &fs::Metadata) -> Identity {
    use std::os::unix::fs::MetadataExt;
    let born = m
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    (m.dev(), m.ino(), born)
}

#[cfg(not(unix))]
fn identity(_: &fs::Metadata) -> Identity {
    (0, 0, 0)
}

fn report_new_garbage(reported: &mut HashSet<PathBuf>, garbage: &[(PathBuf, String)]) {
    for (path, why) in garbage {
        if reported.contains(path) {
            continue;
        }
        if reported.len() >= MAX_REPORTED_GARBAGE {
            reported.clear();
        }
        reported.insert(path.clone());
        tracing::warn!(path = %path.display(), reason = %why, "skipping a file in the local registry");
    }
}

async fn poll(
    inner: Arc<Inner>,
    service_key: String,
    first: Scan,
    mut reported: HashSet<PathBuf>,
    tx: mpsc::Sender<WatchEvent>,
) {
    let mut known = first.live;
    let mut root = first.root;
    let mut observed = first.observed;
    let mut tick = tokio::time::interval(inner.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    let mut connected = true;
    // Until when stale records are kept after the directory came back.
    let mut lenient_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = tick.tick() => {}
        }
        let scan_inner = Arc::clone(&inner);
        let key = service_key.clone();
        let mut events = Vec::new();
        let lenient = !connected || lenient_until.is_some_and(|t| tokio::time::Instant::now() < t);
        let seen = std::mem::take(&mut observed);
        match blocking(move || scan_inner.scan(&key, lenient, seen)).await {
            Ok(mut scan) => {
                observed = std::mem::take(&mut scan.observed);
                report_new_garbage(&mut reported, &scan.garbage);
                if connected && scan.root != root {
                    // Replaced between two polls: the registry restarted,
                    // which consumers must hear about as a break (an empty
                    // new directory is not yet the truth, see the cache's
                    // empty grace), even though no poll saw it missing.
                    tracing::info!(dir = %inner.root.display(), service = %service_key, "local registry directory was replaced");
                    connected = false;
                    events.push(WatchEvent::Connected(false));
                }
                root = scan.root;
                if !connected {
                    connected = true;
                    lenient_until = Some(tokio::time::Instant::now() + inner.ttl);
                    tracing::info!(dir = %inner.root.display(), service = %service_key, "local registry directory is back");
                    events.push(WatchEvent::Connected(true));
                }
                events.extend(diff::diff(&known, &scan.live));
                known = scan.live;
            }
            Err(e) => {
                if connected {
                    connected = false;
                    tracing::warn!(service = %service_key, error = %e, "local registry unreachable; keeping the last known instances");
                    events.push(WatchEvent::Connected(false));
                }
            }
        }
        for event in events {
            if tx.send(event).await.is_err() {
                return;
            }
        }
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
        let reg = registry(&root, 1_000);
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
