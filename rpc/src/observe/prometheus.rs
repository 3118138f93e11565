//! The Prometheus endpoint: the [`PrometheusRecorder`](super::PrometheusRecorder)
//! installed as the process's `metrics` recorder, and a small HTTP/1.1
//! server (hyper) for `GET /metrics`.
//!
//! Not `metrics-exporter-prometheus`'s listener: it spawns tasks nobody
//! owns, accepts any number of connections, has no header timeout and
//! answers every path and method with the metrics (and its recorder was
//! too slow: see `recorder.rs`). This server is owned by
//! [`MetricsEndpoint`] (dropping it stops the listener and its
//! connections), holds
//! at most [`MAX_CONNECTIONS`] connections, gives a client
//! [`HEADER_TIMEOUT`] to send its request head and [`CONNECTION_TIMEOUT`]
//! in all, and answers only `GET`/`HEAD /metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rpc_core::MetricsConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::recorder::{PrometheusHandle, PrometheusRecorder};
use crate::Error;

/// Connections served at once; more are accepted and closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection stays open (keep-alive included).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The text format's content type (Prometheus exposition format 0.0.4).
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus recorder, installed as the process's `metrics`
/// recorder, and the HTTP endpoint that serves it. Dropping it (or
/// [`shutdown`](Self::shutdown)) stops the endpoint; the recorder stays
/// installed (the facade cannot uninstall one). Start it before the first
/// call: metric handles take the recorder installed when first used.
#[derive(Debug)]
pub struct MetricsEndpoint {
    addr: SocketAddr,
    handle: PrometheusHandle,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsEndpoint {
    /// Starts the endpoint `config` asks for: `None` without
    /// `[metrics] listen`. Installs the Prometheus recorder as the global
    /// `metrics` recorder.
    ///
    /// # Errors
    /// [`Error::MetricsBind`] when the address cannot be bound,
    /// [`Error::MetricsRecorder`] when a recorder is already installed.
    pub async fn start(config: &MetricsConfig) -> Result<Option<Self>, Error> {
        let Some(addr) = config.listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::MetricsBind { addr, source })?;
        let handle = install()?;
        Ok(Some(Self::serve(listener, handle)))
    }

    /// Serves `handle`'s metrics on `listener` (for a program, or a test,
    /// that built its own recorder).
    pub fn serve(listener: TcpListener, handle: PrometheusHandle) -> Self {
        let addr = listener.local_addr().unwrap_or_else(|_| {
            // Only fails for a socket that is not bound, which a
            // `TcpListener` always is.
            SocketAddr::from(([0, 0, 0, 0], 0))
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(listener, handle.clone(), stopped));
        info!(%addr, "metrics endpoint listening: GET /metrics");
        Self {
            addr,
            handle,
            stop: Some(stop),
            task,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The recorder's handle (render the text format with `render()`).
    pub fn handle(&self) -> &PrometheusHandle {
        &self.handle
    }

    /// Stops listening and closes the open connections; waits for the
    /// server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`PrometheusRecorder`], installed as the global recorder.
fn install() -> Result<PrometheusHandle, Error> {
    let recorder = PrometheusRecorder::new();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| {
        Error::MetricsRecorder("a metrics recorder is already installed in this process".into())
    })?;
    Ok(handle)
}

async fn run(listener: TcpListener, handle: PrometheusHandle, mut stopped: oneshot::Receiver<()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: pause rather than spin.
                        warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "metrics endpoint: {MAX_CONNECTIONS} connections open; closing this one");
                    continue;
                };
                let handle = handle.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let handle = handle.clone();
                        async move { Ok::<_, Infallible>(respond(&req, &handle)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .max_buf_size(64 * 1024)
                        .serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(%peer, "metrics endpoint: connection closed: {e}"),
                        Err(_) => debug!(%peer, "metrics endpoint: connection open too long; closed"),
                    }
                    drop(permit);
                });
            }
        }
    }
    connections.shutdown().await;
}

/// The answer to one request: the metrics, or a short plain-text error.
fn respond(req: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET /metrics\n",
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let body = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(handle.render())
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE_TEXT),
    );
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
