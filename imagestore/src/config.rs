//! The store's configuration: the `[images]` table of the daemon's TOML config.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::signature::SignaturePolicy;

/// Image store settings. Every field has a default, so an empty `[images]` table is valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Largest unpacked size of one layer, in bytes (file contents plus xattrs). A layer that
    /// unpacks to more is refused as a decompression bomb. Default: 64 GiB.
    pub max_layer_bytes: u64,
    /// Most tar entries one layer may have. Default: 2,000,000.
    pub max_layer_entries: u64,
    /// Layers downloaded and unpacked at the same time, across all pulls. Default: 4.
    pub max_concurrent_downloads: usize,
    /// Retries of a registry request after a transient failure (connection error, timeout, 5xx,
    /// 429), with exponential backoff from 200 ms. Default: 4.
    pub retries: u32,
    /// A registry connection that delivers no data for this long fails (and is retried). Default: 60.
    pub read_timeout_secs: u64,
    /// Keep each layer's compressed blob after unpacking it, as containerd does (a re-unpack then
    /// needs no download). `false` halves the disk used per image. Default: true.
    pub keep_layer_blobs: bool,
    /// Images that garbage collection never removes, e.g. the pause image. Any reference form
    /// (`registry.k8s.io/pause:3.9`, `busybox`, `repo@sha256:...`). Default: none.
    pub pinned_images: Vec<String>,
    /// Owner shift for unpacked layer files: a file owned by uid `n` (0..65535) in the layer is
    /// stored as `layer_uid_shift + n` (same for gids). The default, 2147352576 (0x7FFE0000),
    /// stores layers in systemd's foreign UID range, so that no file of an image is owned by a
    /// user of the node; containers see the original ids through idmapped mounts. `0` keeps
    /// ownership as in the image (and allows ids above 65535). The store records the shift its
    /// layers were unpacked with and refuses to open under another one.
    pub layer_uid_shift: u32,
    /// Per-registry settings keyed by host (`docker.io`, `localhost:5000`), like containerd's
    /// hosts.toml. A registry without an entry is reached over https with the system roots.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// The signature policy (`[images.signatures]`): which images a pull accepts, by scope
    /// (see `signature.rs`). Default: every image.
    pub signatures: SignaturePolicy,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_layer_bytes: 64 << 30,
            max_layer_entries: 2_000_000,
            max_concurrent_downloads: 4,
            retries: 4,
            read_timeout_secs: 60,
            keep_layer_blobs: true,
            pinned_images: Vec::new(),
            layer_uid_shift: FOREIGN_UID_BASE,
            registries: BTreeMap::new(),
            signatures: SignaturePolicy::default(),
        }
    }
}

/// The first id of systemd's foreign UID/GID range (0x7FFE0000..=0x7FFEFFFF), where container
/// trees on disk are owned (systemd's docs/UIDS-GIDS.md).
pub const FOREIGN_UID_BASE: u32 = 0x7FFE_0000;

/// How to reach one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Mirrors tried in order before the registry itself: `https://mirror.example`,
    /// `http://10.0.0.1:5000` or a bare `host[:port]` (https). Requests carry `?ns=<registry>`.
    pub mirrors: Vec<String>,
    /// Reach the registry itself over plain HTTP instead of https.
    pub plain_http: bool,
    /// Skip TLS certificate verification for the registry and its mirrors.
    pub insecure: bool,
    /// A PEM file of extra CA certificates trusted for the registry and its mirrors.
    pub ca_file: Option<PathBuf>,
}

impl StoreConfig {
    /// Checks the values that have no meaningful interpretation.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.max_concurrent_downloads == 0 {
            return bad("max_concurrent_downloads must be at least 1".into());
        }
        if self.max_layer_bytes == 0 || self.max_layer_entries == 0 {
            return bad("max_layer_bytes and max_layer_entries must be at least 1".into());
        }
        if self.layer_uid_shift != 0 && self.layer_uid_shift.checked_add(0xFFFF).is_none() {
            return bad(format!("layer_uid_shift {} leaves no room for 65536 ids", self.layer_uid_shift));
        }
        for (host, registry) in &self.registries {
            if host.is_empty() || host.contains('/') {
                return bad(format!("registry key {host:?} must be a host[:port]"));
            }
            for mirror in &registry.mirrors {
                crate::registry::Endpoint::parse_mirror(mirror).map_err(Error::InvalidConfig)?;
            }
        }
        for pinned in &self.pinned_images {
            crate::reference::ImageReference::parse(pinned)
                .map_err(|e| Error::InvalidConfig(format!("pinned_images: {e}")))?;
        }
        // Reads the keys: a bad policy stops start-up, naming its scope.
        self.signatures.compile()?;
        Ok(())
    }
}

