//! Talking to registries over HTTP (reqwest): endpoints (mirrors first, then the registry),
//! TLS settings per registry, credentials, retries of transient failures, and mapping of
//! registry errors to store errors.

use std::time::Duration;

use tracing::{debug, warn};

use crate::config::{RegistryConfig, StoreConfig};
use crate::digest::Digest;
use crate::error::Error;
use crate::reference::ImageReference;

/// Manifest media types we accept, most preferred first.
pub(crate) const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

const USER_AGENT: &str = concat!("cri-systemd/", env!("CARGO_PKG_VERSION"));

/// Credentials for one pull, as kubelet passes them (CRI `AuthConfig`).
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password (also what a docker `auth` field decodes to).
    Basic { username: String, password: String },
    /// An OAuth2 refresh token from a credential helper (`identitytoken`), exchanged for an
    /// access token at the registry's token endpoint.
    IdentityToken(String),
    /// A bearer token sent to the registry as is.
    RegistryToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
            Credentials::RegistryToken(_) => f.write_str("RegistryToken(<redacted>)"),
        }
    }
}

impl Credentials {
    /// Decodes docker's `auth` field: base64 of `username:password`.
    pub fn from_docker_auth(auth: &str) -> Result<Credentials, Error> {
        use base64::Engine as _;
        let bad = |reason: &str| Error::InvalidConfig(format!("auth field: {reason}"));
        let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad("not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad("not utf-8"))?;
        let (username, password) = decoded.split_once(':').ok_or_else(|| bad("not username:password"))?;
        Ok(Credentials::Basic { username: username.to_owned(), password: password.to_owned() })
    }
}

/// Where requests for a registry go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `host[:port]`
    pub host: String,
    pub plain_http: bool,
    pub is_mirror: bool,
}

impl Endpoint {
    /// `https://host[:port]`, `http://host[:port]` or `host[:port]` (https).
    pub fn parse_mirror(url: &str) -> Result<Endpoint, String> {
        let (plain_http, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (false, rest)
        } else {
            (false, url)
        };
        let host = rest.trim_end_matches('/');
        let host = host.strip_suffix("/v2").unwrap_or(host);
        if host.is_empty() || host.contains('/') || host.contains('@') || host.contains(char::is_whitespace) {
            return Err(format!("mirror {url:?} must be [http[s]://]host[:port] (no path)"));
        }
        Ok(Endpoint { host: host.to_owned(), plain_http, is_mirror: true })
    }
}

/// Endpoints for a registry: its mirrors in order, then the registry itself.
pub(crate) fn endpoints(registry: &str, config: &RegistryConfig) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = config.mirrors.iter().filter_map(|m| Endpoint::parse_mirror(m).ok()).collect();
    // oci-client's own name for Docker Hub's API host.
    let host = if registry == crate::reference::DEFAULT_REGISTRY { "index.docker.io" } else { registry };
    out.push(Endpoint { host: host.to_owned(), plain_http: config.plain_http, is_mirror: false });
    out
}

/// The credentials to present to `endpoint`: none to a mirror over plain HTTP, where anyone on
/// the way would read them (the pull goes on anonymously; a mirror that then wants them fails
/// as Unauthenticated and the next endpoint is tried). The registry itself, when configured with
/// `plain_http`, gets them: that was asked for by name.
fn credentials_for<'c>(
    endpoint: &Endpoint,
    registry: &str,
    credentials: Option<&'c Credentials>,
) -> Option<&'c Credentials> {
    if credentials.is_some() && endpoint.is_mirror && endpoint.plain_http {
        warn!(
            registry,
            mirror = %endpoint.host,
            "not sending the pull's registry credentials to a mirror over plain HTTP; pulling from it anonymously"
        );
        return None;
    }
    credentials
}

