//! Chaos tests (issue 7): real `example-provider` processes against a real,
//! private registry server of every backend (local, etcd, zookeeper, consul,
//! nacos), an in-process consumer calling `get_user` continuously, and the
//! faults of the issue:
//!
//! 1. `kill9` — SIGKILL of one of two providers: no failed call (in-flight
//!    calls of the idempotent `get_user` are retried on the other one), and
//!    the dead instance leaves the consumer's cache within the TTL;
//! 2. `rolling_restart` — SIGTERM of each provider in turn, restarted on
//!    its port: no failed call;
//! 3. `registry_outage` — the registry server stopped for 30 s: no failed
//!    call (the cache serves), and once it is back the providers are
//!    listed again and a provider started then reaches the running consumer;
//! 4. `registry_reset` — the registry restarted with an empty data dir: the
//!    providers register again by themselves within 2x the TTL, the running
//!    consumer recovers, and no call fails (the consumer's cache keeps its
//!    list while the registry is back but still empty, `client.empty_grace_ms`);
//! 5. `unresponsive_provider` — an instance that accepts connections and
//!    never answers: calls to it time out at the deadline, it is ejected,
//!    later calls go to the other provider, and after the cool-down a
//!    single probe call decides;
//! 6. (etcd) `cluster_member_kill` — a three-member cluster on loopback,
//!    its leader SIGKILLed: no failed call and no lost registration.
//!
//! Each prints `CHAOS backend=.. scenario=.. key=value ..` lines with what it
//! measured (the README's tables come from them):
//!
//! ```text
//! cargo nextest run -p example-provider --all-features --test chaos --no-capture
//! ```
//!
//! Servers are started by the tests themselves (the binaries that
//! `scripts/registry-servers.sh install` puts in place); a missing one
//! prints one SKIP line, or fails under `RPC_REQUIRE_SERVERS=1`.

// The skip line, feature stubs and loopback ports, shared with
// rpc-registry's real-server tests.
#[macro_use]
#[allow(unused_macros, dead_code)]
#[path = "../../rpc-registry/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use rpc::ServiceMetaInfo;
use support::*;
use tokio::time::Instant;

/// How long calls keep flowing between steps: not a synchronisation (every
/// wait for an event is on the event), the length of a load phase.
const PHASE: Duration = Duration::from_secs(1);
/// The real outage of scenario 3.
const OUTAGE: Duration = Duration::from_secs(30);
/// Bound on clients finding the registry again after [`OUTAGE`].
const RETURN: Duration = Duration::from_secs(40);

async fn two_providers(
    backend: &Backend,
) -> (
    ProviderProc,
    ProviderProc,
    rpc::Consumer,
    example_common::UserServiceClient,
    rpc::registry::ServiceHandle,
) {
    let a = ProviderProc::start(backend, 0).await;
    let b = ProviderProc::start(backend, 0).await;
    let (consumer, client, handle) = backend.consumer(|_| {}).await;
    let (aa, ba) = (a.addr(), b.addr());
    wait_list(
        &handle,
        WAIT,
        "the consumer lists both providers",
        |l, _| has(l, &aa) && has(l, &ba),
    )
    .await;
    (a, b, consumer, client, handle)
}

// ------------------------------------------------------------- scenario 1

async fn kill9(kind: Kind) {
    let Some(backend) = Backend::start(kind, "kill9", 1).await else {
        return;
    };
    let (mut a, b, _consumer, client, handle) = two_providers(&backend).await;
    let load = Load::start(&client);
    tokio::time::sleep(PHASE).await;

    let killed = Instant::now();
    a.kill9();
    let dead = a.addr();
    wait_list(
        &handle,
        backend.removal_bound() + WAIT,
        "the killed provider leaves the cache",
        |l, _| !has(l, &dead),
    )
    .await;
    let removal = killed.elapsed();
    a.exited(WAIT).await;
    tokio::time::sleep(PHASE).await;
    let calls = load.stop().await;

    report(
        kind,
        "kill9",
        &[
            ("removal_ms", ms(removal)),
            ("ttl_ms", ms(backend.ttl())),
            ("bound_ms", ms(backend.removal_bound())),
            ("failed", calls.failed().len().to_string()),
            ("calls", calls.total().to_string()),
        ],
    );
    calls.assert_no_failure("kill -9 of one of two providers");
    assert!(
        removal <= backend.removal_bound(),
        "the killed provider left the cache after {removal:?}, more than {:?} (TTL {:?})",
        backend.removal_bound(),
        backend.ttl()
    );
    assert!(
        has(&handle.instances(), &b.addr()),
        "the survivor is listed"
    );
    let after = calls.between(killed + removal, Instant::now()).count();
    assert!(after > 0, "no call after the removal");
}

