//! The watch events that turn one instance list into the next, for the
//! backends whose server hands over whole lists (local's directory scan,
//! Consul's blocking queries, Nacos's pushes).

use std::collections::BTreeMap;

use rpc_core::{ServiceMetaInfo, WatchEvent};

/// Instances by node key (`ServiceMetaInfo::node_key`).
pub(crate) type Nodes = BTreeMap<String, ServiceMetaInfo>;

/// A list keyed by node key.
#[cfg(any(feature = "consul", feature = "nacos", test))]
pub(crate) fn nodes(list: Vec<ServiceMetaInfo>) -> Nodes {
    list.into_iter().map(|m| (m.node_key(), m)).collect()
}

/// The changes turning `old` into `new`: upserts first, then removals, so
/// that a consumer applying them one by one never passes through an empty
/// list when an instance is replaced by another.
pub(crate) fn diff(old: &Nodes, new: &Nodes) -> Vec<WatchEvent> {
    let upserted = new
        .iter()
        .filter(|(k, m)| old.get(*k) != Some(*m))
        .map(|(_, m)| WatchEvent::Upsert(m.clone()));
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| WatchEvent::Remove(k.clone()));
    upserted.chain(removed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(port: u16) -> ServiceMetaInfo {
        ServiceMetaInfo::new("S", "1.0", "127.0.0.1", port)
    }

    #[test]
    fn diff_lists_upserts_then_removals() {
        let mut changed = meta(2);
        changed.weight = 7;
        let events = diff(
            &nodes(vec![meta(1), meta(2)]),
            &nodes(vec![changed.clone(), meta(3)]),
        );
        assert_eq!(
            events,
            vec![
                WatchEvent::Upsert(changed),
                WatchEvent::Upsert(meta(3)),
                WatchEvent::Remove(meta(1).node_key()),
            ]
        );
        assert!(diff(&nodes(vec![meta(1)]), &nodes(vec![meta(1)])).is_empty());
        assert_eq!(
            diff(&nodes(vec![meta(1)]), &Nodes::new()),
            vec![WatchEvent::Remove(meta(1).node_key())]
        );
    }
}
