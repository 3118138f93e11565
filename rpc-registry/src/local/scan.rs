//! Reading a service directory: records, liveness by heartbeat, pid and
//! observation, garbage collection.

use super::*;

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

pub(super) const MAX_GARBAGE_PER_SCAN: usize = 64;

/// A heartbeat further ahead of the reader's clock than this was not written
/// by a clock the reader can compare with (a writer whose clock runs ahead,
/// or a record written by hand): its age is judged by observation instead.
/// On one host every process reads the same clock, so a second is plenty.
pub(super) const FUTURE_SKEW_MS: u64 = 1_000;

/// Since when a reader has seen each record with an untrustworthy (future)
/// heartbeat unchanged, by its own monotonic clock. A live writer rewrites
/// its record every TTL / 3, whatever its clock says, so such a record is
/// live while it keeps changing and dead once it has not changed for a TTL
/// (issue 12, fault 7: a dead provider whose clock ran ahead stayed listed
/// until its timestamp came due). Holds only the records of the last scan.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub(super) seen: std::collections::HashMap<PathBuf, (u64, std::time::Instant)>,
}

impl Observed {
    /// How long (ms) the record at `path` has gone unchanged, as far as
    /// this reader can tell. On first sight that is the age of the file by
    /// this host's file system, when it is in the past.
    pub(super) fn unchanged_for(&mut self, path: &Path, record: &Record) -> u64 {
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
    pub(super) fn garbage(&mut self, path: PathBuf, why: impl fmt::Display) {
        if self.garbage.len() < MAX_GARBAGE_PER_SCAN {
            self.garbage.push((path, why.to_string()));
        }
    }
}

impl Inner {
    pub(super) fn unreachable(&self, source: io::Error) -> RegistryError {
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
    pub(super) fn root_identity(&self) -> Result<Identity, RegistryError> {
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
    pub(super) fn scan(
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

    /// The service keys with a live instance: each service directory is
    /// named by its first record (a long key's directory name is hashed and
    /// cannot be decoded) and then read like `discover` reads it.
    pub(super) fn service_keys(&self) -> Result<Vec<String>, RegistryError> {
        self.root_identity()?;
        let entries = fs::read_dir(&self.root).map_err(|e| self.unreachable(e))?;
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.unreachable(e))?;
            let dir_name = entry.file_name();
            let dir_name = dir_name.to_string_lossy();
            if dir_name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let Ok(files) = fs::read_dir(entry.path()) else {
                continue;
            };
            // Record files only: a root pointed at the wrong directory
            // (`/proc`, say) must not have its files read.
            let key = files.flatten().find_map(|f| {
                let name = f.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') || !name.ends_with(".json") {
                    return None;
                }
                let record = read_record(&f.path()).ok().flatten()?;
                let key = record.meta.service_key();
                (encode_name(&key) == dir_name).then_some(key)
            });
            let Some(key) = key else { continue };
            if !self.scan(&key, false, Observed::default())?.live.is_empty() {
                keys.push(key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    pub(super) fn scan_dir(
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
    pub(super) fn collect_dead(&self, path: &Path, heartbeat_ms: u64) {
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
    pub(super) fn collect_temp_file(&self, path: &Path, is_temp: bool) {
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

pub(super) async fn blocking<T: Send + 'static>(
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

pub(super) fn no_runtime(source: rpc_core::BoxError) -> RegistryError {
    RegistryError::Unavailable {
        backend: BACKEND,
        message: "must be used within a Tokio runtime".into(),
        source: Some(source),
    }
}

pub(super) fn log_garbage(garbage: &[(PathBuf, String)]) {
    for (path, why) in garbage {
        tracing::warn!(path = %path.display(), reason = %why, "skipping a file in the local registry");
    }
}
