//! `rpc console`: one web page over any registry. Services with their
//! instance counts, a service's instances updated live from the registry
//! watch (server-sent events), per-instance call rate, error rate and p99
//! read from the instances' metrics endpoints, and a form to call a method
//! with JSON arguments.
//!
//! HTTP (axum): `GET /` the page (embedded: `index.html`, no build step);
//! `GET /api/services`; `GET /api/services/{key}`;
//! `GET /api/services/{key}/events` (SSE); `GET /api/services/{key}/health`;
//! `POST /api/call`. Errors are JSON `{"error": ..}` with a fitting status
//! (400 bad input, 401 no token, 404 unknown service, 502 call failed, 503
//! registry unreachable, 504 call timed out). Request bodies are capped
//! ([`MAX_BODY`]); a token, when set, is required on every request
//! (`Authorization: Bearer T`, or `?token=T` for the page and its event
//! stream, which browsers cannot give headers). Open connections are
//! bounded (`listener.rs`, `--max-connections`), and so is the drain after
//! Ctrl-C or SIGTERM ([`DRAIN`]).

mod health;
mod listener;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use rpc::registry::AnyRegistry;
use rpc::{CallOptions, Consumer, RpcError};
use rpc_core::meta::keys;
use rpc_core::{Discover, RpcConfig, ServiceMetaInfo};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::error::{CliError, code};

/// Largest request body accepted (the call form's JSON), in bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest a call from the form may take, unless the form asks for less.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish after Ctrl-C or SIGTERM
/// before the console exits anyway (s).
pub const DRAIN: Duration = Duration::from_secs(3);
/// How long a registry query may take before the page is told it is
/// unreachable.
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);

const PAGE: &str = include_str!("index.html");

struct Console {
    registry: AnyRegistry,
    consumer: Consumer,
    token: Option<String>,
    kind: &'static str,
    health: health::Scraper,
    /// Set on Ctrl-C or SIGTERM: event streams end, so the graceful shutdown (which
    /// waits for open connections) is not held by pages left open.
    stopping: tokio::sync::watch::Receiver<bool>,
}

type Shared = Arc<Console>;

/// Runs the console until Ctrl-C or SIGTERM; then open connections get
/// [`DRAIN`] to finish before the console exits anyway.
pub async fn run(
    config: &RpcConfig,
    listen: SocketAddr,
    token: Option<String>,
    max_connections: usize,
) -> Result<i32, CliError> {
    // An empty token is no token: checked before the loopback rule, so
    // `--token ''` cannot open a public console.
    let token = token.filter(|t| !t.is_empty());
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(CliError::BadInput(format!(
            "--listen {listen} is not loopback: give --token (or RPC_CONSOLE_TOKEN), which every request must then carry"
        )));
    }
    let registry = crate::commands::connect(config).await?;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let consumer = Consumer::with_registry(
        registry.clone(),
        config.client.clone(),
        config.registry.timeout(),
    );
    let state = Arc::new(Console {
        registry,
        consumer,
        token,
        kind: config.registry.kind.as_str(),
        health: health::Scraper::default(),
        stopping,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::BadInput(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::BadInput(format!("cannot listen on {listen}: {e}")))?;
    // The one line a user needs (and tests read): where the page is.
    println!("console: http://{addr}/");
    info!(target: "rpc_console", %addr, registry = state.kind, "console listening");
    let listener = listener::Capped::new(listener, max_connections.max(1));
    let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
    let serve = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            rpc::shutdown_signal().await;
            info!(target: "rpc_console", "console: stopping");
            let _ = stop.send(true);
            let _ = signalled.send(());
        })
        .into_future();
    // axum's graceful shutdown waits for every open connection, and its
    // server has no header-read timeout: one client that sent half a
    // request would hold the console forever. So the drain is bounded.
    let drained = tokio::select! {
        r = serve => r,
        () = async {
            match on_signal.await {
                Ok(()) => tokio::time::sleep(DRAIN).await,
                Err(_) => std::future::pending().await,
            }
        } => {
            warn!(target: "rpc_console", drain_s = DRAIN.as_secs(), "console: connections still open after the drain; closing them");
            Ok(())
        }
    };
    drained.map_err(|e| CliError::BadInput(format!("console server failed: {e}")))?;
    Ok(code::OK)
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/services", get(services))
        .route("/api/services/{key}", get(service))
        .route("/api/services/{key}/events", get(events))
        .route("/api/services/{key}/health", get(service_health))
        .route("/api/call", post(call))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// A JSON error with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn registry_error(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("registry unreachable: {e}"),
    )
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn require_token(
    State(state): State<Shared>,
    Query(q): Query<TokenQuery>,
    request: Request,
    next: Next,
) -> Response {
    let Some(want) = &state.token else {
        return next.run(request).await;
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer.or(q.token.as_deref());
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())) {
        return next.run(request).await;
    }
    warn!(target: "rpc_console", path = %request.uri().path(), "console: request without a valid token refused");
    ApiError(
        StatusCode::UNAUTHORIZED,
        "this console needs its access token (Authorization: Bearer TOKEN, or ?token=TOKEN)".into(),
    )
    .into_response()
}

