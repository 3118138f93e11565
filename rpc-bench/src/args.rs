//! Command-line parsing: `--key value` or `--key=value`, a few flags.
//! Every bad input is a message, never a panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::orchestrate::RunArgs;
use crate::systems::System;
use crate::{ClientArgs, ServerArgs};

/// Largest accepted duration, warmup or lifetime.
const MAX_SECS: f64 = 24.0 * 3600.0;
/// Largest accepted in-flight level. The framework's client allows 1024
/// calls in flight per connection by default; beyond that calls queue.
const MAX_INFLIGHT: usize = 4096;
const MAX_REPEAT: usize = 100;

/// Which tokio runtime the server and client processes build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// `current_thread`.
    Current,
    /// `multi_thread` with one worker thread.
    Multi,
}

impl Flavour {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Current => "current",
            Flavour::Multi => "multi",
        }
    }

    /// A description for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Flavour::Current => "tokio current_thread runtime in each process",
            Flavour::Multi => "tokio multi_thread runtime with 1 worker thread in each process",
        }
    }
}

const FLAGS: &[&str] = &["--no-pin"];

/// Raw `--key value` pairs.
pub struct Args {
    values: BTreeMap<String, String>,
    flags: Vec<String>,
}

impl Args {
    /// Splits the arguments; rejects positional ones and repeats.
    pub fn parse(argv: &[String]) -> Result<Self, String> {
        let mut values = BTreeMap::new();
        let mut flags = Vec::new();
        let mut it = argv.iter();
        while let Some(a) = it.next() {
            if !a.starts_with("--") {
                return Err(format!("unexpected argument `{a}`"));
            }
            if FLAGS.contains(&a.as_str()) {
                flags.push(a.clone());
                continue;
            }
            let (key, value) = match a.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => {
                    let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                    (a.clone(), v.clone())
                }
            };
            if values.insert(key.clone(), value).is_some() {
                return Err(format!("{key} given twice"));
            }
        }
        Ok(Self { values, flags })
    }

    fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    fn flag(&mut self, key: &str) -> bool {
        let before = self.flags.len();
        self.flags.retain(|f| f != key);
        self.flags.len() != before
    }

    /// Fails on anything not consumed.
    fn finish(self) -> Result<(), String> {
        if let Some(k) = self.values.keys().next().or(self.flags.first()) {
            return Err(format!("unknown option {k}"));
        }
        Ok(())
    }

    fn secs(&mut self, key: &str, default: f64, allow_zero: bool) -> Result<Duration, String> {
        let Some(v) = self.take(key) else {
            return Ok(Duration::from_secs_f64(default));
        };
        let secs: f64 = v
            .trim()
            .parse()
            .map_err(|_| format!("{key}: `{v}` is not a number of seconds"))?;
        if !secs.is_finite() || secs < 0.0 || (secs == 0.0 && !allow_zero) || secs > MAX_SECS {
            let low = if allow_zero { "0" } else { "more than 0" };
            return Err(format!(
                "{key}: {v} is out of range ({low} to {MAX_SECS} seconds)"
            ));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    fn count(&mut self, key: &str, default: usize, max: usize) -> Result<usize, String> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => parse_count(key, &v, max),
        }
    }

    fn flavour(&mut self) -> Result<Flavour, String> {
        match self.take("--runtime").as_deref().map(str::trim) {
            None | Some("current") => Ok(Flavour::Current),
            Some("multi") => Ok(Flavour::Multi),
            Some(other) => Err(format!("--runtime: `{other}` is not `current` or `multi`")),
        }
    }

    fn system(&mut self) -> Result<System, String> {
        self.take("--system")
            .ok_or("--system is required (rpc, tarpc or echo)")?
            .parse()
    }

    /// `run`.
    pub fn into_run(mut self) -> Result<RunArgs, String> {
        let duration = self.secs("--duration", 5.0, false)?;
        let warmup = self.secs("--warmup", 1.0, true)?;
        let inflight = match self.take("--inflight") {
            None => vec![1, 32, 256],
            Some(v) => {
                let mut list = Vec::new();
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let n = parse_count("--inflight", part, MAX_INFLIGHT)?;
                    if !list.contains(&n) {
                        list.push(n);
                    }
                }
                if list.is_empty() {
                    return Err("--inflight: no level given".into());
                }
                list
            }
        };
        let systems = match self.take("--systems") {
            None => System::ALL.to_vec(),
            Some(v) => {
                let mut list = Vec::new();
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let s: System = part.parse().map_err(|e| format!("--systems: {e}"))?;
                    if !list.contains(&s) {
                        list.push(s);
                    }
                }
                if list.is_empty() {
                    return Err("--systems: no system given".into());
                }
                list
            }
        };
        let runtime = self.flavour()?;
        let repeat = self.count("--repeat", 1, MAX_REPEAT)?;
        let pin = !self.flag("--no-pin");
        let baseline = self.take("--baseline").map(PathBuf::from);
        let mut systems = systems;
        if baseline.is_some() && !systems.contains(&System::Baseline) {
            let at = systems
                .iter()
                .position(|&s| s == System::Rpc)
                .map_or(0, |i| i + 1);
            systems.insert(at, System::Baseline);
        }
        self.finish()?;
        Ok(RunArgs {
            duration,
            warmup,
            inflight,
            systems,
            runtime,
            repeat,
            pin,
            baseline,
        })
    }

    /// `server`.
    pub fn into_server(mut self) -> Result<ServerArgs, String> {
        let system = self.system()?;
        let runtime = self.flavour()?;
        let registry_dir = self.take("--registry-dir").map(PathBuf::from);
        let lifetime = self.secs("--lifetime", 600.0, false)?;
        self.finish()?;
        if system.is_rpc() && registry_dir.is_none() {
            return Err("--system rpc needs --registry-dir".into());
        }
        Ok(ServerArgs {
            system,
            runtime,
            registry_dir,
            lifetime,
        })
    }

    /// `client`.
    pub fn into_client(mut self) -> Result<ClientArgs, String> {
        let system = self.system()?;
        let addr_text = self.take("--addr").ok_or("--addr is required")?;
        let addr: SocketAddr = addr_text
            .trim()
            .parse()
            .map_err(|_| format!("--addr: `{addr_text}` is not an IP:port address"))?;
        let registry_dir = self.take("--registry-dir").map(PathBuf::from);
        let inflight = match self.take("--inflight") {
            Some(v) => parse_count("--inflight", &v, MAX_INFLIGHT)?,
            None => return Err("--inflight is required".into()),
        };
        let duration = self.secs("--duration", 5.0, false)?;
        let warmup = self.secs("--warmup", 1.0, true)?;
        let runtime = self.flavour()?;
        let setup_timeout = self.secs("--setup-timeout", 10.0, false)?;
        self.finish()?;
        if system.is_rpc() && registry_dir.is_none() {
            return Err("--system rpc needs --registry-dir".into());
        }
        Ok(ClientArgs {
            system,
            addr,
            registry_dir,
            inflight,
            duration,
            warmup,
            runtime,
            setup_timeout,
        })
    }
}

