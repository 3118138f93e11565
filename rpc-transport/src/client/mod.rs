//! The client side: one [`Endpoint`] per provider address.
//!
//! An endpoint keeps `connections` multiplexed TCP connections, dialled
//! lazily. A dead connection fails its pending calls at once
//! (`ConnectionClosed`) and is replaced on the next call; failed dials back
//! off exponentially, and calls during the backoff fail fast with the last
//! dial error instead of hanging. Every call has a deadline; dropping a call
//! future abandons it (its slot is freed and the server told to cancel).

mod connection;
mod ping;

pub use ping::{Pong, ping, ping_with};

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use rpc_codec::{RequestHead, compression, encode_request_raw, serializer};
use rpc_core::{ClientConfig, Compression, RpcError, SerializerKind, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::connect::{Connector, Dialed};
use connection::{Connection, Liveness, Outgoing};

/// How an endpoint connects and bounds its calls.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Multiplexed connections per endpoint.
    pub connections: usize,
    /// Calls in flight per connection.
    pub max_in_flight_per_connection: usize,
    /// Largest accepted response frame.
    pub max_frame_len: usize,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// With nothing heard for this long, send a heartbeat (idle or not:
    /// servers close connections they hear nothing from).
    pub heartbeat_after: Duration,
    /// With a heartbeat unanswered this long, drop the connection.
    pub dead_after: Duration,
    /// First reconnect backoff; doubles per failure.
    pub backoff_initial: Duration,
    /// Reconnect backoff cap.
    pub backoff_max: Duration,
    /// Plain TCP or TLS ([`Connector::from_config`]); the dial timeout
    /// covers the TLS handshake too.
    pub connector: Connector,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self::from(&ClientConfig::default())
    }
}

impl From<&ClientConfig> for EndpointConfig {
    fn from(c: &ClientConfig) -> Self {
        Self {
            connections: c.connections_per_endpoint.max(1),
            max_in_flight_per_connection: c.max_in_flight_per_connection.max(1),
            max_frame_len: c.max_frame_len,
            connect_timeout: c.connect_timeout(),
            heartbeat_after: Duration::from_secs(5),
            dead_after: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            connector: Connector::Tcp,
        }
    }
}

/// What to call and how.
#[derive(Clone, Copy, Debug)]
pub struct CallOptions<'a> {
    /// `name:version`.
    pub service: &'a str,
    /// Method name.
    pub method: &'a str,
    /// Serializer for arguments and reply.
    pub serializer: SerializerKind,
    /// Time the caller waits, from now.
    pub timeout: Duration,
    /// Metadata sent with the call ([`rpc_core::Metadata::empty`] for none).
    pub metadata: &'a rpc_core::Metadata,
    /// Compression of the request body ([`Compression::None`] for none);
    /// the provider answers with the same.
    pub compression: Compression,
    /// Request bodies smaller than this many bytes are sent uncompressed.
    pub compression_threshold: usize,
}

#[derive(Default)]
struct DialState {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<(io::ErrorKind, String)>,
}

struct Slot {
    conn: ArcSwapOption<Connection>,
    dial: tokio::sync::Mutex<DialState>,
}

/// A successful reply, still encoded: the caller decodes it into its type.
#[derive(Clone, Debug)]
pub struct RawReply {
    /// The serializer the provider answered with (the request's).
    pub serializer: SerializerKind,
    /// The encoded return value.
    pub body: Bytes,
}

impl RawReply {
    /// Decodes the return value.
    pub fn decode<R: DeserializeOwned>(&self, service: &str, method: &str) -> Result<R, RpcError> {
        serializer::decode(self.serializer, &self.body).map_err(|e| RpcError::Serialization {
            context: format!("reply of `{service}.{method}`"),
            source: Box::new(e),
        })
    }
}

