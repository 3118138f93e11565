//! Weighted random: a pick in proportion to the instances' `weight`.

use super::{Instance, LoadBalancer, Pick, Prepared, random_below};

/// A random pick in proportion to each instance's registered `weight`
/// (weight 0 counts as 1, so no instance becomes unreachable). The running
/// sum of weights is prepared once per discovery change; a pick is one
/// binary search.
#[derive(Debug, Default, Clone, Copy)]
pub struct Weighted;

/// Running sum of weights, per instance.
struct Cumulative(Vec<u64>);

impl LoadBalancer for Weighted {
    fn name(&self) -> &str {
        "weighted"
    }

    fn prepare(&self, instances: &[Instance]) -> Prepared {
        let mut sum = 0u64;
        Prepared::new(Cumulative(
            instances
                .iter()
                .map(|i| {
                    sum += u64::from(i.meta.weight.max(1));
                    sum
                })
                .collect(),
        ))
    }

    fn pick(&self, pick: &Pick<'_>) -> usize {
        let n = pick.len();
        match pick.prepared::<Cumulative>() {
            Some(Cumulative(sums)) if sums.last().is_some_and(|&t| t > 0) => {
                let r = random_below(sums[sums.len() - 1]);
                sums.partition_point(|&x| x <= r).min(n - 1)
            }
            _ => random_below(n as u64) as usize,
        }
    }
}
