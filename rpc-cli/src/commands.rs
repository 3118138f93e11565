//! `services`, `instances`, `describe`, `call` and `ping`.

use std::collections::BTreeSet;
use std::time::Duration;

use rpc::registry::{AnyRegistry, MemoryRegistry};
use rpc::{CallOptions, Consumer};
use rpc_core::meta::keys;
use rpc_core::{
    Discover, Registry, RegistryError, RegistryKind, RpcConfig, ServiceKey, ServiceMetaInfo,
};
use serde_json::{Value, json};

use crate::Output;
use crate::error::{CliError, code, one_line};
use crate::output;

/// `name` or `name:version`, with the default version filled in; an empty
/// name or version is refused.
pub fn service_key(s: &str) -> Result<ServiceKey, CliError> {
    let key = ServiceKey::parse(s.trim());
    if key.name().is_empty() || s.trim().ends_with(':') {
        return Err(CliError::BadInput(format!(
            "`{s}` is not a service: give `name` or `name:version`"
        )));
    }
    Ok(ServiceKey::new(key.name(), key.version()))
}

/// The configured registry, connected. A `local` registry's directory
/// must exist: the backend would create it, which for a tool that only
/// reads turns a typo into an empty registry.
pub async fn connect(config: &RpcConfig) -> Result<AnyRegistry, CliError> {
    if config.registry.kind == RegistryKind::Memory {
        // It would connect, to an empty registry of this process only, and
        // every command would answer "nothing there".
        return Err(CliError::BadInput(
            "registry.type `memory` lives inside one process, so `rpc` cannot read it: point it at the registry your providers use".into(),
        ));
    }
    if config.registry.kind == RegistryKind::Local {
        let dir = match config.registry.address.first().filter(|a| !a.is_empty()) {
            Some(dir) => std::path::PathBuf::from(dir),
            None => rpc::registry::local::default_dir(),
        };
        if !dir.is_dir() {
            return Err(RegistryError::unavailable_because(
                "local",
                format!(
                    "no registry directory {} (no provider has registered there)",
                    dir.display()
                ),
            )
            .into());
        }
    }
    Ok(AnyRegistry::from_config(&config.registry).await?)
}

/// The instances of `key`; none is [`CliError::NotFound`].
async fn instances_of(
    registry: &AnyRegistry,
    config: &RpcConfig,
    key: &ServiceKey,
) -> Result<Vec<ServiceMetaInfo>, CliError> {
    let list = registry.discover(key.as_str()).await?;
    if list.is_empty() {
        return Err(CliError::NotFound(format!(
            "no instance of `{key}` is registered in the {} registry",
            config.registry.kind
        )));
    }
    Ok(list)
}

/// `rpc services`.
pub async fn services(config: &RpcConfig, out: Output) -> Result<i32, CliError> {
    let registry = connect(config).await?;
    let mut rows = Vec::new();
    for key in registry.services().await? {
        let count = registry.discover(&key).await?.len();
        rows.push((key, count));
    }
    match out {
        Output::Json => {
            let list: Vec<Value> = rows
                .iter()
                .map(|(k, n)| json!({"service": k, "instances": n}))
                .collect();
            output::emit_line(&output::json(&list));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .map(|(k, n)| vec![k, n.to_string()])
                .collect();
            output::emit(&output::table(&["SERVICE", "INSTANCES"], &rows));
        }
    }
    Ok(code::OK)
}

/// Metadata entries a provider publishes about itself, shown in their
/// own columns or by `describe`, not in the free-form one.
const OWN_KEYS: [&str; 6] = [
    keys::PROTOCOL,
    keys::METHODS,
    keys::FRAMEWORK,
    keys::SERIALIZERS,
    keys::COMPRESSIONS,
    keys::SINCE,
];

const INSTANCE_COLUMNS: [&str; 6] = [
    "ADDRESS", "WEIGHT", "GROUP", "PROTOCOL", "SINCE", "METADATA",
];

/// `rpc instances SERVICE`.
pub async fn instances(config: &RpcConfig, service: &str, out: Output) -> Result<i32, CliError> {
    let key = service_key(service)?;
    let registry = connect(config).await?;
    let list = instances_of(&registry, config, &key).await?;
    match out {
        Output::Json => output::emit_line(&output::json(&list)),
        Output::Table => {
            let rows: Vec<Vec<String>> = list.iter().map(instance_row).collect();
            output::emit(&output::table(&INSTANCE_COLUMNS, &rows));
        }
    }
    Ok(code::OK)
}

