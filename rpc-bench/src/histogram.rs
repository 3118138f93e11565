//! A fixed-size log-linear latency histogram (HdrHistogram-style), in
//! nanoseconds: exact below 256 ns, then 128 linear sub-buckets per power of
//! two (relative error under 0.8 %), up to 2^41 ns (about 36 minutes);
//! larger values are clamped. 4,480 counters, allocated once.

use std::time::Duration;

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS; // 128
/// Values below this get one bucket each.
const EXACT: u64 = 2 * SUB; // 256
/// Highest recordable bit position (values clamp to 2^(MAX_BIT+1) - 1).
const MAX_BIT: u32 = 40;
const MAX_VALUE: u64 = (1 << (MAX_BIT + 1)) - 1;
const BUCKETS: usize = EXACT as usize + (MAX_BIT - SUB_BITS) as usize * SUB as usize;

/// Latency counts; see the module docs.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("max_ns", &self.max)
            .finish_non_exhaustive()
    }
}

fn index(v: u64) -> usize {
    let v = v.min(MAX_VALUE);
    if v < EXACT {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= 8
    let shift = msb - SUB_BITS; // >= 1
    let top = v >> shift; // in [128, 256)
    EXACT as usize + (shift as usize - 1) * SUB as usize + (top - SUB) as usize
}

/// The midpoint of bucket `i`'s value range.
fn value_of(i: usize) -> u64 {
    let i = i as u64;
    if i < EXACT {
        return i;
    }
    let shift = (i - EXACT) / SUB + 1;
    let top = (i - EXACT) % SUB + SUB;
    let low = top << shift;
    low + ((1u64 << shift) - 1) / 2
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            max: 0,
            sum: 0,
        }
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
        self.sum += u128::from(ns);
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += *b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest recorded value, in nanoseconds.
    pub fn max_ns(&self) -> u64 {
        self.max
    }

    /// Mean, in nanoseconds (0 when empty).
    pub fn mean_ns(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1), in nanoseconds: the smallest
    /// bucket whose cumulative count reaches `ceil(q * count)`. 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value_of(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_monotonic_and_in_range() {
        let mut last = 0;
        let mut v = 0u64;
        while v < MAX_VALUE {
            let i = index(v);
            assert!(i >= last, "index({v}) = {i} < {last}");
            assert!(i < BUCKETS);
            last = i;
            v = v + 1 + v / 97;
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn relative_error_is_small() {
        for v in [
            1u64,
            255,
            256,
            257,
            1_000,
            12_345,
            999_999,
            123_456_789,
            1 << 40,
        ] {
            let back = value_of(index(v));
            let err = (back as f64 - v as f64).abs() / v as f64;
            assert!(err < 0.008, "{v} -> {back} ({err})");
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile_ns(0.5) as f64 / 1000.0;
        let p99 = h.quantile_ns(0.99) as f64 / 1000.0;
        assert!((p50 - 50.0).abs() < 0.5, "{p50}");
        assert!((p99 - 99.0).abs() < 1.0, "{p99}");
        let mut other = Histogram::new();
        other.record(Duration::from_millis(5));
        h.merge(&other);
        assert_eq!(h.count(), 101);
        assert_eq!(h.max_ns(), 5_000_000);
    }
}
