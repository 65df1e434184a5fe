//! Unpacked layers, one directory per chain id under `layers/<alg>/<hex>`, shared by every image
//! that has the same layer stack and used directly as overlayfs lower directories.
//!
//! The pipeline for one layer runs on one blocking thread: compressed bytes (from the network or
//! a stored blob) are hashed, counted and optionally teed into the blob store; decompressed by
//! magic bytes (gzip, zstd or plain tar); hashed again for the diff id; and unpacked into a
//! temporary directory. Only when the compressed digest and size and the diff id all match is the
//! directory fsynced (syncfs) and renamed into place. Unpacking while downloading overlaps network
//! and CPU; a mismatch discovered at the end throws the temporary directory away, so nothing
//! unverified is ever visible.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::blobs::BlobWriter;
use crate::config::IdShift;
use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext};
use crate::unpack::{self, Limits, UnpackStats};

/// After the end-of-archive marker a tar stream may carry padding (GNU tar pads to 10 KiB
/// records); more than this is refused as a way to smuggle unbounded data past the limits.
const MAX_TRAILING_BYTES: u64 = 1 << 20;
/// Buffers of the decompressing pipeline, per layer unpacked at once (4 by default); the same
/// size as the unpacker's copy buffer so that its reads of large files bypass the second one.
const READ_BUFFER: usize = 256 << 10;

/// One layer of an image as the manifest and config describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the blob as stored in the registry (usually compressed).
    pub digest: Digest,
    /// Size of that blob.
    pub size: u64,
    pub media_type: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
    /// Identity of the layer stack up to and including this layer; names the unpacked directory.
    pub chain_id: Digest,
}

/// Failures injected into the byte stream by the downloader, recovered on the unpacking side.
#[derive(Debug)]
pub(crate) enum StreamFailure {
    /// The download failed; the error is the registry error to report.
    Download(Error),
    /// The pull was cancelled (the future dropped).
    Cancelled,
    /// More bytes than the descriptor's size.
    TooLong { expected: u64 },
    /// Data after the end of the tar archive beyond what padding needs.
    TrailingData,
}

impl std::fmt::Display for StreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamFailure::Download(e) => write!(f, "{e}"),
            StreamFailure::Cancelled => f.write_str("pull cancelled"),
            StreamFailure::TooLong { expected } => {
                write!(f, "blob is longer than its declared {expected} bytes")
            }
            StreamFailure::TrailingData => f.write_str("more than 1 MiB of data after the end of the tar archive"),
        }
    }
}

impl std::error::Error for StreamFailure {}

pub(crate) fn stream_io_error(failure: StreamFailure) -> io::Error {
    io::Error::other(failure)
}

/// Turns an io error from the layer stream back into the store error it carries.
pub(crate) fn stream_error_into(e: io::Error, layer: &str) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<StreamFailure>()) {
        let inner = e.into_inner().and_then(|b| b.downcast::<StreamFailure>().ok());
        return match inner.map(|b| *b) {
            Some(StreamFailure::Download(err)) => err,
            Some(StreamFailure::Cancelled) => {
                Error::Unavailable { registry: String::new(), detail: format!("pull of layer {layer} cancelled") }
            }
            Some(StreamFailure::TooLong { expected }) => {
                Error::SizeMismatch { what: format!("layer {layer}"), expected, actual: expected + 1 }
            }
            Some(StreamFailure::TrailingData) => Error::HostileLayer {
                layer: layer.to_owned(),
                entry: String::new(),
                reason: "more than 1 MiB of data after the end of the tar archive".into(),
            },
            None => Error::InvalidContent { what: format!("layer {layer}"), detail: "stream failed".into() },
        };
    }
    Error::InvalidContent { what: format!("layer {layer}"), detail: format!("cannot decompress or read: {e}") }
}

/// Hashes and counts the compressed bytes, tees them into the blob store, and refuses more bytes
/// than declared.
struct CompressedSource<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
    expected: u64,
    blob: Option<BlobWriter>,
}

