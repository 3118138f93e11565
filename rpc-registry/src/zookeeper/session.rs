//! How a session is opened (hosts, chroot, digest auth) and handed to
//! discovery.

use super::*;

/// How to open a session.
#[derive(Clone)]
pub(super) struct Spec {
    pub(super) hosts: String,
    pub(super) chroot: Option<String>,
    pub(super) session_timeout: Duration,
    pub(super) timeout: Duration,
    /// `user:password` for the digest scheme.
    pub(super) auth: Option<String>,
    /// TLS to every server (`registry.tls`), with `tcp+tls` for every host.
    pub(super) tls: Option<zookeeper_client::TlsOptions>,
}

impl Spec {
    pub(super) fn acls(&self) -> Acls<'static> {
        if self.auth.is_some() {
            Acls::creator_all()
        } else {
            Acls::anyone_all()
        }
    }

    pub(super) fn persistent(&self) -> CreateOptions<'static> {
        CreateMode::Persistent.with_acls(self.acls())
    }

    pub(super) fn ephemeral(&self) -> CreateOptions<'static> {
        CreateMode::Ephemeral.with_acls(self.acls())
    }

    /// Opens a new session (and creates the chroot if missing).
    pub(super) async fn open(&self) -> Result<Client, RegistryError> {
        let t = self.timeout;
        // Not `with_fail_eagerly`: during a leader election every server
        // refuses clients for a moment; keep cycling through them until the
        // request timeout instead of failing at the first round.
        let mut connector = Client::connector().with_session_timeout(self.session_timeout);
        if let Some(auth) = &self.auth {
            connector = connector.with_auth("digest", auth.as_bytes());
        }
        let what = format!("connecting to {}", self.hosts);
        let client = match &self.tls {
            Some(tls) => {
                bounded(
                    t,
                    what,
                    connector.with_tls(tls.clone()).secure_connect(&self.hosts),
                )
                .await?
            }
            None => bounded(t, what, connector.connect(&self.hosts)).await?,
        };
        let Some(chroot) = &self.chroot else {
            return Ok(client);
        };
        let exists = bounded(t, format!("stat {chroot}"), client.check_stat(chroot)).await?;
        if exists.is_none() {
            bounded(
                t,
                format!("creating chroot {chroot}"),
                client.mkdir(chroot, &self.persistent()),
            )
            .await?;
        }
        client
            .chroot(chroot.as_str())
            .map_err(|_| invalid("address", format!("invalid chroot `{chroot}`")))
    }
}

/// The current session, as handed to discovery.
#[derive(Clone)]
pub(super) struct Session {
    pub(super) client: Client,
    /// Increments with every new session.
    pub(super) epoch: u64,
}
