//! Service instance metadata, as stored in every registry.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Default service version when none is given (the Java original's default).
pub const DEFAULT_VERSION: &str = "1.0";
/// Default service group (the Java original's default).
pub const DEFAULT_GROUP: &str = "default";
/// Default load-balancing weight of an instance.
pub const DEFAULT_WEIGHT: u32 = 100;

/// The [`ServiceMetaInfo::metadata`] entries a provider of this framework
/// publishes about itself, for operators' tools (`rpc describe`) and
/// consumers. Records written before an entry existed simply lack it:
/// readers treat every entry as optional.
pub mod keys {
    /// `mr/{wire version}`: the wire protocol the provider speaks.
    pub const PROTOCOL: &str = "protocol";
    /// The service's method wire names, comma-separated, in the trait's
    /// order (absent from providers older than this entry).
    pub const METHODS: &str = "methods";
    /// `rpc/{crate version}`: the framework version of the provider.
    pub const FRAMEWORK: &str = "framework";
    /// The body serializers the provider decodes, comma-separated
    /// (`bincode,json,postcard,msgpack`); it answers in the one a request uses.
    pub const SERIALIZERS: &str = "serializers";
    /// The body compressions the provider decodes, comma-separated
    /// (`lz4,zstd`); it compresses a reply with the request's. Absent from
    /// providers older than compression, which refuse compressed requests.
    pub const COMPRESSIONS: &str = "compressions";
    /// `true` when the provider serves TLS (`[server.tls]`); absent
    /// otherwise. A consumer calls an instance only when it agrees.
    pub const TLS: &str = "tls";
    /// When the provider registered, in seconds since the Unix epoch (UTC).
    pub const SINCE: &str = "since";
    /// `http://HOST:PORT/metrics`: the provider's Prometheus endpoint
    /// (`[metrics] listen`), for consoles and scrapers that discover
    /// through the registry; absent without one.
    pub const METRICS: &str = "metrics";
}

/// One provider instance of one service.
///
/// The JSON form keeps the field names of the Java original (`serviceName`,
/// `serviceVersion`, `serviceHost`, `servicePort`, `serviceGroup`), so registry
/// entries written by either side look the same to tools and to each other.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMetaInfo {
    /// Service name, by default the trait name.
    pub service_name: String,
    /// Service version; part of the service key.
    #[serde(default = "default_version")]
    pub service_version: String,
    /// Host the provider listens on, as consumers should dial it.
    pub service_host: String,
    /// Port the provider listens on.
    pub service_port: u16,
    /// Service group.
    #[serde(default = "default_group")]
    pub service_group: String,
    /// Relative weight for weighted load balancing.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form metadata (serializer, zone, anything a policy may read).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn default_version() -> String {
    DEFAULT_VERSION.to_owned()
}
fn default_group() -> String {
    DEFAULT_GROUP.to_owned()
}
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl ServiceMetaInfo {
    /// A new instance record with default group, weight and no metadata.
    pub fn new(
        service_name: impl Into<String>,
        service_version: impl Into<String>,
        host: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            service_name: service_name.into(),
            service_version: service_version.into(),
            service_host: host.into(),
            service_port: port,
            service_group: default_group(),
            weight: DEFAULT_WEIGHT,
            metadata: BTreeMap::new(),
        }
    }

    /// `name:version`, the key consumers look services up by.
    pub fn service_key(&self) -> String {
        service_key(&self.service_name, &self.service_version)
    }

    /// `name:version/host:port`, unique per instance.
    pub fn node_key(&self) -> String {
        format!("{}/{}", self.service_key(), self.address())
    }

    /// `host:port`, what a consumer dials.
    pub fn address(&self) -> String {
        if self.service_host.contains(':') && !self.service_host.starts_with('[') {
            // A bare IPv6 literal needs brackets to be dialable with a port.
            format!("[{}]:{}", self.service_host, self.service_port)
        } else {
            format!("{}:{}", self.service_host, self.service_port)
        }
    }

    /// JSON as stored in registries.
    pub fn to_json(&self) -> String {
        // A struct of strings, integers and a string map cannot fail to serialize.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses the JSON stored in a registry.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl fmt::Display for ServiceMetaInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.node_key())
    }
}