/// Body limits, as containerd and CRI-O (containers/image) set them against registries that
/// answer with endless or huge bodies (CVE-2023-25153, CVE-2022-31030 and CVE-2020-1702 classes):
/// every body read into memory is read with one of these caps while streaming, and a
/// `Content-Length` over the cap is refused before the first byte.
///
/// Manifests and indexes: containerd's `MaxManifestSize` (`4 * 1048 * 1048`, in
/// `core/remotes/docker/resolver.go`; 4,393,216 bytes, the `1048` is containerd's).
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 * 1048 * 1048;
/// Image configs: containers/image's `iolimits.MaxConfigBodySize` (4 MiB).
pub(crate) const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Token endpoint answers: containers/image's `iolimits.MaxAuthTokenBodySize` (1 MiB).
pub(crate) const MAX_TOKEN_BYTES: u64 = 1 << 20;
/// Error bodies (only their start is read, for the message): containers/image's
/// `iolimits.MaxErrorBodySize` (1 MiB).
pub(crate) const MAX_ERROR_BYTES: u64 = 1 << 20;

/// A blob's body as it arrives.
pub(crate) type BlobStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send>>;

/// A client for one endpoint of one pull: plain HTTP requests of the distribution API (manifests,
/// blobs) with the registry's token dance, every body in memory read with a cap (oci-client reads
/// whole bodies). Credentials and tokens are per client, so a client is never shared between
/// pulls that may carry different credentials.
pub(crate) struct EndpointClient {
    pub endpoint: Endpoint,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    /// The `Authorization` header the registry accepted (or that we were given), for the next
    /// requests of this pull.
    authorization: std::sync::Mutex<Option<reqwest::header::HeaderValue>>,
    registry: String,
    retries: u32,
}

impl std::fmt::Debug for EndpointClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointClient").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

/// The HTTP clients of the store, one per registry (its mirrors share its TLS settings), kept
/// across pulls: building one loads the TLS roots (milliseconds), and a kept client reuses its
/// idle connections, so a re-pull does not start with a TCP (and TLS) handshake. Credentials are
/// not in the client: they go per request, from each pull's [`EndpointClient`].
#[derive(Default)]
pub(crate) struct HttpClients(std::sync::Mutex<std::collections::HashMap<String, reqwest::Client>>);

impl HttpClients {
    fn get(&self, registry: &str, tls: &TlsSettings, config: &StoreConfig) -> Result<reqwest::Client, Error> {
        if let Some(client) = self.0.lock().expect("http clients lock").get(registry) {
            return Ok(client.clone());
        }
        let client = http_client(registry, tls, config)?;
        self.0.lock().expect("http clients lock").insert(registry.to_owned(), client.clone());
        Ok(client)
    }
}