impl<R: Read> Read for CompressedSource<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.expected {
            return Err(stream_io_error(StreamFailure::TooLong { expected: self.expected }));
        }
        self.hasher.update(&buf[..n]);
        if let Some(blob) = &mut self.blob {
            blob.write_unhashed(&buf[..n]).map_err(io::Error::other)?;
        }
        Ok(n)
    }
}

/// Hashes the uncompressed tar stream for the diff id.
struct DiffHasher<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> Read for DiffHasher<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[derive(Debug)]
pub(crate) struct LayerStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl LayerStore {
    pub fn new(dir: PathBuf, tmp: PathBuf) -> Self {
        LayerStore { dir, tmp }
    }

    pub(crate) fn layer_dir(&self, chain_id: &Digest) -> PathBuf {
        self.dir.join(chain_id.algorithm().name()).join(chain_id.hex())
    }

    /// The directory to use as an overlayfs lower directory.
    pub fn diff_path(&self, chain_id: &Digest) -> PathBuf {
        self.layer_dir(chain_id).join("diff")
    }

    pub fn exists(&self, chain_id: &Digest) -> bool {
        self.diff_path(chain_id).is_dir()
    }

    pub fn remove(&self, chain_id: &Digest) -> Result<(), Error> {
        match fs::remove_dir_all(self.layer_dir(chain_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(format!("remove layer {chain_id}"), e)),
            _ => Ok(()),
        }
    }

    /// The id shift the unpacked layers' owners reveal, for a store that did not record it:
    /// owners all within one 64K range above 65535 give that range's base, any other owners
    /// give 0 (ids as in the images). `None` if there is no unpacked file to look at.
    pub fn detect_owner_shift(&self) -> Result<Option<u32>, Error> {
        use std::os::unix::fs::MetadataExt;
        let (mut lowest, mut highest) = (u32::MAX, 0u32);
        let mut stack: Vec<PathBuf> = self.list()?.iter().map(|c| self.diff_path(c)).collect();
        while let Some(path) = stack.pop() {
            let md = fs::symlink_metadata(&path).ctx(|| format!("stat {}", path.display()))?;
            for id in [md.uid(), md.gid()] {
                lowest = lowest.min(id);
                highest = highest.max(id);
            }
            if md.is_dir() {
                for entry in fs::read_dir(&path).ctx(|| format!("list {}", path.display()))? {
                    stack.push(entry.ctx(|| format!("list {}", path.display()))?.path());
                }
            }
        }
        if lowest > highest {
            return Ok(None);
        }
        let base = lowest & !0xFFFF;
        Ok(Some(if lowest >= 0x1_0000 && highest - base <= 0xFFFF { base } else { 0 }))
    }

