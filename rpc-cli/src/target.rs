//! Which registry a command talks to: `rpc.toml` (with `--config`,
//! `RPC_CONFIG` and the `RPC_*` overrides, as every program of this
//! framework reads it), or a `--registry` URL that replaces its
//! `[registry]` section.
//!
//! URL forms (the query sets any other `[registry]` key the backend takes):
//!
//! | URL | `[registry]` |
//! |---|---|
//! | `etcd://host:2379[,host:2379..]` (`etcd+https://` for TLS endpoints) | `type = "etcd"`, `address = ["http://host:2379", ..]` |
//! | `zookeeper://host:2181[,host:2181..][/chroot]` | `type = "zookeeper"`, `address = "host:2181,../chroot"` |
//! | `consul://host:8500` (`consul+https://`) | `type = "consul"`, `address = "http://host:8500"` |
//! | `nacos://host:8848` | `type = "nacos"`, `address = "host:8848"` |
//! | `local:///path/to/dir` | `type = "local"`, `address = "/path/to/dir"` |
//!
//! e.g. `consul://127.0.0.1:8500?token=s3cret&datacenter=dc1`. A key the
//! backend does not take is refused as in `rpc.toml`, naming it.

use std::path::Path;

use rpc_core::RpcConfig;

use crate::error::CliError;

/// Loads the configuration; `registry` (a URL) replaces its `[registry]`.
pub fn load(config: Option<&Path>, registry: Option<&str>) -> Result<RpcConfig, CliError> {
    let mut cfg = RpcConfig::load(config)?;
    if let Some(url) = registry {
        cfg.registry = from_url(url)?.registry;
    }
    Ok(cfg)
}

/// The configuration a `--registry` URL stands for (module docs).
pub fn from_url(url: &str) -> Result<RpcConfig, CliError> {
    let shown = redacted(url);
    let bad = |why: &str| {
        CliError::BadInput(format!(
            "--registry {shown}: {why} (forms: etcd://host:port, zookeeper://host:port[/chroot], consul://host:port, nacos://host:port, local:///dir)"
        ))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut table = toml::Table::new();
    let hosts = || -> Vec<&str> {
        location
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect()
    };
    let (kind, address) = match scheme {
        "etcd" | "etcd+https" => {
            let web = if scheme == "etcd" { "http" } else { "https" };
            let list = hosts()
                .into_iter()
                .map(|h| toml::Value::String(format!("{web}://{h}")))
                .collect();
            ("etcd", toml::Value::Array(list))
        }
        "zookeeper" | "zk" => ("zookeeper", toml::Value::String(location.to_owned())),
        "consul" | "consul+https" => {
            let web = if scheme == "consul" { "http" } else { "https" };
            ("consul", toml::Value::String(format!("{web}://{location}")))
        }
        "nacos" => ("nacos", toml::Value::String(location.to_owned())),
        "local" => ("local", toml::Value::String(location.to_owned())),
        "memory" => {
            return Err(bad(
                "a memory registry lives inside one process; another process cannot read it",
            ));
        }
        other => return Err(bad(&format!("unknown scheme `{other}`"))),
    };
    if location.is_empty() {
        return Err(bad("no address"));
    }
    table.insert("type".into(), toml::Value::String(kind.into()));
    table.insert("address".into(), address);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key).ok_or_else(|| bad("bad %-escape in the query"))?;
        if key == "type" || key == "address" {
            return Err(bad(&format!(
                "`{key}` comes from the URL itself, not from its query"
            )));
        }
        let value = percent_decode(value).ok_or_else(|| bad("bad %-escape in the query"))?;
        let value = match value.parse::<u64>() {
            Ok(n) if key.ends_with("_ms") || key.ends_with("_secs") => {
                toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
            }
            _ => toml::Value::String(value),
        };
        table.insert(key, value);
    }
    let mut root = toml::Table::new();
    root.insert("registry".into(), toml::Value::Table(table));
    let text = toml::to_string(&root).map_err(|e| bad(&e.to_string()))?;
    Ok(RpcConfig::from_toml_str(
        &text,
        &format!("--registry {shown}"),
    )?)
}

/// Whether a `[registry]` key holds a credential (`password`, `token`):
/// never printed, here or by `config check`.
pub fn is_secret(key: &str) -> bool {
    key.ends_with("password") || key.ends_with("token")
}

/// `url` with the values of `password` and `token` in its query, and any
/// `user:password@` in it, shown as `***`: it is echoed in errors.
fn redacted(url: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    if query.is_empty() {
        return base;
    }
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret(k) => format!("{k}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

/// `%XX` escapes and `+` as a space, as in a URL query; `None` for a bad
/// escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            b'+' => out.push(b' '),
            other => out.push(other),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_core::RegistryKind;

    #[test]
    fn each_url_form_becomes_its_registry_section() {
        let etcd = from_url("etcd://10.0.0.1:2379,10.0.0.2:2379")
            .unwrap()
            .registry;
        assert_eq!(etcd.kind, RegistryKind::Etcd);
        assert_eq!(
            etcd.address.as_slice(),
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        let zk = from_url("zookeeper://a:2181,b:2181/apps").unwrap().registry;
        assert_eq!(zk.kind, RegistryKind::Zookeeper);
        assert_eq!(zk.address.first(), Some("a:2181"));
        let consul = from_url("consul://127.0.0.1:8500?token=s%40cret&datacenter=dc1")
            .unwrap()
            .registry;
        assert_eq!(consul.address.first(), Some("http://127.0.0.1:8500"));
        assert_eq!(consul.token.as_deref(), Some("s@cret"));
        assert_eq!(consul.datacenter.as_deref(), Some("dc1"));
        let nacos = from_url("nacos://127.0.0.1:8848?group=g&timeout_ms=500")
            .unwrap()
            .registry;
        assert_eq!(nacos.group.as_deref(), Some("g"));
        assert_eq!(nacos.timeout_ms, 500);
        let local = from_url("local:///tmp/reg").unwrap().registry;
        assert_eq!(local.kind, RegistryKind::Local);
        assert_eq!(local.address.first(), Some("/tmp/reg"));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let msg = |url: &str| from_url(url).unwrap_err().to_string();
        assert!(msg("127.0.0.1:2379").contains("no scheme"));
        assert!(msg("redis://x:1").contains("unknown scheme `redis`"));
        assert!(msg("memory://").contains("inside one process"));
        assert!(msg("etcd://").contains("no address"));
        // A key the backend does not take is refused, naming it.
        let e = msg("etcd://127.0.0.1:2379?token=x");
        assert!(e.contains("registry.token"), "{e}");
        assert!(e.contains("--registry etcd://"), "{e}");
        assert!(msg("consul://h:1?token=%zz").contains("%-escape"));
        assert!(msg("local:///x?type=etcd").contains("`type` comes from the URL"));
        assert!(msg("local:///x?address=/etc").contains("`address` comes from the URL"));
        // Secrets are not echoed.
        let e = msg("consul://127.0.0.1:1?token=s3cret&bogus=1");
        assert!(e.contains("registry.bogus") && !e.contains("s3cret"), "{e}");
        assert!(e.contains("token=***"), "{e}");
        let e = msg("etcd://user:pw@127.0.0.1:1?password=pw2&bogus=1");
        assert!(
            e.contains("etcd://***@127.0.0.1:1?password=***&bogus=1"),
            "{e}"
        );
        assert!(!e.contains(":pw@") && !e.contains("pw2"), "{e}");
    }
}