impl EndpointClient {
    pub async fn new(
        endpoint: Endpoint,
        registry: &str,
        config: &StoreConfig,
        clients: &HttpClients,
        credentials: Option<&Credentials>,
    ) -> Result<Self, Error> {
        let credentials = credentials_for(&endpoint, registry, credentials);
        let registry_config = config.registries.get(registry).cloned().unwrap_or_default();
        let mut extra_roots = Vec::new();
        if let Some(ca_file) = &registry_config.ca_file {
            let data = std::fs::read(ca_file)
                .map_err(|e| Error::io(format!("read ca_file {} of registry {registry}", ca_file.display()), e))?;
            extra_roots.push(data);
        }
        let tls = TlsSettings { insecure: registry_config.insecure, extra_roots };
        let http = clients.get(registry, &tls, config)?;
        let bearer = match credentials {
            Some(Credentials::RegistryToken(token)) => Some(token.clone()),
            Some(Credentials::IdentityToken(token)) => {
                Some(crate::token::exchange_identity_token(&endpoint, registry, token, &tls, config).await?)
            }
            _ => None,
        };
        let authorization = match bearer {
            Some(token) => {
                Some(reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    Error::InvalidConfig(format!("registry {registry}: the token is not a header value"))
                })?)
            }
            None => None,
        };
        Ok(EndpointClient {
            endpoint,
            http,
            credentials: credentials.cloned(),
            authorization: std::sync::Mutex::new(authorization),
            registry: registry.to_owned(),
            retries: config.retries,
        })
    }

    /// `<scheme>://<host>/v2/<repository>/<kind>/<reference>[?ns=<registry>]` (a mirror is told
    /// which registry the image is from, as containerd and oci-client do).
    fn url(&self, image: &ImageReference, kind: &str, reference: &str) -> String {
        let scheme = if self.endpoint.plain_http { "http" } else { "https" };
        let ns = if self.endpoint.is_mirror { format!("?ns={}", image.registry) } else { String::new() };
        format!("{scheme}://{}/v2/{}/{kind}/{reference}{ns}", self.endpoint.host, image.repository)
    }

    /// Fetches a manifest (or index) by the image's tag/digest, or by `digest`, reading at most
    /// [`MAX_MANIFEST_BYTES`]. Returns the raw bytes; the caller verifies them against the digest
    /// it expects.
    pub async fn manifest(&self, image: &ImageReference, digest: Option<&Digest>) -> Result<bytes::Bytes, Error> {
        let (reference, separator) = match (digest.or(image.digest.as_ref()), &image.tag) {
            (Some(digest), _) => (digest.to_string(), '@'),
            (None, Some(tag)) => (tag.clone(), ':'),
            (None, None) => ("latest".into(), ':'),
        };
        let url = self.url(image, "manifests", &reference);
        let what = format!("{}{separator}{reference}", image.name());
        self.retry("fetch manifest", || async {
            let response = self.get(image, &url, Some(&MANIFEST_MEDIA_TYPES.join(", ")), &what).await?;
            self.read_capped(response, MAX_MANIFEST_BYTES, &format!("manifest of {what}")).await
        })
        .await
    }

    /// The OCI 1.1 referrers API's index of the manifests whose `subject` is `digest`
    /// (`GET /v2/<repo>/referrers/<digest>`). Registries without the API answer 404, some
    /// another error: not retried, since the caller then looks elsewhere. No `artifactType`
    /// filter is sent: registries may ignore it, so the caller filters.
    pub async fn referrers(&self, image: &ImageReference, digest: &Digest) -> Result<bytes::Bytes, Error> {
        let url = self.url(image, "referrers", &digest.to_string());
        let what = format!("referrers of {}@{digest}", image.name());
        let response = self.get(image, &url, Some("application/vnd.oci.image.index.v1+json"), &what).await?;
        self.read_capped(response, MAX_MANIFEST_BYTES, &what).await
    }

    /// The digest of the image's manifest (or index) from a HEAD request's `Docker-Content-Digest`
    /// header, without its body: what containerd's resolver asks first (`core/remotes/docker/
    /// resolver.go`), so that a re-pull of a present image costs one round trip and no body. `None`
    /// when the registry gives no usable answer (no or a bad header, no `Content-Length`, a
    /// manifest over [`MAX_MANIFEST_BYTES`], a 405 or any other failure): the caller then GETs
    /// the manifest as before, and that request reports the error if there is one.
    pub async fn manifest_digest(&self, image: &ImageReference) -> Option<Digest> {
        let reference = match (&image.digest, &image.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".into(),
        };
        let url = self.url(image, "manifests", &reference);
        let what = format!("{}:{reference}", image.name());
        let accept = MANIFEST_MEDIA_TYPES.join(", ");
        let response = match self.send(reqwest::Method::HEAD, image, &url, Some(&accept), &what).await {
            Ok(response) => response,
            Err(e) => {
                debug!(registry = %self.endpoint.host, manifest = %what, error = %e, "HEAD of manifest failed, fetching it");
                return None;
            }
        };
        let headers = response.headers();
        let size = headers
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())?;
        if size > MAX_MANIFEST_BYTES {
            return None;
        }
        let digest = headers.get("docker-content-digest").and_then(|v| v.to_str().ok())?;
        digest.parse::<Digest>().ok()
    }

    /// Fetches a small blob (config) fully into memory, bounded by its declared size, which may
    /// be at most [`MAX_CONFIG_BYTES`].
    pub async fn small_blob(&self, image: &ImageReference, digest: &Digest, size: u64) -> Result<Vec<u8>, Error> {
        use futures_util::StreamExt;
        if size > MAX_CONFIG_BYTES {
            return Err(Error::TooLarge {
                registry: self.endpoint.host.clone(),
                what: format!("blob {digest} (declared {size} bytes)"),
                limit: MAX_CONFIG_BYTES,
            });
        }
        self.retry("fetch blob", || async {
            let mut stream = self.blob_stream(image, digest, size).await?;
            let mut out = Vec::with_capacity(size.min(1 << 20) as usize);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.unavailable(format!("read blob {digest}: {e}")))?;
                if out.len() as u64 + chunk.len() as u64 > size {
                    return Err(Error::SizeMismatch {
                        what: format!("blob {digest}"),
                        expected: size,
                        actual: out.len() as u64 + chunk.len() as u64,
                    });
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        })
        .await
    }

    /// Starts streaming a blob (retrying the request, not the body). The caller bounds and
    /// verifies what it reads.
    pub async fn blob_stream(&self, image: &ImageReference, digest: &Digest, _size: u64) -> Result<BlobStream, Error> {
        let url = self.url(image, "blobs", &digest.to_string());
        let what = format!("{}@{digest}", image.repository);
        self.retry("fetch blob", || async {
            let response = self.get(image, &url, None, &what).await?;
            let stream = futures_util::stream::unfold(Some(response), |response| async move {
                let mut response = response?;
                match response.chunk().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(response))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), None)),
                }
            });
            Ok(Box::pin(stream) as BlobStream)
        })
        .await
    }

    /// A GET with this pull's authorization; on a 401, one more try after the challenge is
    /// answered (a bearer token from the realm, or basic credentials). A non-success answer is
    /// an error made from its status and the start of its body.
    async fn get(
        &self,
        image: &ImageReference,
        url: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response, Error> {
        self.send(reqwest::Method::GET, image, url, accept, what).await
    }

    /// [`Self::get`] with any method (HEAD for a manifest's digest).
    async fn send(
        &self,
        method: reqwest::Method,
        image: &ImageReference,
        url: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response, Error> {
        let mut authorized = false;
        loop {
            let mut request = self.http.request(method.clone(), url);
            if let Some(accept) = accept {
                request = request.header(reqwest::header::ACCEPT, accept);
            }
            let authorization = self.authorization.lock().expect("authorization lock").clone();
            if let Some(authorization) = authorization {
                request = request.header(reqwest::header::AUTHORIZATION, authorization);
            }
            let response = request.send().await.map_err(|e| self.request_error(&e, what))?;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED
                && !authorized
                && let Some(authorization) = self.answer_challenge(image, response.headers()).await?
            {
                *self.authorization.lock().expect("authorization lock") = Some(authorization);
                authorized = true;
                continue;
            }
            if !response.status().is_success() {
                return Err(self.error_response(response, what).await);
            }
            return Ok(response);
        }
    }

    /// The `Authorization` header that answers a 401's `WWW-Authenticate` challenge, if we can.
    async fn answer_challenge(
        &self,
        image: &ImageReference,
        headers: &reqwest::header::HeaderMap,
    ) -> Result<Option<reqwest::header::HeaderValue>, Error> {
        let basic = match &self.credentials {
            Some(Credentials::Basic { username, password }) => Some((username.as_str(), password.as_str())),
            // A given bearer token was refused: nothing else to try.
            Some(_) => return Ok(None),
            None => None,
        };
        let challenges: Vec<&str> =
            headers.get_all(reqwest::header::WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok()).collect();
        if let Some(challenge) = challenges.iter().find_map(|c| crate::token::parse_bearer_challenge(c)) {
            let scope = format!("repository:{}:pull", image.repository);
            let token = crate::token::fetch_bearer_token(&self.http, &self.endpoint, &challenge, &scope, basic).await?;
            return Ok(reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).ok());
        }
        let offers_basic = challenges.iter().any(|c| c.trim_start().to_ascii_lowercase().starts_with("basic"));
        match basic {
            Some((username, password)) if offers_basic => {
                use base64::Engine as _;
                let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
                Ok(reqwest::header::HeaderValue::from_str(&format!("Basic {encoded}")).ok())
            }
            _ => Ok(None),
        }
    }

    /// Reads a success body into memory, failing as soon as it passes `limit` bytes.
    async fn read_capped(&self, response: reqwest::Response, limit: u64, what: &str) -> Result<bytes::Bytes, Error> {
        read_capped(response, limit).await.map_err(|e| match e {
            CappedReadError::TooLarge => {
                Error::TooLarge { registry: self.endpoint.host.clone(), what: what.to_owned(), limit }
            }
            CappedReadError::Request(e) => self.request_error(&e, what),
        })
    }

    /// The error a non-success answer means, from its status and the OCI error envelope in the
    /// first [`MAX_ERROR_BYTES`] of its body.
    async fn error_response(&self, response: reqwest::Response, what: &str) -> Error {
        let status = response.status().as_u16();
        let body = read_prefix(response, MAX_ERROR_BYTES).await;
        registry_error(status, &body, &self.endpoint.host, &self.registry, what)
    }

    fn request_error(&self, e: &reqwest::Error, what: &str) -> Error {
        let mut detail = lower(&e.to_string());
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            detail.push_str(": ");
            detail.push_str(&lower(&s.to_string()));
            source = s.source();
        }
        self.unavailable(format!("{what}: {detail}"))
    }

    pub fn unavailable(&self, detail: String) -> Error {
        Error::Unavailable { registry: self.endpoint.host.clone(), detail }
    }

    /// Runs `op`, retrying transient failures with exponential backoff.
    pub async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if is_transient(&e) && attempt < self.retries => {
                    let delay = Duration::from_millis(200 << attempt.min(6));
                    warn!(registry = %self.endpoint.host, attempt = attempt + 1, ?delay, error = %e, "{what} failed, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// The HTTP client of one registry's requests (and its token endpoint's).
pub(crate) fn http_client(registry: &str, tls: &TlsSettings, config: &StoreConfig) -> Result<reqwest::Client, Error> {
    let mut roots = Vec::new();
    for cert in &tls.extra_roots {
        roots.push(
            reqwest::Certificate::from_pem(cert)
                .map_err(|e| Error::InvalidConfig(format!("ca_file of registry {registry}: {e}")))?,
        );
    }
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .danger_accept_invalid_certs(tls.insecure)
        .tls_certs_merge(roots)
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(config.read_timeout_secs.max(1)))
        .build()
        .map_err(|e| Error::InvalidConfig(format!("registry {registry}: {}", lower(&e.to_string()))))
}

#[derive(Debug)]
pub(crate) enum CappedReadError {
    TooLarge,
    Request(reqwest::Error),
}

/// A whole body, read while it stays within `limit` bytes; a larger `Content-Length`, or more
/// bytes than `limit` (whatever the header said), fail at once.
pub(crate) async fn read_capped(mut response: reqwest::Response, limit: u64) -> Result<bytes::Bytes, CappedReadError> {
    let declared = response.content_length().unwrap_or(0);
    if declared > limit {
        return Err(CappedReadError::TooLarge);
    }
    let mut out = bytes::BytesMut::with_capacity(declared.min(64 << 10) as usize);
    while let Some(chunk) = response.chunk().await.map_err(CappedReadError::Request)? {
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(CappedReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// At most the first `limit` bytes of a body (the rest is not read); what arrived before a
/// failure.
pub(crate) async fn read_prefix(mut response: reqwest::Response, limit: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = (limit as usize).saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() as u64 >= limit {
            break;
        }
    }
    out
}

/// The error an HTTP status and an OCI error envelope (`{"errors":[{"code","message"}]}`) mean.
fn registry_error(status: u16, body: &[u8], host: &str, registry: &str, what: &str) -> Error {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<EnvelopeError>,
    }
    #[derive(serde::Deserialize)]
    struct EnvelopeError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let host = host.to_owned();
    let envelope = serde_json::from_slice::<Envelope>(body).ok().filter(|e| !e.errors.is_empty());
    let code = envelope.as_ref().map(|e| e.errors[0].code.to_ascii_uppercase()).unwrap_or_default();
    let message = match &envelope {
        Some(envelope) => envelope.errors.iter().map(|e| lower(&e.message)).collect::<Vec<_>>().join("; "),
        None => {
            // Only the start: an error page is no place for megabytes of text.
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_string();
            lower(&text)
        }
    };
    let detail = format!("{what}: http {status}: {message}");
    debug!(host, status, code, "registry error");
    match (status, code.as_str()) {
        (_, "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN" | "NOT_FOUND") | (404, _) => {
            Error::NotFound { reference: what.to_owned(), detail: format!("registry {registry} does not have it") }
        }
        (_, "UNAUTHORIZED") | (401, _) => Error::Unauthenticated { registry: host, detail },
        (_, "DENIED") | (403, _) => Error::PermissionDenied { registry: host, detail },
        (_, "TOOMANYREQUESTS") | (408 | 429 | 500..=599, _) => Error::Unavailable { registry: host, detail },
        _ => Error::Registry { registry: host, detail },
    }
}

/// TLS settings of a registry's requests and its token exchange.
#[derive(Debug, Clone)]
pub(crate) struct TlsSettings {
    pub insecure: bool,
    /// PEM files of the registry's `ca_file`.
    pub extra_roots: Vec<Vec<u8>>,
}

pub(crate) fn is_transient(e: &Error) -> bool {
    matches!(e, Error::Unavailable { .. })
}

fn lower(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_and_endpoints() {
        assert_eq!(
            Endpoint::parse_mirror("http://127.0.0.1:5001/").unwrap(),
            Endpoint { host: "127.0.0.1:5001".into(), plain_http: true, is_mirror: true }
        );
        assert!(!Endpoint::parse_mirror("mirror.example").unwrap().plain_http);
        assert!(Endpoint::parse_mirror("https://m.example/some/path").is_err());
        let config = RegistryConfig { mirrors: vec!["http://m1:1".into(), "m2".into()], ..Default::default() };
        let hosts: Vec<_> = endpoints("docker.io", &config).into_iter().map(|e| e.host).collect();
        assert_eq!(hosts, ["m1:1", "m2", "index.docker.io"]);
    }

    #[test]
    fn registry_errors_from_status_and_envelope() {
        let kind = |status, body: &str| registry_error(status, body.as_bytes(), "h", "r", "img").kind();
        use crate::error::ErrorKind;
        assert_eq!(kind(404, r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"x"}]}"#), ErrorKind::NotFound);
        assert_eq!(kind(400, r#"{"errors":[{"code":"NAME_UNKNOWN","message":"x"}]}"#), ErrorKind::NotFound);
        assert_eq!(kind(403, "{{{{"), ErrorKind::PermissionDenied);
        assert_eq!(kind(401, ""), ErrorKind::Unauthenticated);
        assert_eq!(kind(429, ""), ErrorKind::Unavailable);
        let long = "x".repeat(100_000);
        let message = registry_error(500, long.as_bytes(), "h", "r", "img").to_string();
        assert!(message.len() < 1000, "an error page is cut: {} bytes", message.len());
    }

    #[test]
    fn no_credentials_to_a_plain_http_mirror() {
        let creds = Credentials::Basic { username: "u".into(), password: "p".into() };
        let plain_mirror = Endpoint::parse_mirror("http://10.0.0.1:5000").unwrap();
        let tls_mirror = Endpoint::parse_mirror("https://mirror.example").unwrap();
        let plain_registry = Endpoint { host: "127.0.0.1:5000".into(), plain_http: true, is_mirror: false };
        assert!(credentials_for(&plain_mirror, "docker.io", Some(&creds)).is_none());
        assert!(credentials_for(&tls_mirror, "docker.io", Some(&creds)) == Some(&creds));
        assert!(credentials_for(&plain_registry, "127.0.0.1:5000", Some(&creds)) == Some(&creds));
    }

    #[test]
    fn docker_auth_field() {
        assert_eq!(
            Credentials::from_docker_auth("dXNlcjpwYTpzcw==").unwrap(),
            Credentials::Basic { username: "user".into(), password: "pa:ss".into() }
        );
        assert!(Credentials::from_docker_auth("!!").is_err());
        assert!(!format!("{:?}", Credentials::RegistryToken("secret".into())).contains("secret"));
    }
}
