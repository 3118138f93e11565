//! Which host a provider publishes in the registry (issue 12, fault 5).
//!
//! The rule, applied once at startup by [`advertised_host`]:
//!
//! 1. `server.advertise_host`, when set, is published (parsed: any spelling
//!    of an address is published in its standard form). It must not be the
//!    wildcard, nor loopback while the registry is not on loopback.
//! 2. Otherwise `server.host` is published when it names one address. If it
//!    is loopback and the registry is not on loopback, startup fails naming
//!    `server.advertise_host`: other hosts would read an address they cannot
//!    dial.
//! 3. A wildcard `server.host` (`0.0.0.0`, `::`, in any spelling) publishes
//!    the address of the interface that routes to the registry: the address
//!    the registry's host (and, usually, its other clients) reach this host
//!    at. With the registry on loopback, that is loopback.
//! 4. With the `local` and `memory` registries, which are on this host by
//!    construction, `server.host` is published as parsed, and a wildcard as
//!    `127.0.0.1` (with a warning), as before.
//!
//! Looking up the route sends no packet: connecting a UDP socket only asks
//! the kernel which source address it would use.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rpc_core::{ConfigError, Host, RegistryKind, RpcConfig};
use tracing::{info, warn};

use crate::error::Error;

/// Where the configuration came from, for errors: the provider only has
/// the parsed configuration.
const ORIGIN: &str = "the provider's configuration";

fn refuse(message: String) -> Error {
    Error::Config(ConfigError {
        origin: ORIGIN.into(),
        key: "server.advertise_host".into(),
        message,
        source: None,
    })
}

/// The host to publish for this provider; see the module docs.
pub(crate) async fn advertised_host(config: &RpcConfig) -> Result<String, Error> {
    let server = &config.server;
    let on_this_host = matches!(
        config.registry.kind,
        RegistryKind::Local | RegistryKind::Memory
    );
    if let Some(explicit) = &server.advertise_host {
        // The load-time check, again for a configuration built in code.
        rpc_core::config::check_advertise_host(explicit).map_err(refuse)?;
        let host = Host::parse(explicit);
        if host.is_loopback() && !on_this_host {
            let registry = registry_ips(config).await;
            if !all_loopback(&registry) {
                return Err(refuse(format!(
                    "`{explicit}` is a loopback address, and the registry ({}) is not on loopback: consumers on other hosts could not reach this provider",
                    config.registry.address.as_slice().join(", ")
                )));
            }
        }
        return Ok(host.to_string());
    }
    let bind = Host::parse(&server.host);
    if on_this_host {
        if bind.is_unspecified() {
            warn!(
                host = %server.host,
                "server.host is a wildcard and server.advertise_host is unset: advertising 127.0.0.1"
            );
            return Ok("127.0.0.1".to_owned());
        }
        return Ok(bind.to_string());
    }
    // A name or a routable address is published as it is: only the
    // wildcard and loopback need to know where the registry is.
    if !bind.is_unspecified() && !bind.is_loopback() {
        return Ok(bind.to_string());
    }
    let registry = registry_ips(config).await;
    if bind.is_unspecified() {
        // An IPv4 wildcard listens on IPv4 only: publishing the address of
        // an IPv6 route (a registry at `localhost`, resolved to `::1`
        // first) would publish an address nothing listens on.
        let v4_only = matches!(bind, Host::Ip(IpAddr::V4(_)));
        let Some(target) = registry.iter().copied().find(|a| !v4_only || a.is_ipv4()) else {
            return Err(refuse(format!(
                "unset, and server.host `{}` is a wildcard: the registry address ({}) does not resolve (to an address of the bound family), so the address other hosts reach this provider at is unknown; set it",
                server.host,
                config.registry.address.as_slice().join(", ")
            )));
        };
        let ip = route_source(target).map_err(|e| {
            refuse(format!(
                "unset, and server.host `{}` is a wildcard: no route to the registry at {target} to take this host's address from ({e}); set it",
                server.host
            ))
        })?;
        let host = Host::Ip(ip);
        info!(%host, registry = %target, "server.host is a wildcard: advertising the address of the interface that routes to the registry");
        return Ok(host.to_string());
    }
    if bind.is_loopback() && !all_loopback(&registry) {
        return Err(refuse(format!(
            "unset, so server.host `{}` would be published, a loopback address, while the registry ({}) is not on loopback: consumers on other hosts could not reach it; set server.advertise_host, or bind a reachable address or the wildcard",
            server.host,
            config.registry.address.as_slice().join(", ")
        )));
    }
    Ok(bind.to_string())
}

