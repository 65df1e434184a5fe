//! Image signature policy: which images a pull accepts, checked against cosign signatures
//! before anything of the image is stored or unpacked.
//!
//! **Policy** (`[images.signatures]`, [`SignaturePolicy`]): scopes keyed like the `docker:`
//! transport's scopes of containers-policy.json(5) (containers/image `docker/policyconfiguration`):
//! a fully expanded `host[:port]/path:tag` or `...@digest` (one image), a repository, a namespace,
//! a registry `host[:port]`, or `*.example.com` (subdomains). The most specific scope matching the
//! reference *as requested* wins (mirrors do not change it); no match takes `default`. A scope is
//! `accept`, `reject`, or `signed` with public keys (PEM files or inline PEM; ECDSA P-256 and
//! Ed25519), compiled once when the config is read: an unknown kind, an unreadable file, a bad PEM
//! or another key algorithm is a config error naming the scope.
//!
//! **Signatures** are cosign's simple-signing signatures (sigstore/cosign `specs/SIGNATURE_SPEC.md`):
//! an OCI manifest whose layers are payloads of media type
//! `application/vnd.dev.cosign.simplesigning.v1+json`, each with its base64 signature in the layer
//! annotation `dev.cosignproject.cosign/signature`. Where they are looked for, for the digest `D`
//! of the manifest (or index) the pull actually fetched (a pull by tag is checked against what the
//! tag gave): the OCI 1.1 referrers API (`/v2/<repo>/referrers/D`, manifests of artifact type
//! `application/vnd.dev.cosign.artifact.sig.v1+json`, as `cosign sign
//! --registry-referrers-mode=oci-1-1` writes them), the referrers tag schema (`sha256-<hex>`, an
//! index, which registries without the API get), then cosign's tag `sha256-<hex>.sig`. The payload
//! (`critical.type` `cosign container image signature`, `critical.image.docker-manifest-digest`,
//! `critical.identity.docker-reference`) is parsed strictly, like containers/image's
//! `sigstore_payload.go`. A signature is accepted when one key of the scope verifies it over the
//! payload bytes (P-256: ECDSA with SHA-256, ASN.1 DER or fixed r||s encoding as sigstore's
//! verifier accepts; Ed25519: pure Ed25519), its digest is `D`, and its reference names the
//! requested repository (containers/image's `matchRepository`: cosign signs a repository, not a
//! tag). One accepted signature is enough.
//!
//! A refusal names the scope and the reason: no signature, bad signature (malformed, or a payload
//! that does not match its digest), key unknown (no key of the scope verifies it: another signer,
//! or a payload altered along with its descriptor; the two cannot be told apart), digest mismatch
//! (a valid signature of another manifest), reference mismatch (of another repository).
//!
//! The crypto is RustCrypto's (`p256`, `ed25519-dalek`; `spki` to read a key's algorithm): well
//! kept, pure Rust, no hand-written crypto. Not the `sigstore` crate: it brings TUF, Fulcio and
//! Rekor clients this key-based check does not need, and fetches signatures with its own OCI
//! client, outside the store's mirrors, credentials and body caps.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::digest::Digest;
use crate::error::Error;
use crate::reference::ImageReference;
use crate::registry::EndpointClient;

/// Media type of a cosign simple-signing payload layer.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a cosign signature payload.
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";
/// The artifact type of cosign's signature manifests in the OCI 1.1 referrers mode.
pub const COSIGN_SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// Payloads are a few hundred bytes; more is not a cosign signature.
const MAX_PAYLOAD_BYTES: u64 = 64 << 10;
/// Signatures looked at per pull, all sources together.
const MAX_SIGNATURES: usize = 32;
/// Referrer manifests fetched per pull.
const MAX_REFERRERS: usize = 8;

/// One scope's policy: `policy = "accept"` (the default), `"reject"`, or `"signed"` with `keys`
/// (PEM files) and/or `key_data` (inline PEM). The kind is read as text and checked by
/// [`SignaturePolicy::compile`], so that an unknown kind is reported with its scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScopePolicy {
    pub policy: String,
    /// PEM public key files (`-----BEGIN PUBLIC KEY-----`, as `cosign generate-key-pair` writes `cosign.pub`).
    pub keys: Vec<PathBuf>,
    /// Inline PEM public keys.
    pub key_data: Vec<String>,
}

/// The `[images.signatures]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignaturePolicy {
    /// For references no scope matches. Default: accept.
    pub default: ScopePolicy,
    /// Keyed by scope: `registry.example`, `registry.example:5000/team`,
    /// `docker.io/library/busybox`, `docker.io/library/busybox:1.36`, `*.example.com`.
    pub scopes: BTreeMap<String, ScopePolicy>,
}