/// Builds the `name:version` service key.
pub fn service_key(name: &str, version: &str) -> String {
    ServiceKey::new(name, version).into_string()
}

/// A service key, `name:version`: how consumers look a service up, and
/// what every backend maps to its own names. Built and taken apart only
/// here, with one rule: the version is what follows the last `:`, and a
/// key without one has the [`DEFAULT_VERSION`] (the `#[service]` default).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    key: String,
    /// Where the name ends (the `:`), `key.len()` for a key without one.
    split: usize,
}

impl ServiceKey {
    /// `name:version`.
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            key: format!("{name}:{version}"),
            split: name.len(),
        }
    }

    /// Takes a key apart (see the type's docs for the rule).
    pub fn parse(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            split: key.rfind(':').unwrap_or(key.len()),
        }
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.key[..self.split]
    }

    /// The version; [`DEFAULT_VERSION`] when the key has none.
    pub fn version(&self) -> &str {
        match self.key.get(self.split + 1..) {
            Some(v) if self.split < self.key.len() => v,
            _ => DEFAULT_VERSION,
        }
    }

    /// The key as written.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The key as written.
    pub fn into_string(self) -> String {
        self.key
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

impl AsRef<str> for ServiceKey {
    fn as_ref(&self) -> &str {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys_split_at_the_last_colon_with_one_default() {
        let k = ServiceKey::parse("UserService:2.0");
        assert_eq!(
            (k.name(), k.version(), k.as_str()),
            ("UserService", "2.0", "UserService:2.0")
        );
        let k = ServiceKey::parse("a:b:3");
        assert_eq!((k.name(), k.version()), ("a:b", "3"));
        let k = ServiceKey::parse("Bare");
        assert_eq!(
            (k.name(), k.version(), k.as_str()),
            ("Bare", DEFAULT_VERSION, "Bare")
        );
        let k = ServiceKey::parse("Empty:");
        assert_eq!((k.name(), k.version()), ("Empty", ""));
        assert_eq!(ServiceKey::new("S", "1.0"), ServiceKey::parse("S:1.0"));
        assert_eq!(ServiceKey::new("S", "1.0").to_string(), "S:1.0");
    }

    #[test]
    fn keys_follow_the_seed_layout() {
        let m = ServiceMetaInfo::new("UserService", "1.0", "127.0.0.1", 8080);
        assert_eq!(m.service_key(), "UserService:1.0");
        assert_eq!(m.node_key(), "UserService:1.0/127.0.0.1:8080");
        assert_eq!(m.address(), "127.0.0.1:8080");
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let m = ServiceMetaInfo::new("S", "1.0", "::1", 9);
        assert_eq!(m.address(), "[::1]:9");
    }

    #[test]
    fn json_uses_the_java_field_names() {
        let mut m = ServiceMetaInfo::new("UserService", "2.0", "10.0.0.1", 80);
        m.metadata.insert("zone".into(), "a".into());
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(v["serviceName"], "UserService");
        assert_eq!(v["serviceVersion"], "2.0");
        assert_eq!(v["serviceHost"], "10.0.0.1");
        assert_eq!(v["servicePort"], 80);
        assert_eq!(v["serviceGroup"], "default");
        assert_eq!(v["weight"], 100);
        assert_eq!(v["metadata"]["zone"], "a");
        assert_eq!(
            ServiceMetaInfo::from_json(m.to_json().as_bytes()).unwrap(),
            m
        );
    }

    #[test]
    fn java_records_without_optional_fields_parse_with_defaults() {
        let json = br#"{"serviceName":"S","serviceHost":"h","servicePort":1}"#;
        let m = ServiceMetaInfo::from_json(json).unwrap();
        assert_eq!(m.service_version, "1.0");
        assert_eq!(m.service_group, "default");
        assert_eq!(m.weight, DEFAULT_WEIGHT);
    }
}
