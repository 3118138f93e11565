//! Discovery shared by every watch of a registry: one SDK subscription per
//! service, pokes to its followers.

use super::*;

/// Discovery state shared by every watch of a registry.
pub(super) struct Discovery {
    pub(super) naming: NamingService,
    pub(super) health: watch::Receiver<Health>,
    /// Lane 0's probe, shared with the keeper: watches outlive neither.
    pub(super) _probe: Arc<AbortOnDrop>,
    pub(super) group: String,
    pub(super) timeout: Duration,
    /// One SDK subscription per service, shared by its watches.
    pub(super) hub: Mutex<HashMap<String, HubEntry>>,
}

pub(super) struct HubEntry {
    pub(super) pokes: watch::Sender<u64>,
    pub(super) listener: Arc<dyn NamingEventListener>,
    pub(super) watchers: usize,
}

/// The SDK's listener: pokes the watches of its service. The event's list is
/// not used (events are delivered from spawned tasks, so two can arrive out
/// of order); a poked watch reads the service itself.
pub(super) struct Poke(watch::Sender<u64>);

impl NamingEventListener for Poke {
    fn event(&self, _event: Arc<NamingChangeEvent>) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Discovery {
    /// The healthy, enabled instances of `service_key`, straight from the
    /// server, sorted by node key.
    pub(super) async fn query(
        &self,
        service_key: &str,
    ) -> Result<Vec<ServiceMetaInfo>, RegistryError> {
        let service = service_name(service_key)?;
        let t = self.timeout;
        let instances = timeout(
            t,
            self.naming.get_all_instances(
                service.clone(),
                Some(self.group.clone()),
                Vec::new(),
                false,
            ),
        )
        .await
        .map_err(|_| timed_out("query", t))?
        .map_err(|e| {
            let chain = rpc_core::error::report(&e);
            if chain.contains("message length too large") {
                // nacos-sdk 0.8 builds its gRPC clients with tonic's 4 MiB
                // receive limit and offers no setting; Nacos 2.x has no
                // paged instance query (issue 12, fault 6).
                unavailable(
                    format!("query {service}: the instance list is larger than the Nacos client's gRPC receive limit (4 MiB, not configurable in nacos-sdk 0.8); retrying will not help"),
                    e,
                )
            } else {
                unavailable(format!("query {service}"), e)
            }
        })?;
        let mut list: Vec<ServiceMetaInfo> = instances
            .iter()
            .filter(|i| i.healthy && i.enabled)
            .filter_map(|i| from_instance(service_key, i))
            .collect();
        list.sort_by_key(ServiceMetaInfo::node_key);
        list.dedup_by(|a, b| a.node_key() == b.node_key());
        Ok(list)
    }

    /// Every service name of the group, read in pages of
    /// [`SERVICE_PAGE`], at most [`MAX_SERVICE_PAGES`] of them.
    pub(super) async fn service_names(&self) -> Result<Vec<String>, RegistryError> {
        let t = self.timeout;
        let mut names = Vec::new();
        for page in 1..=MAX_SERVICE_PAGES {
            let (batch, total) = timeout(
                t,
                self.naming
                    .get_service_list(page, SERVICE_PAGE, Some(self.group.clone())),
            )
            .await
            .map_err(|_| timed_out("list services", t))?
            .map_err(|e| unavailable("list services", e))?;
            let last = batch.len() < usize::try_from(SERVICE_PAGE).unwrap_or(usize::MAX);
            names.extend(batch);
            if last || names.len() >= usize::try_from(total).unwrap_or(0) {
                break;
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub(super) async fn subscribe(&self, service: &str) -> watch::Receiver<u64> {
        let mut hub = self.hub.lock().await;
        if let Some(e) = hub.get_mut(service) {
            e.watchers += 1;
            return e.pokes.subscribe();
        }
        let (tx, rx) = watch::channel(0u64);
        let listener: Arc<dyn NamingEventListener> = Arc::new(Poke(tx.clone()));
        // The SDK keeps (and re-sends after reconnecting) the subscription
        // even when this request fails or times out.
        match timeout(
            self.timeout,
            self.naming.subscribe(
                service.to_owned(),
                Some(self.group.clone()),
                Vec::new(),
                listener.clone(),
            ),
        )
        .await
        {
            Ok(Ok(())) => debug!(service, "nacos subscription opened"),
            Ok(Err(e)) => debug!(service, error = %e, "nacos subscribe failed; the SDK retries"),
            Err(_) => debug!(service, "nacos subscribe timed out; the SDK retries"),
        }
        hub.insert(
            service.to_owned(),
            HubEntry {
                pokes: tx,
                listener,
                watchers: 1,
            },
        );
        rx
    }

    /// Sends the subscription of `service` again (after a reconnect).
    pub(super) async fn resubscribe(&self, service: &str) {
        let hub = self.hub.lock().await;
        let Some(listener) = hub.get(service).map(|e| e.listener.clone()) else {
            return;
        };
        if timeout(
            self.timeout,
            self.naming.subscribe(
                service.to_owned(),
                Some(self.group.clone()),
                Vec::new(),
                listener,
            ),
        )
        .await
        .is_err()
        {
            debug!(service, "nacos re-subscribe timed out; the SDK retries");
        }
    }

    pub(super) async fn unsubscribe(&self, service: &str) {
        let mut hub = self.hub.lock().await;
        let Some(e) = hub.get_mut(service) else {
            return;
        };
        e.watchers = e.watchers.saturating_sub(1);
        if e.watchers > 0 {
            return;
        }
        let Some(e) = hub.remove(service) else {
            return;
        };
        match timeout(
            self.timeout,
            self.naming.unsubscribe(
                service.to_owned(),
                Some(self.group.clone()),
                Vec::new(),
                e.listener,
            ),
        )
        .await
        {
            Ok(Ok(())) => debug!(service, "nacos subscription closed"),
            _ => debug!(service, "nacos unsubscribe failed"),
        }
    }
}

/// Releases a watch's share of its subscription when the watch task ends.
pub(super) struct SubscriptionGuard {
    pub(super) discovery: Arc<Discovery>,
    pub(super) service: String,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let discovery = self.discovery.clone();
            let service = std::mem::take(&mut self.service);
            rt.spawn(async move { discovery.unsubscribe(&service).await });
        }
    }
}