impl SignaturePolicy {
    /// Checks every scope and reads every key (files included).
    pub fn compile(&self) -> Result<Policy, Error> {
        let default = compile_scope("images.signatures.default", &self.default)?;
        let mut scopes = BTreeMap::new();
        for (scope, policy) in &self.scopes {
            let what = format!("images.signatures.scopes.{scope:?}");
            check_scope(scope).map_err(|e| Error::InvalidConfig(format!("{what}: {e}")))?;
            scopes.insert(scope.clone(), compile_scope(&what, policy)?);
        }
        Ok(Policy { default, scopes })
    }
}

impl Default for ScopePolicy {
    fn default() -> Self {
        ScopePolicy { policy: "accept".into(), keys: Vec::new(), key_data: Vec::new() }
    }
}

fn compile_scope(what: &str, scope: &ScopePolicy) -> Result<Requirement, Error> {
    let bad = |m: String| Error::InvalidConfig(format!("{what}: {m}"));
    let has_keys = !scope.keys.is_empty() || !scope.key_data.is_empty();
    match scope.policy.as_str() {
        "accept" | "reject" if has_keys => {
            Err(bad(format!("keys are only for policy = \"signed\", not {:?}", scope.policy)))
        }
        "accept" => Ok(Requirement::Accept),
        "reject" => Ok(Requirement::Reject),
        "signed" => {
            if !has_keys {
                return Err(bad("policy = \"signed\" needs at least one key (keys or key_data)".into()));
            }
            let mut keys = Vec::new();
            for path in &scope.keys {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| bad(format!("cannot read key file {}: {e}", path.display())))?;
                let name = path.display().to_string();
                keys.push(PublicKey::from_pem(&name, &pem).map_err(|e| bad(format!("key file {name}: {e}")))?);
            }
            for (i, pem) in scope.key_data.iter().enumerate() {
                let name = format!("key_data[{i}]");
                keys.push(PublicKey::from_pem(&name, pem).map_err(|e| bad(format!("{name}: {e}")))?);
            }
            Ok(Requirement::Signed(keys))
        }
        other => Err(bad(format!("unknown policy {other:?} (accept, reject or signed)"))),
    }
}

/// A scope must be a fully expanded reference prefix (what containers-policy.json accepts).
fn check_scope(scope: &str) -> Result<(), String> {
    if scope.is_empty() {
        return Err("empty scope (use `default` for references no scope matches)".into());
    }
    if let Some(domain) = scope.strip_prefix("*.") {
        if domain.is_empty() || domain.contains(['/', ':', '*', '@']) {
            return Err("a wildcard scope is `*.` and a domain, without port or path".into());
        }
        return Ok(());
    }
    if scope.contains('*') {
        return Err("`*` only as `*.domain`".into());
    }
    if scope.contains('@') || scope.rsplit('/').next().is_some_and(|last| last.contains(':') && scope.contains('/')) {
        // One image: must parse as a reference and be in the fully expanded form.
        let parsed = ImageReference::parse(scope).map_err(|e| e.to_string())?;
        if parsed.to_string() != scope {
            return Err(format!("not in the fully expanded form (that would be {parsed})"));
        }
        return Ok(());
    }
    let (host, path) = scope.split_once('/').unwrap_or((scope, ""));
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("the first component must be a registry host[:port]".into());
    }
    // A repository or namespace (`docker.io/team` is a namespace, not `docker.io/library/team`).
    if !path.is_empty() {
        ImageReference::parse(&format!("{scope}:x")).map_err(|e| e.to_string())?;
    } else if !host.contains(['.', ':']) && host != "localhost" {
        return Err(
            "not a registry host[:port] (a scope is in the fully expanded form, e.g. docker.io/library/busybox)".into(),
        );
    }
    Ok(())
}

/// A compiled policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    default: Requirement,
    scopes: BTreeMap<String, Requirement>,
}

/// What one scope requires, keys read.
#[derive(Debug, Clone, Default)]
pub enum Requirement {
    #[default]
    Accept,
    Reject,
    Signed(Vec<PublicKey>),
}

impl Policy {
    /// The scope (its key, or `default`) and requirement for a reference as requested.
    pub fn requirement(&self, reference: &ImageReference) -> (&str, &Requirement) {
        for candidate in scope_candidates(reference) {
            if let Some((scope, requirement)) = self.scopes.get_key_value(&candidate) {
                return (scope, requirement);
            }
        }
        ("default", &self.default)
    }
}

