//! The registry conformance suite: one set of cases every backend runs
//! unchanged.
//!
//! A backend plugs in by implementing [`Backend`] (how to set up an isolated
//! registry, build provider and consumer handles, and inject faults) and
//! invoking [`conformance_suite!`] in a test module:
//!
//! ```ignore
//! mod local {
//!     conformance_suite!(crate::LocalBackend);
//! }
//! ```
//!
//! The macro generates one `#[tokio::test]` per case plus an ignored
//! `child_provider` test, which is the body of the provider process that the
//! SIGKILL case re-executes this test binary into.
//!
//! A case a backend cannot run is skipped with a printed reason (the hook
//! returns [`Unsupported`]); it is never faked. Every wait is bounded.

#![allow(dead_code)]

pub mod private;
pub mod proxy;

use std::future::Future;
use std::time::{Duration, Instant};

use rpc_core::{
    Discover, Registration, RegistrationState, Registry, ServiceMetaInfo, Watch, WatchEvent,
};
use rpc_registry::{CacheOptions, ServiceCache, ServiceHandle};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Environment variable carrying the instance a child provider registers.
pub const CHILD_META_VAR: &str = "RPC_CONFORMANCE_CHILD_META";
/// Line a child provider prints once registered.
pub const READY_LINE: &str = "RPC-CONFORMANCE-READY";
/// A child provider exits by itself after this long, in case its parent died
/// without killing it.
pub const CHILD_LIFETIME: Duration = Duration::from_secs(60);

/// Why a backend cannot run a case.
#[derive(Debug)]
pub struct Unsupported(pub &'static str);

/// One backend under test. `setup` must give an isolated registry: cases run
/// in parallel.
#[allow(async_fn_in_trait)]
pub trait Backend: Sized + Send + Sync + 'static {
    /// Provider-side handle.
    type Provider: Registry + Clone;
    /// Consumer-side handle; the outage hooks cut this one off.
    type Consumer: Discover + Clone;

    /// Name for messages.
    const NAME: &'static str;

    /// Whether the backend's server can be reached. `Err` explains why not;
    /// the case is then skipped, or fails under `RPC_REQUIRE_SERVERS=1`.
    async fn available() -> Result<(), String> {
        Ok(())
    }
    /// A fresh, isolated registry.
    async fn setup() -> Self;
    /// A provider-side handle.
    fn provider(&self) -> Self::Provider;
    /// A consumer-side handle.
    fn consumer(&self) -> Self::Consumer;
    /// The TTL the backend was set up with: how long a dead provider may
    /// stay visible.
    fn ttl(&self) -> Duration;
    /// The longest a change takes to reach a consumer's watch (a poll
    /// interval, a watch round trip).
    fn propagation(&self) -> Duration;

    /// Environment for a child process to build a provider of this registry
    /// with [`Backend::provider_from_env`].
    fn child_env(&self) -> Result<Vec<(String, String)>, Unsupported>;
    /// In the child process: the provider described by [`Backend::child_env`].
    async fn provider_from_env() -> Self::Provider;

    /// Makes the backend lose `meta`'s registration behind its provider's
    /// back (lease revoked, record deleted).
    async fn lose_registration(&self, meta: &ServiceMetaInfo) -> Result<(), Unsupported>;
    /// Makes the registry unreachable for consumers (providers may go on).
    async fn cut_consumers(&self) -> Result<(), Unsupported>;
    /// Undoes [`Backend::cut_consumers`].
    async fn restore_consumers(&self);
}