// ------------------------------------------------------------- scenario 2

async fn rolling_restart(kind: Kind) {
    let Some(backend) = Backend::start(kind, "rolling_restart", 1).await else {
        return;
    };
    let (a, b, _consumer, client, handle) = two_providers(&backend).await;
    let mut providers = [a, b];
    let load = Load::start(&client);
    tokio::time::sleep(PHASE).await;

    let mut removals = Vec::new();
    let mut returns = Vec::new();
    for slot in &mut providers {
        let old = &mut *slot;
        let (addr, port) = (old.addr(), old.port);
        let stopping = Instant::now();
        old.term();
        wait_list(
            &handle,
            WAIT,
            "a stopping provider leaves the cache",
            |l, _| !has(l, &addr),
        )
        .await;
        removals.push(stopping.elapsed());
        let status = old.exited(WAIT).await;
        assert!(
            status.success(),
            "provider {addr} exited with {status}:\n{}",
            old.log()
        );
        assert!(
            old.log().contains("rpc::provider: deregistered"),
            "provider {addr} did not deregister:\n{}",
            old.log()
        );
        let new = ProviderProc::start(&backend, port).await;
        returns.push(
            wait_list(
                &handle,
                WAIT,
                "a restarted provider is listed again",
                |l, _| has(l, &addr),
            )
            .await,
        );
        *slot = new;
        tokio::time::sleep(PHASE).await;
    }
    let calls = load.stop().await;

    let max = removals.iter().max().copied().unwrap_or_default();
    report(
        kind,
        "rolling_restart",
        &[
            ("graceful_removal_ms", ms(max)),
            (
                "removals_ms",
                removals
                    .iter()
                    .map(|d| ms(*d))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "restarted_seen_after_registered_ms",
                returns.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(","),
            ),
            ("failed", calls.failed().len().to_string()),
            ("calls", calls.total().to_string()),
        ],
    );
    calls.assert_no_failure("rolling restart");
    assert!(
        max <= backend.removal_bound(),
        "a gracefully stopped provider took {max:?} to leave the cache: slower than a crash ({:?})",
        backend.removal_bound()
    );
}

// ------------------------------------------------------------- scenario 3

async fn registry_outage(kind: Kind) {
    let Some(mut backend) = Backend::start(kind, "registry_outage", 1).await else {
        return;
    };
    let (a, b, _consumer, client, handle) = two_providers(&backend).await;
    let load = Load::start(&client);
    tokio::time::sleep(PHASE).await;

    backend.stop();
    tokio::time::sleep(OUTAGE).await;
    let restarted = backend.start_again(false).await;
    let ready = restarted.elapsed();

    // The registry lists both providers again (a new client's view). No
    // time promise here, so a generous bound: a client library may back
    // off for long after a long outage (nacos-sdk doubles its reconnect
    // pause up to 64 s).
    let (_observer, listed) = backend.observer().await;
    let (aa, ba) = (a.addr(), b.addr());
    wait_list(
        &listed,
        RETURN,
        "the registry lists both providers again",
        |l, _| has(l, &aa) && has(l, &ba),
    )
    .await;
    let reregistered = restarted.elapsed();
    // The running consumer follows the registry again: a provider started
    // now reaches it.
    wait_list(
        &handle,
        RETURN,
        "the consumer's cache is healthy again",
        |l, healthy| healthy && has(l, &aa) && has(l, &ba),
    )
    .await;
    let c = ProviderProc::start(&backend, 0).await;
    let ca = c.addr();
    let visible = wait_list(
        &handle,
        WAIT,
        "a provider started after the outage reaches the consumer",
        |l, _| has(l, &ca),
    )
    .await;
    tokio::time::sleep(PHASE).await;
    let calls = load.stop().await;

    report(
        kind,
        "registry_outage",
        &[
            ("outage_ms", ms(OUTAGE)),
            ("server_ready_ms", ms(ready)),
            ("relisted_ms", ms(reregistered)),
            ("new_provider_visible_ms", ms(visible)),
            ("failed", calls.failed().len().to_string()),
            ("calls", calls.total().to_string()),
        ],
    );
    calls.assert_no_failure("registry stopped for 30 s");
}