/// The scopes that match `reference`, most specific first, as containers/image looks them up:
/// `name:tag` or `name@digest`, the repository, each parent namespace, the host[:port], then
/// `*.` wildcards of the host (without port) from the longest.
pub fn scope_candidates(reference: &ImageReference) -> Vec<String> {
    let mut out = Vec::new();
    let name = reference.name();
    match (&reference.digest, &reference.tag) {
        (Some(digest), _) => out.push(reference.repo_digest(digest)),
        (None, Some(tag)) => out.push(format!("{name}:{tag}")),
        (None, None) => {}
    }
    let mut prefix = name.as_str();
    loop {
        out.push(prefix.to_owned());
        match prefix.rfind('/') {
            Some(i) => prefix = &prefix[..i],
            None => break,
        }
    }
    let mut host = prefix.split(':').next().unwrap_or(prefix);
    // An IPv6 host ("[::1]:5000") has no domain to wildcard.
    if !host.starts_with('[') {
        while let Some(i) = host.find('.') {
            host = &host[i + 1..];
            out.push(format!("*.{host}"));
        }
    }
    out
}

/// A public key of a `signed` scope.
#[derive(Clone)]
pub struct PublicKey {
    /// The file or `key_data[i]`, for logs.
    name: String,
    key: Key,
}

#[derive(Clone)]
enum Key {
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.key {
            Key::P256(_) => "p256",
            Key::Ed25519(_) => "ed25519",
        };
        write!(f, "PublicKey({kind} {})", self.name)
    }
}

const OID_EC_PUBLIC_KEY: spki::ObjectIdentifier = spki::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: spki::ObjectIdentifier = spki::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_ED25519: spki::ObjectIdentifier = spki::ObjectIdentifier::new_unwrap("1.3.101.112");

impl PublicKey {
    /// A PEM `PUBLIC KEY` (SubjectPublicKeyInfo) of an ECDSA P-256 or Ed25519 key.
    pub fn from_pem(name: &str, pem: &str) -> Result<PublicKey, String> {
        use spki::DecodePublicKey as _;
        use spki::der::DecodePem as _;
        let info = spki::SubjectPublicKeyInfoOwned::from_pem(pem.trim())
            .map_err(|e| format!("not a PEM public key (-----BEGIN PUBLIC KEY-----): {e}"))?;
        let oid = info.algorithm.oid;
        let key = if oid == OID_EC_PUBLIC_KEY {
            let curve = info.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<spki::ObjectIdentifier>().ok());
            if curve != Some(OID_P256) {
                let curve = curve.map_or_else(|| "unknown".to_owned(), |c| c.to_string());
                return Err(format!("ECDSA key on curve {curve}: only P-256 (1.2.840.10045.3.1.7) is supported"));
            }
            Key::P256(
                p256::ecdsa::VerifyingKey::from_public_key_pem(pem.trim())
                    .map_err(|e| format!("bad P-256 public key: {e}"))?,
            )
        } else if oid == OID_ED25519 {
            Key::Ed25519(
                ed25519_dalek::VerifyingKey::from_public_key_pem(pem.trim())
                    .map_err(|e| format!("bad Ed25519 public key: {e}"))?,
            )
        } else {
            return Err(format!("unsupported key algorithm {oid}: ECDSA P-256 and Ed25519 keys are"));
        };
        Ok(PublicKey { name: name.to_owned(), key })
    }

    /// Whether `signature` is this key's over `payload` (sigstore's verifiers: ECDSA over the
    /// SHA-256 of the payload, DER or r||s; pure Ed25519 over the payload).
    pub fn verifies(&self, payload: &[u8], signature: &[u8]) -> bool {
        match &self.key {
            Key::P256(key) => {
                use p256::ecdsa::signature::Verifier as _;
                let signature = p256::ecdsa::DerSignature::try_from(signature)
                    .ok()
                    .and_then(|der| p256::ecdsa::Signature::try_from(der).ok())
                    .or_else(|| p256::ecdsa::Signature::from_slice(signature).ok());
                signature.is_some_and(|s| key.verify(payload, &s).is_ok())
            }
            Key::Ed25519(key) => {
                ed25519_dalek::Signature::from_slice(signature).is_ok_and(|s| key.verify_strict(payload, &s).is_ok())
            }
        }
    }
}

/// A signature payload's claims (containers-signature(5)'s JSON, as cosign writes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub manifest_digest: Digest,
    pub docker_reference: String,
}

/// Parses a payload strictly: unknown or duplicate fields in `critical` are refused, as
/// containers/image does; `optional` may hold anything.
pub fn parse_payload(bytes: &[u8]) -> Result<Payload, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        critical: Critical,
        #[serde(default)]
        #[allow(dead_code)]
        optional: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Critical {
        #[serde(rename = "type")]
        kind: String,
        image: Image,
        identity: Identity,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Image {
        #[serde(rename = "docker-manifest-digest")]
        digest: String,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Identity {
        #[serde(rename = "docker-reference")]
        reference: String,
    }
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| format!("payload: {e}"))?;
    if raw.critical.kind != COSIGN_SIGNATURE_TYPE {
        return Err(format!("payload type {:?} is not {COSIGN_SIGNATURE_TYPE:?}", raw.critical.kind));
    }
    let manifest_digest = raw
        .critical
        .image
        .digest
        .parse()
        .map_err(|e: crate::digest::DigestParseError| format!("payload digest: {}", e.0))?;
    Ok(Payload { manifest_digest, docker_reference: raw.critical.identity.reference })
}