/// Compares without an early exit on the first difference (a token check
/// should not tell how much of a guess was right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn page() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        PAGE,
    )
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such page".into())
}

async fn with_timeout<T, E: std::fmt::Display>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(REGISTRY_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(registry_error(e)),
        Err(_) => Err(registry_error(format!(
            "no answer within {REGISTRY_TIMEOUT:?}"
        ))),
    }
}

/// `GET /api/services`: `{registry, services: [{service, instances}]}`.
async fn services(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    let keys = with_timeout(state.registry.services()).await?;
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let n = with_timeout(state.registry.discover(&key)).await?.len();
        out.push(json!({ "service": key, "instances": n }));
    }
    Ok(Json(json!({ "registry": state.kind, "services": out })))
}

/// A service key from the path, checked against what the registry lists
/// (so a request cannot make the console follow arbitrary keys).
async fn known(state: &Console, key: &str) -> Result<String, ApiError> {
    let key = crate::commands::service_key(key)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?
        .as_str()
        .to_owned();
    let keys = with_timeout(state.registry.services()).await?;
    if !keys.contains(&key) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no service `{key}` in the {} registry", state.kind),
        ));
    }
    Ok(key)
}

fn instance_json(m: &ServiceMetaInfo) -> Value {
    let md = |k: &str| m.metadata.get(k).cloned();
    json!({
        "address": m.address(),
        "node": m.node_key(),
        "weight": m.weight,
        "version": m.service_version,
        "group": m.service_group,
        "tls": md(keys::TLS).is_some_and(|v| v == "true"),
        "since": md(keys::SINCE).and_then(|s| s.parse::<u64>().ok()),
        "metrics": md(keys::METRICS),
        "framework": md(keys::FRAMEWORK),
    })
}

fn methods_of(list: &[ServiceMetaInfo]) -> Vec<String> {
    let mut methods: Vec<String> = list
        .iter()
        .filter_map(|m| m.metadata.get(keys::METHODS))
        .flat_map(|s| s.split(',').map(str::to_owned).collect::<Vec<_>>())
        .filter(|m| !m.is_empty())
        .collect();
    methods.sort();
    methods.dedup();
    methods
}

/// `GET /api/services/{key}`: its instances (from the consumer's cache:
/// the same view the event stream updates) and methods.
async fn service(
    State(state): State<Shared>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = known(&state, &key).await?;
    let handle = with_timeout(state.consumer.cache().service(&key)).await?;
    Ok(Json(snapshot(&key, &handle)))
}

fn snapshot(key: &str, handle: &rpc::registry::ServiceHandle) -> Value {
    let list = handle.instances();
    json!({
        "service": key,
        "healthy": handle.is_healthy(),
        "instances": list.iter().map(instance_json).collect::<Vec<_>>(),
        "methods": methods_of(&list),
    })
}

