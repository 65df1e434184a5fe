//! Image metadata: every image's references, manifest, config and layers, in one JSON document
//! (`metadata.json`) rewritten atomically (temporary file, fsync, rename, fsync of the directory)
//! on each change. One document keeps multi-image changes (a tag moving from one image to
//! another) atomic, and stays small: a few kilobytes per image.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, IoContext};
use crate::layers::Layer;

const FORMAT_VERSION: u32 = 1;

/// What kubelet and the runtime need from an image's config (`config` in the OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// `USER`: `name`, `uid`, `name:group`, `uid:gid`, or empty.
    pub user: String,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    /// Volume paths.
    pub volumes: Vec<String>,
    pub stop_signal: String,
    pub labels: BTreeMap<String, String>,
    /// `80/tcp`, `53/udp`.
    pub exposed_ports: Vec<String>,
}

/// One stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    /// The config digest, which is the image id.
    pub id: Digest,
    pub repo_tags: BTreeSet<String>,
    pub repo_digests: BTreeSet<String>,
    /// The platform manifest.
    pub manifest: Digest,
    /// The index it was chosen from, if any (kept for GC of its blob).
    #[serde(default)]
    pub index: Option<Digest>,
    pub config: ImageConfig,
    pub config_size: u64,
    pub layers: Vec<Layer>,
    /// Removed by the user but maybe still used by containers: hidden, kept until GC finds it
    /// unused. GC is the only place that deletes content.
    #[serde(default)]
    pub removed: bool,
    /// Seconds since the epoch of the last pull that changed the record (a re-pull of the same
    /// manifest under names it already has leaves the metadata file alone).
    #[serde(default)]
    pub pulled_at: u64,
}

