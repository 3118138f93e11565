//! Per-method metric handles, registered once and reused by every call.
//!
//! Registering a metric with labels through the `metrics` macros hashes
//! the key and, with labels borrowed from the call, allocates them: per
//! call, that is a few hundred ns. A call instead looks its (service,
//! method) up here under a read lock and increments handles it already
//! has. The map holds at most [`MAX_LABELED_METHODS`] pairs; calls of
//! later pairs share the [`OVERFLOW_METHOD`] label of their service (the
//! overflow handles are looked up per call: bounded memory over speed
//! for what should never happen).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use metrics::{Counter, Gauge, Histogram, Label};
use rpc_core::metric_names::{
    CLIENT_CALLS, CLIENT_DURATION, CLIENT_IN_FLIGHT, MAX_LABELED_METHODS, METHOD, OVERFLOW_METHOD,
    SERVER_CALLS, SERVER_DURATION, SERVER_IN_FLIGHT, SERVICE, STATUS,
};

/// Which side's names a [`Registry`] registers.
#[derive(Clone, Copy, Debug)]
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
            // Failures are rare; registering per failure keeps the struct small.
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
}

type Methods = HashMap<String, Arc<MethodHandles>>;

/// The handles of one side, by service then method.
#[derive(Debug)]
pub(crate) struct Registry {
    side: Side,
    map: RwLock<HashMap<String, Methods>>,
    len: AtomicUsize,
}

impl Registry {
    fn new(side: Side) -> Self {
        Self {
            side,
            map: RwLock::new(HashMap::new()),
            len: AtomicUsize::new(0),
        }
    }

    /// The handles of `service`/`method`, registered on first use.
    pub(crate) fn get(&self, service: &str, method: &str) -> Arc<MethodHandles> {
        if let Ok(map) = self.map.read()
            && let Some(h) = map.get(service).and_then(|m| m.get(method))
        {
            return h.clone();
        }
        self.insert(service, method)
    }

    #[cold]
    fn insert(&self, service: &str, method: &str) -> Arc<MethodHandles> {
        let Ok(mut map) = self.map.write() else {
            // A panic elsewhere poisoned the lock: record without caching.
            return Arc::new(MethodHandles::new(self.side, service, method));
        };
        if let Some(h) = map.get(service).and_then(|m| m.get(method)) {
            return h.clone();
        }
        if self.len.load(Ordering::Relaxed) >= MAX_LABELED_METHODS {
            return Arc::new(MethodHandles::new(self.side, service, OVERFLOW_METHOD));
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(MethodHandles::new(self.side, service, method));
        map.entry(service.to_owned())
            .or_default()
            .insert(method.to_owned(), h.clone());
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