// ------------------------------------------------------------- scenario 4

async fn registry_reset(kind: Kind) {
    let Some(mut backend) = Backend::start(kind, "registry_reset", 1).await else {
        return;
    };
    let (a, b, _consumer, client, handle) = two_providers(&backend).await;
    let load = Load::start(&client);
    tokio::time::sleep(PHASE).await;

    backend.stop();
    let restarted = backend.start_again(true).await;
    let ready = restarted.elapsed();
    let (_observer, listed) = backend.observer().await;
    let (aa, ba) = (a.addr(), b.addr());
    wait_list(
        &listed,
        2 * backend.ttl() + WAIT,
        "the providers register again by themselves",
        |l, _| has(l, &aa) && has(l, &ba),
    )
    .await;
    let reregistered = restarted.elapsed();
    wait_list(
        &handle,
        WAIT,
        "the consumer's cache recovers",
        |l, healthy| healthy && has(l, &aa) && has(l, &ba),
    )
    .await;
    let recovered = Instant::now();
    tokio::time::sleep(PHASE).await;
    let calls = load.stop().await;

    let late: Vec<_> = calls
        .between(recovered, Instant::now())
        .filter(|o| o.error.is_some())
        .collect();
    report(
        kind,
        "registry_reset",
        &[
            ("server_ready_ms", ms(ready)),
            ("reregistered_ms", ms(reregistered)),
            (
                "reregistered_after_ready_ms",
                ms(reregistered.saturating_sub(ready)),
            ),
            ("ttl_ms", ms(backend.ttl())),
            ("failed", calls.failed().len().to_string()),
            ("calls", calls.total().to_string()),
        ],
    );
    if !calls.failed().is_empty() {
        println!(
            "CHAOS backend={} scenario=registry_reset note: {}",
            kind.name(),
            calls.describe_failures().replace('\n', " |")
        );
    }
    assert!(
        reregistered.saturating_sub(ready) <= 2 * backend.ttl(),
        "the providers took {:?} after the server was ready to register again (2 x TTL = {:?})",
        reregistered.saturating_sub(ready),
        2 * backend.ttl()
    );
    assert!(
        late.is_empty(),
        "calls failed after the consumer's cache recovered: {}",
        calls.describe_failures()
    );
    assert!(
        calls.failed().is_empty(),
        "calls failed while the registry was back but empty: {}",
        calls.describe_failures()
    );
}

// ------------------------------------------------------------- scenario 5

/// A TCP listener that accepts connections and never reads or answers.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (port, task)
}

