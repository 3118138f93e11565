//! The names of every metric the framework records, with their labels and
//! units: the one list dashboards and the README are written from.
//!
//! Names follow the OpenTelemetry RPC semantic conventions
//! (`rpc.client.call.duration`, `rpc.server.call.duration`, attributes
//! `rpc.system`, `rpc.service`, `rpc.method`, `rpc.response.status_code`)
//! as Prometheus spells them: dots become underscores, the unit is a
//! suffix (`_seconds`, `_bytes`), counters end in `_total`. They are
//! recorded through the `metrics` facade, only when `[metrics]` turns
//! recording on; the program's recorder (exporter) decides where they go.
//!
//! Labels are bounded: service keys and method names come from the
//! program's own services (a generic caller such as `rpc call` may name
//! others; at most [`MAX_LABELED_METHODS`] distinct (service, method)
//! pairs per process get their own series, later ones share one series
//! labelled [`OVERFLOW_METHOD`] as both service and method); statuses are
//! the fixed set of [`status_label`]/[`error_label`] plus `CANCELLED`; no
//! label carries a request id,
//! argument or instance address.

use crate::error::RpcError;
use crate::status::StatusCode;

/// Label: the service key, `name:version`.
pub const SERVICE: &str = "rpc_service";
/// Label: the method's wire name.
pub const METHOD: &str = "rpc_method";
/// Label: the outcome, from [`status_label`] or [`error_label`].
pub const STATUS: &str = "rpc_response_status_code";
/// Label: the registry backend (`etcd`, `zookeeper`, ...).
pub const REGISTRY: &str = "rpc_registry";
/// Label: a registration's state (`registered`, `re_registering`,
/// `deregistered`).
pub const STATE: &str = "state";

/// Distinct (service, method) pairs per process that get their own series
/// in the per-call metrics; more share one series labelled
/// [`OVERFLOW_METHOD`].
pub const MAX_LABELED_METHODS: usize = 1024;
/// The service and method label of calls past [`MAX_LABELED_METHODS`].
pub const OVERFLOW_METHOD: &str = "_other";

/// Counter: calls a consumer finished, by service, method, status.
pub const CLIENT_CALLS: &str = "rpc_client_calls_total";
/// Histogram (seconds): a consumer's call duration, from the call's start
/// (after encoding) to its result, retries included; by service, method.
pub const CLIENT_DURATION: &str = "rpc_client_call_duration_seconds";
/// Gauge: a consumer's calls in flight, by service, method.
pub const CLIENT_IN_FLIGHT: &str = "rpc_client_calls_in_flight";
/// Counter (bytes): frame bytes consumers wrote to providers.
pub const CLIENT_SENT_BYTES: &str = "rpc_client_sent_bytes_total";
/// Counter (bytes): frame bytes consumers read from providers.
pub const CLIENT_RECEIVED_BYTES: &str = "rpc_client_received_bytes_total";
/// Counter: retries (attempts after the first), by service.
pub const CLIENT_RETRIES: &str = "rpc_client_retries_total";
/// Counter: retries the retry budget refused, by service.
pub const CLIENT_BUDGET_EXHAUSTED: &str = "rpc_client_retry_budget_exhausted_total";
/// Counter: instances the outlier detector ejected, by service.
pub const CLIENT_EJECTIONS: &str = "rpc_client_outlier_ejections_total";
/// Counter: probe calls sent to an ejected instance, by service.
pub const CLIENT_PROBES: &str = "rpc_client_outlier_probes_total";
/// Gauge: instances of a service as the consumer's discovery cache lists
/// them (after empty-push protection), by service.
pub const CLIENT_INSTANCES: &str = "rpc_client_instances";
/// Gauge: connections from consumers to providers that are open.
pub const CLIENT_CONNECTIONS: &str = "rpc_client_connections";
/// Counter: connections a consumer dialled again after one to the same
/// provider closed.
pub const CLIENT_RECONNECTS: &str = "rpc_client_reconnects_total";

