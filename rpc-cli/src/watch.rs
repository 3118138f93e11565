//! `rpc watch [SERVICE]`: the registry's changes as they happen, one line
//! each, until Ctrl-C.
//!
//! Each service is followed with the backend's own watch (the same one a
//! consumer's cache uses), so a line appears as soon as the registry says
//! something: `present` for what was there when the watch opened, then
//! `added`, `updated`, `removed`, and `registry connection lost` / `back`.
//! Without SERVICE, the service list is read again every
//! [`RELIST`] and new services are followed too (at most [`MAX_WATCHES`]).
//! A watch that ends is opened again at the next look.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use rpc_core::{Discover, RpcConfig, ServiceMetaInfo, WatchEvent};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use crate::Output;
use crate::commands::{connect, service_key};
use crate::error::{CliError, code};
use crate::output;

/// How often the service list is read again (and ended watches reopened).
pub const RELIST: Duration = Duration::from_secs(2);
/// Most services followed at once.
pub const MAX_WATCHES: usize = 256;
/// Events waiting to be printed.
const QUEUE: usize = 256;

/// What a follower task tells the printer.
enum Note {
    Event(String, WatchEvent),
    Ended(String),
}

pub async fn run(config: &RpcConfig, service: Option<&str>, out: Output) -> Result<i32, CliError> {
    let registry = connect(config).await?;
    let only = match service {
        Some(s) => Some(service_key(s)?.into_string()),
        None => None,
    };
    // Opening the first watch reports an unreachable registry at once.
    let first: Vec<String> = match &only {
        Some(key) => vec![key.clone()],
        None => registry.services().await?,
    };
    let (tx, mut rx) = mpsc::channel::<Note>(QUEUE);
    // Owns every follower task: they stop when this function returns.
    let mut followers = JoinSet::new();
    // What each followed service's task is, to stop following a service
    // that left the registry (so churn does not use up MAX_WATCHES).
    let mut watched: HashMap<String, AbortHandle> = HashMap::new();
    // Services there when the watch began: their first instances are
    // `present`; a service found later has its instances `added`.
    let initial: HashSet<String> = first.iter().cloned().collect();
    let mut lists: BTreeMap<String, BTreeMap<String, ServiceMetaInfo>> = BTreeMap::new();
    let mut warned_full = false;
    let mut pending = first;
    let mut relist = tokio::time::interval(RELIST);
    relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Ctrl-C or SIGTERM (systemd, docker, `timeout`) ends the watch
    // cleanly, exit 0.
    let stop = rpc::shutdown_signal();
    tokio::pin!(stop);
    let mut opened_once = false;
    loop {
        for key in std::mem::take(&mut pending) {
            if watched.contains_key(&key) {
                continue;
            }
            if watched.len() >= MAX_WATCHES {
                if !std::mem::replace(&mut warned_full, true) {
                    eprintln!(
                        "rpc: following {MAX_WATCHES} services, the most it follows; others are not shown"
                    );
                }
                break;
            }
            let mut watch = match registry.watch(&key).await {
                Ok(w) => w,
                // The first failure is the answer; later ones are retried.
                Err(e) if !opened_once => return Err(e.into()),
                Err(_) => continue,
            };
            let tx = tx.clone();
            let name = key.clone();
            let task = followers.spawn(async move {
                while let Some(event) = watch.next().await {
                    if tx.send(Note::Event(name.clone(), event)).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Note::Ended(name)).await;
            });
            watched.insert(key, task);
        }
        opened_once = true;
        tokio::select! {
            () = &mut stop => return Ok(code::OK),
            note = rx.recv() => match note {
                Some(Note::Event(key, event)) => {
                    let opening = !lists.contains_key(&key) && initial.contains(&key);
                    let list = lists.entry(key.clone()).or_default();
                    for line in lines(&key, list, event, opening) {
                        print_line(&line, out);
                    }
                }
                Some(Note::Ended(key)) => {
                    watched.remove(&key);
                    print_line(&Line::status(&key, "watch ended; opening it again"), out);
                }
                // Unreachable while `tx` lives here.
                None => return Ok(code::OK),
            },
            _ = relist.tick() => {
                // Finished and stopped tasks leave their results behind.
                while followers.try_join_next().is_some() {}
                pending = match &only {
                    Some(key) => vec![key.clone()],
                    // A failed listing is retried at the next tick; the
                    // watches report the connection themselves.
                    None => match registry.services().await {
                        Ok(listed) => {
                            // Stop following services that left with no
                            // instance; they are followed again if they return.
                            let gone: Vec<String> = watched
                                .keys()
                                .filter(|k| !listed.contains(k))
                                .filter(|k| lists.get(*k).is_none_or(BTreeMap::is_empty))
                                .cloned()
                                .collect();
                            for key in gone {
                                if let Some(task) = watched.remove(&key) {
                                    task.abort();
                                }
                                lists.remove(&key);
                            }
                            listed
                        }
                        Err(_) => Vec::new(),
                    },
                };
            }
        }
    }
}