fn instance_row(m: &ServiceMetaInfo) -> Vec<String> {
    let get = |k: &str| m.metadata.get(k).cloned();
    let metadata: Vec<String> = m
        .metadata
        .iter()
        .filter(|(k, _)| !OWN_KEYS.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    vec![
        m.address(),
        m.weight.to_string(),
        m.service_group.clone(),
        get(keys::PROTOCOL).unwrap_or_else(|| "-".into()),
        get(keys::SINCE)
            .and_then(|s| output::since(&s))
            .unwrap_or_else(|| "-".into()),
        if metadata.is_empty() {
            "-".into()
        } else {
            metadata.join(" ")
        },
    ]
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `rpc describe SERVICE`.
pub async fn describe(config: &RpcConfig, service: &str, out: Output) -> Result<i32, CliError> {
    let key = service_key(service)?;
    let registry = connect(config).await?;
    let list = instances_of(&registry, config, &key).await?;
    let versions: Vec<String> = registry
        .services()
        .await?
        .iter()
        .map(|k| ServiceKey::parse(k))
        .filter(|k| k.name() == key.name())
        .map(|k| k.version().to_owned())
        .collect();
    // Methods as the providers publish them, in the order the first
    // publishing one lists them; providers older than the method list
    // publish none.
    let publishing: Vec<&ServiceMetaInfo> = list
        .iter()
        .filter(|m| m.metadata.contains_key(keys::METHODS))
        .collect();
    let mut methods: Vec<String> = Vec::new();
    for m in &publishing {
        for name in split_list(&m.metadata[keys::METHODS]) {
            if !methods.contains(&name) {
                methods.push(name);
            }
        }
    }
    // Every value any instance gives, split at commas (`bincode,json`).
    let distinct = |k: &str| -> Vec<String> {
        list.iter()
            .filter_map(|m| m.metadata.get(k))
            .flat_map(|v| split_list(v))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let frameworks = distinct(keys::FRAMEWORK);
    let serializers = distinct(keys::SERIALIZERS);
    let compressions = distinct(keys::COMPRESSIONS);
    match out {
        Output::Json => {
            let v = json!({
                "service": key.as_str(),
                "versions": versions,
                "methods": if publishing.is_empty() { Value::Null } else { json!(methods) },
                "instances_publishing_methods": publishing.len(),
                "frameworks": frameworks,
                "serializers": serializers,
                "compressions": compressions,
                "instances": list,
            });
            output::emit_line(&output::json(&v));
        }
        Output::Table => {
            let or_dash = |v: Vec<String>| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.join(", ")
                }
            };
            let mut lines = vec![
                output::field("SERVICE", key.as_str()),
                output::field("VERSIONS", &versions.join(", ")),
                output::field("FRAMEWORK", &or_dash(frameworks)),
                output::field("SERIALIZERS", &or_dash(serializers)),
                output::field("COMPRESSIONS", &or_dash(compressions)),
            ];
            if publishing.is_empty() {
                lines.push(output::field(
                    "METHODS",
                    "not published (older providers); `rpc call` works by name",
                ));
            } else {
                for (i, m) in methods.iter().enumerate() {
                    lines.push(output::field(if i == 0 { "METHODS" } else { "" }, m));
                }
                if publishing.len() < list.len() {
                    lines.push(output::field(
                        "",
                        &format!(
                            "({} of {} instances publish their methods)",
                            publishing.len(),
                            list.len()
                        ),
                    ));
                }
            }
            lines.push(output::field("INSTANCES", &list.len().to_string()));
            let rows: Vec<Vec<String>> = list.iter().map(instance_row).collect();
            output::emit(&format!(
                "{}\n\n{}",
                lines.join("\n"),
                output::table(&INSTANCE_COLUMNS, &rows)
            ));
        }
    }
    Ok(code::OK)
}

/// What `rpc call` was given.
pub struct CallArgs<'a> {
    pub service: &'a str,
    pub method: &'a str,
    pub args: Option<&'a str>,
    pub timeout: Option<u64>,
    pub metadata: &'a [String],
    pub address: Option<&'a str>,
}

/// The argument list from the command line (`rpc call --help`).
pub fn parse_args(text: Option<&str>) -> Result<Vec<Value>, CliError> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(list)) => Ok(list),
        Ok(one) => Ok(vec![one]),
        Err(e) => Err(CliError::BadInput(format!(
            "the arguments are not valid JSON ({e}): give a JSON array of arguments, or one JSON value"
        ))),
    }
}