/// One signature as a signature manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    pub payload: Digest,
    pub size: u64,
    /// Base64, as in the annotation.
    pub signature: String,
}

/// The simple-signing layers of a cosign signature manifest (other layers are skipped).
pub fn signature_layers(manifest: &[u8]) -> Result<Vec<SignatureLayer>, String> {
    #[derive(Deserialize)]
    struct Manifest {
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    #[derive(Deserialize)]
    struct Descriptor {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        digest: String,
        size: u64,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    let manifest: Manifest = serde_json::from_slice(manifest).map_err(|e| format!("signature manifest: {e}"))?;
    let mut out = Vec::new();
    for layer in manifest.layers {
        if layer.media_type != SIMPLE_SIGNING_MEDIA_TYPE {
            continue;
        }
        let payload =
            layer.digest.parse().map_err(|e: crate::digest::DigestParseError| format!("signature layer: {}", e.0))?;
        let Some(signature) = layer.annotations.get(SIGNATURE_ANNOTATION) else { continue };
        out.push(SignatureLayer { payload, size: layer.size, signature: signature.clone() });
    }
    Ok(out)
}

/// The cosign signature manifests an OCI index of referrers lists.
pub fn signature_referrers(index: &[u8]) -> Result<Vec<Digest>, String> {
    #[derive(Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }
    #[derive(Deserialize)]
    struct Descriptor {
        digest: String,
        #[serde(rename = "artifactType", default)]
        artifact_type: String,
    }
    let index: Index = serde_json::from_slice(index).map_err(|e| format!("referrers index: {e}"))?;
    index
        .manifests
        .into_iter()
        .filter(|d| d.artifact_type == COSIGN_SIGNATURE_ARTIFACT_TYPE)
        .map(|d| d.digest.parse().map_err(|e: crate::digest::DigestParseError| format!("referrer: {}", e.0)))
        .collect()
}

/// Why a `signed` scope refuses an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The scope is `reject`.
    Rejected,
    NoSignature,
    BadSignature(String),
    KeyUnknown {
        signatures: usize,
    },
    DigestMismatch {
        signed: String,
        pulled: String,
    },
    ReferenceMismatch {
        signed: String,
        requested: String,
    },
}

impl Refusal {
    /// Which reason to report when several signatures fail: the one that got furthest.
    fn rank(&self) -> u8 {
        match self {
            Refusal::Rejected => 5,
            Refusal::DigestMismatch { .. } | Refusal::ReferenceMismatch { .. } => 4,
            Refusal::KeyUnknown { .. } => 3,
            Refusal::BadSignature(_) => 2,
            Refusal::NoSignature => 1,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Rejected => write!(f, "the scope rejects every image"),
            Refusal::NoSignature => write!(f, "no signature (no cosign signature found for the pulled digest)"),
            Refusal::BadSignature(detail) => write!(f, "bad signature: {detail}"),
            Refusal::KeyUnknown { signatures } => {
                write!(f, "key unknown: no key of the scope verifies the signature ({signatures} found)")
            }
            Refusal::DigestMismatch { signed, pulled } => {
                write!(f, "digest mismatch: the signature is of {signed}, the pull got {pulled}")
            }
            Refusal::ReferenceMismatch { signed, requested } => {
                write!(f, "reference mismatch: the signature names {signed}, not {requested}")
            }
        }
    }
}

/// Checks one signature (payload bytes as fetched) against the keys, the pulled digest and the
/// requested reference. Pure; the fetching is [`verify`]'s.
pub fn check_signature(
    keys: &[PublicKey],
    layer: &SignatureLayer,
    payload: &[u8],
    pulled: &Digest,
    requested: &ImageReference,
) -> Result<String, Refusal> {
    if Digest::sha256_of(payload) != layer.payload || payload.len() as u64 != layer.size {
        return Err(Refusal::BadSignature(format!("payload {} does not match its digest or size", layer.payload)));
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(layer.signature.trim())
        .map_err(|e| Refusal::BadSignature(format!("signature of payload {} is not base64: {e}", layer.payload)))?;
    let key = keys.iter().find(|k| k.verifies(payload, &signature)).ok_or(Refusal::KeyUnknown { signatures: 1 })?;
    let claims = parse_payload(payload).map_err(Refusal::BadSignature)?;
    if claims.manifest_digest != *pulled {
        return Err(Refusal::DigestMismatch { signed: claims.manifest_digest.to_string(), pulled: pulled.to_string() });
    }
    let signed_name = ImageReference::parse(&claims.docker_reference)
        .map(|r| r.name())
        .map_err(|e| Refusal::BadSignature(format!("payload docker-reference {:?}: {e}", claims.docker_reference)))?;
    if signed_name != requested.name() {
        return Err(Refusal::ReferenceMismatch { signed: claims.docker_reference, requested: requested.name() });
    }
    Ok(key.name.clone())
}

/// Finds the cosign signatures of `pulled` through `client` (referrers API, referrers tag, `.sig`
/// tag) and accepts the image if one verifies. `Err(Ok(refusal))`: the policy refuses;
/// `Err(Err(error))`: the registry failed (not a verdict).
pub(crate) async fn verify(
    client: &EndpointClient,
    requested: &ImageReference,
    pulled: &Digest,
    keys: &[PublicKey],
) -> Result<(), Result<Refusal, Error>> {
    let mut manifests: Vec<bytes::Bytes> = Vec::new();
    // 1. The referrers API; 2. the referrers tag schema (an index under `sha256-<hex>`).
    let mut referrers = match client.referrers(requested, pulled).await {
        Ok(index) => signature_referrers(&index).unwrap_or_else(|e| {
            debug!(reference = %requested, error = %e, "unreadable referrers answer, ignored");
            Vec::new()
        }),
        // No API (404, or another answer from registries that do not know the path): the tags
        // below are asked next, and report a registry that is really failing.
        Err(e) => {
            debug!(reference = %requested, error = %e, "no referrers API answer, looking for tags");
            Vec::new()
        }
    };
    if referrers.is_empty() {
        let tag = format!("{}-{}", pulled.algorithm().name(), pulled.hex());
        match fetch_tag(client, requested, &tag).await {
            Ok(index) => referrers = signature_referrers(&index).unwrap_or_default(),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(Err(e)),
        }
    }
    for digest in referrers.iter().take(MAX_REFERRERS) {
        match client.manifest(requested, Some(digest)).await {
            Ok(body) if Digest::sha256_of(&body) == *digest => manifests.push(body),
            Ok(_) => debug!(reference = %requested, %digest, "referrer manifest does not match its digest, ignored"),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(Err(e)),
        }
    }
    // 3. cosign's tag.
    let sig_tag = format!("{}-{}.sig", pulled.algorithm().name(), pulled.hex());
    match fetch_tag(client, requested, &sig_tag).await {
        Ok(body) => manifests.push(body),
        Err(e) if not_found(&e) => {}
        Err(e) => return Err(Err(e)),
    }
    let mut layers = Vec::new();
    let mut worst: Option<Refusal> = None;
    for manifest in &manifests {
        match signature_layers(manifest) {
            Ok(found) => layers.extend(found),
            Err(e) => worst = Some(Refusal::BadSignature(e)),
        }
    }
    let mut refused = 0;
    for layer in layers.iter().take(MAX_SIGNATURES) {
        if layer.size > MAX_PAYLOAD_BYTES {
            let refusal = Refusal::BadSignature(format!("payload {} declares {} bytes", layer.payload, layer.size));
            worst = Some(pick(worst, refusal));
            continue;
        }
        let payload = match client.small_blob(requested, &layer.payload, layer.size).await {
            Ok(payload) => payload,
            Err(e) if not_found(&e) || matches!(e, Error::SizeMismatch { .. }) => {
                worst = Some(pick(worst, Refusal::BadSignature(format!("payload {}: {e}", layer.payload))));
                continue;
            }
            Err(e) => return Err(Err(e)),
        };
        match check_signature(keys, layer, &payload, pulled, requested) {
            Ok(key) => {
                info!(reference = %requested, digest = %pulled, key, "signature verified");
                return Ok(());
            }
            Err(refusal) => {
                refused += 1;
                debug!(reference = %requested, payload = %layer.payload, %refusal, "signature not accepted");
                worst = Some(pick(worst, refusal));
            }
        }
    }
    Err(Ok(match worst {
        Some(Refusal::KeyUnknown { .. }) => Refusal::KeyUnknown { signatures: refused },
        Some(refusal) => refusal,
        None => Refusal::NoSignature,
    }))
}

fn pick(current: Option<Refusal>, new: Refusal) -> Refusal {
    match current {
        Some(current) if current.rank() >= new.rank() => current,
        _ => new,
    }
}

fn not_found(e: &Error) -> bool {
    e.kind() == crate::error::ErrorKind::NotFound
}

async fn fetch_tag(client: &EndpointClient, image: &ImageReference, tag: &str) -> Result<bytes::Bytes, Error> {
    let tagged = ImageReference { tag: Some(tag.to_owned()), digest: None, ..image.clone() };
    client.manifest(&tagged, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(s: &str) -> ImageReference {
        ImageReference::parse(s).unwrap()
    }

    const P256_SECRET: [u8; 32] = [7; 32];
    const ED25519_SECRET: [u8; 32] = [9; 32];

    fn p256_pem(secret: [u8; 32]) -> String {
        use p256::pkcs8::EncodePublicKey as _;
        let key = p256::ecdsa::SigningKey::from_slice(&secret).unwrap();
        key.verifying_key().to_public_key_pem(p256::pkcs8::LineEnding::LF).unwrap()
    }

    fn ed25519_pem(secret: [u8; 32]) -> String {
        use ed25519_dalek::pkcs8::EncodePublicKey as _;
        let key = ed25519_dalek::SigningKey::from_bytes(&secret);
        key.verifying_key().to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF).unwrap()
    }

    fn payload(digest: &str, reference: &str) -> Vec<u8> {
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"{reference}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        )
        .into_bytes()
    }

    fn layer(payload: &[u8], signature: &[u8]) -> SignatureLayer {
        SignatureLayer {
            payload: Digest::sha256_of(payload),
            size: payload.len() as u64,
            signature: base64::engine::general_purpose::STANDARD.encode(signature),
        }
    }

    fn p256_sign(secret: [u8; 32], message: &[u8]) -> p256::ecdsa::Signature {
        use p256::ecdsa::signature::Signer as _;
        p256::ecdsa::SigningKey::from_slice(&secret).unwrap().sign(message)
    }

    #[test]
    fn scope_candidates_most_specific_first() {
        assert_eq!(
            scope_candidates(&reference("registry.example.com:5000/team/app/web:1.2")),
            [
                "registry.example.com:5000/team/app/web:1.2",
                "registry.example.com:5000/team/app/web",
                "registry.example.com:5000/team/app",
                "registry.example.com:5000/team",
                "registry.example.com:5000",
                "*.example.com",
                "*.com",
            ]
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            scope_candidates(&reference(&format!("busybox@{digest}"))),
            [
                format!("docker.io/library/busybox@{digest}").as_str(),
                "docker.io/library/busybox",
                "docker.io/library",
                "docker.io",
                "*.io"
            ]
        );
        assert_eq!(
            scope_candidates(&reference("127.0.0.1:5000/a:1"))[..3],
            ["127.0.0.1:5000/a:1", "127.0.0.1:5000/a", "127.0.0.1:5000"]
        );
    }

    #[test]
    fn longest_scope_wins_then_default() {
        let config: SignaturePolicy = toml::from_str(&format!(
            r#"
            [default]
            policy = "reject"
            [scopes."docker.io"]
            policy = "accept"
            [scopes."docker.io/team"]
            policy = "signed"
            key_data = ["""{}"""]
            [scopes."docker.io/team/open"]
            policy = "accept"
            [scopes."*.example.com"]
            policy = "accept"
            "#,
            p256_pem(P256_SECRET)
        ))
        .unwrap();
        let policy = config.compile().unwrap();
        let scope = |r: &str| policy.requirement(&reference(r)).0.to_owned();
        assert_eq!(scope("busybox"), "docker.io");
        assert_eq!(scope("docker.io/team/app:1"), "docker.io/team");
        assert_eq!(scope("docker.io/team/open:1"), "docker.io/team/open");
        assert_eq!(scope("docker.io/teamx/app"), "docker.io", "components match, not string prefixes");
        assert_eq!(scope("registry.example.com/x"), "*.example.com");
        assert_eq!(scope("quay.io/x"), "default");
        assert!(
            matches!(policy.requirement(&reference("docker.io/team/app")).1, Requirement::Signed(keys) if keys.len() == 1)
        );
        assert!(matches!(policy.requirement(&reference("quay.io/x")).1, Requirement::Reject));
        // Nothing configured: everything is accepted.
        let none = SignaturePolicy::default().compile().unwrap();
        assert!(matches!(none.requirement(&reference("busybox")), ("default", Requirement::Accept)));
    }

    #[test]
    fn bad_policies_name_the_scope() {
        let err = |toml_text: &str| -> String {
            match toml::from_str::<SignaturePolicy>(toml_text) {
                Err(e) => e.to_string(),
                Ok(config) => config.compile().unwrap_err().to_string(),
            }
        };
        let e = err("[scopes.\"quay.io\"]\npolicy = \"sined\"\n");
        assert!(
            e.contains(r#"images.signatures.scopes."quay.io": unknown policy "sined" (accept, reject or signed)"#),
            "{e}"
        );
        let e = err("[scopes.\"quay.io\"]\npolicy = \"signed\"\n");
        assert!(e.contains(r#"images.signatures.scopes."quay.io": policy = "signed" needs at least one key"#), "{e}");
        let e = err("[scopes.\"quay.io\"]\npolicy = \"signed\"\nkeys = [\"/nonexistent/k.pub\"]\n");
        assert!(e.contains(r#"scopes."quay.io": cannot read key file /nonexistent/k.pub"#), "{e}");
        let e = err("[scopes.\"quay.io\"]\npolicy = \"signed\"\nkey_data = [\"not a key\"]\n");
        assert!(e.contains(r#"scopes."quay.io": key_data[0]: not a PEM public key"#), "{e}");
        let e = err("[scopes.\"quay.io\"]\npolicy = \"accept\"\nkey_data = [\"x\"]\n");
        assert!(e.contains("keys are only for policy = \"signed\""), "{e}");
        let e = err("[scopes.\"busybox\"]\npolicy = \"reject\"\n");
        assert!(e.contains(r#"scopes."busybox""#), "{e}");
        let e = err("[scopes.\"docker.io/busybox:1\"]\npolicy = \"reject\"\n");
        assert!(e.contains("fully expanded form (that would be docker.io/library/busybox:1)"), "{e}");
        let e = err("[scopes.\"*.example.com:5000\"]\npolicy = \"reject\"\n");
        assert!(e.contains("wildcard"), "{e}");
        // An RSA key (cosign can make those; not supported here).
        let rsa = "-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMK0zQhDUl1YtDKIc4Eq5qVDOMR3Cj2r\nOmkg3U3m0zDQEaHh5hnFfx5EdyKWhCXPBjYxNiDKP2qzpdYCo1tCNysCAwEAAQ==\n-----END PUBLIC KEY-----\n";
        let e = err(&format!("[scopes.\"quay.io\"]\npolicy = \"signed\"\nkey_data = [\"\"\"{rsa}\"\"\"]\n"));
        assert!(e.contains("unsupported key algorithm 1.2.840.113549.1.1.1"), "{e}");
        // A key file is read.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.pub");
        std::fs::write(&file, ed25519_pem(ED25519_SECRET)).unwrap();
        let config: SignaturePolicy = toml::from_str(&format!(
            "[scopes.\"quay.io\"]\npolicy = \"signed\"\nkeys = [{:?}]\n",
            file.display().to_string()
        ))
        .unwrap();
        config.compile().unwrap();
    }

    #[test]
    fn payload_parsing_is_strict() {
        let digest = format!("sha256:{}", "b".repeat(64));
        let parsed = parse_payload(&payload(&digest, "127.0.0.1:5000/e2e/app")).unwrap();
        assert_eq!(parsed.manifest_digest.to_string(), digest);
        assert_eq!(parsed.docker_reference, "127.0.0.1:5000/e2e/app");
        // cosign with annotations: anything in optional.
        let with_optional =
            String::from_utf8(payload(&digest, "a/b")).unwrap().replace("null", r#"{"creator":"x","n":1}"#);
        parse_payload(with_optional.as_bytes()).unwrap();
        let wrong_type =
            String::from_utf8(payload(&digest, "a/b")).unwrap().replace("cosign container", "atomic container");
        assert!(
            parse_payload(wrong_type.as_bytes()).unwrap_err().contains("is not \"cosign container image signature\"")
        );
        let extra = String::from_utf8(payload(&digest, "a/b")).unwrap().replace(r#""type""#, r#""extra":1,"type""#);
        assert!(parse_payload(extra.as_bytes()).unwrap_err().contains("unknown field `extra`"));
        let duplicate =
            String::from_utf8(payload(&digest, "a/b")).unwrap().replace(r#""type""#, r#""type":"x","type""#);
        assert!(parse_payload(duplicate.as_bytes()).unwrap_err().contains("duplicate field"));
        let bad_digest = payload("sha256:nothex", "a/b");
        assert!(parse_payload(&bad_digest).unwrap_err().contains("payload digest"));
        assert!(parse_payload(b"{}").is_err());
    }

    #[test]
    fn signatures_verify_with_the_right_key_digest_and_reference() {
        let pulled = Digest::sha256_of(b"manifest");
        let requested = reference("127.0.0.1:5000/e2e/app:1");
        let body = payload(&pulled.to_string(), "127.0.0.1:5000/e2e/app");
        let p256_key = PublicKey::from_pem("p", &p256_pem(P256_SECRET)).unwrap();
        let ed_key = PublicKey::from_pem("e", &ed25519_pem(ED25519_SECRET)).unwrap();
        let keys = [p256_key.clone(), ed_key.clone()];

        // P-256, DER (cosign's) and r||s (sigstore accepts both).
        let signature = p256_sign(P256_SECRET, &body);
        assert_eq!(
            check_signature(&keys, &layer(&body, signature.to_der().as_bytes()), &body, &pulled, &requested),
            Ok("p".into())
        );
        assert_eq!(
            check_signature(&keys, &layer(&body, &signature.to_bytes()), &body, &pulled, &requested),
            Ok("p".into())
        );
        // Go's ecdsa does not normalise s: a high-s signature verifies there, and here.
        let (r, s) = signature.split_scalars();
        let high = p256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
        assert!(p256_key.verifies(&body, high.to_der().as_bytes()));
        // Ed25519.
        use ed25519_dalek::Signer as _;
        let ed_signature = ed25519_dalek::SigningKey::from_bytes(&ED25519_SECRET).sign(&body);
        assert_eq!(
            check_signature(&keys, &layer(&body, &ed_signature.to_bytes()), &body, &pulled, &requested),
            Ok("e".into())
        );

        // Another key.
        let other = p256_sign([8; 32], &body);
        assert_eq!(
            check_signature(&keys, &layer(&body, other.to_der().as_bytes()), &body, &pulled, &requested),
            Err(Refusal::KeyUnknown { signatures: 1 })
        );
        // A payload altered behind its descriptor.
        let mut tampered = body.clone();
        tampered[20] ^= 1;
        let good = layer(&body, signature.to_der().as_bytes());
        assert!(matches!(check_signature(&keys, &good, &tampered, &pulled, &requested), Err(Refusal::BadSignature(_))));
        // A payload altered with its descriptor: the signature no longer verifies.
        let altered = payload(&Digest::sha256_of(b"other").to_string(), "127.0.0.1:5000/e2e/app");
        assert_eq!(
            check_signature(&keys, &layer(&altered, signature.to_der().as_bytes()), &altered, &pulled, &requested),
            Err(Refusal::KeyUnknown { signatures: 1 })
        );
        // A valid signature of another digest, and of another repository.
        let other_digest = Digest::sha256_of(b"other");
        let signed_other = payload(&other_digest.to_string(), "127.0.0.1:5000/e2e/app");
        let sig = p256_sign(P256_SECRET, &signed_other);
        assert_eq!(
            check_signature(&keys, &layer(&signed_other, sig.to_der().as_bytes()), &signed_other, &pulled, &requested),
            Err(Refusal::DigestMismatch { signed: other_digest.to_string(), pulled: pulled.to_string() })
        );
        let other_repo = payload(&pulled.to_string(), "127.0.0.1:5000/e2e/evil");
        let sig = p256_sign(P256_SECRET, &other_repo);
        assert!(matches!(
            check_signature(&keys, &layer(&other_repo, sig.to_der().as_bytes()), &other_repo, &pulled, &requested),
            Err(Refusal::ReferenceMismatch { .. })
        ));
        // cosign names Docker Hub images index.docker.io/...: the same repository.
        let hub = payload(&pulled.to_string(), "index.docker.io/library/busybox");
        let sig = p256_sign(P256_SECRET, &hub);
        assert!(
            check_signature(&keys, &layer(&hub, sig.to_der().as_bytes()), &hub, &pulled, &reference("busybox:1"))
                .is_ok()
        );
        // Not base64.
        let mut garbled = layer(&body, signature.to_der().as_bytes());
        garbled.signature = "%%%".into();
        assert!(matches!(check_signature(&keys, &garbled, &body, &pulled, &requested), Err(Refusal::BadSignature(_))));
    }

    #[test]
    fn signature_manifests_and_referrers() {
        let digest = Digest::sha256_of(b"payload");
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
                "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,"digest":"{digest}"}},
                "layers":[
                  {{"mediaType":"{SIMPLE_SIGNING_MEDIA_TYPE}","size":7,"digest":"{digest}","annotations":{{"{SIGNATURE_ANNOTATION}":"c2ln"}}}},
                  {{"mediaType":"{SIMPLE_SIGNING_MEDIA_TYPE}","size":7,"digest":"{digest}"}},
                  {{"mediaType":"application/octet-stream","size":7,"digest":"{digest}","annotations":{{"{SIGNATURE_ANNOTATION}":"c2ln"}}}}
                ]}}"#
        );
        assert_eq!(
            signature_layers(manifest.as_bytes()).unwrap(),
            [SignatureLayer { payload: digest.clone(), size: 7, signature: "c2ln".into() }]
        );
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
                {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":1,"artifactType":"{COSIGN_SIGNATURE_ARTIFACT_TYPE}"}},
                {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":1,"artifactType":"application/spdx+json"}}]}}"#
        );
        assert_eq!(signature_referrers(index.as_bytes()).unwrap(), [digest]);
    }
}
