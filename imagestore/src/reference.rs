//! Image references, normalised as containerd and docker do (`busybox` ->
//! `docker.io/library/busybox:latest`).

use std::fmt;

use crate::digest::Digest;
use crate::error::Error;

pub(crate) const DEFAULT_REGISTRY: &str = "docker.io";
const MAX_NAME_LEN: usize = 255;

/// A fully qualified image reference: `registry/repository[:tag][@digest]`.
/// At least one of `tag` and `digest` is set; a reference without either gets the tag `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// `docker.io`, `registry.k8s.io`, `localhost:5000`, `[::1]:5000`.
    pub registry: String,
    /// `library/busybox`, `pause`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl ImageReference {
    /// Parses and normalises a reference the way containerd's CRI does.
    pub fn parse(input: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidReference { reference: input.to_owned(), reason: reason.to_owned() };
        if input.is_empty() {
            return Err(invalid("empty reference"));
        }
        if input.len() > 4096 || input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace or control characters"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                let digest: Digest = digest.parse().map_err(|e: crate::digest::DigestParseError| invalid(&e.0))?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/', so "host:5000/repo" has no tag.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(invalid("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
        }
        let (registry, repository) = split_registry(name);
        let registry = if registry == "index.docker.io" { DEFAULT_REGISTRY.to_owned() } else { registry };
        if !valid_registry(&registry) {
            return Err(invalid("invalid registry host"));
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty() {
            return Err(invalid("empty repository name"));
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository name must be lowercase"));
        }
        if !repository.split('/').all(valid_path_component) {
            return Err(invalid("repository path components must match [a-z0-9]+(?:[._-][a-z0-9]+)*"));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(invalid("repository name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(ImageReference { registry, repository, tag, digest })
    }

    /// `registry/repository`, the name that repo tags and repo digests start with.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository:tag`, if the reference has a tag.
    pub fn repo_tag(&self) -> Option<String> {
        self.tag.as_ref().map(|tag| format!("{}:{tag}", self.name()))
    }

    /// `registry/repository@digest` for a manifest digest.
    pub fn repo_digest(&self, manifest: &Digest) -> String {
        format!("{}@{manifest}", self.name())
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Splits off the registry like docker's `splitDockerDomain`: the first component is a registry
/// only if it has a '.' or ':' or is `localhost` (and is not uppercase, which would make it an
/// invalid repository instead).
fn split_registry(name: &str) -> (String, String) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first.to_owned(), rest.to_owned())
        }
        _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
    }
}

fn valid_registry(host: &str) -> bool {
    if host.is_empty() || host.len() > 255 {
        return false;
    }
    // host, host:port, [v6]:port
    let (host_part, port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, after)) => {
                if !v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') || v6.is_empty() {
                    return false;
                }
                (None, after.strip_prefix(':').map(Some).unwrap_or(if after.is_empty() { None } else { Some("x") }))
            }
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    match host_part {
        None => true,
        Some(h) => {
            !h.is_empty()
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                })
        }
    }
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    if bytes.is_empty() || !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        ImageReference::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalises_like_containerd() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("index.docker.io/library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("docker.io/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("someone/app:v1"), "docker.io/someone/app:v1");
        assert_eq!(norm("registry.k8s.io/pause:3.9"), "registry.k8s.io/pause:3.9");
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("localhost:5000/a/b/c:x_1.2-3"), "localhost:5000/a/b/c:x_1.2-3");
        assert_eq!(norm("127.0.0.1:5000/app"), "127.0.0.1:5000/app:latest");
        assert_eq!(norm("[::1]:5000/app:1"), "[::1]:5000/app:1");
        let d = format!("sha256:{}", "b".repeat(64));
        assert_eq!(norm(&format!("busybox@{d}")), format!("docker.io/library/busybox@{d}"));
        assert_eq!(norm(&format!("busybox:1@{d}")), format!("docker.io/library/busybox:1@{d}"));
        let r = ImageReference::parse(&format!("busybox@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.repo_digest(r.digest.as_ref().unwrap()), format!("docker.io/library/busybox@{d}"));
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Busybox",
            "docker.io/Library/busybox",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:123",
            "a//b",
            "a/b/",
            "-a",
            "a..b",
            "a b",
            "host:port/app",
            "busybox:1:2",
        ] {
            let err = ImageReference::parse(bad).expect_err(bad);
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
            assert!(err.to_string().starts_with("invalid image reference"), "{err}");
        }
        assert!(ImageReference::parse(&format!("a:{}", "t".repeat(129))).is_err());
        assert!(ImageReference::parse(&format!("x.io/{}", "a".repeat(260))).is_err());
    }
}