/// Whether every registry address is loopback (and there is one).
fn all_loopback(ips: &[SocketAddr]) -> bool {
    !ips.is_empty() && ips.iter().all(|a| Host::Ip(a.ip()).is_loopback())
}

/// The registry's addresses, resolved: `scheme://host:port/path` or
/// `host:port` or `host`, each bounded by `registry.timeout_ms`. Addresses
/// that do not resolve are left out.
async fn registry_ips(config: &RpcConfig) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for raw in config.registry.address.as_slice() {
        let (host, port) = split_address(raw);
        let lookup = tokio::net::lookup_host(host.with_port(port));
        let bound = config.registry.timeout().min(Duration::from_secs(5));
        if let Ok(Ok(found)) = tokio::time::timeout(bound, lookup).await {
            out.extend(found);
        }
    }
    out
}

/// `(host, port)` of one registry address; port 9 (discard) when none is
/// given, for the route lookup only.
fn split_address(raw: &str) -> (Host, u16) {
    let s = raw.trim();
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let s = s.split('/').next().unwrap_or(s);
    // user:password@host:port
    let s = s.rsplit_once('@').map_or(s, |(_, rest)| rest);
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((h, tail)) = rest.split_once(']') {
            let port = tail
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(9);
            return (Host::parse(h), port);
        }
    }
    match s.rsplit_once(':') {
        // Exactly one colon: host:port. More: a bare IPv6 address.
        Some((h, p)) if !h.contains(':') => (Host::parse(h), p.parse().unwrap_or(9)),
        _ => (Host::parse(s), 9),
    }
}

