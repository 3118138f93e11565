//! How much CPU *other* processes used while a run was going: the whole
//! machine's busy time (`/proc/stat`: user, nice, system, irq, softirq and
//! steal) minus this benchmark's own (the orchestrator plus its reaped
//! children, from `getrusage`). A run that shared its cores with a compiler
//! shows it here, and its numbers deserve less trust.

use std::time::Instant;

/// A point to measure from.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    at: Instant,
    busy: Option<f64>,
    ours: Option<f64>,
}

impl Snapshot {
    /// Now.
    pub fn take() -> Self {
        Self {
            at: Instant::now(),
            busy: machine_busy_secs(),
            ours: our_cpu_secs(),
        }
    }

    /// CPU used by other processes since this snapshot, in CPUs (0.25 = a
    /// quarter of one CPU on average). Call after the children are reaped.
    /// `None` where `/proc/stat` or `getrusage` is unavailable.
    pub fn others_since(&self) -> Option<f64> {
        let now = Snapshot::take();
        let wall = now.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return None;
        }
        let busy = now.busy? - self.busy?;
        let ours = now.ours? - self.ours?;
        Some(((busy - ours) / wall).max(0.0))
    }
}

fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user)
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| busy as f64 / hz as f64)
}

fn our_cpu_secs() -> Option<f64> {
    let secs = |who| {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::getrusage(who, &mut ru) };
        (rc == 0).then(|| {
            let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            t(ru.ru_utime) + t(ru.ru_stime)
        })
    };
    Some(secs(libc::RUSAGE_SELF)? + secs(libc::RUSAGE_CHILDREN)?)
}