/// Encodes an argument tuple once, for [`Endpoint::call_raw`] (and retries).
pub fn encode_args<A: Serialize + ?Sized>(
    serializer: SerializerKind,
    args: &A,
    service: &str,
    method: &str,
) -> Result<BytesMut, RpcError> {
    encode_args_sized(serializer, args, service, method, 128)
}

/// [`encode_args`] into a buffer of `size_hint` bytes, so arguments of a
/// known typical size are not grown (reallocated and copied) on the way.
pub fn encode_args_sized<A: Serialize + ?Sized>(
    serializer: SerializerKind,
    args: &A,
    service: &str,
    method: &str,
    size_hint: usize,
) -> Result<BytesMut, RpcError> {
    let mut buf = BytesMut::with_capacity(size_hint.clamp(16, 64 * 1024));
    serializer::encode(serializer, args, &mut buf).map_err(|e| RpcError::Serialization {
        context: format!("arguments of `{service}.{method}`"),
        source: Box::new(e),
    })?;
    Ok(buf)
}

/// One provider address and its connections.
pub struct Endpoint {
    addr: Arc<str>,
    config: EndpointConfig,
    slots: Box<[Slot]>,
    next: AtomicUsize,
    /// Latency EWMA in nanoseconds (f64 bits), for latency-aware balancers.
    ewma_nanos: AtomicU64,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("connections", &self.slots.len())
            .finish()
    }
}

impl Endpoint {
    /// An endpoint for `addr` (`host:port`). Nothing is dialled yet.
    pub fn new(addr: impl Into<String>, config: EndpointConfig) -> Self {
        let slots = (0..config.connections.max(1))
            .map(|_| Slot {
                conn: ArcSwapOption::empty(),
                dial: tokio::sync::Mutex::new(DialState::default()),
            })
            .collect();
        Self {
            addr: Arc::from(addr.into()),
            config,
            slots,
            next: AtomicUsize::new(0),
            ewma_nanos: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Exponentially weighted moving average of successful call latency
    /// (zero until the first call).
    pub fn latency_ewma(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.ewma_nanos.load(Ordering::Relaxed)) as u64)
    }

