//! Power of two choices: the less loaded of two random instances.

use super::{LoadBalancer, Pick, random_below};

/// Picks two distinct instances at random and takes the one with fewer
/// calls in flight, then the lower latency average (Mitzenmacher's "power
/// of two choices": near-best balance without a global view). A fresh
/// instance beats one that is ejected or already tried.
#[derive(Debug, Default, Clone, Copy)]
pub struct P2c;

impl LoadBalancer for P2c {
    fn name(&self) -> &str {
        "p2c"
    }

    fn pick(&self, pick: &Pick<'_>) -> usize {
        let n = pick.len();
        if n == 1 {
            return 0;
        }
        let a = random_below(n as u64) as usize;
        let b = (a + 1 + random_below(n as u64 - 1) as usize) % n;
        match (pick.is_fresh(a), pick.is_fresh(b)) {
            (true, false) => a,
            (false, true) => b,
            _ => {
                let inst = pick.instances();
                let (ea, eb) = (&inst[a].endpoint, &inst[b].endpoint);
                let (la, lb) = (ea.in_flight(), eb.in_flight());
                if la != lb {
                    if la < lb { a } else { b }
                } else if ea.latency_ewma() <= eb.latency_ewma() {
                    a
                } else {
                    b
                }
            }
        }
    }
}
