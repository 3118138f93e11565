//! Empty-push protection as a plain state machine: the one place where the
//! policy lives (issue 14). It never reads a clock or a lock; the watch task
//! ([`super::Entry`]) passes in the time, the published list and the
//! flags, and publishes what comes out. The unit tests at the end drive it
//! with plain `std::time::Instant`s, no runtime.
//!
//! The policy, for one followed service:
//! - An update that would empty a non-empty list while the connection is
//!   unhealthy is held (`Held::Unconfirmed`) until the backend says the
//!   connection is healthy again, which confirms it; any newer list event
//!   replaces it.
//! - For `grace` after the registry comes back from a break, an empty list
//!   from the registry is held too (`Held::Reset`): a registry restarted with
//!   no data lists nothing until its providers have registered again. The
//!   registry's own list is followed meanwhile and published as soon as it
//!   lists an instance, or at the end of the grace as it is.
//!
//! A backend reports facts, never a grace of its own: `Connected(false)` for
//! a break, a snapshot or `Connected(true)` when it is back (Nacos's
//! follower reports a break it saw only as a reconnect count).

use std::time::{Duration, Instant};

use rpc_core::ServiceMetaInfo;

/// An update that empty-push protection keeps from the published list.
#[derive(Debug, PartialEq)]
pub(super) enum Held {
    /// An emptying update that arrived while the connection was unhealthy.
    Unconfirmed(Vec<ServiceMetaInfo>),
    /// The registry's own list, empty, within the grace after the registry
    /// came back from a break; published at `until` as it is.
    Reset {
        truth: Vec<ServiceMetaInfo>,
        until: Instant,
    },
}

/// What an event is, as far as the protection cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// A whole list; it also says the connection works.
    Snapshot,
    /// One instance added or changed.
    Upsert,
    /// One instance gone. Removals do not end the grace: a registry
    /// directory that comes back empty may report each instance gone one by
    /// one.
    Remove,
    /// The backend's word on its connection.
    Connected(bool),
}

impl Step {
    fn health(self) -> Option<bool> {
        match self {
            Step::Snapshot => Some(true),
            Step::Connected(up) => Some(up),
            Step::Upsert | Step::Remove => None,
        }
    }

    fn lists(self) -> bool {
        matches!(self, Step::Snapshot | Step::Upsert)
    }
}

/// The published state an event arrives on.
pub(super) struct View<'a> {
    pub(super) now: Instant,
    /// The published list.
    pub(super) current: &'a [ServiceMetaInfo],
    pub(super) healthy: bool,
    /// Whether a list was ever published (a first snapshot, or the snapshot
    /// file's).
    pub(super) ready: bool,
    /// The first event of a freshly established watch, which the backend
    /// produced over a connection that just worked: it vouches for itself.
    pub(super) trusted: bool,
    /// The service key, for the logs.
    pub(super) service: &'a str,
}

/// What to publish after an event.
#[derive(Debug, PartialEq)]
pub(super) struct Outcome {
    /// The new list, if it changed.
    pub(super) list: Option<Vec<ServiceMetaInfo>>,
    /// The new health, if the event says something the protection believes.
    pub(super) health: Option<bool>,
    /// The first list the service ever gets: mark it ready.
    pub(super) first: bool,
    /// When a list held for the grace is due ([`Protection::release`]).
    pub(super) due: Option<Instant>,
}

/// Empty-push protection's state for one service.
#[derive(Debug)]
pub(super) struct Protection {
    enabled: bool,
    /// Zero: no hold after a break, only while unhealthy.
    grace: Duration,
    held: Option<Held>,
    /// When the registry last came back from a break, until it lists an
    /// instance again.
    recovered_at: Option<Instant>,
}

impl Protection {
    pub(super) fn new(enabled: bool, grace: Duration) -> Self {
        Self {
            enabled,
            grace,
            held: None,
            recovered_at: None,
        }
    }

    /// The list an event applies to: the registry's own while a reset is
    /// held (so an instance that never comes back is not kept), the
    /// published one otherwise (a newer event replaces an unconfirmed hold).
    pub(super) fn base<'a>(&'a self, current: &'a [ServiceMetaInfo]) -> &'a [ServiceMetaInfo] {
        match &self.held {
            Some(Held::Reset { truth, .. }) => truth,
            _ => current,
        }
    }

