//! Regression tests for faults that users of other RPC frameworks and
//! registries reported (issue 12), replayed against real `example-provider`
//! processes and real, private registry servers:
//!
//! 1. `empty_list_recovery` — a running consumer whose only provider stops
//!    gracefully, and which calls in a tight loop on a `current_thread`
//!    runtime (as `example-consumer --concurrency 1` does), finds the
//!    provider started 2 s later and does not spin while it has none.
//! 2. `silent_connection_on_the_last_slot` — a process that connects,
//!    sends nothing and is stopped with SIGSTOP, on a provider with
//!    `server.max_connections = 1`: callers are refused at once instead of
//!    timing out, and served once the silent connection is closed.
//! 3. `same_address_second_writer` — a second provider publishing the same
//!    address (bound elsewhere, `server.advertise_host` the same), stopped
//!    gracefully, leaves the first one listed, and no call fails.
//! 4. `etcd_drift_is_repaired` — the provider's key rewritten without a
//!    lease is put back under the lease, so it expires after a SIGKILL;
//!    `consul_drift_is_repaired` — the provider's service re-registered
//!    through the agent's API with another port (and its TTL check kept
//!    passing) is registered again as it was, and consumers reach it.
//! 5. `published_address` — every spelling of the wildcard (and the
//!    default `127.0.0.1`) as `server.host` publishes a dialable address,
//!    never the spelling.
//! 7. `ttl_out_of_range` — `registry.ttl_secs = 9223372036854775807` fails
//!    at startup naming the key and its maximum, instead of a panic.
//!
//! Servers are started by the tests themselves; a missing one prints one
//! SKIP line, or fails under `RPC_REQUIRE_SERVERS=1`.

#[macro_use]
#[allow(unused_macros, dead_code)]
#[path = "../../rpc-registry/tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rpc::RpcConfig;
use support::*;
use tokio::sync::watch;
use tokio::time::Instant;

// ------------------------------------------------------------- fault 1

/// What a [`TightCaller`] has seen so far.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// When the latest call that succeeded ended.
    last_ok: Option<std::time::Instant>,
}

/// One caller calling `get_user(1)` back to back, with nothing between its
/// calls, on its own `current_thread` runtime in its own thread: the shape
/// of `example-consumer --concurrency 1`. A caller loop that never awaits
/// anything would starve that runtime, so the thread also stops by itself
/// after `cap` of wall-clock time.
struct TightCaller {
    stop: Arc<AtomicBool>,
    tally: watch::Receiver<Tally>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TightCaller {
    fn start(config: RpcConfig, cap: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, tally) = watch::channel(Tally::default());
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = example_common::UserServiceClient::from_config(&config)
                    .await
                    .unwrap();
                let until = std::time::Instant::now() + cap;
                while !flag.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                    let ok = matches!(client.get_user(1).await, Ok(Ok(_)));
                    tx.send_modify(|t| {
                        if ok {
                            t.ok += 1;
                            t.last_ok = Some(std::time::Instant::now());
                        } else {
                            t.failed += 1;
                        }
                    });
                }
            });
        });
        Self {
            stop,
            tally,
            thread: Some(thread),
        }
    }

    fn now(&self) -> Tally {
        *self.tally.borrow()
    }

    /// Waits (bounded) for a call that succeeded and ended after `after`.
    async fn ok_after(&mut self, after: std::time::Instant, within: Duration) -> Option<Tally> {
        let seen = self
            .tally
            .wait_for(|t| t.last_ok.is_some_and(|at| at > after));
        match tokio::time::timeout(within, seen).await {
            Ok(Ok(t)) => Some(*t),
            _ => None,
        }
    }
}

