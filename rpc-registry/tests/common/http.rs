//! One plain HTTP/1.0 exchange with a registry server, for tests that probe
//! it or act behind the backend's back. HTTP/1.0 keeps the answer unchunked
//! and has the server close the connection when it is done.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `method path` with `body` (JSON, or empty); the status and the
/// body of the answer. Bounded by `within`.
pub async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    within: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP status in {head:?}"))?;
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| format!("{method} {path} on {addr}: no answer in {within:?}"))?
}
