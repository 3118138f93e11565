//! Names and records: service keys as Nacos service names, instance records in
//! instance metadata.

use super::*;

/// The Nacos service name of a service key: the key itself (`Name:version`).
/// Nacos reserves `@@` (it separates group and service), so a key holding it
/// is refused.
pub fn service_name(service_key: &str) -> Result<String, RegistryError> {
    if service_key.is_empty() || service_key.contains("@@") {
        return Err(failed(format!(
            "service key `{service_key}` cannot be a Nacos service name (empty or contains `@@`)"
        )));
    }
    Ok(service_key.to_owned())
}

/// The Nacos instance published for `meta` (ephemeral, cluster `DEFAULT`).
pub fn to_instance(meta: &ServiceMetaInfo) -> ServiceInstance {
    let mut metadata = HashMap::new();
    metadata.insert(META_KEY.to_owned(), meta.to_json());
    metadata.insert(VERSION_KEY.to_owned(), meta.service_version.clone());
    ServiceInstance {
        instance_id: None,
        ip: meta.service_host.clone(),
        port: i32::from(meta.service_port),
        weight: f64::from(meta.weight),
        healthy: true,
        enabled: true,
        ephemeral: true,
        cluster_name: Some(CLUSTER.to_owned()),
        service_name: None,
        metadata,
    }
}

/// Nacos weights are `f64` (the console edits them): rounded, clamped.
pub(super) fn weight_from(nacos: f64, fallback: u32) -> u32 {
    if nacos.is_finite() && nacos >= 0.0 {
        // In range after the clamp, so the cast cannot truncate.
        nacos.round().min(f64::from(u32::MAX)) as u32
    } else {
        fallback
    }
}

/// Reads an instance of `service_key` back. `None` for a record that is not
/// an instance of that key (logged).
pub fn from_instance(service_key: &str, instance: &ServiceInstance) -> Option<ServiceMetaInfo> {
    if let Some(json) = instance.metadata.get(META_KEY) {
        return match ServiceMetaInfo::from_json(json.as_bytes()) {
            Ok(mut meta) if meta.service_key() == service_key => {
                meta.weight = weight_from(instance.weight, meta.weight);
                Some(meta)
            }
            Ok(meta) => {
                warn!(service = service_key, found = %meta.service_key(), "skipping an instance record of another service");
                None
            }
            Err(e) => {
                warn!(service = service_key, instance = %instance.ip_and_port(), error = %e, "skipping a malformed instance record");
                None
            }
        };
    }
    // Registered by another Nacos client: build the record from the instance.
    let key = rpc_core::ServiceKey::parse(service_key);
    let (name, version) = (key.name(), key.version());
    let Ok(port) = u16::try_from(instance.port) else {
        warn!(
            service = service_key,
            port = instance.port,
            "skipping an instance with an invalid port"
        );
        return None;
    };
    let mut meta = ServiceMetaInfo::new(name, version, instance.ip.clone(), port);
    meta.weight = weight_from(instance.weight, meta.weight);
    meta.metadata = instance
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(meta)
}
