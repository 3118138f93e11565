//! The agent HTTP API over hyper with rustls: requests, ACL refusals, TLS
//! settings.

use super::*;

/// The agent's HTTP API.
#[derive(Clone)]
pub(super) struct Agent {
    pub(super) client: HttpsClient,
    pub(super) base: String,
    pub(super) token: Option<String>,
}

impl Agent {
    /// One request; `Ok` carries any status the agent answered with.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        t: Duration,
    ) -> Result<(StatusCode, Bytes), RegistryError> {
        self.exchange(method, path, body, t)
            .await
            .map(|(status, _, bytes)| (status, bytes))
    }

    /// [`call`](Self::call), with the answer's headers.
    pub(super) async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        t: Duration,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), RegistryError> {
        let what = format!("{method} {path}");
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        let body = match body {
            Some(b) => Full::new(Bytes::from(b)).boxed(),
            None => Empty::<Bytes>::new().boxed(),
        };
        let req = req
            .body(body)
            .map_err(|e| unavailable(format!("{what}: bad request"), e))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unavailable(what.clone(), e))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unavailable(format!("{what}: reading the answer"), e))?
                .to_bytes();
            Ok((status, headers, bytes))
        };
        timeout(t, exchange)
            .await
            .map_err(|_| timed_out(&what, t))?
    }

    /// A request that must answer 200.
    pub(super) async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        t: Duration,
    ) -> Result<Bytes, RegistryError> {
        let (status, bytes) = self.call(method.clone(), path, body, t).await?;
        if status == StatusCode::OK {
            Ok(bytes)
        } else {
            Err(rejected(&format!("{method} {path}"), status, &bytes))
        }
    }

    pub(super) async fn register(&self, body: &[u8], t: Duration) -> Result<(), RegistryError> {
        self.ok(
            Method::PUT,
            "/v1/agent/service/register",
            Some(body.to_vec()),
            t,
        )
        .await
        .map(drop)
    }

    pub(super) async fn deregister(&self, id: &str, t: Duration) -> Result<(), RegistryError> {
        let path = format!("/v1/agent/service/deregister/{}", encode_path(id));
        self.ok(Method::PUT, &path, None, t).await.map(drop)
    }

    pub(super) async fn pass(
        &self,
        check: &str,
        t: Duration,
    ) -> Result<(StatusCode, Bytes), RegistryError> {
        let path = format!("/v1/agent/check/pass/{}", encode_path(check));
        self.call(Method::PUT, &path, None, t).await
    }
}

pub(super) fn rejected(what: &str, status: StatusCode, body: &[u8]) -> RegistryError {
    let body = String::from_utf8_lossy(body);
    // Consul's answer to a `dc` it has never heard of: a setting to fix,
    // not an outage to wait out.
    if status == StatusCode::INTERNAL_SERVER_ERROR && body.contains("No path to datacenter") {
        return RegistryError::NotFound {
            backend: BACKEND,
            what: format!("the datacenter named by `registry.datacenter` ({what})"),
        };
    }
    // Not Consul (an HTTP server on that port) may answer with a whole
    // page: the first line, cut short, is enough to tell.
    let first: String = body
        .trim()
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    refused(what, status, &body)
        .unwrap_or_else(|| failed(format!("{what}: HTTP {status}: {first}")))
}

/// A 403 is Consul's ACL system refusing the request: "ACL not found" (a
/// token it does not know) is `Unauthenticated`, anything else ("Permission
/// denied": a token without the rights) `PermissionDenied`.
pub(super) fn refused(what: &str, status: StatusCode, body: &str) -> Option<RegistryError> {
    if status != StatusCode::FORBIDDEN {
        return None;
    }
    let kind = if body.contains("ACL not found") {
        RegistryErrorKind::Unauthenticated
    } else {
        RegistryErrorKind::PermissionDenied
    };
    Some(RegistryError::denied(
        BACKEND,
        kind,
        what,
        body.trim(),
        None,
    ))
}

/// The HTTP(S) client: webpki roots by default; `registry.tls` gives a CA,
/// an optional client certificate and an optional server name.
/// The agent's HTTP(S) client (hyper, with rustls).
pub(super) type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector>,
    http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
>;

pub(super) fn http_client(
    tls: Option<&TlsConfig>,
    t: Duration,
) -> Result<HttpsClient, RegistryError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(t));
    http.set_nodelay(true);
    let builder = match tls {
        None => HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| unavailable("TLS set-up", e))?
            .https_or_http()
            .enable_http1(),
        Some(tls) => {
            let Some(ca) = &tls.ca_file else {
                return Err(invalid(
                    "tls.ca_file",
                    "needed for consul (without [registry.tls], https uses the public web roots)",
                ));
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&crate::support::tls::read_pem(
                BACKEND, ca, "ca_file",
            )?) {
                let cert = cert.map_err(|e| unavailable("registry.tls.ca_file", e))?;
                roots
                    .add(cert)
                    .map_err(|e| unavailable("registry.tls.ca_file", e))?;
            }
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| unavailable("TLS set-up", e))?
                .with_root_certificates(roots);
            let config = match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => {
                    let chain = CertificateDer::pem_slice_iter(&crate::support::tls::read_pem(
                        BACKEND,
                        cert,
                        "cert_file",
                    )?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| unavailable("registry.tls.cert_file", e))?;
                    let key = PrivateKeyDer::from_pem_slice(&crate::support::tls::read_pem(
                        BACKEND, key, "key_file",
                    )?)
                    .map_err(|e| unavailable("registry.tls.key_file", e))?;
                    config
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| unavailable("registry.tls client certificate", e))?
                }
                (None, None) => config.with_no_client_auth(),
                _ => {
                    return Err(invalid(
                        "tls.key_file",
                        "registry.tls needs both cert_file and key_file for a client certificate",
                    ));
                }
            };
            let mut b = HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_or_http();
            if let Some(domain) = &tls.domain {
                let name = ServerName::try_from(domain.clone())
                    .map_err(|e| unavailable("registry.tls.domain", e))?;
                b = b.with_server_name_resolver(FixedServerNameResolver::new(name));
            }
            b.enable_http1()
        }
    };
    let connector = builder.wrap_connector(http);
    // No pooled idle connections: a connection
    // the agent closed while idle cannot fail the next heartbeat.
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::ZERO)
        .pool_max_idle_per_host(0)
        .build(connector))
}

/// The agent's base URL: `http://` is assumed when no scheme is given.
pub(super) fn base_url(address: &str) -> String {
    let a = address.trim().trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") {
        a.to_owned()
    } else {
        format!("http://{a}")
    }
}