/// Generates the suite's tests for a backend type.
macro_rules! conformance_suite {
    ($backend:ty) => {
        #[tokio::test]
        async fn register_then_discover_keeps_every_field() {
            $crate::conformance::register_then_discover::<$backend>().await;
        }

        #[tokio::test]
        async fn services_and_versions_are_kept_apart() {
            $crate::conformance::services_are_kept_apart::<$backend>().await;
        }

        #[tokio::test]
        async fn list_services_names_each_service_once() {
            $crate::conformance::list_services::<$backend>().await;
        }

        #[tokio::test]
        async fn a_watcher_sees_an_add_and_a_remove_in_order() {
            $crate::conformance::watch_sees_add_then_remove::<$backend>().await;
        }

        #[tokio::test]
        async fn deregistering_removes_the_instance() {
            $crate::conformance::deregister_removes::<$backend>().await;
        }

        #[tokio::test]
        async fn a_sigkilled_provider_disappears_within_the_ttl() {
            let module = module_path!();
            let module = module.split_once("::").map_or(module, |(_, rest)| rest);
            $crate::conformance::sigkilled_provider_disappears::<$backend>(&format!(
                "{module}::child_provider"
            ))
            .await;
        }

        #[tokio::test]
        async fn a_lost_registration_comes_back_by_itself() {
            $crate::conformance::lost_registration_comes_back::<$backend>().await;
        }

        #[tokio::test]
        async fn an_unknown_service_is_an_empty_list() {
            $crate::conformance::unknown_service_is_empty::<$backend>().await;
        }

        #[tokio::test]
        async fn the_cache_rides_out_an_outage_and_catches_up() {
            $crate::conformance::cache_rides_out_an_outage::<$backend>().await;
        }

        /// Not a test: the provider process of the SIGKILL case.
        #[tokio::test]
        #[ignore = "run by a_sigkilled_provider_disappears_within_the_ttl as a child process"]
        async fn child_provider() {
            $crate::conformance::child_provider::<$backend>().await;
        }
    };
}

/// Generous bound for things that should happen "soon".
fn soon<B: Backend>(b: &B) -> Duration {
    b.propagation() + Duration::from_secs(5)
}

async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Set by the test command: a missing server is a failure, not a skip.
pub const REQUIRE_SERVERS_VAR: &str = "RPC_REQUIRE_SERVERS";

/// Whether missing servers must fail the tests.
pub fn servers_required() -> bool {
    std::env::var(REQUIRE_SERVERS_VAR).is_ok_and(|v| v == "1")
}

/// Sets up a backend, or skips (prints one line) when its server is not
/// there, or fails when `RPC_REQUIRE_SERVERS=1`.
async fn setup<B: Backend>() -> Option<B> {
    if let Err(why) = B::available().await {
        assert!(
            !servers_required(),
            "[{}] server required ({REQUIRE_SERVERS_VAR}=1) but unavailable: {why}",
            B::NAME
        );
        skip_note!(
            "SKIP [{}] no server: {why} (scripts/registry-servers.sh up starts one)",
            B::NAME
        );
        return None;
    }
    Some(B::setup().await)
}

fn skip<B: Backend>(case: &str, why: &Unsupported) {
    skip_note!("SKIP [{}] {case}: {}", B::NAME, why.0);
}

fn instance(service: &str, version: &str, port: u16) -> ServiceMetaInfo {
    ServiceMetaInfo::new(service, version, "127.0.0.1", port)
}

fn cache<D: Discover>(d: D) -> ServiceCache<D> {
    ServiceCache::with_options(
        d,
        CacheOptions {
            // Short backoff keeps recovery quick in tests; the behaviour is
            // the production one.
            backoff_max: Duration::from_secs(1),
            ..CacheOptions::default()
        },
    )
}

async fn wait_list<B: Backend>(
    b: &B,
    handle: &ServiceHandle,
    what: &str,
    accept: impl FnMut(&[ServiceMetaInfo], bool) -> bool,
) -> Vec<ServiceMetaInfo> {
    within(soon(b), what, handle.wait_until(accept))
        .await
        .to_vec()
}

/// The next event that is not a connection notice.
async fn next_change<B: Backend>(b: &B, watch: &mut Watch) -> WatchEvent {
    within(soon(b), "a watch event", async {
        loop {
            match watch.next().await {
                Some(WatchEvent::Connected(_)) => continue,
                Some(event) => return event,
                None => panic!("the watch ended"),
            }
        }
    })
    .await
}

fn node_keys(list: &[ServiceMetaInfo]) -> Vec<String> {
    let mut keys: Vec<_> = list.iter().map(ServiceMetaInfo::node_key).collect();
    keys.sort();
    keys
}

