//! The store's error type. Messages are lowercase and name what failed (the reference, the layer
//! digest, the offending tar entry) so that the daemon can hand them to kubelet unchanged.

use std::io;
use std::path::PathBuf;

/// How an [`Error`] should be reported to a client; the daemon maps each kind to one gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The image, manifest or blob does not exist.
    NotFound,
    /// The request itself is wrong (e.g. a malformed image reference).
    InvalidArgument,
    /// The registry wants credentials, or rejected the ones given.
    Unauthenticated,
    /// The registry knows who we are and says no.
    PermissionDenied,
    /// The registry could not be reached or failed transiently; retrying later may work.
    Unavailable,
    /// The content is unusable: hostile or corrupt layer, digest mismatch, unsupported format.
    FailedPrecondition,
    /// A configured limit was hit (unpacked bytes, entries).
    ResourceExhausted,
    /// A bug or a local system failure (disk, permissions, corrupt metadata).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("invalid store configuration: {0}")]
    InvalidConfig(String),

    #[error("image {reference:?} not found: {detail}")]
    NotFound { reference: String, detail: String },

    #[error("no image for platform {platform} in the image index of {reference}")]
    NoMatchingPlatform { reference: String, platform: String },

    #[error("registry {registry} requires valid credentials: {detail}")]
    Unauthenticated { registry: String, detail: String },

    #[error("registry {registry} denied access: {detail}")]
    PermissionDenied { registry: String, detail: String },

    #[error("registry {registry} unavailable: {detail}")]
    Unavailable { registry: String, detail: String },

    #[error("registry {registry} failed: {detail}")]
    Registry { registry: String, detail: String },

    /// A registry sent more than we read into memory (a hostile or broken registry).
    #[error("registry {registry} sent a {what} over the {limit}-byte limit")]
    TooLarge { registry: String, what: String, limit: u64 },

    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: String, actual: String },

    #[error("{what} size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { what: String, expected: u64, actual: u64 },

    #[error("unsupported {what}: {detail}")]
    Unsupported { what: String, detail: String },

    #[error("invalid {what}: {detail}")]
    InvalidContent { what: String, detail: String },

    /// A layer tries something no legitimate layer does (escape, bomb, bad header).
    #[error("refusing layer {layer}: entry {entry:?}: {reason}")]
    HostileLayer { layer: String, entry: String, reason: String },

    /// A configured limit was exceeded while unpacking.
    #[error("refusing layer {layer}: {reason}")]
    LayerLimit { layer: String, reason: String },

    /// The signature policy refuses the image (nothing of it was stored).
    #[error("image {reference} refused by signature policy scope {scope:?}: {reason}")]
    SignatureRefused { reference: String, scope: String, reason: String },

    #[error("corrupt metadata {path}: {detail}")]
    CorruptMetadata { path: PathBuf, detail: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The class of this error, for the daemon to map to a gRPC status code in one place.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidReference { .. } | Error::InvalidConfig(_) => ErrorKind::InvalidArgument,
            Error::NotFound { .. } | Error::NoMatchingPlatform { .. } => ErrorKind::NotFound,
            Error::Unauthenticated { .. } => ErrorKind::Unauthenticated,
            Error::PermissionDenied { .. } | Error::SignatureRefused { .. } => ErrorKind::PermissionDenied,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Registry { .. } => ErrorKind::Unavailable,
            Error::DigestMismatch { .. }
            | Error::SizeMismatch { .. }
            | Error::Unsupported { .. }
            | Error::InvalidContent { .. }
            | Error::HostileLayer { .. } => ErrorKind::FailedPrecondition,
            Error::LayerLimit { .. } | Error::TooLarge { .. } => ErrorKind::ResourceExhausted,
            Error::CorruptMetadata { .. } | Error::Io { .. } => ErrorKind::Internal,
        }
    }

    /// A short, stable name of what went wrong (snake case, no detail): the daemon's metrics label
    /// failed pulls with it, as CRI-O labels `crio_image_pulls_failure_total` with an error category.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidReference { .. } => "invalid_reference",
            Error::InvalidConfig(_) => "invalid_config",
            Error::NotFound { .. } => "not_found",
            Error::NoMatchingPlatform { .. } => "no_matching_platform",
            Error::Unauthenticated { .. } => "unauthenticated",
            Error::PermissionDenied { .. } => "permission_denied",
            Error::SignatureRefused { .. } => "signature_refused",
            Error::Unavailable { .. } => "unavailable",
            Error::Registry { .. } => "registry_error",
            Error::TooLarge { .. } => "too_large",
            Error::DigestMismatch { .. } => "digest_mismatch",
            Error::SizeMismatch { .. } => "size_mismatch",
            Error::Unsupported { .. } => "unsupported",
            Error::InvalidContent { .. } => "invalid_content",
            Error::HostileLayer { .. } => "hostile_layer",
            Error::LayerLimit { .. } => "layer_limit",
            Error::CorruptMetadata { .. } => "corrupt_metadata",
            Error::Io { .. } => "io",
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Adds a lowercase context to io errors: `.ctx(|| format!("create {path:?}"))`.
pub(crate) trait IoContext<T> {
    fn ctx<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, Error>;
}

impl<T> IoContext<T> for Result<T, io::Error> {
    fn ctx<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, Error> {
        self.map_err(|source| Error::io(context(), source))
    }
}

impl<T> IoContext<T> for Result<T, rustix::io::Errno> {
    fn ctx<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, Error> {
        self.map_err(|errno| Error::io(context(), errno.into()))
    }
}