/// The uid/gid mapping applied to every file unpacked from a layer. All ownership passes through
/// [`IdShift::map`], so moving layers into another id range is a configuration change only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdShift {
    base: u32,
}

impl IdShift {
    pub const IDENTITY: IdShift = IdShift { base: 0 };
    /// Ids a shifted layer may use (the size of systemd's foreign range).
    const SHIFTED_RANGE: u32 = 0x1_0000;

    pub fn new(base: u32) -> Self {
        IdShift { base }
    }

    /// The id layer files owned by `0` (root) are stored with.
    pub fn root(self) -> u32 {
        self.base
    }

    /// The stored id for an id from a layer, or `None` if it does not fit the target range.
    pub fn map(self, id: u64) -> Option<u32> {
        if self.base == 0 {
            return u32::try_from(id).ok().filter(|&id| id != u32::MAX);
        }
        let id = u32::try_from(id).ok().filter(|&id| id < Self::SHIFTED_RANGE)?;
        self.base.checked_add(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_toml_round_trip() {
        let config: StoreConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, StoreConfig::default());
        assert_eq!(config.layer_uid_shift, 0x7FFE_0000, "layers live in the foreign range by default");
        config.validate().unwrap();
        let config: StoreConfig = serde_json::from_str(
            r#"{"max_concurrent_downloads": 2, "pinned_images": ["registry.k8s.io/pause:3.9"],
                "registries": {"localhost:5000": {"plain_http": true, "mirrors": ["http://127.0.0.1:5001"]}}}"#,
        )
        .unwrap();
        config.validate().unwrap();
        assert!(config.registries["localhost:5000"].plain_http);
        assert!(serde_json::from_str::<StoreConfig>(r#"{"max_layer_byte": 1}"#).is_err());
        let bad = StoreConfig { max_concurrent_downloads: 0, ..Default::default() };
        assert!(bad.validate().is_err());
        let bad = StoreConfig { pinned_images: vec!["Bad".into()], ..Default::default() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn parses_as_the_daemons_images_table() {
        #[derive(Deserialize)]
        struct Daemon {
            #[serde(default)]
            images: StoreConfig,
        }
        let daemon: Daemon = toml::from_str(
            r#"
            [images]
            max_layer_bytes = 1073741824
            pinned_images = ["registry.k8s.io/pause:3.10"]
            layer_uid_shift = 2147352576

            [images.registries."docker.io"]
            mirrors = ["https://mirror.example", "http://10.0.0.1:5000"]

            [images.registries."localhost:5000"]
            plain_http = true
            insecure = true
            ca_file = "/etc/cri-systemd/ca.pem"
            "#,
        )
        .unwrap();
        let images = daemon.images;
        images.validate().unwrap();
        assert_eq!(images.max_layer_bytes, 1 << 30);
        assert_eq!(images.max_concurrent_downloads, 4, "unset fields keep their defaults");
        assert_eq!(images.registries["docker.io"].mirrors.len(), 2);
        assert_eq!(
            images.registries["localhost:5000"].ca_file.as_deref(),
            Some(std::path::Path::new("/etc/cri-systemd/ca.pem"))
        );
        let typo = toml::from_str::<Daemon>("[images]\nmax_layer_byte = 1\n").err().unwrap();
        assert!(typo.to_string().contains("unknown field `max_layer_byte`"), "{typo}");
        let empty: Daemon = toml::from_str("").unwrap();
        assert_eq!(empty.images, StoreConfig::default());
        // And back: the daemon can print its effective configuration.
        let text = toml::to_string(&images).unwrap();
        assert_eq!(toml::from_str::<StoreConfig>(&text).unwrap(), images);
    }

    #[test]
    fn id_shift() {
        assert_eq!(IdShift::IDENTITY.map(0), Some(0));
        assert_eq!(IdShift::IDENTITY.map(100_000), Some(100_000));
        assert_eq!(IdShift::IDENTITY.map(u64::from(u32::MAX)), None);
        let foreign = IdShift::new(0x7FFE_0000);
        assert_eq!(foreign.map(0), Some(0x7FFE_0000));
        assert_eq!(foreign.map(65535), Some(0x7FFE_FFFF));
        assert_eq!(foreign.map(65536), None);
    }
}