impl ImageRecord {
    /// Size as kubelet understands it: the compressed content of the image.
    pub fn size(&self) -> u64 {
        self.config_size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    version: u32,
    /// The `layer_uid_shift` every unpacked layer was stored with; absent in stores written
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layer_uid_shift: Option<u32>,
    images: BTreeMap<String, ImageRecord>,
}

/// The metadata document and its file.
#[derive(Debug)]
pub(crate) struct Metadata {
    path: PathBuf,
    images: BTreeMap<Digest, ImageRecord>,
    layer_uid_shift: Option<u32>,
}

impl Metadata {
    pub fn open(path: PathBuf) -> Result<Self, Error> {
        let mut layer_uid_shift = None;
        let images = match fs::read(&path) {
            Ok(data) => {
                let doc: Document = serde_json::from_slice(&data)
                    .map_err(|e| Error::CorruptMetadata { path: path.clone(), detail: e.to_string() })?;
                if doc.version != FORMAT_VERSION {
                    return Err(Error::CorruptMetadata {
                        path,
                        detail: format!("format version {} is not the supported {FORMAT_VERSION}", doc.version),
                    });
                }
                layer_uid_shift = doc.layer_uid_shift;
                doc.images.into_values().map(|record| (record.id.clone(), record)).collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        Ok(Metadata { path, images, layer_uid_shift })
    }

    /// The shift the store's layers were unpacked with, if recorded.
    pub fn layer_uid_shift(&self) -> Option<u32> {
        self.layer_uid_shift
    }

    /// Records the shift the store's layers are unpacked with.
    pub fn record_layer_uid_shift(&mut self, shift: u32) -> Result<(), Error> {
        if self.layer_uid_shift != Some(shift) {
            write_atomic(&self.path, &self.images, Some(shift))?;
            self.layer_uid_shift = Some(shift);
        }
        Ok(())
    }

    pub fn records(&self) -> impl Iterator<Item = &ImageRecord> {
        self.images.values()
    }

    pub fn get(&self, id: &Digest) -> Option<&ImageRecord> {
        self.images.get(id)
    }

    /// Applies `change` to a copy and persists it; memory changes only if the disk write worked.
    pub fn update<T>(&mut self, change: impl FnOnce(&mut BTreeMap<Digest, ImageRecord>) -> T) -> Result<T, Error> {
        let mut next = self.images.clone();
        let out = change(&mut next);
        if next != self.images {
            write_atomic(&self.path, &next, self.layer_uid_shift)?;
            self.images = next;
        }
        Ok(out)
    }
}

fn write_atomic(
    path: &Path,
    images: &BTreeMap<Digest, ImageRecord>,
    layer_uid_shift: Option<u32>,
) -> Result<(), Error> {
    let doc = Document {
        version: FORMAT_VERSION,
        layer_uid_shift,
        images: images.iter().map(|(id, record)| (id.to_string(), record.clone())).collect(),
    };
    let data = serde_json::to_vec_pretty(&doc).map_err(|e| Error::io("serialise metadata", io::Error::other(e)))?;
    let dir = path.parent().expect("metadata path has a parent");
    let mut tmp = tempfile::Builder::new()
        .prefix(".metadata-")
        .tempfile_in(dir)
        .ctx(|| format!("create temporary metadata in {}", dir.display()))?;
    tmp.write_all(&data).ctx(|| "write metadata")?;
    tmp.as_file().sync_all().ctx(|| "fsync metadata")?;
    tmp.persist(path).map_err(|e| Error::io(format!("replace {}", path.display()), e.error))?;
    crate::blobs::sync_dir(dir)
}

/// Extracts [`ImageConfig`] from an OCI/docker image config JSON, and its `rootfs.diff_ids`.
pub(crate) fn parse_image_config(data: &[u8]) -> Result<(ImageConfig, Vec<Digest>), String> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Raw {
        config: Option<RawConfig>,
        rootfs: Option<RootFs>,
        os: Option<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "PascalCase")]
    struct RawConfig {
        user: Option<String>,
        env: Option<Vec<String>>,
        entrypoint: Option<Vec<String>>,
        cmd: Option<Vec<String>>,
        working_dir: Option<String>,
        volumes: Option<BTreeMap<String, serde_json::Value>>,
        stop_signal: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct RootFs {
        #[serde(rename = "type")]
        kind: String,
        diff_ids: Vec<String>,
    }
    let raw: Raw = serde_json::from_slice(data).map_err(|e| format!("image config is not valid json: {e}"))?;
    if let Some(os) = &raw.os
        && os != "linux"
        && !os.is_empty()
    {
        return Err(format!("image is for os {os:?}, not linux"));
    }
    let rootfs = raw.rootfs.ok_or("image config has no rootfs")?;
    if rootfs.kind != "layers" {
        return Err(format!("image config rootfs type {:?} is not \"layers\"", rootfs.kind));
    }
    let diff_ids = rootfs
        .diff_ids
        .iter()
        .map(|d| d.parse::<Digest>().map_err(|e| format!("rootfs.diff_ids: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let c = raw.config.unwrap_or_default();
    let config = ImageConfig {
        user: c.user.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        working_dir: c.working_dir.unwrap_or_default(),
        volumes: c.volumes.unwrap_or_default().into_keys().collect(),
        stop_signal: c.stop_signal.unwrap_or_default(),
        labels: c.labels.unwrap_or_default(),
        exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
    };
    Ok((config, diff_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &Digest, tag: &str) -> ImageRecord {
        ImageRecord {
            id: id.clone(),
            repo_tags: [tag.to_owned()].into(),
            repo_digests: BTreeSet::new(),
            manifest: Digest::sha256_of(b"m"),
            index: None,
            config: ImageConfig { user: "1000".into(), ..Default::default() },
            config_size: 10,
            layers: vec![],
            removed: false,
            pulled_at: 1,
        }
    }

    #[test]
    fn survives_reopen_and_failed_writes_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.json");
        let id = Digest::sha256_of(b"config");
        let mut meta = Metadata::open(path.clone()).unwrap();
        meta.update(|images| images.insert(id.clone(), record(&id, "docker.io/library/a:1"))).unwrap();
        drop(meta);
        let meta = Metadata::open(path.clone()).unwrap();
        assert_eq!(meta.get(&id).unwrap().repo_tags.iter().next().unwrap(), "docker.io/library/a:1");
        assert_eq!(meta.get(&id).unwrap().config.user, "1000");
        // No temporary files are left next to the document.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["metadata.json"]);

        // A write that fails (directory gone read-only is hard as root; remove it instead) keeps memory as it was.
        let mut meta = meta;
        fs::remove_dir_all(dir.path()).unwrap();
        let err = meta.update(|images| images.clear()).unwrap_err();
        assert!(err.to_string().contains("metadata"), "{err}");
        assert!(meta.get(&id).is_some());

        fs::create_dir_all(dir.path()).unwrap();
        fs::write(&path, b"{not json").unwrap();
        let err = Metadata::open(path).unwrap_err();
        assert!(err.to_string().starts_with("corrupt metadata"), "{err}");
    }

    #[test]
    fn parses_image_config() {
        let (config, diff_ids) = parse_image_config(
            br#"{"architecture":"amd64","os":"linux","config":{"User":"www-data:1004","Env":["A=1"],"Cmd":["sh"],
            "WorkingDir":"/w","Volumes":{"/data":{}},"StopSignal":"SIGQUIT","Labels":{"k":"v"},"ExposedPorts":{"80/tcp":{}}},
            "rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#,
        )
        .unwrap();
        assert_eq!(config.user, "www-data:1004");
        assert_eq!(config.volumes, ["/data"]);
        assert_eq!(config.exposed_ports, ["80/tcp"]);
        assert_eq!(diff_ids.len(), 1);
        assert!(parse_image_config(br#"{"os":"windows","rootfs":{"type":"layers","diff_ids":[]}}"#).is_err());
        assert!(parse_image_config(br#"{"rootfs":{"type":"layers","diff_ids":["sha256:x"]}}"#).is_err());
    }
}
