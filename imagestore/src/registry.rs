//! Talking to registries through `oci-client`: endpoints (mirrors first, then the registry),
//! TLS settings per registry, credentials, retries of transient failures, and mapping of
//! registry errors to store errors.

use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
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

/// A client for one endpoint of one pull (oci-client keeps credentials per client, so a client
/// is never shared between pulls that may carry different credentials).
pub(crate) struct EndpointClient {
    pub endpoint: Endpoint,
    client: Client,
    auth: RegistryAuth,
    registry: String,
    retries: u32,
}

impl std::fmt::Debug for EndpointClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointClient").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl EndpointClient {
    pub async fn new(
        endpoint: Endpoint,
        registry: &str,
        config: &StoreConfig,
        credentials: Option<&Credentials>,
    ) -> Result<Self, Error> {
        let registry_config = config.registries.get(registry).cloned().unwrap_or_default();
        let mut extra_roots = Vec::new();
        if let Some(ca_file) = &registry_config.ca_file {
            let data = std::fs::read(ca_file)
                .map_err(|e| Error::io(format!("read ca_file {} of registry {registry}", ca_file.display()), e))?;
            extra_roots.push(Certificate { encoding: CertificateEncoding::Pem, data });
        }
        let client_config = ClientConfig {
            protocol: if endpoint.plain_http { ClientProtocol::Http } else { ClientProtocol::Https },
            accept_invalid_certificates: registry_config.insecure,
            extra_root_certificates: extra_roots.clone(),
            platform_resolver: None,
            read_timeout: Some(Duration::from_secs(config.read_timeout_secs.max(1))),
            connect_timeout: Some(Duration::from_secs(10)),
            user_agent: USER_AGENT,
            ..ClientConfig::default()
        };
        let client = Client::try_from(client_config)
            .map_err(|e| Error::InvalidConfig(format!("registry {registry}: {}", lower(&e.to_string()))))?;
        let auth = match credentials_for(&endpoint, registry, credentials) {
            None => RegistryAuth::Anonymous,
            Some(Credentials::Basic { username, password }) => RegistryAuth::Basic(username.clone(), password.clone()),
            Some(Credentials::RegistryToken(token)) => RegistryAuth::Bearer(token.clone()),
            Some(Credentials::IdentityToken(token)) => {
                let tls = TlsSettings { insecure: registry_config.insecure, extra_roots };
                RegistryAuth::Bearer(
                    crate::token::exchange_identity_token(&endpoint, registry, token, &tls, config).await?,
                )
            }
        };
        Ok(EndpointClient { endpoint, client, auth, registry: registry.to_owned(), retries: config.retries })
    }

    fn reference(&self, image: &ImageReference, digest: Option<&Digest>) -> Reference {
        let mut reference = match (digest.or(image.digest.as_ref()), &image.tag) {
            (Some(digest), _) => {
                Reference::with_digest(image.registry.clone(), image.repository.clone(), digest.to_string())
            }
            (None, Some(tag)) => Reference::with_tag(image.registry.clone(), image.repository.clone(), tag.clone()),
            (None, None) => Reference::with_tag(image.registry.clone(), image.repository.clone(), "latest".into()),
        };
        if self.endpoint.is_mirror {
            reference.set_mirror_registry(self.endpoint.host.clone());
        }
        reference
    }

    /// Fetches a manifest (or index) by the image's tag/digest, or by `digest`. Returns the raw
    /// bytes; the caller verifies them against the digest it expects.
    pub async fn manifest(&self, image: &ImageReference, digest: Option<&Digest>) -> Result<bytes::Bytes, Error> {
        let reference = self.reference(image, digest);
        self.retry("fetch manifest", || async {
            self.client
                .pull_manifest_raw(&reference, &self.auth, MANIFEST_MEDIA_TYPES)
                .await
                .map(|(body, _)| body)
                .map_err(|e| self.map_error(e, &reference.whole()))
        })
        .await
    }

    /// Fetches a small blob (config) fully into memory, bounded by its declared size.
    pub async fn small_blob(&self, image: &ImageReference, digest: &Digest, size: u64) -> Result<Vec<u8>, Error> {
        use futures_util::StreamExt;
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

    /// Starts streaming a blob (retrying the request, not the body).
    pub async fn blob_stream(&self, image: &ImageReference, digest: &Digest, size: u64) -> Result<SizedStream, Error> {
        let reference = self.reference(image, None);
        let descriptor = OciDescriptor { digest: digest.to_string(), size: size as i64, ..Default::default() };
        self.retry("fetch blob", || async {
            self.client
                .pull_blob_stream(&reference, &descriptor)
                .await
                .map_err(|e| self.map_error(e, &format!("{}@{digest}", reference.repository())))
        })
        .await
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

    pub fn map_error(&self, e: OciDistributionError, what: &str) -> Error {
        map_oci_error(e, &self.endpoint.host, &self.registry, what)
    }
}

/// TLS settings shared by the oci-client and the token exchange.
#[derive(Debug, Clone)]
pub(crate) struct TlsSettings {
    pub insecure: bool,
    pub extra_roots: Vec<Certificate>,
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

fn map_oci_error(e: OciDistributionError, host: &str, registry: &str, what: &str) -> Error {
    debug!(host, error = ?e, "registry error");
    let host = host.to_owned();
    match e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            Error::Unauthenticated { registry: host, detail: format!("{what}: {}", lower(&e.to_string())) }
        }
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let code = envelope.errors.first().map(|err| &err.code);
            let detail = format!(
                "{what}: {}",
                envelope.errors.iter().map(|err| lower(&err.message)).collect::<Vec<_>>().join("; ")
            );
            match code {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound,
                ) => Error::NotFound {
                    reference: what.to_owned(),
                    detail: format!("registry {registry} does not have it"),
                },
                Some(OciErrorCode::Unauthorized) => Error::Unauthenticated { registry: host, detail },
                Some(OciErrorCode::Denied) => Error::PermissionDenied { registry: host, detail },
                Some(OciErrorCode::Toomanyrequests) => Error::Unavailable { registry: host, detail },
                _ => Error::Registry { registry: host, detail },
            }
        }
        OciDistributionError::ServerError { code, ref message, .. } => {
            let detail = format!("{what}: http {code}: {}", lower(message.trim()));
            match code {
                404 => Error::NotFound {
                    reference: what.to_owned(),
                    detail: format!("registry {registry} does not have it"),
                },
                401 => Error::Unauthenticated { registry: host, detail },
                403 => Error::PermissionDenied { registry: host, detail },
                408 | 429 | 500..=599 => Error::Unavailable { registry: host, detail },
                _ => Error::Registry { registry: host, detail },
            }
        }
        OciDistributionError::RequestError(ref inner) => {
            let mut detail = lower(&inner.to_string());
            let mut source = std::error::Error::source(inner);
            while let Some(s) = source {
                detail.push_str(": ");
                detail.push_str(&lower(&s.to_string()));
                source = s.source();
            }
            Error::Unavailable { registry: host, detail: format!("{what}: {detail}") }
        }
        OciDistributionError::IoError(ref inner) => {
            Error::Unavailable { registry: host, detail: format!("{what}: {inner}") }
        }
        OciDistributionError::DigestError(ref inner) => {
            Error::DigestMismatch { what: what.to_owned(), expected: String::new(), actual: lower(&inner.to_string()) }
        }
        other => Error::Registry { registry: host, detail: format!("{what}: {}", lower(&other.to_string())) },
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
