//! Connections (lanes) to the server: settings, health probes, and reconnecting
//! a lane.

use super::*;

/// How to reach the server; shared by every lane.
pub(super) struct Settings {
    pub(super) addresses: Vec<String>,
    pub(super) namespace: String,
    pub(super) group: String,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) timeout: Duration,
    /// How often the keeper checks that the server lists its instances as
    /// registered: TTL / 3, at most [`RECONCILE_INTERVAL`].
    pub(super) reconcile: Duration,
    pub(super) cache_dir: PathBuf,
}

impl Settings {
    pub(super) fn from_config(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let addresses: Vec<String> = config
            .address
            .as_slice()
            .iter()
            .map(|a| {
                let a = a.trim();
                let a = a
                    .strip_prefix("http://")
                    .or_else(|| a.strip_prefix("https://"))
                    .unwrap_or(a);
                a.trim_end_matches('/')
                    .trim_end_matches("/nacos")
                    .to_owned()
            })
            .filter(|a| !a.is_empty())
            .collect();
        if addresses.is_empty() {
            return Err(invalid(
                "address",
                "lists no server (e.g. \"127.0.0.1:8848\")",
            ));
        }
        if config.tls.is_some() {
            return Err(invalid("tls", "not supported by the nacos backend"));
        }
        let non_empty = |s: &Option<String>| {
            s.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Ok(Self {
            addresses,
            namespace: non_empty(&config.namespace).unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            group: non_empty(&config.group).unwrap_or_else(|| DEFAULT_GROUP.to_owned()),
            username: non_empty(&config.username),
            password: config.password.clone(),
            timeout: config.timeout().max(Duration::from_millis(100)),
            reconcile: (config.ttl() / 3).clamp(Duration::from_millis(500), RECONCILE_INTERVAL),
            // The SDK always writes its naming cache to disk (never read back
            // here: `naming_load_cache_at_start` stays off); keep it out of $HOME.
            cache_dir: std::env::temp_dir().join("rpc-nacos-cache"),
        })
    }

    /// One SDK client (one gRPC connection), configured from `[registry]`
    /// only: `env_first(false)` keeps NACOS_CLIENT_* variables out of it.
    pub(super) async fn connect(&self) -> Result<NamingService, RegistryError> {
        let mut props = ClientProps::new()
            .server_addr(self.addresses.join(","))
            .namespace(self.namespace.clone())
            .app_name(APP_NAME)
            .naming_push_empty_protection(false)
            .naming_load_cache_at_start(false)
            .cache_dir(self.cache_dir.clone())
            .env_first(false);
        if self.addresses.len() > 1 {
            // The SDK tries ONE server (picked at random) when it starts and
            // gives up if that one is down; with a cluster, let it go round
            // the list (its only knob for this, deprecated without a
            // replacement).
            #[allow(deprecated)]
            {
                props = props.max_retries(u32::try_from(self.addresses.len()).unwrap_or(u32::MAX));
            }
        }
        let auth = self.username.is_some();
        if let Some(user) = &self.username {
            props = props
                .auth_username(user.clone())
                .auth_password(self.password.clone().unwrap_or_default());
        }
        let mut builder = NamingServiceBuilder::new(props);
        if auth {
            builder = builder.enable_auth_plugin_http();
        }
        let t = self.timeout;
        timeout(t, builder.build())
            .await
            .map_err(|_| timed_out("connecting", t))?
            .map_err(|e| unavailable(format!("cannot connect to {}", self.addresses.join(",")), e))
    }

    pub(super) fn probe_timeout(&self) -> Duration {
        self.timeout.min(PROBE_TIMEOUT)
    }
}

/// What a lane's probe last saw.
#[derive(Clone, Copy, Debug)]
pub(super) struct Health {
    pub(super) up: bool,
    /// How many times the connection came back after a break.
    pub(super) reconnects: u64,
    /// When `up` last changed.
    pub(super) since: Instant,
}

/// Probes one connection until every receiver is gone.
pub(super) async fn probe(
    naming: NamingService,
    group: String,
    t: Duration,
    tx: watch::Sender<Health>,
) {
    loop {
        let r = timeout(t, naming.get_service_list(1, 1, Some(group.clone()))).await;
        let up = matches!(r, Ok(Ok(_)));
        if !up {
            match r {
                Ok(Err(e)) => debug!(error = %e, "nacos probe failed"),
                _ => debug!(timeout = ?t, "nacos probe timed out"),
            }
        }
        tx.send_if_modified(|h| {
            if h.up == up {
                return false;
            }
            h.up = up;
            h.since = Instant::now();
            if up {
                h.reconnects += 1;
                info!(reconnects = h.reconnects, "nacos connection is back");
            } else {
                warn!("nacos connection lost");
            }
            true
        });
        tokio::select! {
            _ = sleep(PROBE_INTERVAL) => {}
            _ = tx.closed() => return,
        }
    }
}

/// A connection plus its probe.
pub(super) struct Lane {
    pub(super) naming: NamingService,
    pub(super) health: watch::Receiver<Health>,
    pub(super) probe: Arc<AbortOnDrop>,
}

impl Lane {
    pub(super) fn start(naming: NamingService, settings: &Settings) -> Result<Self, RegistryError> {
        let (tx, rx) = watch::channel(Health {
            up: true,
            reconnects: 0,
            since: Instant::now(),
        });
        let task = AbortOnDrop::spawn(probe(
            naming.clone(),
            settings.group.clone(),
            settings.probe_timeout(),
            tx,
        ))
        .ok_or_else(|| failed("the nacos backend needs a Tokio runtime"))?;
        Ok(Self {
            naming,
            health: rx,
            probe: Arc::new(task),
        })
    }
}