async fn unresponsive_provider(kind: Kind) {
    const DEADLINE: Duration = Duration::from_millis(1000);
    const FAILURES: u32 = 5;
    const COOLDOWN: Duration = Duration::from_millis(3000);
    let Some(backend) = Backend::start(kind, "unresponsive_provider", 1).await else {
        return;
    };
    let good = ProviderProc::start(&backend, 0).await;
    let (hole_port, _hole) = black_hole().await;
    let hole = format!("127.0.0.1:{hole_port}");
    let (_registry, _registration) = backend
        .register(ServiceMetaInfo::new(
            "UserService",
            "1.0",
            "127.0.0.1",
            hole_port,
        ))
        .await;
    let (_consumer, client, handle) = backend
        .consumer(|c| {
            c.client.timeout_ms = DEADLINE.as_millis() as u64;
            c.client.outlier_failures = FAILURES;
            c.client.outlier_cooldown_ms = COOLDOWN.as_millis() as u64;
        })
        .await;
    let ga = good.addr();
    wait_list(&handle, WAIT, "both instances listed", |l, _| {
        has(l, &ga) && has(l, &hole)
    })
    .await;

    // Long enough for the ejection (5 deadlines' worth of failures at most),
    // a cool-down and its probe.
    let load = Load::start(&client);
    tokio::time::sleep(2 * DEADLINE + COOLDOWN + 2 * DEADLINE).await;
    let calls = load.stop().await;
    assert!(
        has(&handle.instances(), &hole),
        "the unresponsive instance must still be registered: ejection, not the registry, moves the calls"
    );

    let failed = calls.failed();
    let mut wrong = Vec::new();
    for o in &failed {
        if !o.timeout
            || o.took < DEADLINE - Duration::from_millis(5)
            || o.took > DEADLINE + Duration::from_millis(500)
        {
            wrong.push(format!("{:?} after {:?}", o.error, o.took));
        }
    }
    // The ejecting failure: the FAILURES-th, in order of completion.
    let mut ends: Vec<Instant> = failed.iter().map(|o| o.ended()).collect();
    ends.sort();
    assert!(
        ends.len() >= FAILURES as usize,
        "fewer than {FAILURES} calls timed out: {}",
        calls.describe_failures()
    );
    let ejected = ends[FAILURES as usize - 1];
    // Calls already on their way to the instance when it was ejected fail
    // too: at most one per other caller.
    let ejection_failures = ends
        .iter()
        .filter(|e| **e <= ejected + Duration::from_millis(100))
        .count();
    // The test sees the ejection a little after the consumer did (the
    // FAILURES-th failure by the test's clock may be another caller's), so
    // the cool-down's edges are judged with a margin: the probe may start
    // up to MARGIN before the end the test computes.
    const MARGIN: Duration = Duration::from_millis(100);
    let window_end = ejected + COOLDOWN - MARGIN;
    let during_cooldown: Vec<_> = calls.between(ejected + MARGIN, window_end).collect();
    let cooldown_failures = during_cooldown.iter().filter(|o| o.error.is_some()).count();
    let slowest_ok = during_cooldown
        .iter()
        .filter(|o| o.error.is_none())
        .map(|o| o.took)
        .max()
        .unwrap_or_default();
    // After the cool-down: one probe call goes to the instance (and times
    // out), which ejects it again.
    let probe_failures = calls
        .between(window_end, Instant::now())
        .filter(|o| o.error.is_some())
        .count();

    report(
        kind,
        "unresponsive_provider",
        &[
            ("deadline_ms", ms(DEADLINE)),
            (
                "ejected_after_ms",
                ms(ejected.duration_since(calls.started)),
            ),
            ("timeouts_to_eject", ejection_failures.to_string()),
            ("calls_in_cooldown", during_cooldown.len().to_string()),
            ("failed_in_cooldown", cooldown_failures.to_string()),
            ("slowest_ok_in_cooldown_ms", ms(slowest_ok)),
            ("probe_failures", probe_failures.to_string()),
            ("failed", failed.len().to_string()),
            ("calls", calls.total().to_string()),
        ],
    );
    assert!(
        wrong.is_empty(),
        "every failure must be a timeout at the {DEADLINE:?} deadline: {wrong:?}"
    );
    assert!(
        ejection_failures < FAILURES as usize + CALLERS,
        "{ejection_failures} calls timed out before the ejection took effect ({FAILURES} + one in flight per other caller at most): {}",
        calls.describe_failures()
    );
    assert!(
        during_cooldown.len() > 100,
        "only {} calls during the cool-down",
        during_cooldown.len()
    );
    assert_eq!(
        cooldown_failures,
        0,
        "calls failed while the instance was ejected: {}",
        calls.describe_failures()
    );
    assert!(
        slowest_ok < DEADLINE / 2,
        "a call took {slowest_ok:?} while the instance was ejected: it went to the unresponsive one"
    );
    assert_eq!(
        probe_failures,
        1,
        "after the cool-down {probe_failures} calls went to the unresponsive instance; one probe should decide: {}",
        calls.describe_failures()
    );
}

// ------------------------------------------------------------- scenario 6

/// `(key, create_revision, lease)` of every instance key in etcd.
#[cfg(feature = "etcd")]
fn etcd_instance_keys(endpoints: &[String]) -> Vec<(String, String, String)> {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args([
            "--command-timeout=5s",
            "get",
            "--prefix",
            "/rpc/",
            "-w",
            "json",
        ])
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "etcdctl get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys: Vec<_> = v["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            (
                kv["key"].to_string(),
                kv["create_revision"].to_string(),
                kv["lease"].to_string(),
            )
        })
        .collect();
    keys.sort();
    keys
}

