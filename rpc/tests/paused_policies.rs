//! Client policies on tokio's paused clock: the real `Deadline` and
//! `Retry` layers over a scripted stub instead of a transport, driven
//! through a generated client (`FlakyClient<S>` over any stack). Timing is
//! the subject here, so virtual time makes it exact and instant.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rpc::client::{Call, ClientContext, Deadline, Retry};
use rpc::retry::RetryBudget;
use rpc::transport::RawReply;
use rpc::{CallOptions, CallPolicy, ClientConfig, RpcError, ServiceClient};
use tokio::time::Instant;

#[rpc::service(version = "1.0")]
pub trait Flaky {
    /// Safe to run twice.
    #[rpc(idempotent)]
    async fn read(&self) -> u32;
    /// Not safe to run twice.
    async fn write(&self) -> u32;
    /// A tight default timeout.
    #[rpc(timeout_ms = 50)]
    async fn quick(&self) -> u32;
}

/// Every attempt takes `delay` (or what is left of it, then times out)
/// and fails with `fail()`.
struct Script {
    attempts: Arc<AtomicU32>,
    delay: Duration,
    fail: fn() -> RpcError,
}

impl Call for Script {
    async fn call(&self, cx: &mut ClientContext<'_>, _args: &[u8]) -> Result<RawReply, RpcError> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let left = cx.attempt_remaining();
        if left < self.delay {
            tokio::time::sleep(left).await;
            return Err(RpcError::Timeout {
                service: cx.service().to_owned(),
                method: cx.method().to_owned(),
                timeout: cx.timeout(),
            });
        }
        tokio::time::sleep(self.delay).await;
        Err((self.fail)())
    }
}

fn lost() -> RpcError {
    RpcError::ConnectionClosed {
        addr: "stub".into(),
        source: None,
    }
}

fn unsent() -> RpcError {
    RpcError::Connect {
        addr: "stub".into(),
        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    }
}

type Stack = Deadline<Retry<Script>>;

fn client(
    policy: CallPolicy,
    budget: RetryBudget,
    delay: Duration,
    fail: fn() -> RpcError,
) -> (FlakyClient<Stack>, Arc<AtomicU32>) {
    let attempts = Arc::new(AtomicU32::new(0));
    let script = Script {
        attempts: attempts.clone(),
        delay,
        fail,
    };
    let stack = Deadline::new(
        Retry::new(script, policy.clone(), Arc::new(budget)),
        policy.timeout,
        policy.service_timeout,
        Arc::from(Vec::<String>::new()),
    );
    let svc = ServiceClient::from_stack("Flaky:1.0", policy, stack);
    (FlakyClient::from_service_client(svc), attempts)
}

fn policy(f: impl FnOnce(&mut ClientConfig)) -> CallPolicy {
    let mut c = ClientConfig::default();
    f(&mut c);
    c.policy_for("Flaky:1.0")
}

fn roomy_budget() -> RetryBudget {
    RetryBudget::new(1.0, 100)
}

#[tokio::test(start_paused = true)]
async fn the_idempotent_attribute_enables_fail_over_for_that_method_only() {
    let p = policy(|c| c.retries = 2);
    let (c, attempts) = client(p.clone(), roomy_budget(), Duration::from_millis(1), lost);
    let err = c.read().await.unwrap_err();
    assert!(matches!(err, RpcError::ConnectionClosed { .. }), "{err}");
    assert_eq!(attempts.load(Ordering::Relaxed), 3, "read: 1 + 2 retries");

    let (c, attempts) = client(p, roomy_budget(), Duration::from_millis(1), lost);
    let err = c.write().await.unwrap_err();
    assert!(matches!(err, RpcError::ConnectionClosed { .. }), "{err}");
    assert_eq!(
        attempts.load(Ordering::Relaxed),
        1,
        "write may have run: no retry"
    );

    // The configured list still adds methods.
    let listed = policy(|c| c.idempotent = vec!["write".into()]);
    let (c, attempts) = client(listed, roomy_budget(), Duration::from_millis(1), lost);
    let _ = c.write().await.unwrap_err();
    assert_eq!(attempts.load(Ordering::Relaxed), 3);
}