/// `GET /api/services/{key}/events`: the service's snapshot now and after
/// every change the registry watch reports, as server-sent events
/// (`event: instances`), with keep-alive comments every 15 s.
async fn events(
    State(state): State<Shared>,
    Path(key): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let key = known(&state, &key).await?;
    let handle = with_timeout(state.consumer.cache().service(&key)).await?;
    let mut changes = handle.changes();
    let mut stopping = state.stopping.clone();
    let stream = async_stream(move |tx| async move {
        loop {
            if *stopping.borrow_and_update() {
                return;
            }
            let data = snapshot(&key, &handle).to_string();
            if tx
                .send(Event::default().event("instances").data(data))
                .await
                .is_err()
            {
                return; // the page went away
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = stopping.changed() => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// A stream fed by a task: `f` gets a sender; the stream ends when the
/// task does, and the task ends when the stream is dropped (its sends
/// fail).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(f(tx));
    let guard = AbortOnDrop(task);
    futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|e| (Ok(e), (rx, guard)))
    })
}

/// Aborts the event task when the stream (the page's connection) goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET /api/services/{key}/health`: per instance that publishes a
/// metrics endpoint, calls/s, error ratio and p99 (ms) since the previous
/// scrape of it.
async fn service_health(
    State(state): State<Shared>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = known(&state, &key).await?;
    let handle = with_timeout(state.consumer.cache().service(&key)).await?;
    let list = handle.instances();
    let mut out = Vec::new();
    for m in list.iter() {
        let Some(url) = m.metadata.get(keys::METRICS) else {
            out.push(json!({ "address": m.address(), "metrics": null }));
            continue;
        };
        out.push(match state.health.sample(&m.address(), url, &key).await {
            Ok(h) => json!({
                "address": m.address(),
                "metrics": url,
                "qps": h.qps,
                "error_ratio": h.error_ratio,
                "p99_ms": h.p99_ms,
            }),
            Err(e) => json!({ "address": m.address(), "metrics": url, "error": e }),
        });
    }
    Ok(Json(json!({ "service": key, "instances": out })))
}

#[derive(Deserialize)]
struct CallRequest {
    service: String,
    method: String,
    /// The arguments: a string is JSON text, as typed in the form (an
    /// array of the arguments, or one value for a one-argument method);
    /// any other JSON value is taken as that array or value itself; absent
    /// or `null`: no arguments.
    #[serde(default)]
    args: Value,
    /// Timeout in ms (at least 1; at most [`CALL_TIMEOUT`]).
    timeout_ms: Option<u64>,
}

/// `POST /api/call`: `{service, method, args, timeout_ms}` -> `{reply}`.
/// `args` is JSON text (`"[1, \"x\"]"`, what the form sends) or the JSON
/// itself (`[1, "x"]`), scripts' natural spelling.
async fn call(
    State(state): State<Shared>,
    body: Result<Json<CallRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let key = known(&state, &req.service).await?;
    if req.method.is_empty() || req.method.len() > 256 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "give a method name".into(),
        ));
    }
    let args = match req.args {
        Value::String(text) => {
            crate::commands::parse_args(Some(text.as_str()).filter(|a| !a.trim().is_empty()))
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?
        }
        Value::Null => Vec::new(),
        Value::Array(list) => list,
        one => vec![one],
    };
    if req.timeout_ms == Some(0) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "timeout_ms must be at least 1".into(),
        ));
    }
    let timeout = req
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(CALL_TIMEOUT)
        .min(CALL_TIMEOUT);
    let name_version = rpc_core::ServiceKey::parse(&key);
    let client = state
        .consumer
        .generic_service(name_version.name(), name_version.version())
        .with(CallOptions::new().timeout(timeout));
    info!(target: "rpc_console", service = %key, method = %req.method, "console: calling");
    match client.call_generic(&req.method, &args).await {
        Ok(reply) => {
            info!(target: "rpc_console", service = %key, method = %req.method, "console: call answered");
            Ok(Json(json!({ "reply": reply })))
        }
        Err(e) => {
            let status = match &e {
                // Either side may notice the deadline first.
                e if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
                RpcError::Remote { code, .. }
                    if *code == rpc::StatusCode::MethodNotFound
                        || *code == rpc::StatusCode::Serialization =>
                {
                    StatusCode::BAD_REQUEST
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            let text = rpc::error::report(&e);
            info!(target: "rpc_console", service = %key, method = %req.method, error = %text, "console: call failed");
            Err(ApiError(status, text))
        }
    }
}