/// `rpc call SERVICE METHOD [JSON_ARGS]`.
pub async fn call(config: &RpcConfig, a: CallArgs<'_>, out: Output) -> Result<i32, CliError> {
    let args = parse_args(a.args)?;
    let mut options = CallOptions::new();
    for kv in a.metadata {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CliError::BadInput(format!("--metadata {kv}: expected KEY=VALUE")))?;
        if k.is_empty() {
            return Err(CliError::BadInput(format!(
                "--metadata {kv}: the key is empty"
            )));
        }
        options = options.metadata(k.to_owned(), v.to_owned());
    }
    if let Some(ms) = a.timeout {
        options = options.timeout(Duration::from_millis(ms));
    }
    let key = service_key(a.service)?;
    let wait = config.registry.timeout();
    // Kept until the call is done: dropping it deregisters.
    let mut _direct = None;
    let consumer = match a.address {
        // One instance, named on the command line: the same stack over a
        // registry holding just it.
        Some(addr) => {
            let (host, port) = split_address(addr)?;
            let registry = MemoryRegistry::new();
            let mut meta = ServiceMetaInfo::new(key.name(), key.version(), host, port);
            // An address given by hand is called the way this
            // configuration dials: over TLS when it has [client.tls].
            if config.client.tls.is_some() {
                meta.metadata
                    .insert(keys::TLS.to_owned(), "true".to_owned());
            }
            _direct = Some(registry.register(meta).await?);
            Consumer::with_registry(registry.into(), config.client.clone(), wait)
        }
        None => {
            let registry = connect(config).await?;
            instances_of(&registry, config, &key).await?;
            Consumer::with_registry(registry, config.client.clone(), wait)
        }
    };
    let client = consumer
        .generic_service(key.name(), key.version())
        .with(options);
    let reply = client.call_generic(a.method, &args).await?;
    let text = match out {
        Output::Json => serde_json::to_string(&reply).unwrap_or_default(),
        Output::Table => output::json(&reply),
    };
    output::emit_line(&text);
    // A method's own `Result` comes back in serde's form: an `Err` is the
    // method failing, which a script should see in the exit code.
    if let Value::Object(map) = &reply {
        if map.len() == 1 && map.contains_key("Err") {
            eprintln!(
                "rpc: `{key}.{}` returned an error (printed above)",
                a.method
            );
            return Ok(code::CALL_FAILED);
        }
    }
    Ok(code::OK)
}

/// `host:port` (IPv6 in brackets) as a host and a port.
fn split_address(addr: &str) -> Result<(String, u16), CliError> {
    let bad = || CliError::BadInput(format!("{addr}: expected HOST:PORT"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// `rpc ping HOST:PORT`, over TLS when the configuration has
/// `[client.tls]` (the provider's certificate is checked as a consumer
/// would).
pub async fn ping(
    address: &str,
    timeout_ms: u64,
    count: u32,
    connector: &rpc::transport::Connector,
    out: Output,
) -> Result<i32, CliError> {
    let limit = Duration::from_millis(timeout_ms);
    split_address(address)?;
    for _ in 0..count {
        let pong = rpc::transport::client::ping_with(address, limit, connector)
            .await
            .map_err(|e| CliError::CallFailed(one_line(&e)))?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let line = match out {
            Output::Json => json!({
                "address": address,
                "connect_ms": ms(pong.connect),
                "round_trip_ms": ms(pong.round_trip),
            })
            .to_string(),
            Output::Table => format!(
                "pong from {address}: connect {:.3} ms, heartbeat round trip {:.3} ms",
                ms(pong.connect),
                ms(pong.round_trip)
            ),
        };
        output::emit_line(&line);
    }
    Ok(code::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_a_list_or_one_value() {
        assert_eq!(parse_args(None).unwrap(), Vec::<Value>::new());
        assert_eq!(
            parse_args(Some("[1, \"a\"]")).unwrap(),
            vec![json!(1), json!("a")]
        );
        assert_eq!(
            parse_args(Some("{\"id\": 1}")).unwrap(),
            vec![json!({"id": 1})]
        );
        let e = parse_args(Some("{id: 1}")).unwrap_err();
        assert_eq!(e.exit_code(), code::BAD_INPUT);
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }

    #[test]
    fn a_bare_name_has_the_default_version() {
        assert_eq!(
            service_key("UserService").unwrap().as_str(),
            "UserService:1.0"
        );
        assert_eq!(
            service_key("UserService:2.0").unwrap().as_str(),
            "UserService:2.0"
        );
        for bad in ["", " ", ":1.0", "UserService:"] {
            assert_eq!(
                service_key(bad).unwrap_err().exit_code(),
                code::BAD_INPUT,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn addresses_split_with_ipv6_brackets() {
        assert_eq!(
            split_address("127.0.0.1:80").unwrap(),
            ("127.0.0.1".into(), 80)
        );
        assert_eq!(split_address("[::1]:80").unwrap(), ("::1".into(), 80));
        assert!(split_address("nohost").is_err());
        assert!(split_address(":80").is_err());
    }
}