#[cfg(feature = "etcd")]
async fn etcd_cluster_member_kill() {
    let Some(mut backend) = Backend::start(Kind::Etcd, "cluster_member_kill", 3).await else {
        return;
    };
    if !support::servers::runs("etcdctl", &["version"]) {
        skip("etcd", "cluster_member_kill", "no `etcdctl` binary");
        return;
    }
    let (a, b, _consumer, client, handle) = two_providers(&backend).await;
    let endpoints = backend.addresses();
    let before = etcd_instance_keys(&endpoints);
    assert_eq!(before.len(), 2, "two instance keys: {before:?}");

    // Every list the consumer's cache goes through, checked for both.
    let gaps = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<String>>::new()));
    let monitor = {
        let (handle, gaps) = (handle.clone(), gaps.clone());
        let (aa, ba) = (a.addr(), b.addr());
        tokio::spawn(async move {
            let mut changes = handle.changes();
            loop {
                changes.borrow_and_update();
                let list = handle.instances();
                if !has(&list, &aa) || !has(&list, &ba) {
                    gaps.lock().unwrap().push(addrs(&list));
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let load = Load::start(&client);
    tokio::time::sleep(PHASE).await;

    let leader = backend
        .etcd()
        .leader()
        .await
        .expect("the cluster has a leader");
    let killed = Instant::now();
    backend.etcd().kill_member(leader);
    let survivors: Vec<String> = endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, e)| e.clone())
        .collect();
    // Three TTLs: a lease the providers failed to keep alive would have
    // expired, and its keys been deleted, by then.
    tokio::time::sleep(3 * backend.ttl()).await;
    let after = etcd_instance_keys(&survivors);
    let (_observer, listed) = backend.observer().await;
    let (aa, ba) = (a.addr(), b.addr());
    wait_list(
        &listed,
        WAIT,
        "a new client lists both providers",
        |l, _| has(l, &aa) && has(l, &ba),
    )
    .await;
    let calls = load.stop().await;
    monitor.abort();
    let gaps = gaps.lock().unwrap().clone();

    report(
        Kind::Etcd,
        "cluster_member_kill",
        &[
            ("members", "3".into()),
            ("killed", format!("etcd{}(leader)", leader + 1)),
            ("observed_ms", ms(killed.elapsed())),
            ("ttl_ms", ms(backend.ttl())),
            (
                "lost_registrations",
                if before == after { "0" } else { "1" }.to_string(),
            ),
            ("cache_gaps", gaps.len().to_string()),
            ("failed", calls.failed().len().to_string()),
            ("calls", calls.total().to_string()),
        ],
    );
    calls.assert_no_failure("SIGKILL of the etcd leader");
    assert_eq!(
        before, after,
        "the instance keys were re-created (a lease was lost) or are gone"
    );
    assert!(
        gaps.is_empty(),
        "the consumer's cache lost a provider: {gaps:?}"
    );
}

// ------------------------------------------------------------- the tests

macro_rules! chaos_tests {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kill9_loses_no_call_and_drops_the_dead_provider_within_the_ttl() {
                kill9($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rolling_restart_loses_no_call() {
                rolling_restart($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn registry_outage_of_30_s_loses_no_call() {
                registry_outage($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn registry_reset_providers_register_again_within_2_ttl() {
                registry_reset($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unresponsive_provider_times_out_is_ejected_and_probed_once() {
                unresponsive_provider($kind).await;
            }
        }
    };
}

chaos_tests!(local, Kind::Local);

#[cfg(feature = "etcd")]
chaos_tests!(etcd, Kind::Etcd);
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_leader_kill_loses_no_call_and_no_registration() {
    etcd_cluster_member_kill().await;
}

#[cfg(feature = "zookeeper")]
chaos_tests!(zookeeper, Kind::Zookeeper);

#[cfg(feature = "consul")]
chaos_tests!(consul, Kind::Consul);

#[cfg(feature = "nacos")]
chaos_tests!(nacos, Kind::Nacos);

feature_stub!(etcd_chaos_needs_the_etcd_feature, "etcd", "chaos tests");

feature_stub!(
    zookeeper_chaos_needs_the_zookeeper_feature,
    "zookeeper",
    "chaos tests"
);

feature_stub!(
    consul_chaos_needs_the_consul_feature,
    "consul",
    "chaos tests"
);

feature_stub!(nacos_chaos_needs_the_nacos_feature, "nacos", "chaos tests");
