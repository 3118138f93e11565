//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` value a call carries in its metadata, and the span a
//! handler is running in, so that a call it makes continues its trace.
//!
//! Hand-written rather than taken from `opentelemetry`: the format is one
//! fixed 55-byte line, and the framework needs it with or without the
//! OpenTelemetry SDK (the `opentelemetry` feature adds export on top).

use std::cell::Cell;
use std::fmt;

/// The metadata key of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key of the W3C vendor trace state (passed on untouched).
pub const TRACESTATE: &str = "tracestate";

/// One span's place in a trace: the `traceparent` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanIds {
    /// 16-byte trace id, never 0.
    pub trace_id: u128,
    /// 8-byte span id, never 0.
    pub span_id: u64,
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl SpanIds {
    /// A new trace's root span: random ids, sampled.
    pub fn new_root() -> Self {
        let mut trace_id = 0u128;
        while trace_id == 0 {
            trace_id = (u128::from(rpc_core::backoff::random_u64()) << 64)
                | u128::from(rpc_core::backoff::random_u64());
        }
        Self {
            trace_id,
            span_id: new_span_id(),
            flags: 1,
        }
    }

    /// A child of this span: same trace and flags, a new span id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            flags: self.flags,
        }
    }

    /// Parses a `traceparent` value. Per the spec, a version other than
    /// `00` (and not the invalid `ff`) is read by its first four fields;
    /// all-zero ids, bad hex and bad lengths are `None`.
    pub fn parse(value: &str) -> Option<Self> {
        let b = value.as_bytes();
        if b.len() < 55 || (b.len() > 55 && b[0..2] == *b"00") {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let version = hex(&b[0..2])? as u8;
        if version == 0xff {
            return None;
        }
        let trace_id = hex(&b[3..35])?;
        let span_id = hex(&b[36..52])? as u64;
        let flags = hex(&b[53..55])? as u8;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

/// The `traceparent` value: `00-<trace id>-<span id>-<flags>`.
impl fmt::Display for SpanIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

fn new_span_id() -> u64 {
    loop {
        let id = rpc_core::backoff::random_u64();
        if id != 0 {
            return id;
        }
    }
}

/// Lowercase hex only, as the spec requires.
fn hex(digits: &[u8]) -> Option<u128> {
    let mut v = 0u128;
    for &d in digits {
        let n = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(n);
    }
    Some(v)
}

thread_local! {
    /// The server span whose handler is being polled on this thread.
    static CURRENT: Cell<Option<SpanIds>> = const { Cell::new(None) };
}

/// The span of the call whose handler is running on this thread (set by
/// the server's observe layer for the duration of each poll), if any.
pub fn current() -> Option<SpanIds> {
    CURRENT.with(Cell::get)
}

/// Runs `f` with `ids` as the current span, restoring the previous one
/// after (also when `f` panics: the guard restores on unwind).
pub(crate) fn with_current<R>(ids: SpanIds, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<SpanIds>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(Some(ids))));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_spec_example() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ids = SpanIds::parse(v).unwrap();
        assert_eq!(ids.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(ids.span_id, 0x00f067aa0ba902b7);
        assert_eq!(ids.flags, 1);
        assert_eq!(ids.to_string(), v);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanIds::parse(bad), None, "{bad}");
        }
        // A later version is read by its first fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-next";
        assert!(SpanIds::parse(later).is_some());
    }

    #[test]
    fn children_keep_the_trace() {
        let root = SpanIds::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(SpanIds::parse(&child.to_string()), Some(child));
    }

    #[test]
    fn the_current_span_is_restored() {
        let a = SpanIds::new_root();
        let b = SpanIds::new_root();
        assert_eq!(current(), None);
        with_current(a, || {
            assert_eq!(current(), Some(a));
            with_current(b, || assert_eq!(current(), Some(b)));
            assert_eq!(current(), Some(a));
        });
        assert_eq!(current(), None);
    }
}
