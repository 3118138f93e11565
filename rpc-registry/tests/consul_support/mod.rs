//! Plain HTTP/1.0 to a Consul agent for the Consul tests: probing it and
//! acting behind the backend's back (deregistering, reading critical
//! instances). HTTP/1.0 keeps answers unchunked and closes the connection.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

/// `host:port` of an `http://host:port` address.
pub fn socket_addr(address: &str) -> SocketAddr {
    let hostport = address.rsplit("//").next().unwrap_or(address);
    hostport.trim_end_matches('/').parse().unwrap()
}

/// One request; the status code and the body. Bounded by 5 s.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    crate::common::http::exchange(addr, method, path, "", Duration::from_secs(5)).await
}

/// Percent-encodes a path segment.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Whether the agent has a leader (`/v1/status/leader` is a quoted address).
pub async fn leader(addr: SocketAddr) -> Result<(), String> {
    let (status, body) = request(addr, "GET", "/v1/status/leader").await?;
    let body = body.trim();
    if status == 200 && body.len() > 2 && body.starts_with('"') && body.ends_with('"') {
        Ok(())
    } else {
        Err(format!("no leader yet (HTTP {status}: {body})"))
    }
}

/// Deregisters a service from the agent by ID.
pub async fn deregister(addr: SocketAddr, id: &str) {
    let path = format!("/v1/agent/service/deregister/{}", encode(id));
    let (status, body) = request(addr, "PUT", &path).await.unwrap();
    assert_eq!(status, 200, "deregister {id}: {body}");
}

/// The `(service ID, aggregated status)` of every instance of a Consul
/// service, passing or not.
pub async fn health_states(addr: SocketAddr, name: &str) -> Vec<(String, String)> {
    let (status, body) = request(addr, "GET", &format!("/v1/health/service/{name}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let entries: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out = Vec::new();
    for e in entries.as_array().into_iter().flatten() {
        let id = e["Service"]["ID"].as_str().unwrap_or_default().to_owned();
        let checks = e["Checks"].as_array().cloned().unwrap_or_default();
        let worst = if checks.iter().any(|c| c["Status"] == "critical") {
            "critical"
        } else if checks.iter().any(|c| c["Status"] == "warning") {
            "warning"
        } else {
            "passing"
        };
        out.push((id, worst.to_owned()));
    }
    out
}