    fn record_latency(&self, took: Duration) {
        // Weight 0.1 per sample; a racing update loses one sample at worst.
        let old = f64::from_bits(self.ewma_nanos.load(Ordering::Relaxed));
        let sample = took.as_nanos() as f64;
        let new = if old == 0.0 {
            sample
        } else {
            old + 0.1 * (sample - old)
        };
        self.ewma_nanos.store(new.to_bits(), Ordering::Relaxed);
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Calls in flight on this endpoint's live connections.
    pub fn in_flight(&self) -> usize {
        let cap = self.config.max_in_flight_per_connection;
        self.slots
            .iter()
            .filter_map(|s| s.conn.load_full())
            .filter(|c| !c.is_closed())
            .map(|c| cap.saturating_sub(c.in_flight.available_permits()))
            .sum()
    }

    /// Calls `opts.method` with the argument tuple `args` and decodes the reply.
    pub async fn call<A, R>(&self, opts: &CallOptions<'_>, args: &A) -> Result<R, RpcError>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let encoded = encode_args(opts.serializer, args, opts.service, opts.method)?;
        self.call_raw(opts, &encoded)
            .await?
            .decode(opts.service, opts.method)
    }

    /// Calls `opts.method` with arguments already encoded by
    /// `opts.serializer` (see [`encode_args`]) and returns the raw reply.
    pub async fn call_raw(
        &self,
        opts: &CallOptions<'_>,
        args: &[u8],
    ) -> Result<RawReply, RpcError> {
        self.call_raw_from(Instant::now(), opts, args).await
    }

    /// [`Endpoint::call_raw`] for a caller that has just read the clock:
    /// `started` is when the call began (`opts.timeout` runs from it), so
    /// the hot path reads the clock once per call, at the end.
    pub async fn call_raw_from(
        &self,
        started: Instant,
        opts: &CallOptions<'_>,
        args: &[u8],
    ) -> Result<RawReply, RpcError> {
        // Saturating: a caller's `Duration::MAX` means "no deadline to speak of".
        let deadline = rpc_core::context::deadline_after(started, opts.timeout);
        let outcome =
            match tokio::time::timeout_at(deadline, self.call_inner(opts, args, deadline)).await {
                Ok(r) => r,
                Err(_) => Err(RpcError::Timeout {
                    service: opts.service.to_owned(),
                    method: opts.method.to_owned(),
                    timeout: opts.timeout,
                }),
            };
        if outcome.is_ok() {
            self.record_latency(started.elapsed());
        }
        outcome
    }

    async fn call_inner(
        &self,
        opts: &CallOptions<'_>,
        args: &[u8],
        deadline: Instant,
    ) -> Result<RawReply, RpcError> {
        let (conn, mut waited) = self.connection().await?;
        let unsent = |source| RpcError::Unsent {
            addr: self.addr.to_string(),
            source,
        };
        let permit = match conn.in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(unsent(None)),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                waited = true;
                conn.in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| unsent(None))?
            }
        };
        // The server is told the time left. Without a dial or a wait for a
        // permit, that is the whole timeout less a few microseconds, and the
        // clock is not worth reading for them.
        let remaining = if waited {
            deadline.saturating_duration_since(Instant::now())
        } else {
            opts.timeout
        };
        let head = RequestHead {
            // Numbered by the connection task, in write order.
            request_id: 0,
            serializer: opts.serializer,
            deadline: Some(remaining),
            service: opts.service,
            method: opts.method,
            metadata: opts.metadata,
        };
        let mut frame =
            encode_request_raw(&head, args, self.config.max_frame_len).map_err(|e| {
                RpcError::Serialization {
                    context: format!("request for `{}.{}`", opts.service, opts.method),
                    source: Box::new(e),
                }
            })?;
        if opts.compression != Compression::None {
            frame =
                compression::compress_frame(frame, opts.compression, opts.compression_threshold);
        }
        let (tx, rx) = oneshot::channel();
        let out = Outgoing {
            frame,
            reply: tx,
            permit,
        };
        if conn.send(out).is_err() {
            return Err(unsent(None));
        }
        let frame = match rx.await {
            Ok(Ok(frame)) => frame,
            Ok(Err(why)) if !why.written => return Err(unsent(Some(why.boxed()))),
            Ok(Err(why)) => {
                return Err(RpcError::ConnectionClosed {
                    addr: self.addr.to_string(),
                    source: Some(why.boxed()),
                });
            }
            Err(_) => {
                return Err(RpcError::ConnectionClosed {
                    addr: self.addr.to_string(),
                    source: None,
                });
            }
        };
        let h = frame.header;
        if h.status != StatusCode::Ok {
            return Err(RpcError::Remote {
                service: opts.service.to_owned(),
                method: opts.method.to_owned(),
                addr: self.addr.to_string(),
                code: h.status,
                message: String::from_utf8_lossy(&frame.body).into_owned(),
            });
        }
        let bad_reply = |e| RpcError::Serialization {
            context: format!("reply of `{}.{}`", opts.service, opts.method),
            source: Box::new(e),
        };
        // The common case reads the byte as a plain serializer id; a
        // compressed reply (flag bits set) is opened within the frame limit.
        let (serializer, body) = match serializer::from_id(h.serializer) {
            Ok(s) => (s, frame.body),
            Err(_) => {
                let (id, body) =
                    compression::open_body(h.serializer, frame.body, self.config.max_frame_len)
                        .map_err(bad_reply)?;
                (serializer::from_id(id).map_err(bad_reply)?, body)
            }
        };
        Ok(RawReply { serializer, body })
    }

    /// Connects (and, with TLS, shakes hands) and starts the connection's
    /// task, compiled for the stream the connector gives.
    async fn dial(&self) -> io::Result<Connection> {
        Ok(match self.config.connector.dial(&self.addr).await? {
            Dialed::Tcp(s) => self.start(s),
            Dialed::Memory(s) => self.start(s),
            #[cfg(feature = "tls")]
            Dialed::Tls(s) => self.start(*s),
        })
    }

    fn start<S: crate::io::Io>(&self, stream: S) -> Connection {
        Connection::spawn(
            stream,
            self.addr.clone(),
            self.config.max_in_flight_per_connection,
            self.config.max_frame_len,
            Liveness {
                heartbeat_after: self.config.heartbeat_after,
                dead_after: self.config.dead_after,
            },
        )
    }

    /// The pause before dialling again after `failures` failed dials (or
    /// refusals): exponential from `backoff_initial` to `backoff_max`, with
    /// equal jitter (half fixed, half random), so that the consumers of a
    /// restarted or full provider do not all dial again in lockstep.
    fn backoff(&self, failures: u32) -> Duration {
        rpc_core::backoff::pause(
            self.config.backoff_initial,
            self.config.backoff_max,
            failures,
        )
    }

    /// A live connection, dialling one if its slot has none; `true` if that
    /// took a wait (a dial, or another caller's dial).
    async fn connection(&self) -> Result<(Arc<Connection>, bool), RpcError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[i];
        if let Some(c) = slot.conn.load_full() {
            if !c.is_closed() {
                return Ok((c, false));
            }
        }
        // One dial per slot at a time; others wait for its outcome.
        let mut dial = slot.dial.lock().await;
        // A dial after a connection closed, or after failed dials, is a
        // reconnect (the first dial of a slot is not).
        let reconnect = dial.failures > 0 || slot.conn.load().is_some();
        if let Some(c) = slot.conn.load_full() {
            if !c.is_closed() {
                return Ok((c, true));
            }
            if let Some(refused_at) = c.refused_at() {
                // A full server refused it: dialling again at once would
                // only add to a storm of refused connections. Back off as
                // after a failed dial; the calls meanwhile fail fast and
                // fail over to other instances.
                slot.conn.store(None);
                dial.failures = dial.failures.saturating_add(1);
                // From the refusal, not from now: a call that comes along
                // after the backoff must not start one.
                dial.retry_at = Some(refused_at + self.backoff(dial.failures));
                dial.last_error = Some((
                    io::ErrorKind::ConnectionRefused,
                    "the server refused the connection: it is at its connection limit".into(),
                ));
            }
        }
        let now = Instant::now();
        if let (Some(retry_at), Some((kind, msg))) = (dial.retry_at, &dial.last_error) {
            if now < retry_at {
                return Err(RpcError::Connect {
                    addr: self.addr.to_string(),
                    source: io::Error::new(
                        *kind,
                        format!("{msg} (backing off, next attempt in {:?})", retry_at - now),
                    ),
                });
            }
        }
        let dialled = tokio::time::timeout(self.config.connect_timeout, self.dial())
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", self.config.connect_timeout),
                ))
            });
        match dialled {
            Ok(conn) => {
                if dial.failures > 0 {
                    info!(addr = %self.addr, after_failures = dial.failures, "reconnected");
                }
                if reconnect {
                    metrics::counter!(rpc_core::metric_names::CLIENT_RECONNECTS).increment(1);
                }
                *dial = DialState::default();
                let conn = Arc::new(conn);
                slot.conn.store(Some(conn.clone()));
                Ok((conn, true))
            }
            Err(e) => {
                dial.failures = dial.failures.saturating_add(1);
                let backoff = self.backoff(dial.failures);
                dial.retry_at = Some(Instant::now() + backoff);
                dial.last_error = Some((e.kind(), e.to_string()));
                debug!(addr = %self.addr, error = %e, ?backoff, "dial failed");
                Err(RpcError::Connect {
                    addr: self.addr.to_string(),
                    source: e,
                })
            }
        }
    }
}
