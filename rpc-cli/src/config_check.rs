//! `rpc config check [FILE]`: loads a configuration the way every program
//! of this framework does (so it fails the same way, naming the file and
//! the key), then prints each effective setting with where it came from:
//! the file (named on the first line), an `RPC_*` environment variable, `--registry`, or the
//! built-in default. Passwords and tokens are shown as `***`.

use std::path::{Path, PathBuf};

use rpc_core::RpcConfig;
use serde_json::{Value, json};

use crate::Output;
use crate::error::{CliError, code};
use crate::output;

pub fn run(file: Option<&Path>, registry: Option<&str>, out: Output) -> Result<i32, CliError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut config = RpcConfig::load_with_env(file, env.iter().cloned())?;
    if let Some(url) = registry {
        config.registry = crate::target::from_url(url)?.registry;
    }
    // The certificate files are read as at startup: a provider or consumer
    // with this file would fail on them, so the check does too.
    rpc::transport::Acceptor::from_config(&config.server)?;
    rpc::transport::Connector::from_config(&config.client)?;
    // The file `load` read, by the same rule.
    let path: Option<PathBuf> = file.map(Path::to_path_buf).or_else(|| {
        env.iter()
            .find(|(k, _)| k == "RPC_CONFIG")
            .map(|(_, v)| PathBuf::from(v))
            .or_else(|| Some(PathBuf::from("rpc.toml")).filter(|p| p.exists()))
    });
    let in_file: toml::Table = match &path {
        Some(p) => std::fs::read_to_string(p)
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default(),
        None => toml::Table::new(),
    };
    // `section.key` set by each RPC_SECTION_KEY variable, as `load` reads them.
    let from_env: Vec<(String, String)> = env
        .iter()
        .filter_map(|(var, _)| {
            let rest = var.strip_prefix("RPC_")?.to_ascii_lowercase();
            let (section, key) = rest.split_once('_')?;
            (!key.is_empty() && section != "config")
                .then(|| (format!("{section}.{key}"), var.clone()))
        })
        .collect();
    let effective = serde_json::to_value(&config).unwrap_or(Value::Null);
    let mut settings = Vec::new();
    flatten("", &effective, &mut settings);
    let file_name = path.as_ref().map_or_else(
        || "built-in defaults".to_owned(),
        |p| p.display().to_string(),
    );
    let rows: Vec<(String, String, String)> = settings
        .into_iter()
        .map(|(key, value)| {
            let source = if registry.is_some() && key.starts_with("registry.") {
                "--registry".to_owned()
            } else if let Some((_, var)) = from_env
                .iter()
                .find(|(k, _)| key == *k || key.starts_with(&format!("{k}.")))
            {
                format!("env {var}")
            } else if lookup(&in_file, &key) {
                // The path is on the first line: a long one would not fit.
                "file".to_owned()
            } else {
                "default".to_owned()
            };
            let secret = crate::target::is_secret(&key);
            let value = match value {
                Value::Null => "(unset)".to_owned(),
                _ if secret => "***".to_owned(),
                Value::String(s) => format!("{s:?}"),
                other => other.to_string(),
            };
            (key, value, source)
        })
        .collect();
    match out {
        Output::Json => {
            let list: Vec<Value> = rows
                .iter()
                .map(|(k, v, s)| json!({"key": k, "value": v, "source": s}))
                .collect();
            output::emit_line(&output::json(
                &json!({"file": file_name, "valid": true, "settings": list}),
            ));
        }
        Output::Table => {
            output::emit_line(&format!("{}: valid", output::clean(&file_name)));
            // The value last: it is the one that may be long (cut to fit;
            // `--output json` has it whole).
            let rows: Vec<Vec<String>> = rows.into_iter().map(|(k, v, s)| vec![k, s, v]).collect();
            output::emit(&output::table(&["KEY", "SOURCE", "VALUE"], &rows));
        }
    }
    Ok(code::OK)
}

/// Dotted keys and leaf values of `v`.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

/// Whether the dotted `key` is set in `table`.
fn lookup(table: &toml::Table, key: &str) -> bool {
    let mut parts = key.split('.');
    let Some(first) = parts.next() else {
        return false;
    };
    let mut at = table.get(first);
    for part in parts {
        at = at.and_then(|v| v.as_table()).and_then(|t| t.get(part));
    }
    at.is_some()
}