    /// When a list held for the grace is due.
    pub(super) fn due(&self) -> Option<Instant> {
        match self.held {
            Some(Held::Reset { until, .. }) => Some(until),
            _ => None,
        }
    }

    /// Decides what an event publishes. `next` is the event's list operation
    /// applied to [`Protection::base`] (`None`: no change; always `None` for
    /// `Connected`).
    pub(super) fn settle(
        &mut self,
        view: View<'_>,
        step: Step,
        mut next: Option<Vec<ServiceMetaInfo>>,
    ) -> Outcome {
        let View {
            now,
            current,
            healthy,
            ready,
            trusted,
            service,
        } = view;
        let mut health = step.health();
        let first = step == Step::Snapshot && !ready;
        let confirms = trusted || step == Step::Connected(true);
        if health == Some(true) && !healthy && ready {
            self.recovered_at = Some(now);
        }
        match step {
            Step::Connected(up) => match self.held.take() {
                // A healthy connection confirms an update held back while it was not.
                Some(Held::Unconfirmed(list)) if up => next = Some(list),
                other => self.held = other,
            },
            // A list event during a reset hold: its outcome is the registry's
            // list, which is held again below while it is empty.
            _ => {
                if let Some(Held::Reset { truth, .. }) = self.held.take() {
                    next = next.or(Some(truth));
                }
            }
        }
        if step.lists() {
            // The registry lists instances again: whatever it says from now
            // on is news, not the emptiness of a restart.
            let listed = next.as_ref().map_or(!current.is_empty(), |l| !l.is_empty());
            if listed && self.recovered_at.take().is_some() {
                tracing::info!(%service, "the registry lists instances again since it came back");
            }
        }
        let empties = !current.is_empty() && next.as_ref().is_some_and(Vec::is_empty);
        if self.enabled && empties {
            let grace_until = self
                .recovered_at
                .map(|at| at + self.grace)
                .filter(|until| now < *until);
            if !healthy && !confirms {
                tracing::warn!(%service, instances = current.len(), "holding back an update that would empty the list while the registry is unhealthy");
                count_hold(service);
                self.held = next.take().map(Held::Unconfirmed);
                // A held snapshot does not vouch for the connection either.
                health = None;
            } else if let Some(until) = grace_until {
                tracing::warn!(%service, instances = current.len(), left = ?until.saturating_duration_since(now), "the registry lists no instance right after coming back; keeping the last list until its providers register again");
                count_hold(service);
                self.held = next.take().map(|truth| Held::Reset { truth, until });
            }
        }
        Outcome {
            list: next,
            health,
            first,
            due: self.due(),
        }
    }

    /// At a due time: the list held for the grace, if the registry has
    /// listed nothing for the whole grace and the connection is healthy. If
    /// the connection broke again meanwhile, the list waits for it to
    /// confirm instead.
    pub(super) fn release(
        &mut self,
        now: Instant,
        healthy: bool,
        service: &str,
    ) -> Option<Vec<ServiceMetaInfo>> {
        let truth = match self.held.take() {
            Some(Held::Reset { truth, until }) if now < until => {
                self.held = Some(Held::Reset { truth, until });
                return None;
            }
            Some(Held::Reset { truth, .. }) => truth,
            other => {
                self.held = other;
                return None;
            }
        };
        if !healthy {
            self.held = Some(Held::Unconfirmed(truth));
            return None;
        }
        tracing::warn!(%service, "the registry still lists no instance at the end of the grace: applying the empty list");
        Some(truth)
    }
}

