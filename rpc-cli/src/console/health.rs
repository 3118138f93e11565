//! Live health per instance: the console scrapes an instance's metrics
//! endpoint (the `metrics` URL it publishes in the registry) and turns the
//! difference between two scrapes into calls/s, error ratio and p99, the
//! way Prometheus's `rate` and `histogram_quantile` would.
//!
//! The HTTP GET is a few lines over a `TcpStream` (HTTP/1.0, plain
//! `http://` only) rather than an HTTP client crate: one request shape,
//! bounded in time and size, and no new dependency for the `rpc` tool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time for one scrape (connect, request, whole reply).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest metrics page read, in bytes.
pub const MAX_PAGE: usize = 4 * 1024 * 1024;
/// Instances remembered between scrapes; past it the oldest is dropped.
pub const MAX_INSTANCES: usize = 1024;

/// Calls/s, error ratio (0-1) and p99 (ms) of one instance for one
/// service since its previous scrape; `None` until there are two scrapes
/// (or no calls in between).
#[derive(Debug, Clone, Copy, Default)]
pub struct Health {
    pub qps: Option<f64>,
    pub error_ratio: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// What one scrape read for one service.
#[derive(Debug, Clone, Default)]
struct Sample {
    at: Option<Instant>,
    calls: f64,
    errors: f64,
    /// Cumulative bucket counts by upper bound, ascending.
    buckets: Vec<(f64, f64)>,
}

/// Remembers each instance's previous sample.
#[derive(Debug, Default)]
pub struct Scraper {
    last: Mutex<HashMap<(String, String), Sample>>,
}

impl Scraper {
    /// Scrapes `url` and compares with the previous scrape of `address`
    /// for `service`.
    pub async fn sample(&self, address: &str, url: &str, service: &str) -> Result<Health, String> {
        let page = fetch(url).await?;
        let mut now = parse(&page, service);
        now.at = Some(Instant::now());
        let key = (address.to_owned(), service.to_owned());
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.len() >= MAX_INSTANCES && !last.contains_key(&key) {
            if let Some(oldest) = last
                .iter()
                .min_by_key(|(_, s)| s.at)
                .map(|(k, _)| k.clone())
            {
                last.remove(&oldest);
            }
        }
        let before = last.insert(key, now.clone());
        Ok(before.map(|b| compare(&b, &now)).unwrap_or_default())
    }
}

fn compare(before: &Sample, now: &Sample) -> Health {
    let (Some(t0), Some(t1)) = (before.at, now.at) else {
        return Health::default();
    };
    let secs = t1.duration_since(t0).as_secs_f64();
    let calls = now.calls - before.calls;
    if secs <= 0.0 || calls < 0.0 {
        // A restarted instance starts its counters again: wait for the next.
        return Health::default();
    }
    let errors = (now.errors - before.errors).max(0.0);
    let deltas: Vec<(f64, f64)> = now
        .buckets
        .iter()
        .map(|(le, c)| {
            let b = before
                .buckets
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, (c - b).max(0.0))
        })
        .collect();
    Health {
        qps: Some(calls / secs),
        error_ratio: (calls > 0.0).then(|| errors / calls),
        p99_ms: quantile(0.99, &deltas).map(|s| s * 1000.0),
    }
}

/// `histogram_quantile`: the bucket where the rank falls, interpolated
/// linearly within it; the highest finite bound if it falls in `+Inf`.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_le = 0.0;
    let mut prev_count = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let in_bucket = count - prev_count;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(prev_le + (le - prev_le) * (rank - prev_count) / in_bucket);
        }
        prev_le = le;
        prev_count = count;
    }
    Some(prev_le)
}

/// The value of a label in a series' label text (`a="x",b="y"`).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

