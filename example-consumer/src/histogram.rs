//! A fixed-size latency histogram: log-linear buckets (16 per power of two)
//! from 1 µs to ~1 h, so memory stays constant however long the run.

use std::time::Duration;

const SUB: usize = 16;
const POWERS: usize = 32;

pub(crate) struct Histogram {
    buckets: Box<[u64; SUB * POWERS]>,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: Box::new([0; SUB * POWERS]),
            count: 0,
        }
    }
}

fn index(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let power = 63 - us.leading_zeros() as usize; // >= 4
    let sub = ((us >> (power - 4)) & (SUB as u64 - 1)) as usize;
    ((power - 3) * SUB + sub).min(SUB * POWERS - 1)
}

fn lower_bound(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let power = i / SUB + 3;
    let sub = (i % SUB) as u64;
    (1u64 << power) + (sub << (power - 4))
}

impl Histogram {
    pub(crate) fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[index(us)] += 1;
        self.count += 1;
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
    }

    /// The lower bound (µs) of the bucket holding quantile `q`; 0 if empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= target {
                return lower_bound(i);
            }
        }
        lower_bound(SUB * POWERS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for us in [0u64, 1, 15, 16, 17, 100, 1000, 75_000, 10_000_000] {
            let i = index(us);
            assert!(i >= last);
            last = i;
            let lb = lower_bound(i);
            assert!(lb <= us, "{us}: {lb}");
            assert!(us - lb <= us / 16 + 1, "{us}: {lb}");
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.quantile(0.5), 50);
        assert!((96..=99).contains(&h.quantile(0.99)));
    }
}
