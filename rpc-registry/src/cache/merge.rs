//! Applying watch events to a list: snapshot merges with a Delta, single
//! upserts and removals, in node-key order.

use super::*;

/// What a snapshot changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) added: usize,
    pub(crate) removed: usize,
    pub(crate) updated: usize,
}

impl Delta {
    pub(super) fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Diffs `snapshot` against `current` (sorted by node key). Returns the new
/// list (`None` if nothing changed) and what changed.
pub(crate) fn merge_snapshot(
    current: &[ServiceMetaInfo],
    mut snapshot: Vec<ServiceMetaInfo>,
) -> (Option<Vec<ServiceMetaInfo>>, Delta) {
    snapshot.sort_by_cached_key(ServiceMetaInfo::node_key);
    // Duplicates of a node in one snapshot: the last one wins.
    snapshot.reverse();
    snapshot.dedup_by_key(|m| m.node_key());
    snapshot.reverse();

    let mut delta = Delta::default();
    let (mut i, mut j) = (0, 0);
    while i < current.len() || j < snapshot.len() {
        let order = match (current.get(i), snapshot.get(j)) {
            (Some(c), Some(s)) => c.node_key().cmp(&s.node_key()),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                delta.removed += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                delta.added += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                if current[i] != snapshot[j] {
                    delta.updated += 1;
                }
                i += 1;
                j += 1;
            }
        }
    }
    ((!delta.is_empty()).then_some(snapshot), delta)
}

/// Inserts or replaces `meta` in a list sorted by node key.
pub(crate) fn upsert(
    current: &[ServiceMetaInfo],
    meta: ServiceMetaInfo,
) -> Option<Vec<ServiceMetaInfo>> {
    let key = meta.node_key();
    match current.binary_search_by(|m| m.node_key().cmp(&key)) {
        Ok(at) if current[at] == meta => None,
        Ok(at) => {
            let mut next = current.to_vec();
            next[at] = meta;
            Some(next)
        }
        Err(at) => {
            let mut next = Vec::with_capacity(current.len() + 1);
            next.extend_from_slice(&current[..at]);
            next.push(meta);
            next.extend_from_slice(&current[at..]);
            Some(next)
        }
    }
}

/// Removes the instance `node_key` from a list sorted by node key.
pub(crate) fn remove(current: &[ServiceMetaInfo], node_key: &str) -> Option<Vec<ServiceMetaInfo>> {
    let at = current
        .binary_search_by(|m| m.node_key().as_str().cmp(node_key))
        .ok()?;
    let mut next = current.to_vec();
    next.remove(at);
    Some(next)
}
