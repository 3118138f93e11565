//! `rpc-bench run`: for each in-flight level, repetition and system, start
//! the server and the client as separate processes (this binary, re-run
//! with `server` / `client`), pinned to CPU 0 and CPU 1, collect the
//! client's `RESULT` line, stop the server, and print the table.
//!
//! Every child is owned by a [`Child`] guard that kills it when dropped, so
//! an error anywhere leaves no process behind; every wait has a deadline.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::args::Flavour;
use crate::message::{self, BenchmarkMessage};
use crate::systems::System;
use crate::{cpuload, memory};

/// How long a server may take to print its address.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Discovery, connect and first call, inside the client.
const CLIENT_SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// After SIGTERM: the rpc provider deregisters and drains (nothing is in
/// flight by then); beyond this the server is killed.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(15);
const SERVER_CPU: &str = "0";
const CLIENT_CPU: &str = "1";

/// `rpc-bench run` options.
#[derive(Debug)]
pub struct RunArgs {
    pub duration: Duration,
    pub warmup: Duration,
    pub inflight: Vec<usize>,
    pub systems: Vec<System>,
    pub runtime: Flavour,
    pub repeat: usize,
    pub pin: bool,
    /// Another `rpc-bench` binary whose `rpc` system runs as `rpc@base`.
    pub baseline: Option<PathBuf>,
}

/// One client's `RESULT` line.
#[derive(Clone, Copy, Debug)]
struct Sample {
    qps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// CPUs' worth of time other processes used during the run.
    others: Option<f64>,
    /// Peak resident memory (VmHWM), KiB, of the server and the client.
    peak_kib: Option<(u64, u64)>,
    /// Resident memory growth, KiB, of the server and the client from
    /// shortly after the warmup to the end of the measured window.
    growth_kib: Option<(i64, i64)>,
    /// The client's own resident memory at the end, from its RESULT line.
    client_rss_kib: Option<u64>,
    client_hwm_kib: Option<u64>,
}

/// A child process, killed (and reaped) on drop unless it already exited.
struct Child {
    name: String,
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Child {
    fn spawn(name: String, mut cmd: Command) -> Result<Self, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the {name}: {e}"))?;
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self { name, child, lines })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, within `timeout`.
    fn line(&mut self, timeout: Duration) -> Result<String, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the {} printed nothing within {timeout:?}",
                self.name
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.wait_for(Duration::from_secs(1));
                Err(format!(
                    "the {} closed its output without printing a line ({})",
                    self.name,
                    describe(status)
                ))
            }
        }
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// SIGTERM, then up to `timeout` for a clean exit, else SIGKILL.
    fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        match i32::try_from(self.pid()) {
            // SAFETY: kill(2) with a pid of our own, still unreaped child
            // (try_wait above saw it running, so the pid is not recycled).
            Ok(pid) => unsafe {
                libc::kill(pid, libc::SIGTERM);
            },
            Err(_) => {
                let _ = self.child.kill();
            }
        }
        match self.wait_for(timeout) {
            Some(status) => Ok(status),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(format!(
                    "the {} did not exit within {timeout:?} of SIGTERM and was killed",
                    self.name
                ))
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => s.to_string(),
        None => "still running".into(),
    }
}

/// How children are pinned.
enum Pinning {
    Taskset,
    None(String),
}

impl Pinning {
    fn detect(wanted: bool) -> Self {
        if !wanted {
            return Pinning::None("disabled with --no-pin".into());
        }
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 {
            return Pinning::None(format!("only {cpus} CPU available"));
        }
        for cpu in [SERVER_CPU, CLIENT_CPU] {
            match Command::new("taskset")
                .args(["-c", cpu, "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
            {
                Ok(s) if s.success() => {}
                Ok(s) => {
                    return Pinning::None(format!("`taskset -c {cpu} true` failed ({s})"));
                }
                Err(e) => return Pinning::None(format!("taskset not usable: {e}")),
            }
        }
        Pinning::Taskset
    }

    fn command(&self, cpu: &str, exe: &Path) -> Command {
        match self {
            Pinning::Taskset => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu).arg(exe);
                c
            }
            Pinning::None(_) => Command::new(exe),
        }
    }

    fn describe(&self) -> String {
        match self {
            Pinning::Taskset => {
                format!("server pinned to CPU {SERVER_CPU}, client to CPU {CLIENT_CPU} (taskset)")
            }
            Pinning::None(why) => format!("NOT pinned: {why}"),
        }
    }
}

