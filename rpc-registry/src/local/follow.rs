//! A service directory followed by polling, diffed into watch events.

use super::*;

/// Whether process `pid` of this host still runs. The `local` registry is
/// single-host by design, so a record's pid names a process here. Where that
/// cannot be checked, the answer is "alive" (never collect by guess).
pub(super) fn process_alive(pid: u32) -> bool {
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
pub(super) type Identity = (u64, u64, u128);

#[cfg(unix)]
pub(super) fn identity(m: &fs::Metadata) -> Identity {
    use std::os::unix::fs::MetadataExt;
    let born = m
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    (m.dev(), m.ino(), born)
}

#[cfg(not(unix))]
pub(super) fn identity(_: &fs::Metadata) -> Identity {
    (0, 0, 0)
}

pub(super) fn report_new_garbage(reported: &mut HashSet<PathBuf>, garbage: &[(PathBuf, String)]) {
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

pub(super) async fn poll(
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