/// The source address the kernel would use to reach `target`.
fn route_source(target: SocketAddr) -> std::io::Result<IpAddr> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (IpAddr::from([0u8; 4]), 0).into(),
        SocketAddr::V6(_) => (IpAddr::from([0u16; 8]), 0).into(),
    };
    let socket = std::net::UdpSocket::bind(local)?;
    let mut target = target;
    if target.port() == 0 {
        target.set_port(9);
    }
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(host: &str, advertise: Option<&str>, kind: &str, address: &str) -> RpcConfig {
        let mut text = format!("[server]\nhost = \"{host}\"\n");
        if let Some(a) = advertise {
            text.push_str(&format!("advertise_host = \"{a}\"\n"));
        }
        text.push_str(&format!("[registry]\ntype = \"{kind}\"\n"));
        if !address.is_empty() {
            text.push_str(&format!("address = \"{address}\"\n"));
        }
        RpcConfig::from_toml_str(&text, "t").unwrap()
    }

    async fn advertised(c: &RpcConfig) -> Result<String, String> {
        advertised_host(c).await.map_err(|e| e.to_string())
    }

    #[test]
    fn registry_addresses_split_into_host_and_port() {
        let s = |raw| {
            let (h, p) = split_address(raw);
            (h.to_string(), p)
        };
        assert_eq!(s("127.0.0.1:2379"), ("127.0.0.1".into(), 2379));
        assert_eq!(s("http://10.0.0.5:8500"), ("10.0.0.5".into(), 8500));
        assert_eq!(
            s("https://u:p@db.example:8848/nacos"),
            ("db.example".into(), 8848)
        );
        assert_eq!(s("[::1]:2181/chroot"), ("[::1]".into(), 2181));
        assert_eq!(s("::1"), ("[::1]".into(), 9));
        assert_eq!(s("zk1"), ("zk1".into(), 9));
    }

    /// Every spelling of the wildcard, with a registry on loopback (the
    /// test machine's servers): loopback is published, never the spelling.
    #[tokio::test]
    async fn a_wildcard_with_a_loopback_registry_advertises_loopback() {
        for host in [
            "0.0.0.0",
            "::",
            "::0",
            "[::]",
            "0:0:0:0:0:0:0:0",
            "0.0.0.00",
        ] {
            let c = config(host, None, "etcd", "127.0.0.1:2379");
            let got = advertised(&c).await.unwrap();
            assert!(
                Host::parse(&got).is_loopback(),
                "{host:?} advertised {got:?}"
            );
        }
    }

    /// A registry elsewhere: a wildcard advertises this host's address on
    /// the route to it, the kernel's own answer (192.0.2.0/24 is the
    /// documentation range; no packet is sent).
    #[tokio::test]
    async fn a_wildcard_with_a_remote_registry_advertises_a_reachable_address() {
        let target: SocketAddr = "192.0.2.200:2379".parse().unwrap();
        let Ok(expected) = route_source(target) else {
            // No route there at all on this machine: the error names the
            // key to set.
            let c = config("0.0.0.0", None, "etcd", "192.0.2.200:2379");
            let e = advertised(&c).await.unwrap_err();
            assert!(e.contains("server.advertise_host"), "{e}");
            return;
        };
        assert!(!expected.is_loopback() && !expected.is_unspecified());
        for host in ["0.0.0.0", "0.0.0.00"] {
            let c = config(host, None, "etcd", "192.0.2.200:2379");
            assert_eq!(
                advertised(&c).await.unwrap(),
                Host::Ip(expected).to_string(),
                "{host:?}"
            );
        }
    }

    /// An IPv4 wildcard never publishes an IPv6 route's address.
    #[tokio::test]
    async fn an_ipv4_wildcard_takes_the_ipv4_route() {
        let c = config("0.0.0.0", None, "etcd", "localhost:2379");
        assert_eq!(advertised(&c).await.unwrap(), "127.0.0.1");
        let c = config("0.0.0.0", None, "etcd", "[::1]:2379");
        let e = advertised(&c).await.unwrap_err();
        assert!(e.contains("server.advertise_host"), "{e}");
        let c = config("::", None, "etcd", "[::1]:2379");
        assert_eq!(advertised(&c).await.unwrap(), "[::1]");
    }

    #[tokio::test]
    async fn loopback_into_a_remote_registry_fails_naming_advertise_host() {
        // The default server.host.
        let c = config("127.0.0.1", None, "etcd", "192.0.2.200:2379");
        let e = advertised(&c).await.unwrap_err();
        assert!(e.contains("server.advertise_host"), "{e}");
        let c = config(
            "0.0.0.0",
            Some("127.0.0.1"),
            "consul",
            "http://192.0.2.200:8500",
        );
        let e = advertised(&c).await.unwrap_err();
        assert!(e.contains("server.advertise_host"), "{e}");
        // (A configuration file with it fails to load; one built in code
        // meets this check.)
        let mut c = config("0.0.0.0", None, "etcd", "127.0.0.1:2379");
        c.server.advertise_host = Some("[::]".into());
        let e = advertised(&c).await.unwrap_err();
        assert!(e.contains("wildcard"), "{e}");
        // On loopback, loopback is right.
        let c = config("127.0.0.1", None, "etcd", "127.0.0.1:2379");
        assert_eq!(advertised(&c).await.unwrap(), "127.0.0.1");
        let c = config("0.0.0.0", Some("10.1.2.3"), "etcd", "192.0.2.200:2379");
        assert_eq!(advertised(&c).await.unwrap(), "10.1.2.3");
        let c = config("0.0.0.0", Some("fd00::7"), "etcd", "192.0.2.200:2379");
        assert_eq!(advertised(&c).await.unwrap(), "[fd00::7]");
    }

    #[tokio::test]
    async fn local_and_memory_keep_their_behaviour() {
        for host in ["0.0.0.0", "::0", "0.0.0.00"] {
            let c = config(host, None, "local", "");
            assert_eq!(advertised(&c).await.unwrap(), "127.0.0.1");
        }
        let c = config("127.0.0.1", None, "memory", "");
        assert_eq!(advertised(&c).await.unwrap(), "127.0.0.1");
    }
}
