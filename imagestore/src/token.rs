//! The OAuth2 refresh-token grant for identity tokens (docker's `identitytoken`), which
//! oci-client does not implement: the token is exchanged for an access token at the realm the
//! registry's `WWW-Authenticate: Bearer` challenge names, as docker and containerd do.

use serde::Deserialize;

use crate::config::StoreConfig;
use crate::error::Error;
use crate::registry::{Endpoint, TlsSettings};

const CLIENT_ID: &str = "cri-systemd";

pub(crate) async fn exchange_identity_token(
    endpoint: &Endpoint,
    registry: &str,
    refresh_token: &str,
    tls: &TlsSettings,
    config: &StoreConfig,
) -> Result<String, Error> {
    exchange(endpoint, registry, refresh_token, tls, config, None).await
}

/// `scope` defaults to pull access to nothing in particular; registries then scope it themselves.
pub(crate) async fn exchange(
    endpoint: &Endpoint,
    registry: &str,
    refresh_token: &str,
    tls: &TlsSettings,
    config: &StoreConfig,
    scope: Option<&str>,
) -> Result<String, Error> {
    let unavailable = |detail: String| Error::Unavailable { registry: endpoint.host.clone(), detail };
    let unauthenticated = |detail: String| Error::Unauthenticated { registry: endpoint.host.clone(), detail };
    let client = crate::registry::http_client(registry, tls, config)?;
    let scheme = if endpoint.plain_http { "http" } else { "https" };
    let ping = client
        .get(format!("{scheme}://{}/v2/", endpoint.host))
        .send()
        .await
        .map_err(|e| unavailable(format!("ping: {e}")))?;
    let challenge = ping
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_bearer_challenge)
        .ok_or_else(|| {
            unauthenticated("identity token given but the registry offers no bearer token endpoint".into())
        })?;
    let mut form = vec![("grant_type", "refresh_token"), ("refresh_token", refresh_token), ("client_id", CLIENT_ID)];
    if let Some(service) = challenge.service.as_deref() {
        form.push(("service", service));
    }
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let body = form.iter().map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v))).collect::<Vec<_>>().join("&");
    let response = client
        .post(&challenge.realm)
        .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| unavailable(format!("token endpoint {}: {e}", challenge.realm)))?;
    let status = response.status();
    let bytes = read_token_body(response, endpoint).await?;
    if status == reqwest::StatusCode::UNAUTHORIZED
        || status == reqwest::StatusCode::FORBIDDEN
        || status == reqwest::StatusCode::BAD_REQUEST
    {
        return Err(unauthenticated(format!("token endpoint rejected the identity token (http {})", status.as_u16())));
    }
    if !status.is_success() {
        return Err(unavailable(format!("token endpoint answered http {}", status.as_u16())));
    }
    token_of(&bytes, endpoint)
}

/// The access token in a token endpoint's answer (`access_token`, or docker's `token`).
fn token_of(body: &[u8], endpoint: &Endpoint) -> Result<String, Error> {
    let unauthenticated = |detail: String| Error::Unauthenticated { registry: endpoint.host.clone(), detail };
    #[derive(Deserialize)]
    struct TokenResponse {
        #[serde(default)]
        access_token: Option<String>,
        #[serde(default)]
        token: Option<String>,
    }
    let token: TokenResponse = serde_json::from_slice(body)
        .map_err(|e| unauthenticated(format!("token endpoint answer is not a token: {e}")))?;
    token
        .access_token
        .or(token.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthenticated("token endpoint answered without a token".into()))
}

/// A token endpoint's answer, read with [`MAX_TOKEN_BYTES`](crate::registry::MAX_TOKEN_BYTES).
async fn read_token_body(response: reqwest::Response, endpoint: &Endpoint) -> Result<bytes::Bytes, Error> {
    use crate::registry::{CappedReadError, MAX_TOKEN_BYTES};
    crate::registry::read_capped(response, MAX_TOKEN_BYTES).await.map_err(|e| match e {
        CappedReadError::TooLarge => Error::TooLarge {
            registry: endpoint.host.clone(),
            what: "token endpoint answer".into(),
            limit: MAX_TOKEN_BYTES,
        },
        CappedReadError::Request(e) => {
            Error::Unavailable { registry: endpoint.host.clone(), detail: format!("token endpoint: {e}") }
        }
    })
}

/// The docker token flow (what a 401's `Bearer` challenge asks for): GET the realm with the
/// scope and service, with basic credentials when we have them.
pub(crate) async fn fetch_bearer_token(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    challenge: &BearerChallenge,
    scope: &str,
    basic: Option<(&str, &str)>,
) -> Result<String, Error> {
    let mut query = vec![("scope", scope)];
    if let Some(service) = challenge.service.as_deref() {
        query.push(("service", service));
    }
    let query = query.iter().map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v))).collect::<Vec<_>>().join("&");
    let separator = if challenge.realm.contains('?') { '&' } else { '?' };
    let mut request = http.get(format!("{}{separator}{query}", challenge.realm));
    if let Some((username, password)) = basic {
        request = request.basic_auth(username, Some(password));
    }
    let response = request.send().await.map_err(|e| Error::Unavailable {
        registry: endpoint.host.clone(),
        detail: format!("token endpoint {}: {e}", challenge.realm),
    })?;
    let status = response.status();
    if !status.is_success() {
        let body = crate::registry::read_prefix(response, 512).await;
        let detail = format!(
            "token endpoint {} answered http {}: {}",
            challenge.realm,
            status.as_u16(),
            String::from_utf8_lossy(&body).trim()
        );
        return Err(match status.as_u16() {
            401 | 403 => Error::Unauthenticated { registry: endpoint.host.clone(), detail },
            _ => Error::Unavailable { registry: endpoint.host.clone(), detail },
        });
    }
    token_of(&read_token_body(response, endpoint).await?, endpoint)
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BearerChallenge {
    pub realm: String,
    pub service: Option<String>,
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
pub(crate) fn parse_bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let rest = header.trim();
    let (scheme, params) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut chars = params.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        let value: String = if chars.peek() == Some(&'"') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => v.extend(chars.next()),
                    '"' => break,
                    c => v.push(c),
                }
            }
            v
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect::<String>().trim().to_owned()
        };
        match key.as_str() {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            _ => {}
        }
    }
    Some(BearerChallenge { realm: realm?, service })
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parsing() {
        assert_eq!(
            parse_bearer_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#
            ),
            Some(BearerChallenge {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into())
            })
        );
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }
}
