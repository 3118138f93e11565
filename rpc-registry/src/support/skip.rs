//! [`SkipLog`]: a consumer that skips a registry entry it cannot use says
//! why, once (issue 12, fault 4: a Consul entry rewritten without its record
//! vanished from discovery with no log line; other backends warned on every
//! read).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Entries remembered at most; past it the memory starts over (a registry
/// full of foreign entries then logs them again, once per round).
const MAX_REMEMBERED: usize = 1024;

/// Which entries were reported skipped, and why.
#[derive(Debug, Default)]
pub(crate) struct SkipLog {
    seen: Mutex<HashMap<String, String>>,
}

impl SkipLog {
    /// Logs (warn) that `entry` of `backend` is skipped because of `why`,
    /// unless it was already logged for the same reason.
    pub(crate) fn skipped(&self, backend: &'static str, entry: &str, why: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.get(entry).is_some_and(|w| w == why) {
            return;
        }
        if seen.len() >= MAX_REMEMBERED {
            seen.clear();
        }
        seen.insert(entry.to_owned(), why.to_owned());
        drop(seen);
        tracing::warn!(
            backend,
            entry,
            reason = why,
            "skipping a registry entry the consumer cannot use"
        );
    }

    /// `entry` is usable (again): a later skip is news.
    pub(crate) fn usable(&self, entry: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if !seen.is_empty() {
            seen.remove(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_entry_and_reason_is_remembered_until_it_is_usable() {
        let log = SkipLog::default();
        log.skipped("x", "a", "bad");
        log.skipped("x", "a", "bad");
        assert_eq!(log.seen.lock().unwrap().len(), 1);
        log.skipped("x", "a", "worse");
        assert_eq!(log.seen.lock().unwrap()["a"], "worse");
        log.usable("a");
        assert!(log.seen.lock().unwrap().is_empty());
        for i in 0..MAX_REMEMBERED + 5 {
            log.skipped("x", &i.to_string(), "bad");
        }
        assert!(log.seen.lock().unwrap().len() <= MAX_REMEMBERED);
    }
}