/// Runs the whole matrix and prints the table. Failed cells are reported
/// and the others still run.
pub fn run(a: &RunArgs) -> Result<(), String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable to re-run it: {e}"))?;
    let sample = BenchmarkMessage::sample();
    let size = message::encoded_len(&sample)
        .map_err(|e| format!("cannot encode the benchmark message: {e}"))?;
    let pinning = Pinning::detect(a.pin);
    let machine = machine(a, &pinning, size);
    for line in &machine {
        eprintln!("{line}");
    }
    let total = a.inflight.len() * a.repeat * a.systems.len();
    let estimate = (a.warmup + a.duration + Duration::from_millis(700)) * total as u32;
    eprintln!("{total} runs, about {}s in all\n", estimate.as_secs());

    let mut cells: BTreeMap<(usize, usize), Vec<Result<Sample, String>>> = BTreeMap::new();
    let mut n = 0;
    for (li, &inflight) in a.inflight.iter().enumerate() {
        for rep in 0..a.repeat {
            // Systems interleaved within a repetition, so slow drift of the
            // machine affects them alike.
            for (si, &system) in a.systems.iter().enumerate() {
                n += 1;
                let result = run_one(a, &exe, &pinning, system, inflight);
                match &result {
                    Ok(s) => eprintln!(
                        "[{n}/{total}] {system:<5} inflight={inflight:<4} rep={}: qps={:.0} p50={:.1}us p99={:.1}us others={}{}",
                        rep + 1,
                        s.qps,
                        s.p50_us,
                        s.p99_us,
                        percent(s.others),
                        if s.errors > 0 {
                            format!(" ERRORS={}", s.errors)
                        } else {
                            String::new()
                        }
                    ),
                    Err(e) => eprintln!(
                        "[{n}/{total}] {system:<5} inflight={inflight:<4} rep={}: FAILED: {e}",
                        rep + 1
                    ),
                }
                cells.entry((li, si)).or_default().push(result);
            }
        }
    }

    println!();
    for line in &machine {
        println!("{line}  ");
    }
    println!();
    print!("{}", table(a, &cells));
    println!("\nLoad average at the end: {}  ", loadavg());
    let mut others: Vec<f64> = cells
        .values()
        .flatten()
        .filter_map(|r| r.as_ref().ok().and_then(|s| s.others))
        .collect();
    if !others.is_empty() {
        let worst = others.iter().copied().fold(0.0, f64::max);
        let mid = median(&mut others);
        println!(
            "CPU used by other processes during the runs: median {}, worst {} of one CPU{}",
            percent(Some(mid)),
            percent(Some(worst)),
            if worst > DISTURBED {
                " (runs above ~5 % were disturbed: rerun on a quiet machine or use --repeat)"
            } else {
                ""
            }
        );
    }
    let failures: Vec<String> = cells
        .iter()
        .flat_map(|(&(li, si), results)| {
            results.iter().filter_map(move |r| {
                r.as_ref()
                    .err()
                    .map(|e| format!("- {} at {} in flight: {e}", a.systems[si], a.inflight[li]))
            })
        })
        .collect();
    let with_errors: Vec<String> = cells
        .iter()
        .flat_map(|(&(li, si), results)| {
            results.iter().filter_map(move |r| match r {
                Ok(s) if s.errors > 0 => Some(format!(
                    "- {} at {} in flight: {} failed calls in the measured window",
                    a.systems[si], a.inflight[li], s.errors
                )),
                _ => None,
            })
        })
        .collect();
    if !failures.is_empty() || !with_errors.is_empty() {
        println!("\nProblems:\n");
        for f in failures.iter().chain(&with_errors) {
            println!("{f}");
        }
    }
    if failures.len() == total {
        return Err("every run failed".into());
    }
    Ok(())
}

