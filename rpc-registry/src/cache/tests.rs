//! The cache's tests: scripted backends, paused clocks.

use std::sync::atomic::AtomicUsize;

use rpc_core::Watch;
use tokio::sync::mpsc;

use super::*;

const WAIT: Duration = Duration::from_secs(5);

fn meta(port: u16) -> ServiceMetaInfo {
    ServiceMetaInfo::new("Echo", "1.0", "127.0.0.1", port)
}

fn ports(list: &[ServiceMetaInfo]) -> Vec<u16> {
    list.iter().map(|m| m.service_port).collect()
}

#[test]
fn snapshots_are_diffed_not_replaced_blindly() {
    let current = vec![meta(1), meta(2), meta(3)];
    let mut changed = meta(2);
    changed.weight = 1;
    let (next, delta) = merge_snapshot(&current, vec![meta(4), changed.clone(), meta(1)]);
    assert_eq!(
        delta,
        Delta {
            added: 1,
            removed: 1,
            updated: 1
        }
    );
    assert_eq!(next.unwrap(), vec![meta(1), changed, meta(4)]);
    let (same, delta) = merge_snapshot(&current, vec![meta(3), meta(1), meta(2)]);
    assert!(same.is_none());
    assert!(delta.is_empty());
    let (dedup, _) = merge_snapshot(&[], vec![meta(1), meta(1)]);
    assert_eq!(dedup.unwrap(), vec![meta(1)]);
}

#[test]
fn upserts_and_removals_keep_node_key_order() {
    // Node keys sort as strings: port 10 before port 9.
    let list = upsert(&[], meta(9)).unwrap();
    let list = upsert(&list, meta(10)).unwrap();
    let list = upsert(&list, meta(5)).unwrap();
    assert_eq!(ports(&list), vec![10, 5, 9]);
    assert!(upsert(&list, meta(5)).is_none());
    let mut heavier = meta(5);
    heavier.weight = 3;
    let list = upsert(&list, heavier).unwrap();
    assert_eq!(list[1].weight, 3);
    let list = remove(&list, &meta(10).node_key()).unwrap();
    assert_eq!(ports(&list), vec![5, 9]);
    assert!(remove(&list, &meta(10).node_key()).is_none());
}

/// A scripted backend: every `watch` call hands out the next channel
/// the test pushes, or fails when there is none.
#[derive(Clone, Default)]
struct Scripted {
    watches: Arc<Mutex<Vec<mpsc::Receiver<WatchEvent>>>>,
    calls: Arc<AtomicUsize>,
    opened: Arc<tokio::sync::Notify>,
    /// Fail as the registry refusing our credentials, not as an outage.
    refuse: Arc<std::sync::atomic::AtomicBool>,
}

impl Scripted {
    fn push(&self) -> mpsc::Sender<WatchEvent> {
        let (tx, rx) = mpsc::channel(16);
        self.watches.lock().unwrap().push(rx);
        tx
    }
}

impl Discover for Scripted {
    async fn discover(&self, _: &str) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        Ok(Vec::new())
    }
    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        Ok(Vec::new())
    }
    async fn watch(&self, _: &str) -> Result<Watch, RegistryError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let next = {
            let mut w = self.watches.lock().unwrap();
            if w.is_empty() {
                None
            } else {
                Some(w.remove(0))
            }
        };
        self.opened.notify_waiters();
        match next {
            Some(rx) => Ok(Watch::new(rx)),
            None if self.refuse.load(Ordering::SeqCst) => Err(RegistryError::denied(
                "scripted",
                rpc_core::RegistryErrorKind::Unauthenticated,
                "get /rpc/Echo:1.0/",
                "bad token",
                None,
            )),
            None => Err(RegistryError::unavailable(
                "scripted",
                "get /rpc/Echo:1.0/",
                std::io::Error::other("the root cause"),
            )),
        }
    }
}

fn options() -> CacheOptions {
    CacheOptions {
        max_services: 2,
        ready_timeout: Duration::from_millis(300),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        ..CacheOptions::default()
    }
}