    /// Every unpacked layer's chain id.
    pub fn list(&self) -> Result<Vec<Digest>, Error> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            let dir = self.dir.join(alg);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
            };
            for entry in entries {
                let entry = entry.ctx(|| format!("list {}", dir.display()))?;
                if let Some(name) = entry.file_name().to_str()
                    && let Ok(digest) = format!("{alg}:{name}").parse()
                {
                    out.push(digest);
                }
            }
        }
        Ok(out)
    }

    /// Unpacks one layer from its compressed bytes, verifying everything before committing.
    /// Blocking: run it on a blocking thread. `blob` receives the compressed bytes when the blob
    /// is to be kept. On any error the temporary directory is removed.
    pub fn unpack_verified(
        &self,
        layer: &Layer,
        compressed: impl Read,
        blob: Option<BlobWriter>,
        limits: Limits,
        shift: IdShift,
    ) -> Result<UnpackStats, Error> {
        let staging = tempfile::Builder::new()
            .prefix("layer-")
            .tempdir_in(&self.tmp)
            .ctx(|| format!("create temporary layer directory in {}", self.tmp.display()))?;
        let diff = staging.path().join("diff");
        fs::create_dir(&diff).ctx(|| format!("create {}", diff.display()))?;
        // The layer's root belongs to the layer's root user like everything in it (a `./` entry
        // may set it otherwise): nothing in a layer is owned by a user of the node.
        if shift != IdShift::IDENTITY {
            let root = Some(shift.root());
            std::os::unix::fs::chown(&diff, root, root).ctx(|| format!("chown {}", diff.display()))?;
        }
        let name = layer.digest.to_string();

        let mut source = CompressedSource {
            inner: compressed,
            hasher: Hasher::new(layer.digest.algorithm()),
            count: 0,
            expected: layer.size,
            blob,
        };
        let (stats, diff_id) = {
            let mut buffered = BufReader::with_capacity(READ_BUFFER, &mut source);
            let magic = buffered.fill_buf().map_err(|e| stream_error_into(e, &name))?.to_vec();
            let decompressed: Box<dyn Read + '_> = match Compression::detect(&magic, &layer.media_type) {
                Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
                Compression::Zstd => Box::new(
                    zstd::stream::read::Decoder::with_buffer(buffered)
                        .map_err(|e| Error::io(format!("layer {name}: start zstd decoder"), e))?,
                ),
                Compression::None => Box::new(buffered),
            };
            let hashed = DiffHasher { inner: decompressed, hasher: Hasher::new(layer.diff_id.algorithm()) };
            let (stats, rest) =
                unpack::unpack(BufReader::with_capacity(READ_BUFFER, hashed), &diff, &name, limits, shift)?;
            // Everything after the end-of-archive marker still counts for the diff id.
            let mut rest = rest.into_inner();
            let trailing = io::copy(&mut (&mut rest).take(MAX_TRAILING_BYTES + 1), &mut io::sink())
                .map_err(|e| stream_error_into(e, &name))?;
            if trailing > MAX_TRAILING_BYTES {
                return Err(stream_error_into(stream_io_error(StreamFailure::TrailingData), &name));
            }
            (stats, rest.hasher.finish())
        };
        // The decompressor may stop before the compressed stream does; hash all of it.
        io::copy(&mut source, &mut io::sink()).map_err(|e| stream_error_into(e, &name))?;
        if source.count != layer.size {
            return Err(Error::SizeMismatch {
                what: format!("layer {name}"),
                expected: layer.size,
                actual: source.count,
            });
        }
        let actual = source.hasher.clone().finish();
        if actual != layer.digest {
            return Err(Error::DigestMismatch { what: "layer".into(), expected: name, actual: actual.to_string() });
        }
        if diff_id != layer.diff_id {
            return Err(Error::DigestMismatch {
                what: format!("uncompressed layer {name} (diff_id)"),
                expected: layer.diff_id.to_string(),
                actual: diff_id.to_string(),
            });
        }
        self.commit(staging, layer, source.blob.take())?;
        Ok(stats)
    }

    fn commit(&self, staging: tempfile::TempDir, layer: &Layer, blob: Option<BlobWriter>) -> Result<(), Error> {
        // One syncfs instead of an fsync per file: the layer must be on disk before its name is.
        let dir = fs::File::open(staging.path()).ctx(|| "open staged layer")?;
        rustix::fs::syncfs(&dir).ctx(|| "syncfs staged layer")?;
        if let Some(blob) = blob {
            blob.commit_verified(&layer.digest)?;
        }
        let target = self.layer_dir(&layer.chain_id);
        let parent = target.parent().expect("layer dir has a parent");
        fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
        let staged = staging.keep();
        match fs::rename(&staged, &target) {
            Ok(()) => crate::blobs::sync_dir(parent),
            // Another pull committed the same layer first (possible only without the in-flight
            // lock, e.g. a second store on the same root): keep theirs.
            Err(_) if target.is_dir() => {
                let _ = fs::remove_dir_all(&staged);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&staged);
                Err(Error::io(format!("commit layer {}", layer.digest), e))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    /// Magic bytes decide; the media type only breaks the tie for streams too short to tell.
    fn detect(magic: &[u8], media_type: &str) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if magic.len() >= 4 {
            Compression::None
        } else if media_type.ends_with("gzip") {
            Compression::Gzip
        } else if media_type.ends_with("zstd") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Layer media types we can unpack.
pub(crate) fn supported_layer_media_type(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    )
}
