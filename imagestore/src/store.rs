//! [`ImageStore`]: the public face of the crate, tying blobs, layers, metadata and pulls together.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::blobs::{BlobStore, InFlight};
use crate::config::{IdShift, StoreConfig};
use crate::digest::{Digest, Hasher, chain_ids};
use crate::error::{Error, IoContext};
use crate::layers::{self, Layer, LayerStore, StreamFailure, stream_io_error};
use crate::meta::{ImageConfig, ImageRecord, Metadata, parse_image_config};
use crate::platform::{self, Platform};
use crate::reference::ImageReference;
use crate::registry::{self, Credentials, EndpointClient, HttpClients};
use crate::signature::{self, PublicKey, Refusal, Requirement};
use crate::unpack::Limits;

const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// An image id: the digest of the image's config (`sha256:...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(pub Digest);

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ImageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        s.parse().map(ImageId).map_err(|e: crate::digest::DigestParseError| Error::InvalidReference {
            reference: s.to_owned(),
            reason: e.0,
        })
    }
}

/// An image as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: ImageId,
    /// `registry/repository:tag` names of the image.
    pub repo_tags: Vec<String>,
    /// `registry/repository@sha256:<manifest digest>` names of the image.
    pub repo_digests: Vec<String>,
    /// Bytes of the image's content as pulled (config and compressed layers).
    pub size: u64,
    /// Listed in `pinned_images`: garbage collection never removes it.
    pub pinned: bool,
    pub config: ImageConfig,
    /// Bottom layer first.
    pub layers: Vec<Layer>,
    pub manifest_digest: Digest,
}

/// Disk use of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Bytes allocated on disk (like `du`), hard links counted once.
    pub used_bytes: u64,
    pub inodes_used: u64,
    /// The store's root directory (what containerd reports as the image filesystem).
    pub mountpoint: PathBuf,
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub images_removed: Vec<ImageId>,
    pub layers_removed: usize,
    pub blobs_removed: usize,
    /// Disk space the removed layers and blobs took (allocated blocks, as `du` counts them).
    pub bytes_freed: u64,
}

/// What the store has done since it was opened, for the daemon's metrics (the store knows no
/// metrics library: the daemon reads these at each scrape).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Bytes of layers and image configs received from registries.
    pub bytes_fetched: u64,
    /// Layers unpacked (downloaded, or from a stored blob).
    pub layers_unpacked: u64,
    /// Layers a pull needed that were unpacked already.
    pub layers_reused: u64,
}

#[derive(Default)]
struct Counters {
    bytes_fetched: AtomicU64,
    layers_unpacked: AtomicU64,
    layers_reused: AtomicU64,
}

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The content-addressed image store rooted at one directory. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageStore").field("root", &self.inner.root).finish_non_exhaustive()
    }
}

struct Inner {
    root: PathBuf,
    config: StoreConfig,
    blobs: BlobStore,
    layers: Arc<LayerStore>,
    meta: Mutex<Metadata>,
    /// Work on one blob or layer at a time, across pulls.
    in_flight: InFlight,
    /// Bounds layer downloads+unpacks across all pulls.
    downloads: Arc<Semaphore>,
    /// Content that pulls in progress rely on and GC must keep. The one place, with the metadata,
    /// that decides what is referenced.
    active: Mutex<HashMap<Digest, usize>>,
    pinned: HashSet<String>,
    platform: Platform,
    http_clients: HttpClients,
    counters: Counters,
    /// The signature policy, keys read (`config.signatures` compiled).
    signatures: crate::signature::Policy,
}

/// Keeps content referenced while a pull uses it.
struct ActiveGuard<'a> {
    inner: &'a Inner,
    keys: Vec<Digest>,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        release(&self.inner.active, &self.keys);
    }
}

fn release(active: &Mutex<HashMap<Digest, usize>>, keys: &[Digest]) {
    let mut active = lock(active);
    for key in keys {
        if let Some(n) = active.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                active.remove(key);
            }
        }
    }
}

/// An image's layer directories, kept from garbage collection (with the image's record) for as
/// long as the lease lives: what a container about to be created mounts, from the lookup until
/// the runtime has recorded the container (whose record then keeps them, see [`InUse`]).
#[must_use = "the layers may be collected as soon as the lease is dropped"]
pub struct LayerLease {
    inner: Arc<Inner>,
    keys: Vec<Digest>,
    lowerdirs: Vec<PathBuf>,
}

impl LayerLease {
    /// The image's layer directories, the top layer first (overlayfs `lowerdir` order).
    pub fn lowerdirs(&self) -> &[PathBuf] {
        &self.lowerdirs
    }
}

impl fmt::Debug for LayerLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerLease").field("lowerdirs", &self.lowerdirs).finish_non_exhaustive()
    }
}

impl Drop for LayerLease {
    fn drop(&mut self) {
        release(&self.inner.active, &self.keys);
    }
}