impl Drop for TightCaller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn empty_list_recovery(kind: Kind) {
    let Some(backend) = Backend::start(kind, "empty_list_recovery", 1).await else {
        return;
    };
    let mut a = ProviderProc::start(&backend, 0).await;
    let mut caller = TightCaller::start(backend.consumer_config(), 3 * WAIT);
    assert!(
        caller
            .ok_after(std::time::Instant::now(), WAIT)
            .await
            .is_some(),
        "the consumer never reached the first provider: {:?}",
        caller.now()
    );

    // The only provider stops gracefully: it deregisters, so the running
    // consumer's list becomes empty.
    a.term();
    a.exited(WAIT).await;
    let before = caller.now();
    // The gap of the reported input: 2 s with no provider at all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = ProviderProc::start(&backend, 0).await;
    let registered = std::time::Instant::now();
    let Some(after) = caller.ok_after(registered, WAIT).await else {
        panic!(
            "[{}] the running consumer never reached the provider started after the list was empty ({:?} before, {:?} now)",
            kind.name(),
            before,
            caller.now()
        );
    };
    let recovered = after
        .last_ok
        .map(|at| at.saturating_duration_since(registered))
        .unwrap_or_default();
    let failed = after.failed - before.failed;
    report(
        kind,
        "empty_list_recovery",
        &[
            ("recovered_after_registered_ms", ms(recovered)),
            ("failed_while_empty", failed.to_string()),
            ("provider", b.addr()),
        ],
    );
    // Each call that found no provider waited for one until its deadline
    // (3 s by default): over a gap of about 2.5 s that is one or two calls,
    // where a caller spinning on an error that awaits nothing makes
    // millions.
    assert!(
        failed <= 3,
        "[{}] {failed} calls failed while the list was empty: the caller spun",
        kind.name()
    );
    // One watch round trip (a 250 ms poll for `local`, a push elsewhere);
    // the bound leaves room for a loaded two-core machine.
    assert!(
        recovered <= Duration::from_secs(3),
        "[{}] the consumer took {recovered:?} to reach a provider that had registered",
        kind.name()
    );
}

// ------------------------------------------------------------- fault 2

