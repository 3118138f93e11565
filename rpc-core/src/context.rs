//! Call context: what travels with a call besides its arguments.
//!
//! * [`Metadata`] — ordered key/value pairs sent with a request (a token, a
//!   trace id, a tenant). Text values, or bytes under keys that end in
//!   `-bin` (gRPC's convention), which travel as base64 text so that every
//!   value on the wire stays a UTF-8 string (`docs/protocol.md`). An empty
//!   map allocates nothing and encodes as two zero bytes.
//! * [`Context`] — the incoming call a provider is serving: service key,
//!   method, metadata, deadline and peer address. A handler reads it with
//!   [`Context::current`] (or [`Context::with_current`], which copies
//!   nothing); the server makes it current while the handler's future is
//!   polled ([`Context::scope`]). A call made from there inherits what is
//!   left of the deadline and the [`PROPAGATE`]d metadata.
//!
//! The wire carries the time remaining (no clocks cross hosts); the
//! provider turns it into a deadline on its own clock at the first ask, and
//! at the latest when a handler has to wait (the server then holds it to
//! that deadline). So a handler that answers on its first poll costs no
//! clock read (25 ns here, about 1% of a call's server CPU, measured); the
//! price is that the CPU time of that first poll, before anything asks, is
//! not counted against the deadline. Copies resolve it first, so they
//! share it.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use tokio::time::Instant;

/// Metadata keys a call made while serving another passes on by default:
/// the W3C Trace Context headers (<https://www.w3.org/TR/trace-context/>).
/// `[client].propagate_metadata` adds more.
pub const PROPAGATE: &[&str] = &["traceparent", "tracestate"];

/// The suffix of keys whose values are bytes.
pub const BINARY_SUFFIX: &str = "-bin";

/// Longest timeout anything here turns into a deadline (30 days): longer
/// means "no particular deadline", and `Instant + Duration` must not
/// overflow (it panics). Used by the server, the client stack and the
/// transport alike ([`deadline_after`]).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// `start + timeout`, with `timeout` capped at [`MAX_TIMEOUT`]: never panics.
pub fn deadline_after(start: Instant, timeout: Duration) -> Instant {
    start.checked_add(timeout.min(MAX_TIMEOUT)).unwrap_or(start)
}

/// base64 as gRPC sends binary metadata: standard alphabet, no padding on
/// output, padding accepted or not on input.
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// One metadata value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaValue {
    /// A text value (any UTF-8).
    Text(Cow<'static, str>),
    /// Bytes; only under keys ending in `-bin`.
    Binary(Bytes),
}

impl MetaValue {
    /// The text, if this is a text value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text(s) => Some(s),
            Self::Binary(_) => None,
        }
    }

    /// The bytes of either kind of value (a text value's UTF-8).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Text(s) => s.as_bytes(),
            Self::Binary(b) => b,
        }
    }
}

/// Most metadata entries a request may carry. gRPC bounds metadata by size
/// (8 KiB by default); a count bound also keeps decoding's duplicate-key
/// check (a scan per entry) cheap against a hostile frame.
pub const MAX_ENTRIES: usize = 128;

/// Most bytes of metadata (keys and values as sent) a request may carry:
/// gRPC's default header-list limit is 8 KiB; twice that leaves room for
/// base64 binary values.
pub const MAX_WIRE_BYTES: usize = 16 * 1024;

/// Received metadata that cannot be accepted; the server answers `bad request`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMetadata {
    /// A `-bin` value that is not base64.
    #[error("metadata value of `{key}` is not base64, which keys ending in `-bin` require")]
    NotBase64 {
        /// The offending key.
        key: String,
    },
    /// More entries than [`MAX_ENTRIES`].
    #[error("{count} metadata entries; at most {MAX_ENTRIES} are accepted")]
    TooMany {
        /// Entries sent.
        count: usize,
    },
    /// More bytes than [`MAX_WIRE_BYTES`].
    #[error("metadata of more than {MAX_WIRE_BYTES} bytes")]
    TooLarge,
}