/// Sums `service`'s server calls, failures and duration buckets.
fn parse(page: &str, service: &str) -> Sample {
    let mut s = Sample::default();
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in page.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let labels = labels.trim_end_matches('}');
        if label(labels, "rpc_service") != Some(service) {
            continue;
        }
        match name {
            "rpc_server_calls_total" => {
                s.calls += value;
                if label(labels, "rpc_response_status_code") != Some("OK") {
                    s.errors += value;
                }
            }
            "rpc_server_call_duration_seconds_bucket" => {
                let le = match label(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => match v.parse() {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                match buckets.iter_mut().find(|(l, _)| *l == le) {
                    Some(b) => b.1 += value,
                    None => buckets.push((le, value)),
                }
            }
            _ => {}
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    s.buckets = buckets;
    s
}

/// GETs an `http://host:port/path` URL.
async fn fetch(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// metrics endpoints are scraped"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let mut body = Vec::new();
        (&mut stream)
            .take(MAX_PAGE as u64 + 1)
            .read_to_end(&mut body)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if body.len() > MAX_PAGE {
            return Err(format!("{url}: the page is larger than {MAX_PAGE} bytes"));
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        let (head, page) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{url}: not an HTTP reply"))?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            let status = head.lines().next().unwrap_or_default();
            return Err(format!("{url}: {status}"));
        }
        Ok(page.to_owned())
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, work)
        .await
        .map_err(|_| format!("{url}: no reply within {SCRAPE_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE_1: &str = r#"# TYPE rpc_server_calls_total counter
rpc_server_calls_total{rpc_service="S:1.0",rpc_method="a",rpc_response_status_code="OK"} 100
rpc_server_calls_total{rpc_service="S:1.0",rpc_method="a",rpc_response_status_code="HANDLER"} 0
rpc_server_calls_total{rpc_service="T:1.0",rpc_method="a",rpc_response_status_code="OK"} 7
rpc_server_call_duration_seconds_bucket{rpc_service="S:1.0",rpc_method="a",le="0.001"} 100
rpc_server_call_duration_seconds_bucket{rpc_service="S:1.0",rpc_method="a",le="0.01"} 100
rpc_server_call_duration_seconds_bucket{rpc_service="S:1.0",rpc_method="a",le="+Inf"} 100
"#;
    // One second later: 200 more calls, 10 failed, 100 of them slow.
    const PAGE_2: &str = r#"rpc_server_calls_total{rpc_service="S:1.0",rpc_method="a",rpc_response_status_code="OK"} 290
rpc_server_calls_total{rpc_service="S:1.0",rpc_method="a",rpc_response_status_code="HANDLER"} 10
rpc_server_call_duration_seconds_bucket{rpc_service="S:1.0",rpc_method="a",le="0.001"} 200
rpc_server_call_duration_seconds_bucket{rpc_service="S:1.0",rpc_method="a",le="0.01"} 300
rpc_server_call_duration_seconds_bucket{rpc_service="S:1.0",rpc_method="a",le="+Inf"} 300
"#;

    #[test]
    fn two_scrapes_give_rate_errors_and_p99() {
        let t0 = Instant::now();
        let mut a = parse(PAGE_1, "S:1.0");
        a.at = Some(t0);
        let mut b = parse(PAGE_2, "S:1.0");
        b.at = Some(t0 + Duration::from_secs(1));
        let h = compare(&a, &b);
        assert_eq!(h.qps, Some(200.0));
        assert_eq!(h.error_ratio, Some(0.05));
        // Rank 198 of 200: in (0.001, 0.01], 98 of its 100 calls in.
        let p99 = h.p99_ms.unwrap();
        assert!((p99 - (1.0 + 9.0 * 0.98)).abs() < 1e-9, "{p99}");
        assert_eq!(parse(PAGE_1, "T:1.0").calls, 7.0);
    }

    #[test]
    fn a_restarted_instance_reports_nothing_until_the_next_scrape() {
        let t0 = Instant::now();
        let mut a = parse(PAGE_2, "S:1.0");
        a.at = Some(t0);
        let mut b = parse(PAGE_1, "S:1.0");
        b.at = Some(t0 + Duration::from_secs(1));
        assert!(compare(&a, &b).qps.is_none());
    }
}