/// One server + client pair.
fn run_one(
    a: &RunArgs,
    exe: &Path,
    pinning: &Pinning,
    system: System,
    inflight: usize,
) -> Result<Sample, String> {
    // The baseline is the `rpc` system of another binary.
    let (exe, system_arg) = match (system, &a.baseline) {
        (System::Baseline, Some(path)) => (path.as_path(), System::Rpc.name()),
        (System::Baseline, None) => return Err("rpc@base needs --baseline PATH".into()),
        _ => (exe, system.name()),
    };
    let registry = match system {
        _ if system.is_rpc() => Some(
            tempfile::Builder::new()
                .prefix("rpc-bench-registry-")
                .tempdir()
                .map_err(|e| format!("cannot create a registry directory: {e}"))?,
        ),
        _ => None,
    };
    let registry_dir: Option<PathBuf> = registry.as_ref().map(|d| d.path().to_path_buf());
    let load = cpuload::Snapshot::take();
    // The server outlives a normal run comfortably, but not forever if this
    // process dies without stopping it.
    let lifetime = a.warmup + a.duration + Duration::from_secs(120);

    let mut cmd = pinning.command(SERVER_CPU, exe);
    cmd.args([
        "server",
        "--system",
        system_arg,
        "--runtime",
        a.runtime.name(),
    ])
    .arg("--lifetime")
    .arg(lifetime.as_secs().to_string());
    if let Some(dir) = &registry_dir {
        cmd.arg("--registry-dir").arg(dir);
    }
    let mut server = Child::spawn(format!("{system} server"), cmd)?;
    let line = server.line(SERVER_READY_TIMEOUT)?;
    let addr: SocketAddr = line
        .trim()
        .parse()
        .map_err(|_| format!("the {system} server printed `{line}` instead of its address"))?;

    let mut cmd = pinning.command(CLIENT_CPU, exe);
    cmd.args([
        "client",
        "--system",
        system_arg,
        "--runtime",
        a.runtime.name(),
    ])
    .arg("--addr")
    .arg(addr.to_string())
    .arg("--inflight")
    .arg(inflight.to_string())
    .arg("--duration")
    .arg(a.duration.as_secs_f64().to_string())
    .arg("--warmup")
    .arg(a.warmup.as_secs_f64().to_string())
    .arg("--setup-timeout")
    .arg(CLIENT_SETUP_TIMEOUT.as_secs_f64().to_string());
    if let Some(dir) = &registry_dir {
        cmd.arg("--registry-dir").arg(dir);
    }
    let mut client = Child::spawn(format!("{system} client"), cmd)?;
    // Resident memory once the warmup is over (set-up takes well under the
    // extra second), the baseline of the growth column.
    std::thread::sleep(a.warmup + Duration::from_secs(1));
    let rss_at_start = (
        memory::status_kib(Some(server.pid()), "VmRSS"),
        memory::status_kib(Some(client.pid()), "VmRSS"),
    );
    let bound = CLIENT_SETUP_TIMEOUT * 3 + a.warmup + a.duration + Duration::from_secs(10);
    let status = client.wait_for(bound).ok_or_else(|| {
        format!("the {system} client did not finish within {bound:?} and was killed")
    })?;
    // The reader thread ends at EOF, which follows the exit.
    let mut result = None;
    while let Ok(line) = client.lines.recv_timeout(Duration::from_secs(2)) {
        if line.starts_with("RESULT ") {
            result = Some(line);
        }
    }
    let server_rss = memory::status_kib(Some(server.pid()), "VmRSS");
    let server_hwm = memory::status_kib(Some(server.pid()), "VmHWM");
    let stopped = server.terminate(SERVER_STOP_TIMEOUT);
    let others = load.others_since();
    drop(registry);

    if !status.success() {
        return Err(format!("the {system} client exited with {status}"));
    }
    let line = result.ok_or_else(|| format!("the {system} client printed no RESULT line"))?;
    let mut sample = parse_result(&line)?;
    sample.others = others;
    if let (Some(s), Some(c)) = (server_hwm, sample.client_hwm_kib) {
        sample.peak_kib = Some((s, c));
    }
    if let ((Some(s0), Some(c0)), Some(s1), Some(c1)) =
        (rss_at_start, server_rss, sample.client_rss_kib)
    {
        let grew = |a: u64, b: u64| {
            i64::try_from(b).unwrap_or(i64::MAX) - i64::try_from(a).unwrap_or(i64::MAX)
        };
        sample.growth_kib = Some((grew(s0, s1), grew(c0, c1)));
    }
    match stopped {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("warning: the {system} server exited with {s} after SIGTERM"),
        Err(e) => eprintln!("warning: {e}"),
    }
    Ok(sample)
}

fn parse_result(line: &str) -> Result<Sample, String> {
    let mut fields = BTreeMap::new();
    for kv in line.split_whitespace().skip(1) {
        if let Some((k, v)) = kv.split_once('=') {
            fields.insert(k, v);
        }
    }
    let num = |k: &str| -> Result<f64, String> {
        fields
            .get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("RESULT line without a numeric `{k}`: {line}"))
    };
    Ok(Sample {
        qps: num("qps")?,
        p50_us: num("p50_us")?,
        p99_us: num("p99_us")?,
        errors: num("errors")? as u64,
        others: None,
        peak_kib: None,
        growth_kib: None,
        client_rss_kib: num("rss_kib").ok().map(|v| v as u64),
        client_hwm_kib: num("hwm_kib").ok().map(|v| v as u64),
    })
}