/// Counts one update held back (`rpc_registry_empty_push_holds_total`).
fn count_hold(service: &str) {
    metrics::counter!(
        rpc_core::metric_names::REGISTRY_EMPTY_HOLDS,
        rpc_core::metric_names::SERVICE => service.to_owned()
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    //! The policy alone, with plain `Instant`s: no runtime, no clock. The
    //! cache's own tests (`super::super::tests`) drive the same policy
    //! through real watch tasks on a paused clock.

    use super::*;

    const GRACE: Duration = Duration::from_secs(20);

    fn one() -> Vec<ServiceMetaInfo> {
        vec![ServiceMetaInfo::new("S", "1.0", "127.0.0.1", 9000)]
    }

    /// The published state the tests drive: what `Entry` keeps.
    struct Published {
        protection: Protection,
        list: Vec<ServiceMetaInfo>,
        healthy: bool,
        ready: bool,
        t0: Instant,
    }

    impl Published {
        fn new(enabled: bool, grace: Duration) -> Self {
            Self {
                protection: Protection::new(enabled, grace),
                list: Vec::new(),
                healthy: false,
                ready: false,
                t0: Instant::now(),
            }
        }

        /// A healthy service listing one instance.
        fn listing(enabled: bool, grace: Duration) -> Self {
            let mut p = Self::new(enabled, grace);
            p.event(0, Step::Snapshot, Some(one()), true);
            assert_eq!((p.list.len(), p.healthy, p.ready), (1, true, true));
            p
        }

        /// Feeds an event at `secs` after the start; `list` is the event's
        /// list operation as `Entry` computes it on [`Protection::base`].
        fn event(
            &mut self,
            secs: u64,
            step: Step,
            list: Option<Vec<ServiceMetaInfo>>,
            trusted: bool,
        ) -> Option<Instant> {
            let view = View {
                now: self.t0 + Duration::from_secs(secs),
                current: &self.list,
                healthy: self.healthy,
                ready: self.ready,
                trusted,
                service: "S:1.0",
            };
            let out = self.protection.settle(view, step, list);
            self.apply(out)
        }

        fn apply(&mut self, out: Outcome) -> Option<Instant> {
            if let Some(list) = out.list {
                self.list = list;
            }
            if let Some(h) = out.health {
                self.healthy = h;
            }
            self.ready |= out.first;
            out.due
        }

        fn release(&mut self, secs: u64) {
            let now = self.t0 + Duration::from_secs(secs);
            if let Some(list) = self.protection.release(now, self.healthy, "S:1.0") {
                self.list = list;
            }
        }

        fn at(&self, secs: u64) -> Instant {
            self.t0 + Duration::from_secs(secs)
        }
    }

    #[test]
    fn an_emptying_update_while_unhealthy_waits_for_the_connection() {
        // No grace: only the unhealthy hold is at work.
        let mut p = Published::listing(true, Duration::ZERO);
        p.event(1, Step::Connected(false), None, false);
        assert!(!p.healthy);
        // The snapshot would empty the list: held, and it does not make the
        // service healthy either.
        assert_eq!(p.event(2, Step::Snapshot, Some(vec![]), false), None);
        assert_eq!(p.list, one());
        assert!(!p.healthy);
        // The connection confirms it: published.
        p.event(3, Step::Connected(true), None, false);
        assert!(p.list.is_empty());
        assert!(p.healthy);
    }

    #[test]
    fn a_newer_list_replaces_an_unconfirmed_hold() {
        let mut p = Published::listing(true, GRACE);
        p.event(1, Step::Connected(false), None, false);
        p.event(2, Step::Remove, Some(vec![]), false);
        assert_eq!(p.list, one());
        let two = vec![ServiceMetaInfo::new("S", "1.0", "127.0.0.1", 9001)];
        // An upsert applies to the published list, not to the held one.
        assert_eq!(p.protection.base(&p.list), one().as_slice());
        p.event(3, Step::Upsert, Some(two.clone()), false);
        assert_eq!(p.list, two);
        // Nothing is left to confirm.
        p.event(4, Step::Connected(true), None, false);
        assert_eq!(p.list, two);
    }

    #[test]
    fn the_first_event_of_a_fresh_watch_vouches_for_itself() {
        let mut p = Published::listing(true, Duration::ZERO);
        p.event(1, Step::Connected(false), None, false);
        p.event(2, Step::Snapshot, Some(vec![]), true);
        assert!(p.list.is_empty());
        assert!(p.healthy);
    }

    #[test]
    fn an_empty_registry_after_a_break_is_held_for_the_grace() {
        let mut p = Published::listing(true, GRACE);
        p.event(1, Step::Connected(false), None, false);
        // Back, empty: the snapshot and the connection say it is healthy,
        // and the grace starts now (10 s).
        let due = p.event(10, Step::Snapshot, Some(vec![]), false);
        p.event(10, Step::Connected(true), None, false);
        let due = due.or(p.protection.due());
        assert_eq!(due, Some(p.at(10 + 20)));
        assert_eq!(p.list, one());
        assert!(p.healthy);
        // Removals during the hold apply to the registry's list.
        assert_eq!(p.protection.base(&p.list), &[] as &[ServiceMetaInfo]);
        // Early: nothing.
        p.release(29);
        assert_eq!(p.list, one());
        // Due: the registry is believed.
        p.release(30);
        assert!(p.list.is_empty());
        assert_eq!(p.protection.due(), None);
    }

    #[test]
    fn a_provider_back_within_the_grace_is_published_at_once() {
        let mut p = Published::listing(true, GRACE);
        p.event(1, Step::Connected(false), None, false);
        p.event(2, Step::Connected(true), None, false);
        p.event(3, Step::Snapshot, Some(vec![]), false);
        assert_eq!(p.list, one());
        let back = vec![ServiceMetaInfo::new("S", "1.0", "127.0.0.1", 9002)];
        assert_eq!(p.event(5, Step::Upsert, Some(back.clone()), false), None);
        // The registry's list, not the old one merged in.
        assert_eq!(p.list, back);
        // The registry lists again: a later removal is news.
        p.event(6, Step::Remove, Some(vec![]), false);
        assert!(p.list.is_empty());
    }

    #[test]
    fn removals_one_by_one_keep_the_grace() {
        let two = vec![
            ServiceMetaInfo::new("S", "1.0", "127.0.0.1", 9000),
            ServiceMetaInfo::new("S", "1.0", "127.0.0.1", 9001),
        ];
        let mut p = Published::new(true, GRACE);
        p.event(0, Step::Snapshot, Some(two.clone()), true);
        p.event(1, Step::Connected(false), None, false);
        p.event(2, Step::Connected(true), None, false);
        // The first removal leaves one: published, and the grace stays.
        p.event(3, Step::Remove, Some(two[1..].to_vec()), false);
        assert_eq!(p.list, two[1..].to_vec());
        // The last one empties it: held.
        p.event(4, Step::Remove, Some(vec![]), false);
        assert_eq!(p.list, two[1..].to_vec());
        assert_eq!(p.protection.due(), Some(p.at(22)));
    }

    #[test]
    fn the_grace_ends_after_its_time() {
        let mut p = Published::listing(true, GRACE);
        p.event(1, Step::Connected(false), None, false);
        p.event(2, Step::Connected(true), None, false);
        p.event(22, Step::Remove, Some(vec![]), false);
        assert!(p.list.is_empty());
    }

    #[test]
    fn a_break_during_the_hold_waits_for_confirmation() {
        let mut p = Published::listing(true, GRACE);
        p.event(1, Step::Connected(false), None, false);
        p.event(2, Step::Connected(true), None, false);
        p.event(3, Step::Snapshot, Some(vec![]), false);
        p.event(4, Step::Connected(false), None, false);
        p.release(22);
        assert_eq!(p.list, one());
        assert!(matches!(p.protection.held, Some(Held::Unconfirmed(_))));
        // Back again: a new break, so a new grace from now.
        p.event(30, Step::Connected(true), None, false);
        assert_eq!(p.list, one());
        assert_eq!(p.protection.due(), Some(p.at(50)));
        p.release(50);
        assert!(p.list.is_empty());
    }

    #[test]
    fn off_means_every_update_is_published() {
        let mut p = Published::listing(false, GRACE);
        p.event(1, Step::Connected(false), None, false);
        p.event(2, Step::Remove, Some(vec![]), false);
        assert!(p.list.is_empty());
    }

    #[test]
    fn a_zero_grace_holds_only_while_unhealthy() {
        let mut p = Published::listing(true, Duration::ZERO);
        p.event(1, Step::Connected(false), None, false);
        p.event(2, Step::Connected(true), None, false);
        p.event(2, Step::Snapshot, Some(vec![]), false);
        assert!(p.list.is_empty());
    }

    #[test]
    fn a_first_list_is_not_a_recovery() {
        // Not ready yet: the first snapshot cannot start a grace.
        let mut p = Published::new(true, GRACE);
        p.event(0, Step::Snapshot, Some(vec![]), false);
        assert!(p.ready);
        assert_eq!(p.protection.recovered_at, None);
    }
}
