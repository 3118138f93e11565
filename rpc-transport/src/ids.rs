//! Maps keyed by request id.
//!
//! Request ids are sequential u64s chosen by us, not attacker-chosen keys
//! (a peer can only make us look up ids we issued, or ids it sent us, which
//! it could send anyway): SipHash's protection buys nothing here and costs
//! on every call. A Fibonacci multiply spreads sequential ids over the
//! table's bits.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from request id to `V`.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Hashes one u64 by a multiply; other inputs fold in byte by byte.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_spread_and_round_trip() {
        let mut m: IdMap<u64> = IdMap::default();
        for id in 0..10_000u64 {
            m.insert(id, id * 2);
        }
        assert!((0..10_000u64).all(|id| m.get(&id) == Some(&(id * 2))));
        let top_bits: std::collections::HashSet<u64> = (0..128u64)
            .map(|id| {
                let mut h = IdHasher::default();
                h.write_u64(id);
                h.finish() >> 57
            })
            .collect();
        assert!(top_bits.len() > 60, "ids do not spread: {}", top_bits.len());
    }
}