#[tokio::test(start_paused = true)]
async fn retries_never_outlive_the_deadline() {
    let p = policy(|c| {
        c.timeout_ms = 300;
        c.retries = 100;
    });
    let (c, attempts) = client(p, roomy_budget(), Duration::from_millis(40), unsent);
    let started = Instant::now();
    let err = c.read().await.unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }), "{err}");
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(300),
        "exactly the deadline"
    );
    assert!(attempts.load(Ordering::Relaxed) >= 3);
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_retry_budget_stops_retries() {
    let p = policy(|c| c.retries = 5);
    let (c, attempts) = client(
        p,
        RetryBudget::new(0.0, 0),
        Duration::from_millis(1),
        unsent,
    );
    let err = c.read().await.unwrap_err();
    assert!(matches!(err, RpcError::Connect { .. }), "{err}");
    assert_eq!(attempts.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn fail_fast_never_retries() {
    let p = policy(|c| c.fault_tolerance = rpc::FaultTolerance::FailFast);
    let (c, attempts) = client(p, roomy_budget(), Duration::from_millis(1), unsent);
    let _ = c.read().await.unwrap_err();
    assert_eq!(attempts.load(Ordering::Relaxed), 1);
}

async fn timeout_of(c: &FlakyClient<Stack>) -> (Duration, Duration) {
    let started = Instant::now();
    match c.quick().await.unwrap_err() {
        RpcError::Timeout { timeout, .. } => (timeout, started.elapsed()),
        other => panic!("expected a timeout, got {other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn timeouts_follow_the_documented_precedence() {
    let hang = Duration::from_secs(3600);
    // The attribute beats `[client].timeout_ms`.
    let (c, _) = client(policy(|_| {}), roomy_budget(), hang, unsent);
    assert_eq!(
        timeout_of(&c).await,
        (Duration::from_millis(50), Duration::from_millis(50))
    );
    // `[client.services."Flaky:1.0"].timeout_ms` beats the attribute.
    let p = policy(|c| {
        c.services.insert(
            "Flaky:1.0".into(),
            rpc_core::ServiceOverrides {
                timeout_ms: Some(80),
                ..Default::default()
            },
        );
    });
    let (c, _) = client(p, roomy_budget(), hang, unsent);
    assert_eq!(timeout_of(&c).await.0, Duration::from_millis(80));
    // A per-call option beats both, on a copy sharing the stack.
    let quick = c.with(CallOptions::new().timeout(Duration::from_millis(20)));
    assert!(quick.service_client().shares_stack_with(c.service_client()));
    assert_eq!(
        timeout_of(&quick).await,
        (Duration::from_millis(20), Duration::from_millis(20))
    );
    // The original is unchanged.
    assert_eq!(timeout_of(&c).await.0, Duration::from_millis(80));
    // "Forever" is a long deadline, not an overflow.
    let forever = c.with(CallOptions::new().timeout(Duration::MAX));
    let pending = tokio::time::timeout(Duration::from_secs(3600), forever.quick()).await;
    assert!(pending.is_err(), "still waiting after an hour");
}

#[tokio::test(start_paused = true)]
async fn a_call_made_while_serving_inherits_the_smaller_deadline() {
    let (c, _) = client(
        policy(|c| c.timeout_ms = 60_000),
        roomy_budget(),
        Duration::from_secs(3600),
        unsent,
    );
    let incoming =
        rpc::Context::new("Outer:1.0", "m").with_remaining(Some(Duration::from_millis(70)));
    tokio::time::advance(Duration::from_millis(1)).await;
    let started = Instant::now();
    let (timeout, took) = incoming
        .scope(async {
            match c.read().await.unwrap_err() {
                RpcError::Timeout { timeout, .. } => (timeout, started.elapsed()),
                other => panic!("expected a timeout, got {other}"),
            }
        })
        .await;
    // The incoming deadline was fixed at its first ask (inside the call).
    assert_eq!(timeout, Duration::from_millis(70));
    assert_eq!(took, Duration::from_millis(70));
    // An already expired incoming deadline fails before anything is sent.
    let expired = rpc::Context::new("Outer:1.0", "m").with_remaining(Some(Duration::ZERO));
    let err = expired.scope(c.read()).await.unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }), "{err}");
}
