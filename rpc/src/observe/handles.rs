//! Per-method metric handles, registered once and reused by every call.
//!
//! Registering a metric with labels through the `metrics` macros hashes
//! the key and, with labels borrowed from the call, allocates them: per
//! call, that is a few hundred ns. A call instead finds its (service,
//! method) in a small per-thread cache (string compares, no lock), else
//! in the process's map under a read lock, and increments handles it
//! already has. Handles live for the process (`&'static`, leaked once per
//! pair): at most [`MAX_LABELED_METHODS`] pairs, after which calls of new
//! pairs share one entry labelled [`OVERFLOW_METHOD`] for both service and
//! method. Handles take the recorder installed when they are first used:
//! install it before the first call.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use metrics::{Counter, Gauge, Histogram, Label};
use rpc_core::metric_names::{
    CLIENT_CALLS, CLIENT_DURATION, CLIENT_IN_FLIGHT, MAX_LABELED_METHODS, METHOD, OVERFLOW_METHOD,
    SERVER_CALLS, SERVER_DURATION, SERVER_IN_FLIGHT, SERVICE, STATUS,
};

/// Which side's names a [`Registry`] registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

impl Side {
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Side::Client => (CLIENT_CALLS, CLIENT_DURATION, CLIENT_IN_FLIGHT),
            Side::Server => (SERVER_CALLS, SERVER_DURATION, SERVER_IN_FLIGHT),
        }
    }
}

/// The handles of one (service, method).
#[derive(Debug)]
pub(crate) struct MethodHandles {
    side: Side,
    service: String,
    method: String,
    /// The `OK` counter, the one nearly every call increments.
    ok: Counter,
    pub(crate) duration: Histogram,
    pub(crate) in_flight: Gauge,
}

impl MethodHandles {
    fn new(side: Side, service: &str, method: &str) -> Self {
        let (calls, duration, in_flight) = side.names();
        let labels = [
            Label::new(SERVICE, service.to_owned()),
            Label::new(METHOD, method.to_owned()),
        ];
        let mut ok_labels = labels.to_vec();
        ok_labels.push(Label::new(STATUS, "OK"));
        Self {
            side,
            service: service.to_owned(),
            method: method.to_owned(),
            ok: metrics::counter!(calls, ok_labels),
            duration: metrics::histogram!(duration, labels.to_vec()),
            in_flight: metrics::gauge!(in_flight, labels.to_vec()),
        }
    }

    /// Counts one finished call with status label `status`.
    pub(crate) fn finished(&self, status: &'static str) {
        if status == "OK" {
            self.ok.increment(1);
        } else {
            // Failures are rare; registering per failure keeps this small.
            let (calls, _, _) = self.side.names();
            metrics::counter!(
                calls,
                SERVICE => self.service.clone(),
                METHOD => self.method.clone(),
                STATUS => status
            )
            .increment(1);
        }
    }

    fn is(&self, service: &str, method: &str) -> bool {
        self.method == method && self.service == service
    }
}

type Methods = HashMap<String, &'static MethodHandles>;

/// The handles of one side, by service then method.
#[derive(Debug)]
pub(crate) struct Registry {
    side: Side,
    map: RwLock<(HashMap<String, Methods>, usize)>,
    overflow: OnceLock<&'static MethodHandles>,
}

/// Entries of the per-thread cache, per side.
const CACHED: usize = 4;

thread_local! {
    static CACHE: [Cell<[Option<&'static MethodHandles>; CACHED]>; 2] =
        const { [Cell::new([None; CACHED]), Cell::new([None; CACHED])] };
}

impl Registry {
    fn new(side: Side) -> Self {
        Self {
            side,
            map: RwLock::new((HashMap::new(), 0)),
            overflow: OnceLock::new(),
        }
    }

    /// The handles of `service`/`method`, registered on first use.
    pub(crate) fn get(&self, service: &str, method: &str) -> &'static MethodHandles {
        let slot = self.side as usize;
        let hit = CACHE.with(|c| {
            let entries = c[slot].get();
            entries
                .iter()
                .flatten()
                .find(|h| h.is(service, method))
                .copied()
        });
        if let Some(h) = hit {
            return h;
        }
        let h = self.lookup(service, method);
        // Most recent first; the oldest falls out.
        CACHE.with(|c| {
            let mut entries = c[slot].get();
            entries.rotate_right(1);
            entries[0] = Some(h);
            c[slot].set(entries);
        });
        h
    }

    fn lookup(&self, service: &str, method: &str) -> &'static MethodHandles {
        if let Ok(map) = self.map.read()
            && let Some(h) = map.0.get(service).and_then(|m| m.get(method))
        {
            return h;
        }
        self.insert(service, method)
    }

    #[cold]
    fn insert(&self, service: &str, method: &str) -> &'static MethodHandles {
        // A poisoned lock (a panic elsewhere) still holds a usable map.
        let mut guard = self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (map, len) = &mut *guard;
        if let Some(h) = map.get(service).and_then(|m| m.get(method)) {
            return h;
        }
        if *len >= MAX_LABELED_METHODS {
            return self.overflow.get_or_init(|| {
                Box::leak(Box::new(MethodHandles::new(
                    self.side,
                    OVERFLOW_METHOD,
                    OVERFLOW_METHOD,
                )))
            });
        }
        *len += 1;
        let h: &'static MethodHandles =
            Box::leak(Box::new(MethodHandles::new(self.side, service, method)));
        map.entry(service.to_owned())
            .or_default()
            .insert(method.to_owned(), h);
        h
    }
}

static CLIENT: OnceLock<Registry> = OnceLock::new();
static SERVER: OnceLock<Registry> = OnceLock::new();

/// The consumers' handles.
pub(crate) fn client() -> &'static Registry {
    CLIENT.get_or_init(|| Registry::new(Side::Client))
}

/// The providers' handles.
pub(crate) fn server() -> &'static Registry {
    SERVER.get_or_init(|| Registry::new(Side::Server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_past_the_limit_share_one_overflow_entry() {
        let r = Registry::new(Side::Client);
        let first = r.get("S:1", "m0");
        assert!(std::ptr::eq(first, r.get("S:1", "m0")), "cached");
        assert!(std::ptr::eq(first, r.lookup("S:1", "m0")), "registered");
        for i in 1..MAX_LABELED_METHODS {
            let h = r.get("S:1", &format!("m{i}"));
            assert_eq!(h.method, format!("m{i}"));
        }
        let over = r.get("T:1", "x");
        assert_eq!(
            (over.service.as_str(), over.method.as_str()),
            (OVERFLOW_METHOD, OVERFLOW_METHOD)
        );
        assert!(std::ptr::eq(over, r.get("U:1", "y")), "one overflow entry");
        assert_eq!(r.map.read().unwrap().1, MAX_LABELED_METHODS);
    }
}
