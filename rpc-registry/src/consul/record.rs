//! Names and records: how a service key becomes a Consul service name and ID,
//! and the service definition carrying the instance record.

use super::*;

/// Appends `s` as lowercase `a-z0-9` runs joined by single dashes (and
/// separated from what `out` holds by one).
pub(super) fn dns_part(s: &str, out: &mut String) {
    let mut dash = true;
    for c in s.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
    }
}

pub(super) fn clean_namespace(namespace: Option<&str>) -> Option<&str> {
    namespace
        .map(|n| n.trim_matches('/'))
        .filter(|n| !n.is_empty())
}

/// The Consul service name for a service key (module docs, "Names").
pub fn service_name(namespace: Option<&str>, service_key: &str) -> String {
    let mut out = String::new();
    if let Some(ns) = clean_namespace(namespace) {
        dns_part(ns, &mut out);
    }
    let key = rpc_core::ServiceKey::parse(service_key);
    let (name, version) = (key.name(), key.version());
    dns_part(name, &mut out);
    dns_part(version, &mut out);
    if out.is_empty() {
        out.push_str("rpc-service");
    }
    out
}

/// The Consul service ID of an instance: `[{namespace}/]{node key}`.
pub fn service_id(namespace: Option<&str>, meta: &ServiceMetaInfo) -> String {
    match clean_namespace(namespace) {
        Some(ns) => format!("{ns}/{}", meta.node_key()),
        None => meta.node_key(),
    }
}

/// The ID of an instance's TTL check (Consul's default for a service's only
/// check).
pub(super) fn check_id(service_id: &str) -> String {
    format!("service:{service_id}")
}

/// Percent-encodes a path segment (Consul decodes it, `/` included).
pub(super) fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Go duration syntax for whole milliseconds.
pub(super) fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Whether a metadata entry may be copied into Consul's `Meta`.
pub(super) fn fits_meta(key: &str, value: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && value.len() <= 512
        && !key.starts_with("consul-")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ServiceDefinition<'a> {
    #[serde(rename = "ID")]
    pub(super) id: &'a str,
    pub(super) name: &'a str,
    pub(super) tags: Vec<String>,
    pub(super) address: &'a str,
    pub(super) port: u16,
    pub(super) meta: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) weights: Option<Weights>,
    pub(super) check: CheckDefinition<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Weights {
    pub(super) passing: u32,
    pub(super) warning: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct CheckDefinition<'a> {
    #[serde(rename = "CheckID")]
    pub(super) check_id: &'a str,
    pub(super) name: &'static str,
    #[serde(rename = "TTL")]
    pub(super) ttl: String,
    pub(super) status: &'static str,
    pub(super) deregister_critical_service_after: String,
}

/// The agent registration body of an instance.
pub(super) fn definition(
    namespace: Option<&str>,
    meta: &ServiceMetaInfo,
    ttl: Duration,
) -> (String, String, Vec<u8>) {
    let id = service_id(namespace, meta);
    let check = check_id(&id);
    let name = service_name(namespace, &meta.service_key());
    let mut m = BTreeMap::new();
    for (k, v) in &meta.metadata {
        if m.len() < 60 && fits_meta(k, v) {
            m.insert(k.clone(), v.clone());
        }
    }
    // Ours win over metadata of the same name.
    let mut put = |k: &str, v: String| {
        if fits_meta(k, &v) {
            m.insert(k.to_owned(), v);
        }
    };
    put("rpc_service_key", meta.service_key());
    put("rpc_version", meta.service_version.clone());
    put("rpc_group", meta.service_group.clone());
    put("rpc_weight", meta.weight.to_string());
    let def = ServiceDefinition {
        id: &id,
        name: &name,
        tags: vec![
            format!("rpc-version={}", meta.service_version),
            format!("rpc-group={}", meta.service_group),
            format!("{RECORD_TAG}{}", meta.to_json()),
        ],
        address: &meta.service_host,
        port: meta.service_port,
        meta: m,
        weights: (meta.weight > 0).then_some(Weights {
            passing: meta.weight,
            warning: 1,
        }),
        check: CheckDefinition {
            check_id: &check,
            name: "rpc heartbeat",
            ttl: go_duration(ttl),
            status: "passing",
            deregister_critical_service_after: go_duration(
                ttl.saturating_mul(3).max(DEREGISTER_CRITICAL_MIN),
            ),
        },
    };
    // Strings, integers and maps only: serialization cannot fail.
    let body = serde_json::to_vec(&def).unwrap_or_default();
    (id, check, body)
}