fn parse_count(key: &str, v: &str, max: usize) -> Result<usize, String> {
    let n: usize = v
        .trim()
        .parse()
        .map_err(|_| format!("{key}: `{v}` is not a whole number"))?;
    if n == 0 || n > max {
        return Err(format!("{key}: {n} is out of range (1 to {max})"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn run_defaults() {
        let run = Args::parse(&[]).and_then(Args::into_run).expect("parses");
        assert_eq!(run.inflight, vec![1, 32, 256]);
        assert_eq!(run.systems, System::ALL.to_vec());
        assert_eq!(run.duration, Duration::from_secs(5));
        assert_eq!(run.warmup, Duration::from_secs(1));
        assert_eq!(run.repeat, 1);
        assert!(run.pin);
    }

    #[test]
    fn run_options() {
        let run = Args::parse(&args(
            "--duration=2.5 --warmup 0 --inflight 4,4,8 --systems echo,tarpc --runtime multi --repeat 3 --no-pin",
        ))
        .and_then(Args::into_run)
        .expect("parses");
        assert_eq!(run.inflight, vec![4, 8]);
        assert_eq!(run.systems, vec![System::Echo, System::Tarpc]);
        assert_eq!(run.duration, Duration::from_millis(2500));
        assert_eq!(run.warmup, Duration::ZERO);
        assert_eq!(run.runtime, Flavour::Multi);
        assert_eq!(run.repeat, 3);
        assert!(!run.pin);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            "--duration",
            "--duration x",
            "--duration -1",
            "--duration 0",
            "--duration NaN",
            "--inflight 0",
            "--inflight 1,x",
            "--inflight ,",
            "--systems grpc",
            "--runtime fast",
            "--repeat 0",
            "--bogus 1",
            "positional",
            "--warmup 1 --warmup 2",
        ] {
            let r = Args::parse(&args(bad)).and_then(Args::into_run);
            assert!(r.is_err(), "{bad} was accepted");
        }
        assert!(
            Args::parse(&args("--system echo"))
                .and_then(Args::into_client)
                .is_err()
        );
        assert!(
            Args::parse(&args("--system rpc --addr 127.0.0.1:1 --inflight 1"))
                .and_then(Args::into_client)
                .is_err()
        );
        assert!(
            Args::parse(&args("--system rpc"))
                .and_then(Args::into_server)
                .is_err()
        );
        assert!(
            Args::parse(&args("--system echo --addr nowhere --inflight 1"))
                .and_then(Args::into_client)
                .is_err()
        );
    }
}