async fn silent_connection_on_the_last_slot() {
    let Some(backend) = Backend::start(Kind::Local, "silent_connection_on_the_last_slot", 1).await
    else {
        return;
    };
    let a = ProviderProc::start_with(
        &backend,
        0,
        &[
            ("RPC_SERVER_MAX_CONNECTIONS", "1"),
            ("RUST_LOG", "info,rpc_transport=debug"),
        ],
    )
    .await;
    // A process that takes the only slot, sends nothing, and is stopped.
    let mut silent = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{}; sleep 120", a.port))
        .spawn()
        .unwrap();
    let opened = Instant::now();
    // Its connection is open once its fd 3 is a socket: an external
    // process gives no event, so poll.
    tokio::time::timeout(WAIT, async {
        loop {
            let fd = std::fs::read_link(format!("/proc/{}/fd/3", silent.id()));
            if fd.is_ok_and(|l| l.to_string_lossy().starts_with("socket:")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the silent process never connected");
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &silent.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let (_consumer, client, _handle) = backend.consumer(|_| {}).await;
    let load = Load::start(&client);
    // The first call that succeeds: once the silent connection was closed
    // (server.first_frame_timeout_ms, 5 s), the caller gets its slot.
    let served = tokio::time::timeout(WAIT, async {
        loop {
            if matches!(client.get_user(1).await, Ok(Ok(_))) {
                return Instant::now();
            }
        }
    })
    .await
    .expect("no call was served after the silent connection should have been closed");
    let calls = load.stop().await;
    let _ = silent.kill();
    let _ = silent.wait();
    let timeouts = calls.all.iter().filter(|o| o.timeout).count();
    report(
        Kind::Local,
        "silent_connection_on_the_last_slot",
        &[
            ("served_after_ms", ms(served - opened)),
            ("refused_fast", calls.failed().len().to_string()),
            ("timeouts", timeouts.to_string()),
            ("calls", calls.total().to_string()),
        ],
    );
    // Refused at once (a go-away), never left to time out in the backlog.
    let timed_out: Vec<String> = calls
        .all
        .iter()
        .filter(|o| o.timeout)
        .take(4)
        .map(|o| {
            format!(
                "+{}ms: {}",
                o.started.duration_since(opened).as_millis(),
                o.error.as_deref().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        timeouts,
        0,
        "calls that timed out: {timed_out:?}\nprovider log:\n{}",
        a.log()
    );
    drop(a);
}

// ------------------------------------------------------------- fault 3

async fn same_address_second_writer(kind: Kind) {
    let Some(backend) = Backend::start(kind, "same_address_second_writer", 1).await else {
        return;
    };
    let a = ProviderProc::start(&backend, 0).await;
    let addr = a.addr();
    let (_consumer, client, handle) = backend.consumer(|_| {}).await;
    wait_list(&handle, WAIT, "the first provider is listed", |l, _| {
        has(l, &addr)
    })
    .await;
    let load = Load::start(&client);
    // The same port on another loopback address, publishing the first
    // one's address.
    let port = a.port.to_string();
    let mut b = ProviderProc::start_with(
        &backend,
        a.port,
        &[
            ("RPC_SERVER_HOST", "127.0.0.2"),
            ("RPC_SERVER_ADVERTISE_HOST", "127.0.0.1"),
        ],
    )
    .await;
    assert_eq!(b.port.to_string(), port);
    b.term();
    let status = b.exited(WAIT).await;
    assert!(status.success(), "{status}:\n{}", b.log());
    let stopped = Instant::now();
    // What the registry itself holds, as a new consumer sees it: the first
    // provider, still running, is listed within TTL / 3 (plus a margin
    // for a loaded machine) ...
    let bound = backend.ttl() / 3 + Duration::from_millis(1500);
    let (_observer, listed) = backend.observer().await;
    wait_list(
        &listed,
        bound,
        "the first provider is listed again",
        |l, _| has(l, &addr),
    )
    .await;
    let back = stopped.elapsed();
    // ... and stays listed: a second TTL later it is still there.
    tokio::time::sleep(backend.ttl() + Duration::from_millis(500)).await;
    assert!(
        has(&listed.instances(), &addr),
        "[{}] the first provider was unlisted again",
        kind.name()
    );
    let calls = load.stop().await;
    report(
        kind,
        "same_address_second_writer",
        &[
            ("listed_again_after_ms", ms(back)),
            ("failed", calls.failed().len().to_string()),
            ("calls", calls.total().to_string()),
        ],
    );
    calls.assert_no_failure("a second writer of the same address stopped");
    drop(a);
}

// ------------------------------------------------------------- fault 4

/// `etcdctl` against the backend's first endpoint.
#[cfg(feature = "etcd")]
fn etcdctl(backend: &Backend, args: &[&str]) -> String {
    let out = std::process::Command::new("etcdctl")
        .arg(format!("--endpoints={}", backend.addresses()[0]))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

#[cfg(feature = "etcd")]
async fn etcd_drift_is_repaired() {
    let Some(backend) = Backend::start(Kind::Etcd, "etcd_drift_is_repaired", 1).await else {
        return;
    };
    if !servers::runs("etcdctl", &["version"]) {
        skip("etcd", "etcd_drift_is_repaired", "no `etcdctl` binary");
        return;
    }
    let mut a = ProviderProc::start(&backend, 0).await;
    let key = format!("/rpc/{SERVICE}/{}", a.addr());
    let value = etcdctl(&backend, &["get", &key, "--print-value-only"]);
    assert!(value.contains(&a.port.to_string()), "{value}");
    // The input: the same value again, without a lease.
    etcdctl(&backend, &["put", &key, &value]);
    let lease_of = |backend: &Backend| {
        let json = etcdctl(backend, &["get", &key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["kvs"][0]["lease"].as_i64().unwrap_or(0)
    };
    assert_eq!(lease_of(&backend), 0);
    // Put back under the provider's lease within TTL / 3 (polled: the
    // registry tells nobody).
    let bound = backend.ttl() / 3 + Duration::from_millis(1500);
    let repaired = tokio::time::timeout(bound, async {
        while lease_of(&backend) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        repaired.is_ok(),
        "the lease-less key was not repaired within {bound:?}"
    );
    // So it expires with the lease once the provider dies.
    a.kill9();
    a.exited(WAIT).await;
    let (_observer, listed) = backend.observer().await;
    let addr = a.addr();
    wait_list(
        &listed,
        backend.removal_bound(),
        "the SIGKILLed provider's key expired",
        |l, _| !has(l, &addr),
    )
    .await;
}

#[cfg(feature = "consul")]
async fn consul_drift_is_repaired() {
    let Some(backend) = Backend::start(Kind::Consul, "consul_drift_is_repaired", 1).await else {
        return;
    };
    let agent: std::net::SocketAddr = backend.addresses()[0]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let a = ProviderProc::start(&backend, 0).await;
    let (_consumer, client, handle) = backend.consumer(|_| {}).await;
    wait_list(&handle, WAIT, "the provider is listed", |l, _| {
        has(l, &a.addr())
    })
    .await;
    let id = format!("{SERVICE}/{}", a.addr());
    let path = format!(
        "/v1/agent/service/{}",
        id.replace(':', "%3A").replace('/', "%2F")
    );
    let port_held = || async {
        let (status, body) = servers::http(agent, "GET", &path, "").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["Port"].as_u64().unwrap_or(0)
    };
    assert_eq!(port_held().await, u64::from(a.port));
    // The input: the same service ID registered again by hand with
    // another port and no record tag, its TTL check kept (so the provider's
    // heartbeats keep passing it).
    let wrong = serde_json::json!({
        "ID": id,
        "Name": "UserService:1.0",
        "Address": "127.0.0.1",
        "Port": 9,
        "Check": {"CheckID": format!("service:{id}"), "TTL": "10s", "Status": "passing"},
    });
    let (status, body) = servers::http(
        agent,
        "PUT",
        "/v1/agent/service/register",
        &wrong.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(port_held().await, 9);
    // Registered again as it was within TTL / 3 (polled: the agent tells
    // nobody), and listed for consumers.
    let bound = backend.ttl() / 3 + Duration::from_millis(1500);
    let repaired = tokio::time::timeout(bound, async {
        while port_held().await != u64::from(a.port) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        repaired.is_ok(),
        "the drifted registration was not repaired within {bound:?}"
    );
    wait_list(&handle, WAIT, "the provider is listed again", |l, _| {
        has(l, &a.addr())
    })
    .await;
    assert!(matches!(client.get_user(1).await, Ok(Ok(_))));
    assert!(
        a.log().contains("drifted"),
        "the provider did not say what it repaired:\n{}",
        a.log()
    );
}

// ------------------------------------------------------------- fault 5

/// With the registry on loopback (as every test server is), a provider
/// bound to any spelling of the wildcard, or to the default `127.0.0.1`,
/// publishes `127.0.0.1`, and a consumer reaches it there. (A registry off
/// loopback is covered by `rpc`'s `advertise` unit tests: a test may not
/// send traffic off this machine.)
async fn published_address(kind: Kind) {
    let Some(backend) = Backend::start(kind, "published_address", 1).await else {
        return;
    };
    let (_consumer, client, handle) = backend.consumer(|_| {}).await;
    for host in [
        "127.0.0.1",
        "0.0.0.0",
        "::",
        "::0",
        "[::]",
        "0:0:0:0:0:0:0:0",
        "0.0.0.00",
    ] {
        let mut p = ProviderProc::start_with(&backend, 0, &[("RPC_SERVER_HOST", host)]).await;
        let port = p.port;
        wait_list(&handle, WAIT, "the provider is listed", |l, _| {
            l.iter().any(|m| m.service_port == port)
        })
        .await;
        let listed: Vec<String> = handle
            .instances()
            .iter()
            .filter(|m| m.service_port == port)
            .map(|m| m.service_host.clone())
            .collect();
        assert_eq!(
            listed,
            ["127.0.0.1"],
            "[{}] server.host = {host:?} published {listed:?}",
            kind.name()
        );
        let user = client.get_user(1).await;
        assert!(
            matches!(user, Ok(Ok(_))),
            "[{}] server.host = {host:?}: {user:?}",
            kind.name()
        );
        p.term();
        p.exited(WAIT).await;
        wait_list(&handle, WAIT, "the provider is gone", |l, _| {
            !l.iter().any(|m| m.service_port == port)
        })
        .await;
    }
}

// ------------------------------------------------------------- fault 7

/// An absurd TTL fails at startup with a message naming the key and the
/// maximum (exit code 2: a configuration error), not a panic (101).
#[cfg(feature = "consul")]
async fn ttl_out_of_range(kind: Kind) {
    let Some(backend) = Backend::start(kind, "ttl_out_of_range", 1).await else {
        return;
    };
    let mut p = ProviderProc::spawn(
        &backend,
        0,
        &[("RPC_REGISTRY_TTL_SECS", "9223372036854775807")],
    );
    let status = p.exited(WAIT).await;
    let log = p.log();
    assert_eq!(status.code(), Some(2), "{status}:\n{log}");
    assert!(
        log.contains("registry.ttl_secs") && log.contains("at most 86400 s"),
        "{log}"
    );
}

// ------------------------------------------------------------- the tests

mod local {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_consumer_recovers_from_an_empty_instance_list() {
        empty_list_recovery(Kind::Local).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_spelling_of_the_bind_host_publishes_a_dialable_address() {
        published_address(Kind::Local).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_writer_of_the_same_address_leaves_the_first_listed() {
        same_address_second_writer(Kind::Local).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_stopped_process_on_the_last_slot_does_not_take_the_provider_off_the_air() {
        silent_connection_on_the_last_slot().await;
    }
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_consumer_recovers_from_an_empty_instance_list() {
        empty_list_recovery(Kind::Etcd).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_spelling_of_the_bind_host_publishes_a_dialable_address() {
        published_address(Kind::Etcd).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_writer_of_the_same_address_leaves_the_first_listed() {
        same_address_second_writer(Kind::Etcd).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_rewritten_without_a_lease_is_put_back_under_it() {
        etcd_drift_is_repaired().await;
    }
}

#[cfg(feature = "zookeeper")]
mod zookeeper {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_writer_of_the_same_address_leaves_the_first_listed() {
        same_address_second_writer(Kind::Zookeeper).await;
    }
}

#[cfg(feature = "nacos")]
mod nacos {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_writer_of_the_same_address_leaves_the_first_listed() {
        same_address_second_writer(Kind::Nacos).await;
    }
}

#[cfg(feature = "consul")]
mod consul {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_consumer_recovers_from_an_empty_instance_list() {
        empty_list_recovery(Kind::Consul).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_out_of_range_ttl_fails_at_startup_naming_the_key() {
        ttl_out_of_range(Kind::Consul).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_writer_of_the_same_address_leaves_the_first_listed() {
        same_address_second_writer(Kind::Consul).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_service_re_registered_with_another_port_is_put_back() {
        consul_drift_is_repaired().await;
    }
}

feature_stub!(
    etcd_field_faults_need_the_etcd_feature,
    "etcd",
    "field-fault tests"
);
feature_stub!(
    zookeeper_field_faults_need_the_zookeeper_feature,
    "zookeeper",
    "field-fault tests"
);
feature_stub!(
    nacos_field_faults_need_the_nacos_feature,
    "nacos",
    "field-fault tests"
);
feature_stub!(
    consul_field_faults_need_the_consul_feature,
    "consul",
    "field-fault tests"
);