/// Ordered metadata: keys (ASCII-lowercased on insert, like HTTP header
/// names) to text or binary values. Inserting a key that is present
/// replaces its value in place; iteration is in insertion order.
///
/// Small and cheap when empty: `Metadata::new()` does not allocate, and a
/// clone of an empty map copies three words. Lookups scan (metadata maps
/// hold a handful of entries). Size limits are the wire's: keys and encoded
/// values up to 65,535 bytes, 65,535 entries, all within the frame limit.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    entries: Vec<(Cow<'static, str>, MetaValue)>,
}

/// Keys and value sizes only: metadata carries credentials (a bearer
/// token), which a `debug!(?cx)` must not log.
impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted(usize);
        impl fmt::Debug for Redacted {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "<{} bytes>", self.0)
            }
        }
        f.debug_map()
            .entries(self.iter().map(|(k, v)| (k, Redacted(v.as_bytes().len()))))
            .finish()
    }
}

fn normalize(key: Cow<'static, str>) -> Cow<'static, str> {
    if key.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(key.to_ascii_lowercase())
    } else {
        key
    }
}

fn is_binary_key(key: &str) -> bool {
    key.len() >= BINARY_SUFFIX.len()
        && key.as_bytes()[key.len() - BINARY_SUFFIX.len()..]
            .eq_ignore_ascii_case(BINARY_SUFFIX.as_bytes())
}

impl Metadata {
    /// An empty map (no allocation).
    pub const fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// A shared empty map, for a call that sends none.
    pub fn empty() -> &'static Metadata {
        static EMPTY: Metadata = Metadata::new();
        &EMPTY
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets a text value. Under a key ending in `-bin`, the text's bytes
    /// are stored as a binary value.
    pub fn insert(
        &mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) {
        let key = normalize(key.into());
        let value = if is_binary_key(&key) {
            MetaValue::Binary(match value.into() {
                Cow::Borrowed(s) => Bytes::from_static(s.as_bytes()),
                Cow::Owned(s) => Bytes::from(s.into_bytes()),
            })
        } else {
            MetaValue::Text(value.into())
        };
        self.put(key, value);
    }

    /// Sets a binary value. The key gets the `-bin` suffix if it lacks it,
    /// since that suffix is what tells a receiver to decode the value.
    pub fn insert_bin(&mut self, key: impl Into<Cow<'static, str>>, value: impl Into<Bytes>) {
        let mut key = normalize(key.into());
        if !is_binary_key(&key) {
            key.to_mut().push_str(BINARY_SUFFIX);
        }
        self.put(key, MetaValue::Binary(value.into()));
    }

