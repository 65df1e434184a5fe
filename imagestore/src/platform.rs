//! Choosing this node's image from an image index / manifest list, as containerd's default
//! platform matcher does: same OS, same architecture, and the best compatible variant.

use serde::Deserialize;

/// An OCI platform (`linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// The platform of the machine we run on, in OCI terms.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform { os: "linux".into(), architecture: architecture.into(), variant: variant.map(Into::into) }
    }

    /// How well an image built for `candidate` runs here: `None` if it cannot, lower is better.
    pub fn rank(&self, candidate: &Platform) -> Option<usize> {
        if candidate.os != self.os || normalise_arch(&candidate.architecture) != normalise_arch(&self.architecture) {
            return None;
        }
        let wanted = self.variant.as_deref().unwrap_or("");
        let offered = candidate.variant.as_deref().unwrap_or("");
        let acceptable: &[&str] = match (normalise_arch(&self.architecture), wanted) {
            // An arm64 image without a variant is v8.
            ("arm64", "v8" | "") => &["v8", ""],
            ("arm", "v7") => &["v7", "", "v6", "v5"],
            ("arm", "v6") => &["v6", "v5"],
            ("arm", "v5") => &["v5"],
            // amd64 microarchitecture levels: the baseline only, as containerd does by default.
            ("amd64", _) => &["", "v1"],
            (_, wanted) => {
                return if offered == wanted || offered.is_empty() {
                    Some(usize::from(offered != wanted))
                } else {
                    None
                };
            }
        };
        acceptable.iter().position(|v| *v == offered)
    }
}

fn normalise_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" => "386",
        other => other,
    }
}

/// The index of the best entry for `host`, the first of equally good ones.
pub(crate) fn select<'a>(host: &Platform, entries: impl IntoIterator<Item = Option<&'a Platform>>) -> Option<usize> {
    entries
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| p.and_then(|p| host.rank(p)).map(|rank| (rank, i)))
        .min()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        let mut parts = s.split('/');
        Platform {
            os: parts.next().unwrap().into(),
            architecture: parts.next().unwrap().into(),
            variant: parts.next().map(Into::into),
        }
    }

    #[test]
    fn picks_the_matching_platform() {
        let index = [
            p("linux/arm/v6"),
            p("linux/arm/v7"),
            p("linux/arm64/v8"),
            p("linux/amd64"),
            p("windows/amd64"),
            p("unknown/unknown"),
        ];
        let entries = || index.iter().map(Some);
        assert_eq!(select(&p("linux/amd64"), entries()), Some(3));
        assert_eq!(select(&p("linux/arm64/v8"), entries()), Some(2));
        assert_eq!(select(&p("linux/arm/v7"), entries()), Some(1));
        assert_eq!(select(&p("linux/arm/v6"), entries()), Some(0));
        assert_eq!(select(&p("linux/s390x"), entries()), None);
        // arm64 without variant counts as v8; amd64/v3 is not chosen over the baseline.
        assert_eq!(select(&p("linux/arm64/v8"), [Some(&p("linux/arm64"))]), Some(0));
        assert_eq!(select(&p("linux/amd64"), [Some(&p("linux/amd64/v3")), Some(&p("linux/amd64"))]), Some(1));
        assert_eq!(select(&p("linux/amd64"), [None, Some(&p("linux/amd64"))]), Some(1));
        // An arm/v7 node runs v6 images when nothing better is offered, not the reverse.
        assert_eq!(select(&p("linux/arm/v7"), [Some(&p("linux/arm/v6"))]), Some(0));
        assert_eq!(select(&p("linux/arm/v6"), [Some(&p("linux/arm/v7"))]), None);
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert_eq!(host.rank(&host), Some(0));
    }
}