async fn until(
    handle: &ServiceHandle,
    accept: impl FnMut(&[ServiceMetaInfo], bool) -> bool,
) -> Vec<u16> {
    let list = tokio::time::timeout(WAIT, handle.wait_until(accept))
        .await
        .expect("timed out waiting for the cache");
    ports(&list)
}

#[tokio::test]
async fn follows_incremental_changes_and_survives_outages() {
    let backend = Scripted::default();
    let first = backend.push();
    first
        .send(WatchEvent::Snapshot(vec![meta(2), meta(1)]))
        .await
        .unwrap();
    let cache = ServiceCache::with_options(backend.clone(), options());
    let handle = cache.service("Echo:1.0").await.unwrap();
    assert_eq!(ports(&handle.instances()), vec![1, 2]);
    assert!(handle.is_healthy());

    let v = handle.version();
    first.send(WatchEvent::Upsert(meta(3))).await.unwrap();
    assert_eq!(until(&handle, |l, _| l.len() == 3).await, vec![1, 2, 3]);
    assert!(handle.version() > v);
    first
        .send(WatchEvent::Remove(meta(1).node_key()))
        .await
        .unwrap();
    assert_eq!(until(&handle, |l, _| l.len() == 2).await, vec![2, 3]);

    // Connection loss: unhealthy, list kept.
    first.send(WatchEvent::Connected(false)).await.unwrap();
    assert_eq!(until(&handle, |_, healthy| !healthy).await, vec![2, 3]);
    first.send(WatchEvent::Connected(true)).await.unwrap();
    assert_eq!(until(&handle, |_, healthy| healthy).await, vec![2, 3]);

    // The stream ends and watching fails a few times: the list is kept.
    drop(first);
    assert_eq!(until(&handle, |_, healthy| !healthy).await, vec![2, 3]);
    let calls = backend.calls.load(Ordering::SeqCst);
    tokio::time::timeout(WAIT, async {
        while backend.calls.load(Ordering::SeqCst) < calls + 2 {
            backend.opened.notified().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(ports(&handle.instances()), vec![2, 3]);
    assert!(handle.last_error().is_some());

    // Back: the snapshot catches up with an addition and a removal.
    let second = backend.push();
    second
        .send(WatchEvent::Snapshot(vec![meta(3), meta(4)]))
        .await
        .unwrap();
    assert_eq!(
        until(&handle, |l, h| h && l.len() == 2 && l[0].service_port == 3).await,
        vec![3, 4]
    );
    assert!(handle.last_error().is_none());
    assert_eq!(
        ports(&cache.instances("Echo:1.0").await.unwrap()),
        vec![3, 4]
    );
}

#[tokio::test]
async fn an_empty_push_while_unhealthy_is_held_until_confirmed() {
    // The grace after a break is the next tests'; without it the
    // confirming `Connected(true)` applies the held update at once.
    let (handle, w, _cache) = listing_1_and_2(Duration::ZERO).await;

    // A healthy connection may empty the list: that is news, not noise.
    w.send(WatchEvent::Remove(meta(1).node_key()))
        .await
        .unwrap();
    w.send(WatchEvent::Remove(meta(2).node_key()))
        .await
        .unwrap();
    assert_eq!(until(&handle, |l, _| l.is_empty()).await, Vec::<u16>::new());
    w.send(WatchEvent::Snapshot(vec![meta(1), meta(2)]))
        .await
        .unwrap();
    until(&handle, |l, _| l.len() == 2).await;

    // Unhealthy: an empty snapshot (a restarting server) and removing the
    // last instances are both held back.
    w.send(WatchEvent::Connected(false)).await.unwrap();
    w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
    w.send(WatchEvent::Remove(meta(1).node_key()))
        .await
        .unwrap();
    // A marker event proves the ones before it were processed.
    w.send(WatchEvent::Upsert(meta(9))).await.unwrap();
    assert_eq!(
        until(&handle, |l, _| l.len() == 2 && l[1].service_port == 9).await,
        vec![2, 9]
    );
    w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
    w.send(WatchEvent::Connected(false)).await.unwrap();
    w.send(WatchEvent::Upsert(meta(2))).await.unwrap();
    assert_eq!(ports(&handle.instances()), vec![2, 9]);
    w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
    assert!(!handle.is_healthy());

    // The connection is healthy again: the held update was true after all.
    w.send(WatchEvent::Connected(true)).await.unwrap();
    assert_eq!(
        until(&handle, |l, h| h && l.is_empty()).await,
        Vec::<u16>::new()
    );
}

const GRACE: Duration = Duration::from_secs(10);

/// A cache with `grace` over a registry that lists 1 and 2.
async fn listing_1_and_2(
    grace: Duration,
) -> (
    ServiceHandle,
    mpsc::Sender<WatchEvent>,
    ServiceCache<Scripted>,
) {
    let backend = Scripted::default();
    let w = backend.push();
    w.send(WatchEvent::Snapshot(vec![meta(1), meta(2)]))
        .await
        .unwrap();
    let cache = ServiceCache::with_options(
        backend,
        CacheOptions {
            empty_grace: grace,
            ..options()
        },
    );
    let handle = cache.service("Echo:1.0").await.unwrap();
    (handle, w, cache)
}

/// [`listing_1_and_2`], then the registry breaks and comes back with no
/// data; also returns when it came back. The clock is tokio's paused
/// one: it moves only when every task waits for it, so the grace is
/// measured, not slept.
async fn back_empty() -> (
    ServiceHandle,
    mpsc::Sender<WatchEvent>,
    Instant,
    ServiceCache<Scripted>,
) {
    let (handle, w, cache) = listing_1_and_2(GRACE).await;
    w.send(WatchEvent::Connected(false)).await.unwrap();
    until(&handle, |_, h| !h).await;
    let back = Instant::now();
    w.send(WatchEvent::Connected(true)).await.unwrap();
    w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
    until(&handle, |_, h| h).await;
    (handle, w, back, cache)
}

/// Issue 14: refused credentials are not retried like an outage. Over
/// the same 3 s, an outage is retried on the jittered backoff (10 ms
/// doubling to 1 s: 8 or more watches), a refusal every `backoff_max`
/// (1 s: at most 4 watches).
#[tokio::test(start_paused = true)]
async fn a_refused_watch_is_retried_at_the_slowest_pace() {
    async fn watches_in_3s(refuse: bool) -> usize {
        let backend = Scripted::default();
        backend.refuse.store(refuse, Ordering::SeqCst);
        let options = CacheOptions {
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            ..options()
        };
        let cache = ServiceCache::with_options(backend.clone(), options);
        // Never ready: the first watch fails. Its task goes on.
        assert!(cache.service("Echo:1.0").await.is_err());
        tokio::time::sleep(Duration::from_secs(3)).await;
        backend.calls.load(Ordering::SeqCst)
    }
    let outage = watches_in_3s(false).await;
    let refused = watches_in_3s(true).await;
    assert!(outage >= 8, "an outage was retried only {outage} times");
    assert!(refused <= 4, "a refusal was retried {refused} times");
}

#[tokio::test(start_paused = true)]
async fn a_registry_back_empty_keeps_the_list_until_its_providers_return() {
    let (handle, w, back, _cache) = back_empty().await;
    // Half the grace later (the clock moves once the empty snapshot has
    // been taken in): still the last list, and healthy.
    tokio::time::sleep(GRACE / 2).await;
    assert_eq!(ports(&handle.instances()), vec![1, 2]);
    assert!(handle.is_healthy());
    // A provider registers again: the registry's own list is published,
    // without 2, which the registry has not listed since it came back.
    w.send(WatchEvent::Upsert(meta(1))).await.unwrap();
    assert_eq!(until(&handle, |l, _| l.len() == 1).await, vec![1]);
    assert!(back.elapsed() < GRACE);
    // Holding is over: the last instance leaving now empties the list.
    w.send(WatchEvent::Remove(meta(1).node_key()))
        .await
        .unwrap();
    assert_eq!(until(&handle, |l, _| l.is_empty()).await, Vec::<u16>::new());
    assert!(back.elapsed() < GRACE);
}

#[tokio::test(start_paused = true)]
async fn a_registry_still_empty_at_the_end_of_the_grace_empties_the_list() {
    let (handle, w, back, _cache) = back_empty().await;
    // Events that leave the registry's list empty do not end the hold.
    w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
    w.send(WatchEvent::Remove(meta(2).node_key()))
        .await
        .unwrap();
    let list = tokio::time::timeout(2 * GRACE, handle.wait_until(|l, _| l.is_empty()))
        .await
        .expect("the empty list was never applied");
    assert!(list.is_empty());
    let held = back.elapsed();
    assert!(
        held >= GRACE && held < GRACE + Duration::from_secs(1),
        "held for {held:?}, grace {GRACE:?}"
    );
    assert!(handle.is_healthy());
}

#[tokio::test(start_paused = true)]
async fn instances_removed_one_by_one_after_a_break_are_held_too() {
    let (handle, w, _cache) = listing_1_and_2(GRACE).await;
    // How the local backend reports a directory that came back empty.
    w.send(WatchEvent::Connected(false)).await.unwrap();
    w.send(WatchEvent::Connected(true)).await.unwrap();
    w.send(WatchEvent::Remove(meta(1).node_key()))
        .await
        .unwrap();
    w.send(WatchEvent::Remove(meta(2).node_key()))
        .await
        .unwrap();
    tokio::time::sleep(GRACE / 2).await;
    assert_eq!(ports(&handle.instances()), vec![2]);
    w.send(WatchEvent::Upsert(meta(1))).await.unwrap();
    assert_eq!(until(&handle, |l, _| l[0].service_port == 1).await, vec![1]);
}

#[tokio::test(start_paused = true)]
async fn after_the_grace_an_emptying_update_applies_at_once() {
    let (handle, w, _back, _cache) = back_empty().await;
    w.send(WatchEvent::Snapshot(vec![meta(1)])).await.unwrap();
    assert_eq!(until(&handle, |l, _| l.len() == 1).await, vec![1]);
    tokio::time::sleep(GRACE).await;
    let at = Instant::now();
    w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
    assert_eq!(until(&handle, |l, _| l.is_empty()).await, Vec::<u16>::new());
    assert_eq!(at.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn without_protection_an_empty_push_applies_at_once() {
    let backend = Scripted::default();
    let w = backend.push();
    w.send(WatchEvent::Snapshot(vec![meta(1)])).await.unwrap();
    let cache = ServiceCache::with_options(
        backend.clone(),
        CacheOptions {
            empty_protection: false,
            ..options()
        },
    );
    let handle = cache.service("Echo:1.0").await.unwrap();
    w.send(WatchEvent::Connected(false)).await.unwrap();
    w.send(WatchEvent::Snapshot(vec![])).await.unwrap();
    assert_eq!(until(&handle, |l, _| l.is_empty()).await, Vec::<u16>::new());
}

#[tokio::test]
async fn the_snapshot_file_lets_a_consumer_start_while_the_registry_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instances.json");
    let opts = CacheOptions {
        snapshot_file: Some(file.clone()),
        ..options()
    };
    {
        // A run with a working registry writes the file.
        let backend = Scripted::default();
        let w = backend.push();
        w.send(WatchEvent::Snapshot(vec![meta(1), meta(2)]))
            .await
            .unwrap();
        let cache = ServiceCache::with_options(backend, opts.clone());
        let _h = cache.service("Echo:1.0").await.unwrap();
        tokio::time::timeout(WAIT, async {
            while !file.exists() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the snapshot file was not written");
    }
    // A new consumer, registry down: it starts from the file.
    let down = Scripted::default();
    let cache = ServiceCache::with_options(down.clone(), opts);
    let handle = cache.service("Echo:1.0").await.unwrap();
    assert_eq!(ports(&handle.instances()), vec![1, 2]);
    assert!(!handle.is_healthy());
    // Another service is not in the file: it fails as before.
    assert!(cache.service("Other:1.0").await.is_err());
    // The registry comes back: its truth replaces the saved list. (One
    // watch per service: `Other:1.0` keeps retrying too, and the
    // scripted backend hands the next watch to whoever asks first.)
    let (w, other) = (down.push(), down.push());
    w.send(WatchEvent::Snapshot(vec![meta(3)])).await.unwrap();
    other
        .send(WatchEvent::Snapshot(vec![meta(3)]))
        .await
        .unwrap();
    assert_eq!(until(&handle, |l, h| h && l.len() == 1).await, vec![3]);
}

#[tokio::test]
async fn the_first_lookup_times_out_without_a_snapshot_then_recovers() {
    let backend = Scripted::default();
    let cache = ServiceCache::with_options(backend.clone(), options());
    let err = cache.service("Echo:1.0").await.unwrap_err();
    match &err {
        CacheError::NotReady {
            service,
            last_error,
            ..
        } => {
            assert_eq!(service, "Echo:1.0");
            // The whole chain, not only the outer message (issue 12,
            // fault 6).
            let last = last_error.as_deref().unwrap_or_default();
            assert!(last.contains("get /rpc/Echo:1.0/"), "{last}");
            assert!(last.contains("the root cause"), "{last}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(RegistryError::from(err).to_string().contains("cache"));
    let tx = backend.push();
    tx.send(WatchEvent::Snapshot(vec![meta(7)])).await.unwrap();
    let list = cache.instances("Echo:1.0").await.unwrap();
    assert_eq!(ports(&list), vec![7]);
    assert_eq!(cache.len(), 1);
}

#[tokio::test]
async fn the_number_of_services_is_bounded() {
    let backend = Scripted::default();
    for _ in 0..2 {
        backend
            .push()
            .send(WatchEvent::Snapshot(vec![]))
            .await
            .unwrap();
    }
    let cache = ServiceCache::with_options(backend, options());
    cache.service("A:1").await.unwrap();
    cache.service("B:1").await.unwrap();
    assert!(matches!(
        cache.service("C:1").await,
        Err(CacheError::TooManyServices { limit: 2 })
    ));
    // Known keys still work.
    assert!(cache.instances("A:1").await.unwrap().is_empty());
}

#[tokio::test]
async fn instances_of_other_services_are_ignored() {
    let backend = Scripted::default();
    let tx = backend.push();
    tx.send(WatchEvent::Snapshot(vec![
        ServiceMetaInfo::new("Other", "1.0", "h", 1),
        meta(1),
    ]))
    .await
    .unwrap();
    let cache = ServiceCache::with_options(backend, options());
    let handle = cache.service("Echo:1.0").await.unwrap();
    assert_eq!(ports(&handle.instances()), vec![1]);
    tx.send(WatchEvent::Upsert(ServiceMetaInfo::new(
        "Echo", "2.0", "h", 2,
    )))
    .await
    .unwrap();
    tx.send(WatchEvent::Upsert(meta(3))).await.unwrap();
    assert_eq!(until(&handle, |l, _| l.len() >= 2).await, vec![1, 3]);
}

#[tokio::test]
async fn dropping_the_cache_stops_its_watch_tasks() {
    let backend = Scripted::default();
    let tx = backend.push();
    tx.send(WatchEvent::Snapshot(vec![meta(1)])).await.unwrap();
    let cache = ServiceCache::with_options(backend, options());
    let handle = cache.service("Echo:1.0").await.unwrap();
    let clone = cache.clone();
    drop(cache);
    assert!(handle.is_healthy(), "a clone keeps the task");
    drop(clone);
    // The aborted task drops its watch, closing the backend's channel.
    tokio::time::timeout(WAIT, tx.closed()).await.unwrap();
    assert!(!handle.is_healthy());
    assert_eq!(ports(&handle.instances()), vec![1]);
}