    fn put(&mut self, key: Cow<'static, str>, value: MetaValue) {
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.entries.push((key, value)),
        }
    }

    /// The value under `key` (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    }

    /// The text value under `key`, if it is a text value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    /// The bytes under `key` (binary, or a text value's UTF-8).
    pub fn get_bin(&self, key: &str) -> Option<&[u8]> {
        self.get(key).map(MetaValue::as_bytes)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<MetaValue> {
        let i = self
            .entries
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(key))?;
        Some(self.entries.remove(i).1)
    }

    /// The entries, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &MetaValue)> + '_ {
        self.entries.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// Adds the entries of `other` whose keys this map lacks: what a call
    /// does with metadata propagated from the call it serves, so keys set
    /// explicitly win.
    pub fn merge_missing(&mut self, other: &Metadata) {
        for (k, v) in &other.entries {
            if self.get(k).is_none() {
                self.entries.push((k.clone(), v.clone()));
            }
        }
    }

    /// The entries a nested call passes on: keys in [`PROPAGATE`] or
    /// `extra` (compared case-insensitively). Allocates only if one is present.
    pub fn propagated(&self, extra: &[String]) -> Metadata {
        let keep = |k: &str| {
            PROPAGATE.iter().any(|p| p.eq_ignore_ascii_case(k))
                || extra.iter().any(|p| p.eq_ignore_ascii_case(k))
        };
        Metadata {
            entries: self
                .entries
                .iter()
                .filter(|(k, _)| keep(k))
                .cloned()
                .collect(),
        }
    }

    /// Each entry as the wire carries it: the key, and the value as text
    /// (binary values base64-encoded, without padding).
    pub fn wire_entries(&self) -> impl Iterator<Item = (&str, Cow<'_, str>)> + '_ {
        self.entries.iter().map(|(k, v)| {
            let v = match v {
                MetaValue::Text(s) => Cow::Borrowed(s.as_ref()),
                MetaValue::Binary(b) => Cow::Owned(B64.encode(b)),
            };
            (k.as_ref(), v)
        })
    }

    /// Rebuilds metadata from wire entries (the inverse of
    /// [`wire_entries`](Self::wire_entries)). Fails on a `-bin` value that
    /// is not base64, and past [`MAX_ENTRIES`] or [`MAX_WIRE_BYTES`].
    /// Duplicate keys: the last one wins.
    pub fn from_wire<'a, I>(entries: I) -> Result<Self, InvalidMetadata>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
        I::IntoIter: ExactSizeIterator,
    {
        let entries = entries.into_iter();
        if entries.len() > MAX_ENTRIES {
            return Err(InvalidMetadata::TooMany {
                count: entries.len(),
            });
        }
        let mut md = Metadata {
            entries: Vec::with_capacity(entries.len()),
        };
        let mut bytes = 0usize;
        for (k, v) in entries {
            bytes += k.len() + v.len();
            if bytes > MAX_WIRE_BYTES {
                return Err(InvalidMetadata::TooLarge);
            }
            let key = normalize(Cow::Owned(k.to_owned()));
            let value = if is_binary_key(&key) {
                let raw = B64.decode(v).map_err(|_| InvalidMetadata::NotBase64 {
                    key: key.to_string(),
                })?;
                MetaValue::Binary(Bytes::from(raw))
            } else {
                MetaValue::Text(Cow::Owned(v.to_owned()))
            };
            md.put(key, value);
        }
        Ok(md)
    }
}

impl<K, V> FromIterator<(K, V)> for Metadata
where
    K: Into<Cow<'static, str>>,
    V: Into<Cow<'static, str>>,
{
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut md = Metadata::new();
        for (k, v) in iter {
            md.insert(k, v);
        }
        md
    }
}

/// The incoming call a provider is serving.
///
/// Cheap to build: the service key and method are slices of the request
/// frame's buffer (until [`compact`](Self::compact)), and metadata is
/// decoded only when the caller sent some. Clones share the buffer and the
/// deadline (resolved before copying), and copy the metadata.
pub struct Context {
    request: Bytes,
    service: (u32, u32),
    method: (u32, u32),
    metadata: Metadata,
    remaining: Option<Duration>,
    deadline: OnceLock<Instant>,
    peer: SocketAddr,
}

impl Clone for Context {
    fn clone(&self) -> Self {
        let deadline = OnceLock::new();
        if let Some(d) = self.deadline() {
            let _ = deadline.set(d);
        }
        Self {
            request: self.request.clone(),
            service: self.service,
            method: self.method,
            metadata: self.metadata.clone(),
            remaining: self.remaining,
            deadline,
            peer: self.peer,
        }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("service", &self.service())
            .field("method", &self.method())
            .field("metadata", &self.metadata)
            .field("remaining", &self.remaining)
            .field("peer", &self.peer)
            .finish()
    }
}

/// The two names in a buffer of their own, and their spans in it.
fn own_names(service: &str, method: &str) -> (Bytes, (u32, u32), (u32, u32)) {
    let mut buf = Vec::with_capacity(service.len() + method.len());
    buf.extend_from_slice(service.as_bytes());
    buf.extend_from_slice(method.as_bytes());
    // Names come from u16-length wire fields (or a test); past u32 they
    // would read back as "" rather than wrap.
    let s = u32::try_from(service.len()).unwrap_or(u32::MAX);
    let m = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    (Bytes::from(buf), (0, s), (s, m))
}

/// `part`'s position in `whole`, if it is a slice of it.
fn span_in(whole: &[u8], part: &[u8]) -> Option<(u32, u32)> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    if end > whole.len() {
        return None;
    }
    Some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
}

