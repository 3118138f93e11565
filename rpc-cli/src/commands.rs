//! `services`, `instances`, `describe`, `call` and `ping`.

use std::collections::BTreeSet;
use std::time::Duration;

use rpc::registry::{AnyRegistry, MemoryRegistry};
use rpc::{CallOptions, Consumer};
use rpc_core::meta::keys;
use rpc_core::{Discover, Registry, RpcConfig, ServiceKey, ServiceMetaInfo};
use serde_json::{Value, json};

use crate::Output;
use crate::error::{CliError, code, one_line};
use crate::output;

/// `name` or `name:version`, with the default version filled in.
pub fn service_key(s: &str) -> ServiceKey {
    let key = ServiceKey::parse(s.trim());
    ServiceKey::new(key.name(), key.version())
}

/// The configured registry, connected.
pub async fn connect(config: &RpcConfig) -> Result<AnyRegistry, CliError> {
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
            println!("{}", output::json(&list));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .map(|(k, n)| vec![k, n.to_string()])
                .collect();
            print!("{}", output::table(&["SERVICE", "INSTANCES"], &rows));
        }
    }
    Ok(code::OK)
}

/// Metadata entries a provider publishes about itself, shown in their
/// own columns or by `describe`, not in the free-form one.
const OWN_KEYS: [&str; 5] = [
    keys::PROTOCOL,
    keys::METHODS,
    keys::FRAMEWORK,
    keys::SERIALIZERS,
    keys::SINCE,
];

/// `rpc instances SERVICE`.
pub async fn instances(config: &RpcConfig, service: &str, out: Output) -> Result<i32, CliError> {
    let key = service_key(service);
    let registry = connect(config).await?;
    let list = instances_of(&registry, config, &key).await?;
    match out {
        Output::Json => println!("{}", output::json(&list)),
        Output::Table => {
            let rows: Vec<Vec<String>> = list.iter().map(instance_row).collect();
            print!(
                "{}",
                output::table(
                    &[
                        "ADDRESS", "WEIGHT", "GROUP", "PROTOCOL", "SINCE", "METADATA"
                    ],
                    &rows
                )
            );
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
    let key = service_key(service);
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
    let distinct = |k: &str| -> Vec<String> {
        list.iter()
            .filter_map(|m| m.metadata.get(k).cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let frameworks = distinct(keys::FRAMEWORK);
    let serializers = distinct(keys::SERIALIZERS);
    match out {
        Output::Json => {
            let v = json!({
                "service": key.as_str(),
                "versions": versions,
                "methods": if publishing.is_empty() { Value::Null } else { json!(methods) },
                "instances_publishing_methods": publishing.len(),
                "frameworks": frameworks,
                "serializers": serializers,
                "instances": list,
            });
            println!("{}", output::json(&v));
        }
        Output::Table => {
            let none = || "-".to_owned();
            let mut text = String::new();
            let mut field = |label: &str, value: String| {
                text.push_str(&format!("{label:<12} {value}\n"));
            };
            field("SERVICE", key.as_str().to_owned());
            field("VERSIONS", versions.join(", "));
            field(
                "FRAMEWORK",
                Some(frameworks.join(", "))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(none),
            );
            field(
                "SERIALIZERS",
                Some(serializers.join(" | "))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(none),
            );
            if publishing.is_empty() {
                field(
                    "METHODS",
                    "not published: these providers predate method lists \
                     (`rpc call` still works by name)"
                        .into(),
                );
            } else {
                let mut first = true;
                for m in &methods {
                    field(if first { "METHODS" } else { "" }, m.clone());
                    first = false;
                }
                if publishing.len() < list.len() {
                    field(
                        "",
                        format!(
                            "({} of {} instances publish their methods)",
                            publishing.len(),
                            list.len()
                        ),
                    );
                }
            }
            field("INSTANCES", list.len().to_string());
            text.push('\n');
            print!("{text}");
            let rows: Vec<Vec<String>> = list.iter().map(instance_row).collect();
            print!(
                "{}",
                output::table(
                    &[
                        "ADDRESS", "WEIGHT", "GROUP", "PROTOCOL", "SINCE", "METADATA"
                    ],
                    &rows
                )
            );
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
fn parse_args(text: Option<&str>) -> Result<Vec<Value>, CliError> {
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
    let key = service_key(a.service);
    let wait = config.registry.timeout();
    // Kept until the call is done: dropping it deregisters.
    let mut _direct = None;
    let consumer = match a.address {
        // One instance, named on the command line: the same stack over a
        // registry holding just it.
        Some(addr) => {
            let (host, port) = split_address(addr)?;
            let registry = MemoryRegistry::new();
            let meta = ServiceMetaInfo::new(key.name(), key.version(), host, port);
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
    println!("{text}");
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
    let bad = || CliError::BadInput(format!("--address {addr}: expected HOST:PORT"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// `rpc ping HOST:PORT`.
pub async fn ping(
    address: &str,
    timeout_ms: u64,
    count: u32,
    out: Output,
) -> Result<i32, CliError> {
    let limit = Duration::from_millis(timeout_ms);
    for _ in 0..count.max(1) {
        let pong = rpc::transport::client::ping(address, limit)
            .await
            .map_err(|e| CliError::CallFailed(one_line(&e)))?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        match out {
            Output::Json => println!(
                "{}",
                json!({
                    "address": address,
                    "connect_ms": ms(pong.connect),
                    "round_trip_ms": ms(pong.round_trip),
                })
            ),
            Output::Table => println!(
                "pong from {address}: connect {:.3} ms, heartbeat round trip {:.3} ms",
                ms(pong.connect),
                ms(pong.round_trip)
            ),
        }
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
        assert_eq!(service_key("UserService").as_str(), "UserService:1.0");
        assert_eq!(service_key("UserService:2.0").as_str(), "UserService:2.0");
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