/// One printed line.
struct Line {
    service: String,
    what: &'static str,
    address: Option<String>,
    instance: Option<ServiceMetaInfo>,
}

impl Line {
    fn status(service: &str, what: &'static str) -> Self {
        Self {
            service: service.to_owned(),
            what,
            address: None,
            instance: None,
        }
    }

    fn instance(service: &str, what: &'static str, m: &ServiceMetaInfo) -> Self {
        Self {
            service: service.to_owned(),
            what,
            address: Some(m.address()),
            instance: Some(m.clone()),
        }
    }
}

/// The lines an event makes, given what the service listed so far
/// (`list`, by node key, updated here); `opening`: the service's first
/// event, whose instances were there before the watch.
fn lines(
    key: &str,
    list: &mut BTreeMap<String, ServiceMetaInfo>,
    event: WatchEvent,
    opening: bool,
) -> Vec<Line> {
    let mut out = Vec::new();
    let put = |out: &mut Vec<Line>,
               list: &mut BTreeMap<String, ServiceMetaInfo>,
               m: ServiceMetaInfo,
               first: bool| {
        match list.insert(m.node_key(), m.clone()) {
            None if first => out.push(Line::instance(key, "present", &m)),
            None => out.push(Line::instance(key, "added", &m)),
            Some(old) if old != m => out.push(Line::instance(key, "updated", &m)),
            Some(_) => {}
        }
    };
    match event {
        WatchEvent::Snapshot(snapshot) => {
            let keep: HashSet<String> = snapshot.iter().map(ServiceMetaInfo::node_key).collect();
            let gone: Vec<ServiceMetaInfo> = list
                .values()
                .filter(|m| !keep.contains(&m.node_key()))
                .cloned()
                .collect();
            for m in gone {
                list.remove(&m.node_key());
                out.push(Line::instance(key, "removed", &m));
            }
            for m in snapshot {
                put(&mut out, list, m, opening);
            }
        }
        WatchEvent::Upsert(m) => put(&mut out, list, m, false),
        WatchEvent::Remove(node) => {
            let address = node.rsplit_once('/').map_or(node.as_str(), |(_, a)| a);
            let mut line = Line::status(key, "removed");
            line.address = Some(address.to_owned());
            line.instance = list.remove(&node);
            out.push(line);
        }
        WatchEvent::Connected(false) => out.push(Line::status(key, "registry connection lost")),
        WatchEvent::Connected(true) => out.push(Line::status(key, "registry connection back")),
    }
    out
}

fn print_line(line: &Line, out: Output) {
    let time = output::now();
    let text = match out {
        Output::Json => json!({
            "time": time,
            "service": line.service,
            "event": line.what,
            "address": line.address,
            "instance": line.instance,
        })
        .to_string(),
        Output::Table => {
            let service = output::clean(&line.service);
            match &line.address {
                Some(a) => format!("{time}  {service}  {}  {}", line.what, output::clean(a)),
                None => format!("{time}  {service}  {}", line.what),
            }
        }
    };
    output::emit_line(&text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(port: u16) -> ServiceMetaInfo {
        ServiceMetaInfo::new("S", "1.0", "127.0.0.1", port)
    }

    fn whats(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| format!("{} {}", l.what, l.address.as_deref().unwrap_or("")))
            .collect()
    }

    #[test]
    fn events_become_lines() {
        let mut list = BTreeMap::new();
        let l = lines("S:1.0", &mut list, WatchEvent::Snapshot(vec![m(1)]), true);
        assert_eq!(whats(&l), ["present 127.0.0.1:1"]);
        let l = lines("S:1.0", &mut list, WatchEvent::Upsert(m(2)), false);
        assert_eq!(whats(&l), ["added 127.0.0.1:2"]);
        let mut heavier = m(2);
        heavier.weight = 7;
        let l = lines("S:1.0", &mut list, WatchEvent::Upsert(heavier), false);
        assert_eq!(whats(&l), ["updated 127.0.0.1:2"]);
        let l = lines(
            "S:1.0",
            &mut list,
            WatchEvent::Remove(m(1).node_key()),
            false,
        );
        assert_eq!(whats(&l), ["removed 127.0.0.1:1"]);
        let l = lines("S:1.0", &mut list, WatchEvent::Connected(false), false);
        assert_eq!(whats(&l), ["registry connection lost "]);
        // A resynchronising snapshot says what changed meanwhile.
        let l = lines("S:1.0", &mut list, WatchEvent::Snapshot(vec![m(3)]), false);
        assert_eq!(whats(&l), ["removed 127.0.0.1:2", "added 127.0.0.1:3"]);
    }
}