thread_local! {
    /// The context of the call whose future this thread is polling.
    static CURRENT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

impl Context {
    /// A context for `service` and `method`, with no metadata, no deadline
    /// and an unspecified peer (`0.0.0.0:0`): for tests and custom servers.
    pub fn new(service: &str, method: &str) -> Self {
        let (request, service, method) = own_names(service, method);
        Self {
            request,
            service,
            method,
            metadata: Metadata::new(),
            remaining: None,
            deadline: OnceLock::new(),
            peer: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        }
    }

    /// The context of a request whose body is `request`; `service` and
    /// `method` should be slices of it (they are copied otherwise).
    /// `remaining` is the time the caller still waits, as the wire carries
    /// it; the deadline is that much from the first ask (module docs).
    pub fn from_request(
        request: Bytes,
        service: &str,
        method: &str,
        metadata: Metadata,
        remaining: Option<Duration>,
        peer: SocketAddr,
    ) -> Self {
        match (
            span_in(&request, service.as_bytes()),
            span_in(&request, method.as_bytes()),
        ) {
            (Some(s), Some(m)) => Self {
                request,
                service: s,
                method: m,
                metadata,
                remaining,
                deadline: OnceLock::new(),
                peer,
            },
            _ => Self::new(service, method)
                .with_metadata(metadata)
                .with_remaining(remaining)
                .with_peer(peer),
        }
    }

    /// The same context with `metadata`.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The same context whose caller waits `remaining` from now (`None`: no deadline).
    pub fn with_remaining(mut self, remaining: Option<Duration>) -> Self {
        self.remaining = remaining;
        self.deadline = OnceLock::new();
        self
    }

    /// Keeps only the service and method names (copied into a small buffer
    /// of their own), releasing the request frame and the read buffer it
    /// shares: what the server does before a handler that has to wait
    /// goes into a task, so that a slow handler does not pin its request.
    pub fn compact(&mut self) {
        (self.request, self.service, self.method) = own_names(self.service(), self.method());
    }

    /// The same context from `peer`.
    pub fn with_peer(mut self, peer: SocketAddr) -> Self {
        self.peer = peer;
        self
    }

    fn slice(&self, (start, end): (u32, u32)) -> &str {
        self.request
            .get(start as usize..end as usize)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// `name:version` of the service called.
    pub fn service(&self) -> &str {
        self.slice(self.service)
    }

    /// The method called (its wire name).
    pub fn method(&self) -> &str {
        self.slice(self.method)
    }

    /// The caller's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The caller's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The time the caller waited when it sent the request, if it set a
    /// deadline (as the wire carries it).
    pub fn timeout(&self) -> Option<Duration> {
        self.remaining
    }

    /// When the caller stops waiting, if it set a deadline: the time
    /// remaining the request carried, from the first ask (module docs; a
    /// peer's "30 days or more" means no particular deadline).
    pub fn deadline(&self) -> Option<Instant> {
        let remaining = self.remaining?;
        Some(
            *self
                .deadline
                .get_or_init(|| deadline_after(Instant::now(), remaining)),
        )
    }

    /// What is left until [`deadline`](Self::deadline), if there is one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// A copy of the context of the call this task is serving, if any.
    /// [`with_current`](Self::with_current) reads it without copying.
    pub fn current() -> Option<Context> {
        Self::with_current(Context::clone)
    }

    /// Runs `f` on the context of the call this task is serving, if any.
    /// (Futures polled inside `f` do not see a context of their own.)
    pub fn with_current<R>(f: impl FnOnce(&Context) -> R) -> Option<R> {
        CURRENT
            .try_with(|c| c.try_borrow().ok().and_then(|c| c.as_ref().map(f)))
            .ok()
            .flatten()
    }

    /// Runs `fut` with this context current: what the server does around
    /// each handler.
    pub fn scope<F: Future>(self, fut: F) -> Scoped<F> {
        Scoped {
            cx: Some(self),
            fut,
        }
    }

    /// Runs `fut` with the context of the call this task is serving (if
    /// any) current: for work a handler spawns, since a new task does not
    /// inherit it: `tokio::spawn(Context::scope_current(work))`.
    pub fn scope_current<F: Future>(fut: F) -> Scoped<F> {
        Scoped {
            cx: Self::current(),
            fut,
        }
    }
}

pin_project_lite::pin_project! {
    /// A future run with a [`Context`] current ([`Context::scope`]).
    /// `Unpin` when the inner future is.
    pub struct Scoped<F> {
        cx: Option<Context>,
        #[pin]
        fut: F,
    }
}

impl<F> fmt::Debug for Scoped<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scoped")
            .field("cx", &self.cx)
            .finish_non_exhaustive()
    }
}