/// What containers use, as the runtime's records say: garbage collection keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InUse {
    /// Images (their records, so removed images stay until their last container goes).
    pub images: HashSet<ImageId>,
    /// Layer directories containers mount (as [`LayerLease::lowerdirs`] gave them): kept even
    /// when no image record names them any more.
    pub layers: HashSet<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize, Clone)]
struct RawDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
}

const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
const CONFIG_TYPES: &[&str] =
    &["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

/// Disk space under `path` (a file or a directory tree): allocated blocks, each inode once.
/// Entries that vanish meanwhile count as nothing.
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&path) else { continue };
        if seen.insert((md.dev(), md.ino())) {
            total += md.blocks() * 512;
        }
        if md.is_dir()
            && let Ok(entries) = fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
    total
}

/// Makes sure every unpacked layer was stored with `configured` as its owner shift, recording it
/// for an empty or unrecorded store. Layers of another shift would show wrong owners in every
/// container (files of a node user, or unmapped ids): the store then refuses to open.
fn check_layer_uid_shift(root: &Path, meta: &mut Metadata, layers: &LayerStore, configured: u32) -> Result<(), Error> {
    let stored = match meta.layer_uid_shift() {
        Some(recorded) => Some(recorded),
        // Stores written before the shift was recorded: their owners tell.
        None => layers.detect_owner_shift()?,
    };
    match stored {
        Some(stored) if stored != configured && !layers.list()?.is_empty() => Err(Error::InvalidConfig(format!(
            "the layers in {} were unpacked with images.layer_uid_shift = {stored}, but the config says {configured}: \
                 set images.layer_uid_shift = {stored} again, or remove every container, delete {} and pull the images again",
            root.display(),
            root.display()
        ))),
        _ => meta.record_layer_uid_shift(configured),
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`. Leftovers of interrupted pulls are
    /// discarded here.
    pub fn open(root: &Path, config: StoreConfig) -> Result<ImageStore, Error> {
        config.validate()?;
        for dir in ["blobs", "layers"] {
            fs::create_dir_all(root.join(dir)).ctx(|| format!("create {}", root.join(dir).display()))?;
        }
        let tmp = root.join("tmp");
        match fs::remove_dir_all(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Error::io(format!("clear {}", tmp.display()), e));
            }
            _ => {}
        }
        fs::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        let mut meta = Metadata::open(root.join("metadata.json"))?;
        let layers = LayerStore::new(root.join("layers"), tmp.clone());
        check_layer_uid_shift(root, &mut meta, &layers, config.layer_uid_shift)?;
        let pinned = config
            .pinned_images
            .iter()
            .filter_map(|p| ImageReference::parse(p).ok())
            .map(|r| match (&r.digest, r.repo_tag()) {
                (Some(d), _) => r.repo_digest(d),
                (None, Some(tag)) => tag,
                (None, None) => r.name(),
            })
            .collect();
        let signatures = config.signatures.compile()?;
        let inner = Inner {
            signatures,
            root: root.to_path_buf(),
            blobs: BlobStore::new(root.join("blobs"), tmp.clone()),
            layers: Arc::new(layers),
            meta: Mutex::new(meta),
            in_flight: InFlight::default(),
            downloads: Arc::new(Semaphore::new(config.max_concurrent_downloads)),
            active: Mutex::new(HashMap::new()),
            pinned,
            platform: Platform::host(),
            http_clients: HttpClients::default(),
            counters: Counters::default(),
            config,
        };
        Ok(ImageStore { inner: Arc::new(inner) })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// What the store has done since it was opened.
    pub fn counters(&self) -> StoreCounters {
        let counters = &self.inner.counters;
        StoreCounters {
            bytes_fetched: counters.bytes_fetched.load(Ordering::Relaxed),
            layers_unpacked: counters.layers_unpacked.load(Ordering::Relaxed),
            layers_reused: counters.layers_reused.load(Ordering::Relaxed),
        }
    }

    /// Pulls an image and returns it. Cancel-safe: if the future is dropped, the pull stops and
    /// nothing partial becomes visible (verified layers already committed stay, as cache).
    /// Its span is a step of a traced PullImage (cri-server's otel.rs).
    #[tracing::instrument(name = "image.pull", skip_all, fields(container.image.name = %reference))]
    pub async fn pull(&self, reference: &str, auth: Option<Credentials>) -> Result<Image, Error> {
        let image_ref = ImageReference::parse(reference)?;
        let started = Instant::now();
        // The policy of the reference as requested, whichever endpoint (mirror) serves it.
        let (scope, requirement) = self.inner.signatures.requirement(&image_ref);
        let keys = match requirement {
            Requirement::Accept => None,
            Requirement::Reject => return Err(refused(&image_ref, scope, &Refusal::Rejected)),
            Requirement::Signed(keys) => Some((scope, keys.as_slice())),
        };
        let registry_config = self.inner.config.registries.get(&image_ref.registry).cloned().unwrap_or_default();
        let mut last_error = None;
        // A mirror's image the policy refused: the next endpoint may have its signature, but if
        // it fails too, the refusal is what the caller should hear (not "unreachable").
        let mut refusal = None;
        for endpoint in registry::endpoints(&image_ref.registry, &registry_config) {
            let is_mirror = endpoint.is_mirror;
            let host = endpoint.host.clone();
            let attempt = async {
                let client = EndpointClient::new(
                    endpoint,
                    &image_ref.registry,
                    &self.inner.config,
                    &self.inner.http_clients,
                    auth.as_ref(),
                )
                .await?;
                self.pull_from(&client, &image_ref, keys).await
            };
            match attempt.await {
                Ok(image) => {
                    let secs = started.elapsed().as_secs_f64();
                    info!(reference = %image_ref, id = %image.id, from = %host, size = image.size, secs = format_args!("{secs:.2}"),
                        rate_mb_s = format_args!("{:.1}", image.size as f64 / secs.max(1e-3) / 1e6), "pulled image");
                    return Ok(image);
                }
                Err(e) if is_mirror && mirror_may_fall_back(&e) => {
                    warn!(reference = %image_ref, mirror = %host, error = %e, "mirror failed, trying the next endpoint");
                    if matches!(e, Error::SignatureRefused { .. }) {
                        refusal = Some(e);
                    } else {
                        last_error = Some(e);
                    }
                }
                Err(e) if matches!(e, Error::SignatureRefused { .. }) => return Err(e),
                Err(e) => return Err(refusal.unwrap_or(e)),
            }
        }
        Err(refusal
            .or(last_error)
            .unwrap_or_else(|| Error::NotFound { reference: reference.to_owned(), detail: "no endpoint".into() }))
    }

    /// One endpoint's pull. `signed`: the scope and keys the image must be signed with; checked
    /// against the digest of the manifest (or index) fetched, before anything is stored.
    async fn pull_from(
        &self,
        client: &EndpointClient,
        image_ref: &ImageReference,
        signed: Option<(&str, &[PublicKey])>,
    ) -> Result<Image, Error> {
        let body = self.top_manifest(client, image_ref).await?;
        let top_digest = verify_manifest_digest(&body, image_ref.digest.as_ref(), &image_ref.to_string())?;
        if let Some((scope, keys)) = signed {
            match signature::verify(client, image_ref, &top_digest, keys).await {
                Ok(()) => {}
                Err(Ok(refusal)) => {
                    warn!(reference = %image_ref, digest = %top_digest, from = %client.endpoint.host, scope, %refusal,
                        "signature policy refused the image");
                    return Err(refused(image_ref, scope, &refusal));
                }
                Err(Err(e)) => return Err(e),
            }
        }
        let (manifest_body, manifest_digest, manifest, index) =
            match read_manifest(&body, &self.inner.platform, &image_ref.to_string())? {
                ManifestPlan::Index { manifest: digest } => {
                    let what = format!("{}@{digest}", image_ref.name());
                    // Named by digest: a stored copy is the same bytes (checked below).
                    let manifest_body = match self.inner.blobs.read(&digest)? {
                        Some(stored) => Bytes::from(stored),
                        None => client.manifest(image_ref, Some(&digest)).await?,
                    };
                    verify_manifest_digest(&manifest_body, Some(&digest), &what)?;
                    match read_manifest(&manifest_body, &self.inner.platform, &what)? {
                        ManifestPlan::Index { .. } => {
                            return Err(Error::Unsupported {
                                what: "image index".into(),
                                detail: format!("{digest} is an index inside an index"),
                            });
                        }
                        ManifestPlan::Image(manifest) => {
                            (manifest_body, digest, manifest, Some((body_clone(&body), top_digest)))
                        }
                    }
                }
                ManifestPlan::Image(manifest) => (body.clone(), top_digest, manifest, None),
            };

        let ImageManifest { config: config_digest, config_size, layers: layer_descriptors } = manifest;
        let _config_active = self.activate(vec![config_digest.clone(), manifest_digest.clone()]);
        let config_bytes = self.small_blob(client, image_ref, &config_digest, config_size, "config").await?;
        let (config, layers) = image_layers(&layer_descriptors, &config_bytes)?;
        let mut keys: Vec<Digest> = layers.iter().flat_map(|l| [l.chain_id.clone(), l.digest.clone()]).collect();
        keys.extend(index.as_ref().map(|(_, d)| d.clone()));
        let _layers_active = self.activate(keys);

        // All layers at once, bounded by the download semaphore. Each runs to its end, so that a
        // failed pull returns only once every unpacker has cleaned up after itself (a dropped
        // layer future would leave its blocking unpacker still writing into tmp/).
        let results =
            futures_util::future::join_all(layers.iter().map(|layer| self.ensure_layer(client, image_ref, layer)))
                .await;
        results.into_iter().collect::<Result<Vec<()>, Error>>()?;

        self.inner.blobs.put(&manifest_digest, &manifest_body, "manifest")?;
        if let Some((index_body, index_digest)) = &index {
            self.inner.blobs.put(index_digest, index_body, "image index")?;
        }
        let record = ImageRecord {
            id: config_digest.clone(),
            repo_tags: BTreeSet::new(),
            repo_digests: BTreeSet::new(),
            manifest: manifest_digest.clone(),
            index: index.map(|(_, d)| d),
            config,
            config_size,
            layers,
            removed: false,
            pulled_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        // A digest reference names the manifest list if there is one, as containerd records it.
        let repo_digest = image_ref
            .repo_digest(image_ref.digest.as_ref().unwrap_or(&record.index.clone().unwrap_or(manifest_digest)));
        let repo_tag = if image_ref.digest.is_none() { image_ref.repo_tag() } else { None };
        let mut meta = lock(&self.inner.meta);
        meta.update(|images| {
            let before = images.get(&config_digest).cloned();
            if let Some(tag) = &repo_tag {
                for other in images.values_mut() {
                    other.repo_tags.remove(tag);
                }
            }
            let entry = images.entry(config_digest.clone()).or_insert_with(|| record.clone());
            if entry.removed {
                *entry = record.clone();
            }
            entry.manifest = record.manifest.clone();
            entry.index = record.index.clone();
            entry.layers = record.layers.clone();
            entry.repo_tags.extend(repo_tag.clone());
            entry.repo_digests.insert(repo_digest.clone());
            // A re-pull that changes nothing writes nothing (no metadata fsync on the re-pull path).
            if before.as_ref() != Some(&*entry) {
                entry.pulled_at = record.pulled_at;
            }
        })?;
        let record = meta.get(&config_digest).expect("just stored").clone();
        drop(meta);
        Ok(self.to_image(&record))
    }

    /// The manifest (or index) the reference names. Like containerd's resolver, a HEAD first: when
    /// the registry's digest names a manifest the store already has, its stored bytes are used
    /// and no body crosses the network (a re-pull of a present image is one round trip; the blob
    /// store checks the stored bytes against their digest). Otherwise a GET.
    async fn top_manifest(&self, client: &EndpointClient, image_ref: &ImageReference) -> Result<Bytes, Error> {
        if let Some(digest) = client.manifest_digest(image_ref).await
            && image_ref.digest.as_ref().is_none_or(|d| *d == digest)
            && let Some(stored) = self.inner.blobs.read(&digest)?
        {
            debug!(reference = %image_ref, %digest, "manifest digest unchanged, using the stored manifest");
            return Ok(Bytes::from(stored));
        }
        client.manifest(image_ref, None).await
    }

    /// Marks content as used by a pull in progress, so GC keeps it.
    fn activate(&self, keys: Vec<Digest>) -> ActiveGuard<'_> {
        let mut active = lock(&self.inner.active);
        for key in &keys {
            *active.entry(key.clone()).or_default() += 1;
        }
        ActiveGuard { inner: &self.inner, keys }
    }

    /// Returns a small blob from the store, downloading it once if missing.
    async fn small_blob(
        &self,
        client: &EndpointClient,
        image_ref: &ImageReference,
        digest: &Digest,
        size: u64,
        what: &str,
    ) -> Result<Vec<u8>, Error> {
        if let Some(data) = self.inner.blobs.read(digest)? {
            return Ok(data);
        }
        let _guard = self.inner.in_flight.lock(&format!("blob {digest}")).await;
        if let Some(data) = self.inner.blobs.read(digest)? {
            return Ok(data);
        }
        let data = client.small_blob(image_ref, digest, size).await?;
        count(&self.inner.counters.bytes_fetched, data.len() as u64);
        self.inner.blobs.put(digest, &data, &format!("{what} {digest}"))?;
        Ok(data)
    }

    /// Makes sure a layer is unpacked: from a stored blob if we have it, else downloaded.
    async fn ensure_layer(
        &self,
        client: &EndpointClient,
        image_ref: &ImageReference,
        layer: &Layer,
    ) -> Result<(), Error> {
        let layers = &self.inner.layers;
        let counters = &self.inner.counters;
        if layers.exists(&layer.chain_id) {
            count(&counters.layers_reused, 1);
            return Ok(());
        }
        let _guard = self.inner.in_flight.lock(&format!("layer {}", layer.chain_id)).await;
        if layers.exists(&layer.chain_id) {
            count(&counters.layers_reused, 1);
            return Ok(());
        }
        let _permit = self.inner.downloads.clone().acquire_owned().await.expect("semaphore never closed");
        let started = Instant::now();
        if self.inner.blobs.exists(&layer.digest) {
            let (store, blob_path, layer_c) = (layers.clone(), self.inner.blobs.path(&layer.digest), layer.clone());
            let (limits, shift) = (self.limits(), self.shift());
            let result = tokio::task::spawn_blocking(move || {
                let file = fs::File::open(&blob_path).ctx(|| format!("open {}", blob_path.display()))?;
                store.unpack_verified(&layer_c, file, None, limits, shift)
            })
            .await
            .map_err(|e| Error::io("unpack task", io::Error::other(e)))?;
            match result {
                Ok(stats) => {
                    count(&counters.layers_unpacked, 1);
                    info!(layer = %layer.digest, entries = stats.entries, bytes = stats.bytes, "unpacked layer from stored blob");
                    return Ok(());
                }
                Err(e) => {
                    warn!(layer = %layer.digest, error = %e, "stored blob unusable, downloading it again");
                    self.inner.blobs.remove(&layer.digest)?;
                }
            }
        }
        let mut attempt = 0;
        loop {
            match self.download_and_unpack(client, image_ref, layer).await {
                Ok(stats) => {
                    count(&counters.layers_unpacked, 1);
                    let secs = started.elapsed().as_secs_f64();
                    info!(layer = %layer.digest, size = layer.size, unpacked = stats.bytes, entries = stats.entries,
                        secs = format_args!("{secs:.2}"), rate_mb_s = format_args!("{:.1}", layer.size as f64 / secs.max(1e-3) / 1e6),
                        "pulled layer");
                    return Ok(());
                }
                Err(e) if registry::is_transient(&e) && attempt < self.inner.config.retries => {
                    attempt += 1;
                    warn!(layer = %layer.digest, attempt, error = %e, "layer download failed, retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(6))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Streams a layer from the registry into the unpacker running on a blocking thread.
    async fn download_and_unpack(
        &self,
        client: &EndpointClient,
        image_ref: &ImageReference,
        layer: &Layer,
    ) -> Result<crate::unpack::UnpackStats, Error> {
        let mut stream = client.blob_stream(image_ref, &layer.digest, layer.size).await?;
        let blob = if self.inner.config.keep_layer_blobs { Some(self.inner.blobs.writer()?) } else { None };
        // Few chunks in flight: hyper hands over up to ~400 KiB per chunk when the registry is
        // faster than the unpacker. 64 queued chunks per layer (as before) made ~100 MiB of the
        // daemon's peak RSS with 4 layers at once (e2e pull_perf: +119 MiB; 8 chunks: +31 MiB,
        // 2: +15 MiB); the socket's receive buffer and the chunk being read keep the unpacker fed.
        let (tx, rx) = mpsc::channel::<Chunk>(DOWNLOAD_CHUNKS_IN_FLIGHT);
        let (store, layer_c, limits, shift) = (self.inner.layers.clone(), layer.clone(), self.limits(), self.shift());
        let unpacker = tokio::task::spawn_blocking(move || {
            store.unpack_verified(
                &layer_c,
                ChannelReader { rx, current: Bytes::new(), ended: false },
                blob,
                limits,
                shift,
            )
        });
        let mut received: u64 = 0;
        let started = Instant::now();
        let mut last_report = Instant::now();
        while let Some(chunk) = stream.next().await {
            let message = match chunk {
                Ok(bytes) => {
                    received += bytes.len() as u64;
                    count(&self.inner.counters.bytes_fetched, bytes.len() as u64);
                    Chunk::Data(bytes)
                }
                // The unpacker verifies size and digest; an error after the whole blob is its end.
                Err(_) if received == layer.size => break,
                Err(e) => Chunk::Failed(StreamFailure::Download(client.unavailable(format!(
                    "download of layer {} interrupted after {received} bytes: {e}",
                    layer.digest
                )))),
            };
            let failed = matches!(message, Chunk::Failed(_));
            if tx.send(message).await.is_err() || failed {
                break; // the unpacker stopped (its error is reported below) or we failed
            }
            if last_report.elapsed() >= PROGRESS_INTERVAL {
                last_report = Instant::now();
                let secs = started.elapsed().as_secs_f64();
                info!(layer = %layer.digest, received, total = layer.size,
                    rate_mb_s = format_args!("{:.1}", received as f64 / secs.max(1e-3) / 1e6), "pulling layer");
            }
        }
        let _ = tx.send(Chunk::End).await;
        drop(tx);
        unpacker.await.map_err(|e| Error::io("unpack task", io::Error::other(e)))?
    }

    fn limits(&self) -> Limits {
        Limits { max_bytes: self.inner.config.max_layer_bytes, max_entries: self.inner.config.max_layer_entries }
    }

    fn shift(&self) -> IdShift {
        IdShift::new(self.inner.config.layer_uid_shift)
    }

    fn is_pinned(&self, record: &ImageRecord) -> bool {
        record.repo_tags.iter().chain(&record.repo_digests).any(|r| self.inner.pinned.contains(r))
    }

    fn to_image(&self, record: &ImageRecord) -> Image {
        Image {
            id: ImageId(record.id.clone()),
            repo_tags: record.repo_tags.iter().cloned().collect(),
            repo_digests: record.repo_digests.iter().cloned().collect(),
            size: record.size(),
            pinned: self.is_pinned(record),
            config: record.config.clone(),
            layers: record.layers.clone(),
            manifest_digest: record.manifest.clone(),
        }
    }

    /// Finds a visible image by id (`sha256:...` or the bare hex), tag or digest reference.
    fn find<'m>(&self, meta: &'m Metadata, name: &str) -> Result<Option<&'m ImageRecord>, Error> {
        let visible = || meta.records().filter(|r| !r.removed);
        let id = name.parse::<Digest>().ok().or_else(|| {
            (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| format!("sha256:{name}").parse().ok())
                .flatten()
        });
        if let Some(id) = id {
            return Ok(meta.get(&id).filter(|r| !r.removed));
        }
        let reference = ImageReference::parse(name)?;
        Ok(match &reference.digest {
            Some(digest) => {
                let wanted = reference.repo_digest(digest);
                visible().find(|r| r.repo_digests.contains(&wanted))
            }
            None => {
                let tag = reference.repo_tag().expect("a reference without digest has a tag");
                visible().find(|r| r.repo_tags.contains(&tag))
            }
        })
    }

    /// Looks an image up by reference, id or digest. `Ok(None)` if absent.
    pub fn image(&self, name: &str) -> Result<Option<Image>, Error> {
        let meta = lock(&self.inner.meta);
        Ok(self.find(&meta, name)?.map(|r| self.to_image(r)))
    }

    /// All images.
    pub fn images(&self) -> Result<Vec<Image>, Error> {
        let meta = lock(&self.inner.meta);
        Ok(meta.records().filter(|r| !r.removed).map(|r| self.to_image(r)).collect())
    }

    /// The image's config JSON as pulled (for verbose status).
    pub fn config_json(&self, id: &ImageId) -> Result<Option<Vec<u8>>, Error> {
        self.inner.blobs.read(&id.0)
    }

    /// Removes an image with all its names. Absent is fine. Its content stays until [`gc`]
    /// finds no container using it.
    ///
    /// [`gc`]: ImageStore::gc
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        let mut meta = lock(&self.inner.meta);
        let Some(id) = self.find(&meta, name)?.map(|r| r.id.clone()) else {
            return Ok(());
        };
        meta.update(|images| {
            if let Some(record) = images.get_mut(&id) {
                record.removed = true;
                record.repo_tags.clear();
                record.repo_digests.clear();
            }
        })?;
        info!(image = %id, name, "removed image");
        Ok(())
    }

    /// Deletes removed images no container uses, then every layer and blob no image refers to
    /// and no container uses. Visible images, and so pinned ones, are never deleted here; pulls in
    /// progress and [`LayerLease`]s keep what they need.
    ///
    /// `in_use` is asked once the store is locked against leases ending: a lease dropped after
    /// its container was recorded cannot slip between what `in_use` says and the deletion.
    pub fn gc(&self, in_use: impl FnOnce() -> InUse) -> Result<GcReport, Error> {
        // Holding `active` while deleting makes a pull that starts now wait, then re-check.
        let active = lock(&self.inner.active);
        let in_use = in_use();
        let mut meta = lock(&self.inner.meta);
        let doomed: Vec<Digest> = meta
            .records()
            .filter(|r| {
                r.removed
                    && !in_use.images.contains(&ImageId(r.id.clone()))
                    && !active.contains_key(&r.id)
                    && !self.is_pinned(r)
            })
            .map(|r| r.id.clone())
            .collect();
        meta.update(|images| {
            for id in &doomed {
                images.remove(id);
            }
        })?;
        let mut live: HashSet<Digest> = active.keys().cloned().collect();
        for record in meta.records() {
            live.insert(record.id.clone());
            live.insert(record.manifest.clone());
            live.extend(record.index.clone());
            for layer in &record.layers {
                live.insert(layer.digest.clone());
                live.insert(layer.chain_id.clone());
            }
        }
        let mut report = GcReport { images_removed: doomed.into_iter().map(ImageId).collect(), ..Default::default() };
        for chain_id in self.inner.layers.list()? {
            if !live.contains(&chain_id) && !in_use.layers.contains(&self.inner.layers.diff_path(&chain_id)) {
                report.bytes_freed += allocated_bytes(&self.inner.layers.layer_dir(&chain_id));
                self.inner.layers.remove(&chain_id)?;
                report.layers_removed += 1;
            }
        }
        for digest in self.inner.blobs.list()? {
            if !live.contains(&digest) {
                report.bytes_freed += allocated_bytes(&self.inner.blobs.path(&digest));
                self.inner.blobs.remove(&digest)?;
                report.blobs_removed += 1;
            }
        }
        drop(meta);
        drop(active);
        if report != GcReport::default() {
            info!(
                images = report.images_removed.len(),
                layers = report.layers_removed,
                blobs = report.blobs_removed,
                bytes_freed = report.bytes_freed,
                "image garbage collection"
            );
        }
        Ok(report)
    }

    /// Disk use of everything under the store's root.
    pub fn usage(&self) -> Result<Usage, Error> {
        use std::os::unix::fs::MetadataExt;
        let mut seen = HashSet::new();
        let mut used_bytes = 0u64;
        let mut stack = vec![self.inner.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Removed by a concurrent GC or pull cleanup: nothing to count.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
            };
            for entry in entries {
                let Ok(entry) = entry else { continue };
                let Ok(md) = entry.metadata() else { continue };
                if md.is_dir() {
                    stack.push(entry.path());
                }
                if seen.insert((md.dev(), md.ino())) {
                    used_bytes += md.blocks() * 512;
                }
            }
        }
        Ok(Usage { used_bytes, inodes_used: seen.len() as u64, mountpoint: self.inner.root.clone() })
    }

    /// The layer directories of an image (top first) for a container's root file system, kept
    /// from garbage collection while the lease lives. The container's own writable layer is the
    /// runtime's business.
    pub fn lease_layers(&self, image: &ImageId) -> Result<LayerLease, Error> {
        // `active` before `meta`, as gc takes them: a record found here is not collected.
        let mut active = lock(&self.inner.active);
        let record = {
            let meta = lock(&self.inner.meta);
            meta.get(&image.0).cloned()
        }
        .ok_or_else(|| Error::NotFound { reference: image.to_string(), detail: "no such image in the store".into() })?;
        let mut lowerdirs = Vec::with_capacity(record.layers.len());
        for layer in record.layers.iter().rev() {
            let path = self.inner.layers.diff_path(&layer.chain_id);
            if !path.is_dir() {
                return Err(Error::NotFound {
                    reference: image.to_string(),
                    detail: format!("layer {} is missing from the store; pull the image again", layer.digest),
                });
            }
            lowerdirs.push(path);
        }
        let keys: Vec<Digest> =
            std::iter::once(record.id.clone()).chain(record.layers.iter().map(|l| l.chain_id.clone())).collect();
        for key in &keys {
            *active.entry(key.clone()).or_default() += 1;
        }
        Ok(LayerLease { inner: self.inner.clone(), keys, lowerdirs })
    }
}

fn refused(image_ref: &ImageReference, scope: &str, refusal: &Refusal) -> Error {
    Error::SignatureRefused { reference: image_ref.to_string(), scope: scope.to_owned(), reason: refusal.to_string() }
}

fn body_clone(b: &Bytes) -> Bytes {
    b.clone()
}

fn mirror_may_fall_back(e: &Error) -> bool {
    use crate::error::ErrorKind as K;
    matches!(e.kind(), K::NotFound | K::Unavailable | K::Unauthenticated | K::PermissionDenied)
        || matches!(e, Error::DigestMismatch { .. } | Error::SizeMismatch { .. })
}

fn invalid(what: &str, detail: &str) -> Error {
    Error::InvalidContent { what: what.to_owned(), detail: detail.to_owned() }
}

fn parse_digest(s: &str, what: &str) -> Result<Digest, Error> {
    s.parse().map_err(|e: crate::digest::DigestParseError| invalid(what, &e.0))
}

fn descriptor_size(desc: &RawDescriptor, max: u64) -> Result<u64, Error> {
    let size =
        u64::try_from(desc.size).map_err(|_| invalid("descriptor", &format!("negative size for {}", desc.digest)))?;
    if size > max {
        return Err(invalid(
            "descriptor",
            &format!("{} declares {size} bytes, more than the {max} allowed", desc.digest),
        ));
    }
    Ok(size)
}

struct ParsedManifest {
    raw: RawManifest,
    is_index: bool,
}

fn parse_manifest(body: &[u8], what: &str) -> Result<ParsedManifest, Error> {
    if body.len() as u64 > registry::MAX_MANIFEST_BYTES {
        let limit = registry::MAX_MANIFEST_BYTES;
        return Err(invalid("manifest", &format!("{what} is larger than {limit} bytes")));
    }
    let raw: RawManifest = serde_json::from_slice(body).map_err(|e| invalid("manifest", &format!("{what}: {e}")))?;
    if raw.schema_version != 2 {
        return Err(Error::Unsupported {
            what: "manifest".into(),
            detail: format!("schema version {} of {what} (docker schema 1 is not supported)", raw.schema_version),
        });
    }
    let is_index = match raw.media_type.as_deref() {
        Some(t) if INDEX_TYPES.contains(&t) => true,
        Some("application/vnd.oci.image.manifest.v1+json" | "application/vnd.docker.distribution.manifest.v2+json") => {
            false
        }
        Some(other) => {
            return Err(Error::Unsupported {
                what: "manifest media type".into(),
                detail: format!("{other:?} of {what}"),
            });
        }
        None => raw.manifests.is_some() && raw.config.is_none(),
    };
    if !is_index && (raw.config.is_none() || raw.layers.is_none()) {
        return Err(invalid("manifest", &format!("{what} has no config or layers")));
    }
    Ok(ParsedManifest { raw, is_index })
}

/// A manifest or index body as a pull reads it, before it downloads anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestPlan {
    /// An image index (manifest list): the manifest of the platform asked for.
    Index { manifest: Digest },
    /// An image manifest, its config and layer descriptors checked.
    Image(ImageManifest),
}

/// What an image manifest names: its config and, bottom first, its layers (digest, size, media type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    pub config: Digest,
    pub config_size: u64,
    pub layers: Vec<(Digest, u64, String)>,
}

/// Reads a registry's manifest or index body (`what` names it in errors); for an index, chooses
/// the manifest for `platform`. Pure: imagestore/fuzz feeds it arbitrary bytes.
pub fn read_manifest(body: &[u8], platform: &Platform, what: &str) -> Result<ManifestPlan, Error> {
    let parsed = parse_manifest(body, what)?;
    if parsed.is_index {
        let entries = parsed.raw.manifests.unwrap_or_default();
        let chosen = platform::select(platform, entries.iter().map(|e| e.platform.as_ref()))
            .ok_or_else(|| Error::NoMatchingPlatform { reference: what.to_owned(), platform: platform.to_string() })?;
        let manifest = parse_digest(&entries[chosen].digest, "manifest list entry")?;
        return Ok(ManifestPlan::Index { manifest });
    }
    let config_desc = parsed.raw.config.ok_or_else(|| invalid("manifest", "no config descriptor"))?;
    if !CONFIG_TYPES.contains(&config_desc.media_type.as_str()) {
        return Err(Error::Unsupported {
            what: "config media type".into(),
            detail: format!("{:?} (not a container image)", config_desc.media_type),
        });
    }
    let config = parse_digest(&config_desc.digest, "config descriptor")?;
    let config_size = descriptor_size(&config_desc, registry::MAX_CONFIG_BYTES)?;
    let mut layers = Vec::new();
    for desc in parsed.raw.layers.unwrap_or_default() {
        if !layers::supported_layer_media_type(&desc.media_type) {
            return Err(Error::Unsupported {
                what: "layer media type".into(),
                detail: format!("{:?} of layer {}", desc.media_type, desc.digest),
            });
        }
        let digest = parse_digest(&desc.digest, "layer descriptor")?;
        let size = descriptor_size(&desc, u64::MAX)?;
        layers.push((digest, size, desc.media_type));
    }
    Ok(ManifestPlan::Image(ImageManifest { config, config_size, layers }))
}

/// Reads an image config for the manifest's `layers`: the image's settings, and its layers with
/// their diff and chain ids. Pure: imagestore/fuzz feeds it arbitrary bytes.
pub fn image_layers(layers: &[(Digest, u64, String)], config: &[u8]) -> Result<(ImageConfig, Vec<Layer>), Error> {
    let (config, diff_ids) = parse_image_config(config).map_err(|e| invalid("image config", &e))?;
    if layers.len() != diff_ids.len() {
        return Err(invalid(
            "image",
            &format!("manifest lists {} layers but the config has {} diff_ids", layers.len(), diff_ids.len()),
        ));
    }
    let chains = chain_ids(&diff_ids);
    let layers = layers
        .iter()
        .zip(diff_ids)
        .zip(chains)
        .map(|(((digest, size, media_type), diff_id), chain_id)| Layer {
            digest: digest.clone(),
            size: *size,
            media_type: media_type.clone(),
            diff_id,
            chain_id,
        })
        .collect();
    Ok((config, layers))
}

fn verify_manifest_digest(body: &[u8], expected: Option<&Digest>, what: &str) -> Result<Digest, Error> {
    let algorithm = expected.map_or(crate::digest::Algorithm::Sha256, |d| d.algorithm());
    let mut hasher = Hasher::new(algorithm);
    hasher.update(body);
    let actual = hasher.finish();
    if let Some(expected) = expected
        && *expected != actual
    {
        return Err(Error::DigestMismatch {
            what: format!("manifest of {what}"),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(actual)
}

/// Downloaded chunks queued for one layer's unpacker (see `download_and_unpack`).
const DOWNLOAD_CHUNKS_IN_FLIGHT: usize = 2;

enum Chunk {
    Data(Bytes),
    Failed(StreamFailure),
    End,
}

/// The blocking side of the download channel. A channel closed without `End` means the pull
/// was cancelled.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    current: Bytes,
    ended: bool,
}

impl io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(bytes)) => self.current = bytes,
                Some(Chunk::End) => self.ended = true,
                Some(Chunk::Failed(failure)) => return Err(stream_io_error(failure)),
                None => return Err(stream_io_error(StreamFailure::Cancelled)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