fn first_line_with(path: &str, prefix: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn machine(a: &RunArgs, pinning: &Pinning, size: usize) -> Vec<String> {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let model = first_line_with("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let build = if cfg!(debug_assertions) {
        "DEBUG build: numbers are meaningless, use --release"
    } else {
        "release build"
    };
    vec![
        format!(
            "Machine: nproc={cpus}, CPU: {model}, Linux {kernel}, load average at start: {}",
            loadavg()
        ),
        format!("Runtime: {}", a.runtime.describe()),
        format!("Pinning: {}", pinning.describe()),
        format!(
            "Payload: BenchmarkMessage, {size} bytes with bincode 2 standard (tarpc, echo; rpc uses its default serializer, postcard, unless the system names one); one TCP connection per system over loopback"
        ),
        format!(
            "Per run: {}s warmup + {}s measured; {} run(s) per cell{}; {build}",
            a.warmup.as_secs_f64(),
            a.duration.as_secs_f64(),
            a.repeat,
            if a.repeat > 1 {
                ", cells show median (min-max)"
            } else {
                ""
            }
        ),
    ]
}

/// Other processes' CPU use above which a run counts as disturbed.
const DISTURBED: f64 = 0.05;

fn percent(x: Option<f64>) -> String {
    match x {
        Some(x) => format!("{:.0}%", x * 100.0),
        None => "n/a".into(),
    }
}

/// The 1-minute load average: other work on the machine skews the numbers.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median, min and max of one statistic over a cell's successful runs.
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> Option<Stat> {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    if v.is_empty() {
        return None;
    }
    let median = median(&mut v);
    Some(Stat {
        median,
        min: v[0],
        max: v[v.len() - 1],
    })
}

/// Worst (largest) value of an optional statistic over a cell's runs.
fn stat_opt(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    samples.iter().filter_map(f).reduce(f64::max)
}

fn show(s: &Option<Stat>, repeat: usize, decimals: usize) -> String {
    match s {
        None => "FAILED".into(),
        Some(s) if repeat > 1 => format!(
            "{:.d$} ({:.d$}–{:.d$})",
            s.median,
            s.min,
            s.max,
            d = decimals
        ),
        Some(s) => format!("{:.d$}", s.median, d = decimals),
    }
}

fn table(a: &RunArgs, cells: &BTreeMap<(usize, usize), Vec<Result<Sample, String>>>) -> String {
    let echo = a.systems.iter().position(|&s| s == System::Echo);
    let mut out = String::from(
        "| system | in flight | QPS | p50 µs | p99 µs | QPS vs echo | p99 vs echo | peak RSS MiB server / client | RSS growth KiB server / client | others' CPU |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ok = |li: usize, si: usize| -> Vec<Sample> {
        cells
            .get(&(li, si))
            .map(|v| v.iter().filter_map(|r| r.as_ref().ok().copied()).collect())
            .unwrap_or_default()
    };
    for (li, &inflight) in a.inflight.iter().enumerate() {
        let base = echo.map(|ei| ok(li, ei));
        let base_qps = base.as_deref().and_then(|b| stat(b, |s| s.qps));
        let base_p99 = base.as_deref().and_then(|b| stat(b, |s| s.p99_us));
        for (si, &system) in a.systems.iter().enumerate() {
            let samples = ok(li, si);
            let runs = cells.get(&(li, si)).map_or(0, Vec::len);
            let failed = runs - samples.len();
            let qps = stat(&samples, |s| s.qps);
            let p50 = stat(&samples, |s| s.p50_us);
            let p99 = stat(&samples, |s| s.p99_us);
            let ratio = |x: &Option<Stat>, b: &Option<Stat>| match (x, b) {
                (Some(x), Some(b)) if b.median > 0.0 => format!("{:.2}×", x.median / b.median),
                _ => "n/a".into(),
            };
            let mut name = system.to_string();
            if failed > 0 && !samples.is_empty() {
                name.push_str(&format!(" ({failed}/{runs} runs failed)"));
            }
            // Memory: the worst over the repetitions.
            let peak = samples
                .iter()
                .filter_map(|s| s.peak_kib)
                .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
                .map_or("n/a".into(), |(s, c)| {
                    format!("{:.1} / {:.1}", s as f64 / 1024.0, c as f64 / 1024.0)
                });
            let growth = samples
                .iter()
                .filter_map(|s| s.growth_kib)
                .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
                .map_or("n/a".into(), |(s, c)| format!("{s:+} / {c:+}"));
            out.push_str(&format!(
                "| {name} | {inflight} | {} | {} | {} | {} | {} | {peak} | {growth} | {} |\n",
                show(&qps, a.repeat, 0),
                show(&p50, a.repeat, 1),
                show(&p99, a.repeat, 1),
                ratio(&qps, &base_qps),
                ratio(&p99, &base_p99),
                percent(stat_opt(&samples, |s| s.others)),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        let s = parse_result(
            "RESULT system=rpc inflight=32 calls=10 qps=2.5 p50_us=10.0 p90_us=1 p99_us=20.5 p999_us=1 max_us=1 mean_us=1 errors=0 errors_total=0",
        )
        .expect("parses");
        assert_eq!(s.qps, 2.5);
        assert_eq!(s.p99_us, 20.5);
        assert!(parse_result("RESULT system=rpc").is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