impl<F> Scoped<F> {
    /// The context this future runs with (`None` only while it is being
    /// polled, when it is current instead).
    pub fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }

    /// The context, to change (the server [`compact`](Context::compact)s it).
    pub fn context_mut(&mut self) -> Option<&mut Context> {
        self.cx.as_mut()
    }
}

/// Puts a context back where it came from when the poll ends, even by a panic.
struct Restore<'a>(&'a mut Option<Context>);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                std::mem::swap(&mut *c, self.0);
            }
        });
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Swap the context in (and the outer one, if any, out) for this
        // poll only: the thread may poll other tasks next. A borrow held
        // by `with_current` around this poll leaves the context unset
        // rather than panicking.
        let entered = CURRENT
            .try_with(|c| match c.try_borrow_mut() {
                Ok(mut c) => {
                    std::mem::swap(&mut *c, this.cx);
                    true
                }
                Err(_) => false,
            })
            .unwrap_or(false);
        if entered {
            let _restore = Restore(this.cx);
            this.fut.poll(cx)
        } else {
            this.fut.poll(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_metadata_is_free_and_ordered_inserts_replace_in_place() {
        let md = Metadata::new();
        assert_eq!(md.entries.capacity(), 0);
        let mut md = Metadata::new();
        md.insert("B", "1");
        md.insert("a", "2");
        md.insert("b", "3");
        let keys: Vec<_> = md.iter().map(|(k, v)| (k, v.as_str().unwrap())).collect();
        assert_eq!(keys, [("b", "3"), ("a", "2")]);
        assert_eq!(md.get_str("A"), Some("2"));
        assert_eq!(
            md.remove("b").and_then(|v| v.as_str().map(str::to_owned)),
            Some("3".into())
        );
        assert_eq!(md.len(), 1);
    }

    #[test]
    fn binary_values_round_trip_through_wire_text() {
        let mut md = Metadata::new();
        md.insert("name", "值-ü");
        md.insert_bin("blob", vec![0u8, 0xff, 0x10]);
        md.insert("raw-bin", "abc");
        assert!(md.get("blob-bin").is_some(), "suffix added");
        let wire: Vec<(String, String)> = md
            .wire_entries()
            .map(|(k, v)| (k.to_owned(), v.into_owned()))
            .collect();
        assert_eq!(wire[1], ("blob-bin".into(), "AP8Q".into()));
        let back = Metadata::from_wire(wire.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(back, md);
        assert_eq!(back.get_bin("blob-bin"), Some(&[0u8, 0xff, 0x10][..]));
        assert_eq!(back.get_str("name"), Some("值-ü"));
        let err = Metadata::from_wire([("x-bin", "not base64!")]).unwrap_err();
        assert_eq!(
            err,
            InvalidMetadata::NotBase64 {
                key: "x-bin".into()
            }
        );
        // Padded input is accepted too.
        let padded = Metadata::from_wire([("p-bin", "YQ==")]).unwrap();
        assert_eq!(padded.get_bin("p-bin"), Some(&b"a"[..]));
    }

    #[test]
    fn propagation_keeps_trace_keys_and_explicit_keys_win() {
        let md: Metadata = [("traceparent", "00-a"), ("x-other", "1"), ("tenant", "t")]
            .into_iter()
            .collect();
        let p = md.propagated(&["Tenant".into()]);
        let keys: Vec<_> = p.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["traceparent", "tenant"]);
        let mut out: Metadata = [("tenant", "mine")].into_iter().collect();
        out.merge_missing(&p);
        assert_eq!(out.get_str("tenant"), Some("mine"));
        assert_eq!(out.get_str("traceparent"), Some("00-a"));
        assert!(Metadata::new().propagated(&[]).entries.capacity() == 0);
    }

    #[test]
    fn a_context_borrows_its_names_from_the_request() {
        let body = Bytes::from_static(b"..Svc:1.0..get..");
        let s = std::str::from_utf8(&body[2..9]).unwrap();
        let m = std::str::from_utf8(&body[11..14]).unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let cx = Context::from_request(body.clone(), s, m, Metadata::new(), None, peer);
        assert_eq!(
            (cx.service(), cx.method(), cx.peer()),
            ("Svc:1.0", "get", peer)
        );
        assert_eq!(cx.request.as_ptr(), body.as_ptr(), "no copy");
        // Strings from elsewhere are copied.
        let cx = Context::from_request(body, "A:1", "b", Metadata::new(), None, peer);
        assert_eq!((cx.service(), cx.method()), ("A:1", "b"));
        assert_eq!(cx.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_fixed_at_the_first_ask_and_clones_share_it() {
        let cx = Context::new("S:1", "m").with_remaining(Some(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(30)).await;
        // The copy resolves the deadline first: both hold the same one.
        let copy = cx.clone();
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(cx.deadline(), copy.deadline());
        assert_eq!(copy.remaining(), Some(Duration::from_millis(90)));
        let d = cx.deadline();
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(cx.deadline(), d, "fixed once resolved");
        let huge = Context::new("S:1", "m").with_remaining(Some(Duration::from_secs(u64::MAX)));
        assert!(huge.deadline().is_some());
    }

    #[test]
    fn hostile_metadata_is_refused_before_work_grows_with_it() {
        let keys: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("k{i}")).collect();
        let many: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
        assert_eq!(
            Metadata::from_wire(many.iter().copied()).unwrap_err(),
            InvalidMetadata::TooMany {
                count: MAX_ENTRIES + 1
            }
        );
        assert!(Metadata::from_wire(many[..MAX_ENTRIES].iter().copied()).is_ok());
        let big = "x".repeat(MAX_WIRE_BYTES);
        assert_eq!(
            Metadata::from_wire([("k", big.as_str())]).unwrap_err(),
            InvalidMetadata::TooLarge
        );
    }

    #[test]
    fn debug_output_does_not_show_values() {
        let md: Metadata = [("authorization", "Bearer s3cret")].into_iter().collect();
        let shown = format!(
            "{md:?} {:?}",
            Context::new("S:1", "m").with_metadata(md.clone())
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("authorization"), "{shown}");
    }

    #[test]
    fn compact_keeps_the_names_and_drops_the_request() {
        let body = Bytes::from(b"..Svc:1.0..get..".to_vec());
        let s = std::str::from_utf8(&body[2..9]).unwrap();
        let m = std::str::from_utf8(&body[11..14]).unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut cx = Context::from_request(body.clone(), s, m, Metadata::new(), None, peer);
        cx.compact();
        assert_eq!((cx.service(), cx.method()), ("Svc:1.0", "get"));
        assert_ne!(cx.request.as_ptr(), body.as_ptr());
        assert_eq!(cx.request.len(), 10);
    }

    #[tokio::test]
    async fn the_current_context_is_set_only_while_its_future_runs() {
        assert!(Context::current().is_none());
        let cx = Context::new("S:1", "outer");
        let seen = cx
            .scope(async {
                let outer = Context::with_current(|c| c.method().to_owned());
                let inner = Context::new("S:1", "inner")
                    .scope(async { Context::with_current(|c| c.method().to_owned()) })
                    .await;
                tokio::task::yield_now().await;
                let after = Context::with_current(|c| c.method().to_owned());
                (outer, inner, after)
            })
            .await;
        assert_eq!(
            seen,
            (
                Some("outer".into()),
                Some("inner".into()),
                Some("outer".into())
            )
        );
        assert!(Context::current().is_none(), "restored after the poll");
    }
}