/// (1) A registered instance is discovered with every field intact.
pub async fn register_then_discover<B: Backend>() {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let mut meta = ServiceMetaInfo::new("Conf.Fields", "2.1-beta", "10.1.2.3", 65_000);
    meta.service_group = "blue/green".into();
    meta.weight = 7;
    meta.metadata.insert("serializer".into(), "json".into());
    meta.metadata.insert("zone".into(), "eu-west-1a".into());
    meta.metadata
        .insert("note".into(), "ünïcödé, \"quotes\", / and :".into());
    meta.metadata.insert("empty".into(), String::new());
    let registration = b.provider().register(meta.clone()).await.unwrap();
    assert_eq!(registration.meta(), &meta);
    assert_eq!(
        *registration.state().borrow(),
        RegistrationState::Registered { generation: 0 }
    );
    let found = b.consumer().discover("Conf.Fields:2.1-beta").await.unwrap();
    assert_eq!(found, vec![meta.clone()]);
    let mut watch = b.consumer().watch("Conf.Fields:2.1-beta").await.unwrap();
    assert_eq!(
        next_change(&b, &mut watch).await,
        WatchEvent::Snapshot(vec![meta])
    );
    registration.deregister().await.unwrap();
}

/// (2) Instances, services and versions do not leak into each other.
pub async fn services_are_kept_apart<B: Backend>() {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let p = b.provider();
    let a1 = instance("Conf.Apart", "1.0", 7001);
    let a2 = instance("Conf.Apart", "1.0", 7002);
    // Same host and port as a1: only the version differs.
    let a_v2 = instance("Conf.Apart", "2.0", 7001);
    let other = instance("Conf.Other", "1.0", 7001);
    let _r = [
        p.register(a1.clone()).await.unwrap(),
        p.register(a2.clone()).await.unwrap(),
        p.register(a_v2.clone()).await.unwrap(),
        p.register(other.clone()).await.unwrap(),
    ];
    let c = b.consumer();
    assert_eq!(
        node_keys(&c.discover("Conf.Apart:1.0").await.unwrap()),
        node_keys(&[a1, a2])
    );
    assert_eq!(c.discover("Conf.Apart:2.0").await.unwrap(), vec![a_v2]);
    assert_eq!(c.discover("Conf.Other:1.0").await.unwrap(), vec![other]);
    assert!(c.discover("Conf.Other:2.0").await.unwrap().is_empty());
}