/// Counter: calls a provider's handlers finished, by service, method,
/// status (calls refused before a handler ran, by a server layer or for an
/// unknown service, are counted by the caller only).
pub const SERVER_CALLS: &str = "rpc_server_calls_total";
/// Histogram (seconds): handler duration, by service, method.
pub const SERVER_DURATION: &str = "rpc_server_call_duration_seconds";
/// Gauge: calls a provider is handling, by service, method.
pub const SERVER_IN_FLIGHT: &str = "rpc_server_calls_in_flight";
/// Counter (bytes): frame bytes providers read from consumers.
pub const SERVER_RECEIVED_BYTES: &str = "rpc_server_received_bytes_total";
/// Counter (bytes): frame bytes providers wrote to consumers.
pub const SERVER_SENT_BYTES: &str = "rpc_server_sent_bytes_total";
/// Gauge: connections a provider has open.
pub const SERVER_CONNECTIONS: &str = "rpc_server_connections";

/// Gauge: a provider's registrations (one per service) in each state, by
/// registry and state: `registered`; `re_registering` (the registry lost
/// it: lease, session or check gone, and the backend is publishing it
/// again); `deregistered`.
pub const PROVIDER_REGISTRATION: &str = "rpc_provider_registration_state";
/// Counter: times a provider registered again after losing its lease,
/// session or check, by registry.
pub const PROVIDER_REREGISTRATIONS: &str = "rpc_provider_reregistrations_total";

/// Gauge: 1 while the watch on a service's instances is connected (the
/// discovery cache trusts what it lists), 0 while it is broken, by service.
pub const REGISTRY_WATCH_CONNECTED: &str = "rpc_registry_watch_connected";
/// Counter: updates that would have emptied a service's instance list and
/// were held back by empty-push protection, by service.
pub const REGISTRY_EMPTY_HOLDS: &str = "rpc_registry_empty_push_holds_total";

/// Histogram buckets for the call durations, in seconds: 50 µs to 10 s,
/// roughly ×2.5 apart (loopback calls take 20–100 µs here, remote ones
/// milliseconds; timeouts default to 3 s).
pub const DURATION_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// The status label of a reply status: `OK`, or the status in upper snake
/// case (`DEADLINE_EXCEEDED`, `UNAUTHENTICATED`, ...).
pub fn status_label(code: StatusCode) -> &'static str {
    match code {
        StatusCode::Ok => "OK",
        StatusCode::ServiceNotFound => "SERVICE_NOT_FOUND",
        StatusCode::MethodNotFound => "METHOD_NOT_FOUND",
        StatusCode::BadRequest => "BAD_REQUEST",
        StatusCode::Serialization => "SERIALIZATION",
        StatusCode::Handler => "HANDLER",
        StatusCode::Timeout => "DEADLINE_EXCEEDED",
        StatusCode::Overloaded => "OVERLOADED",
        StatusCode::ShuttingDown => "SHUTTING_DOWN",
        StatusCode::Unauthenticated => "UNAUTHENTICATED",
        StatusCode::PermissionDenied => "PERMISSION_DENIED",
        StatusCode::Unknown => "UNKNOWN",
    }
}

/// The status label of a failed call: the remote status for
/// [`RpcError::Remote`], else the local failure (`DEADLINE_EXCEEDED` for
/// a timeout, `NO_PROVIDER`, `UNAVAILABLE`, `CONNECT`, `CONNECTION_CLOSED`,
/// ...).
pub fn error_label(e: &RpcError) -> &'static str {
    match e {
        RpcError::Remote { code, .. } => status_label(*code),
        RpcError::Timeout { .. } => "DEADLINE_EXCEEDED",
        RpcError::NoProvider { .. } => "NO_PROVIDER",
        RpcError::Unavailable { .. } => "UNAVAILABLE",
        RpcError::Connect { .. } => "CONNECT",
        RpcError::Unsent { .. } => "UNSENT",
        RpcError::ConnectionClosed { .. } => "CONNECTION_CLOSED",
        RpcError::Serialization { .. } => "SERIALIZATION",
        RpcError::Overloaded(_) => "CLIENT_OVERLOADED",
        RpcError::Registry(_) => "REGISTRY",
        RpcError::Config(_) => "CONFIG",
        RpcError::Shutdown => "SHUTDOWN",
    }
}
