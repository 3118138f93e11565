//! The client side of a measurement: the time line (warmup, window), the
//! closed-loop driver used by `rpc` and `tarpc` (N tasks, each calling in a
//! loop, so N calls are in flight), and the `RESULT` line.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::histogram::Histogram;
use crate::message::BenchmarkMessage;

/// When to start counting and when to stop.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    /// Calls completing before this are warmup.
    pub measure_start: Instant,
    /// Calls completing at or after this are not counted; no call starts after it.
    pub end: Instant,
}

impl Timeline {
    /// Warmup from now, then the measured window.
    pub fn starting_now(warmup: Duration, duration: Duration) -> Self {
        let now = Instant::now();
        let measure_start = now + warmup;
        Self {
            measure_start,
            end: measure_start + duration,
        }
    }

    /// Whether a call completing at `t` counts.
    pub fn in_window(&self, t: Instant) -> bool {
        t >= self.measure_start && t < self.end
    }
}

/// What one client run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Latencies of the calls completed in the window.
    pub hist: Histogram,
    /// Failed calls completed in the window.
    pub errors: u64,
    /// Failed calls overall (warmup included).
    pub errors_total: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

impl Outcome {
    /// Adds another worker's outcome.
    pub fn merge(&mut self, other: Outcome) {
        self.hist.merge(&other.hist);
        self.errors += other.errors;
        self.errors_total += other.errors_total;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Notes one failure completing at `t`.
    pub fn failed(&mut self, timeline: &Timeline, t: Instant, error: impl FnOnce() -> String) {
        self.errors_total += 1;
        if timeline.in_window(t) {
            self.errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(error());
        }
    }

    /// The machine-readable line the orchestrator parses.
    pub fn result_line(&self, system: &str, inflight: usize, duration: Duration) -> String {
        let us = |ns: u64| ns as f64 / 1000.0;
        let calls = self.hist.count();
        let qps = calls as f64 / duration.as_secs_f64();
        format!(
            "RESULT system={system} inflight={inflight} calls={calls} qps={qps:.0} \
             p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} mean_us={:.1} \
             errors={} errors_total={}",
            us(self.hist.quantile_ns(0.50)),
            us(self.hist.quantile_ns(0.90)),
            us(self.hist.quantile_ns(0.99)),
            us(self.hist.quantile_ns(0.999)),
            us(self.hist.max_ns()),
            self.hist.mean_ns() / 1000.0,
            self.errors,
            self.errors_total,
        )
    }
}

/// One echo call of a system's client.
pub trait Caller: Clone + Send + Sync + 'static {
    /// Sends `msg` and returns the echoed message.
    fn echo(
        &self,
        msg: BenchmarkMessage,
    ) -> impl Future<Output = Result<BenchmarkMessage, String>> + Send;
}

/// Checks one round trip before measuring: the echo must come back equal.
pub async fn check_round_trip<C: Caller>(caller: &C, timeout: Duration) -> Result<(), String> {
    let sample = BenchmarkMessage::sample();
    let back = tokio::time::timeout(timeout, caller.echo(sample.clone()))
        .await
        .map_err(|_| format!("the first call did not complete within {timeout:?}"))?
        .map_err(|e| format!("the first call failed: {e}"))?;
    if back != sample {
        return Err("the first call returned a different message than it sent".into());
    }
    Ok(())
}

/// Closed loop: `inflight` tasks, each calling back to back until the end
/// of the time line. The echoed message is sent again, so no task clones
/// the message per call (a failed call starts over from a fresh copy).
pub async fn closed_loop<C: Caller>(caller: C, inflight: usize, timeline: Timeline) -> Outcome {
    let template = Arc::new(BenchmarkMessage::sample());
    let mut tasks = Vec::with_capacity(inflight);
    for _ in 0..inflight {
        let caller = caller.clone();
        let template = Arc::clone(&template);
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut msg = (*template).clone();
            loop {
                let t0 = Instant::now();
                if t0 >= timeline.end {
                    break;
                }
                let result = caller.echo(msg).await;
                let t1 = Instant::now();
                match result {
                    Ok(back) => {
                        msg = back;
                        if timeline.in_window(t1) {
                            out.hist.record(t1 - t0);
                        }
                    }
                    Err(e) => {
                        msg = (*template).clone();
                        out.failed(&timeline, t1, || e);
                    }
                }
            }
            out
        }));
    }
    let mut total = Outcome::default();
    for task in tasks {
        match task.await {
            Ok(out) => total.merge(out),
            Err(e) => {
                total.errors_total += 1;
                total
                    .first_error
                    .get_or_insert_with(|| format!("a client task failed: {e}"));
            }
        }
    }
    total
}