/// (2b) Listing services names each registered service key once (two
/// instances, two versions of one name), sorted, and each listed key of
/// ours discovers its instances.
pub async fn list_services<B: Backend>() {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let p = b.provider();
    let _r = [
        p.register(instance("Conf.List", "1.0", 7201))
            .await
            .unwrap(),
        p.register(instance("Conf.List", "1.0", 7202))
            .await
            .unwrap(),
        p.register(instance("Conf.List", "2.0", 7201))
            .await
            .unwrap(),
        p.register(instance("Conf.Listed", "1.0", 7201))
            .await
            .unwrap(),
    ];
    let c = b.consumer();
    let ours = ["Conf.List:1.0", "Conf.List:2.0", "Conf.Listed:1.0"];
    // Consul's catalog and Nacos's service list follow registrations a
    // moment later on some servers: wait for them, bounded.
    let listed = within(soon(&b), "the services to be listed", async {
        loop {
            let listed = c.services().await.unwrap();
            if ours.iter().all(|k| listed.iter().any(|l| l == k)) {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(listed, sorted, "sorted, each key once");
    for key in ours {
        assert!(!c.discover(key).await.unwrap().is_empty(), "{key}");
    }
    assert_eq!(c.discover("Conf.List:1.0").await.unwrap().len(), 2);
}

/// (3) A watcher sees an addition, then a removal, in order.
pub async fn watch_sees_add_then_remove<B: Backend>() {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let meta = instance("Conf.Watch", "1.0", 7100);
    let mut watch = b.consumer().watch("Conf.Watch:1.0").await.unwrap();
    assert_eq!(
        next_change(&b, &mut watch).await,
        WatchEvent::Snapshot(vec![])
    );
    let started = Instant::now();
    let registration = b.provider().register(meta.clone()).await.unwrap();
    assert_eq!(
        next_change(&b, &mut watch).await,
        WatchEvent::Upsert(meta.clone())
    );
    let added = started.elapsed();
    let started = Instant::now();
    registration.deregister().await.unwrap();
    assert_eq!(
        next_change(&b, &mut watch).await,
        WatchEvent::Remove(meta.node_key())
    );
    println!(
        "[{}] watch latency: add {added:?}, remove {:?}",
        B::NAME,
        started.elapsed()
    );
}

/// (4) Explicit deregistration is visible once it returns; dropping the
/// registration removes the instance soon after.
pub async fn deregister_removes<B: Backend>() {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let p = b.provider();
    let c = b.consumer();
    let explicit = instance("Conf.Dereg", "1.0", 7201);
    let dropped = instance("Conf.Dereg", "1.0", 7202);
    let r1 = p.register(explicit.clone()).await.unwrap();
    let r2 = p.register(dropped.clone()).await.unwrap();
    assert_eq!(c.discover("Conf.Dereg:1.0").await.unwrap().len(), 2);

    let state = r1.state();
    r1.deregister().await.unwrap();
    assert_eq!(*state.borrow(), RegistrationState::Deregistered);
    assert_eq!(
        c.discover("Conf.Dereg:1.0").await.unwrap(),
        vec![dropped.clone()]
    );

    let mut watch = c.watch("Conf.Dereg:1.0").await.unwrap();
    assert_eq!(
        next_change(&b, &mut watch).await,
        WatchEvent::Snapshot(vec![dropped.clone()])
    );
    drop(r2);
    assert_eq!(
        next_change(&b, &mut watch).await,
        WatchEvent::Remove(dropped.node_key())
    );
    assert!(c.discover("Conf.Dereg:1.0").await.unwrap().is_empty());
}

/// (5) A provider process killed with SIGKILL, which cannot deregister,
/// disappears within the TTL (plus propagation).
pub async fn sigkilled_provider_disappears<B: Backend>(child_test: &str) {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let env = match b.child_env() {
        Ok(env) => env,
        Err(why) => return skip::<B>("SIGKILL", &why),
    };
    let meta = instance("Conf.Kill", "1.0", 7300);
    let cache = cache(b.consumer());
    let handle = cache.service("Conf.Kill:1.0").await.unwrap();

    let exe = std::env::current_exe().unwrap();
    let spawned = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .args(["--exact", child_test, "--nocapture", "--ignored"])
        .envs(env)
        .env(CHILD_META_VAR, meta.to_json())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    within(Duration::from_secs(20), "the child's ready line", async {
        loop {
            match lines.next_line().await.unwrap() {
                Some(line) if line.starts_with(READY_LINE) => break,
                Some(_) => continue,
                None => panic!("the child provider exited before registering"),
            }
        }
    })
    .await;
    wait_list(&b, &handle, "the child's instance", |l, _| {
        l.contains(&meta)
    })
    .await;
    println!(
        "[{}] provider process start to a watching consumer seeing it: {:?}",
        B::NAME,
        spawned.elapsed()
    );

    let killed = Instant::now();
    child.kill().await.unwrap();
    let bound = b.ttl() + b.propagation() + Duration::from_secs(1);
    wait_list(&b, &handle, "the killed provider's removal", |l, _| {
        !l.contains(&meta)
    })
    .await;
    let took = killed.elapsed();
    println!(
        "[{}] SIGKILL to removal from discovery: {took:?} (ttl {:?}, bound {bound:?})",
        B::NAME,
        b.ttl()
    );
    assert!(took <= bound, "took {took:?}, more than {bound:?}");
}

/// The child side of case 5: register, say so, wait to be killed.
pub async fn child_provider<B: Backend>() {
    let Ok(json) = std::env::var(CHILD_META_VAR) else {
        println!("not started by the SIGKILL case; nothing to do");
        return;
    };
    let meta = ServiceMetaInfo::from_json(json.as_bytes()).unwrap();
    let registration: Registration = B::provider_from_env().await.register(meta).await.unwrap();
    println!("{READY_LINE} {}", registration.meta().node_key());
    tokio::time::sleep(CHILD_LIFETIME).await;
    drop(registration);
}

/// (6) After the backend loses a registration, the still-running provider
/// publishes it again and consumers see it.
pub async fn lost_registration_comes_back<B: Backend>() {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let meta = instance("Conf.Lost", "1.0", 7400);
    let registration = b.provider().register(meta.clone()).await.unwrap();
    let cache = cache(b.consumer());
    let handle = cache.service("Conf.Lost:1.0").await.unwrap();
    wait_list(&b, &handle, "the instance", |l, _| l.contains(&meta)).await;

    if let Err(why) = b.lose_registration(&meta).await {
        return skip::<B>("lost registration", &why);
    }
    let mut state = registration.state();
    let bound = b.ttl() + soon(&b);
    within(
        bound,
        "the provider to register again",
        state.wait_for(
            |s| matches!(s, RegistrationState::Registered { generation } if *generation >= 1),
        ),
    )
    .await
    .unwrap();
    // A fresh watch's snapshot shows what the backend holds now.
    let mut watch = b.consumer().watch("Conf.Lost:1.0").await.unwrap();
    assert_eq!(
        next_change(&b, &mut watch).await,
        WatchEvent::Snapshot(vec![meta.clone()])
    );
    wait_list(&b, &handle, "the cache to list it again", |l, _| {
        l.contains(&meta)
    })
    .await;
}

/// (7) An unknown service is an empty list, not an error.
pub async fn unknown_service_is_empty<B: Backend>() {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let c = b.consumer();
    assert!(c.discover("Conf.Nobody:9.9").await.unwrap().is_empty());
    let mut watch = c.watch("Conf.Nobody:9.9").await.unwrap();
    assert_eq!(
        next_change(&b, &mut watch).await,
        WatchEvent::Snapshot(vec![])
    );
    let cache = cache(c);
    assert!(cache.instances("Conf.Nobody:9.9").await.unwrap().is_empty());
}

/// (8) A consumer cache keeps its last list while the registry is
/// unreachable, and catches up with additions and removals once it is back.
pub async fn cache_rides_out_an_outage<B: Backend>() {
    let Some(b) = setup::<B>().await else {
        return;
    };
    let p = b.provider();
    let stays = instance("Conf.Outage", "1.0", 7501);
    let leaves = instance("Conf.Outage", "1.0", 7502);
    let joins = instance("Conf.Outage", "1.0", 7503);
    let _stays = p.register(stays.clone()).await.unwrap();
    let leaving = p.register(leaves.clone()).await.unwrap();
    let cache = cache(b.consumer());
    let handle = cache.service("Conf.Outage:1.0").await.unwrap();
    let before = node_keys(&[stays.clone(), leaves.clone()]);
    wait_list(&b, &handle, "both instances", |l, _| node_keys(l) == before).await;
    assert!(handle.is_healthy());

    if let Err(why) = b.cut_consumers().await {
        return skip::<B>("outage", &why);
    }
    let list = wait_list(&b, &handle, "the cache to notice the outage", |_, h| !h).await;
    assert_eq!(node_keys(&list), before, "the list survives the outage");

    leaving.deregister().await.unwrap();
    let _joining = p.register(joins.clone()).await.unwrap();
    // Consumers are cut off: the list must stay as it was. Bounded negative
    // check over a few propagation intervals.
    let quiet = (b.propagation() * 3).max(Duration::from_millis(300));
    let changed =
        tokio::time::timeout(quiet, handle.wait_until(|l, _| node_keys(l) != before)).await;
    assert!(changed.is_err(), "the cut-off cache changed: {changed:?}");

    b.restore_consumers().await;
    let after = node_keys(&[stays, joins]);
    let restored = Instant::now();
    // Recovery may wait out the cache's reconnect backoff (at most 1 s here).
    within(
        soon(&b) + Duration::from_secs(1),
        "the cache to catch up",
        handle.wait_until(|l, h| h && node_keys(l) == after),
    )
    .await;
    println!(
        "[{}] cache caught up {:?} after the registry came back",
        B::NAME,
        restored.elapsed()
    );
}
