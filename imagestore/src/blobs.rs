//! Blobs (manifests, configs, compressed layers) stored once by digest under `blobs/<alg>/<hex>`.
//!
//! A blob is written to `tmp/`, verified (size and digest), fsynced and only then renamed into
//! place, so a visible blob is always complete and correct; `tmp/` is emptied on open.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext};

#[derive(Debug)]
pub(crate) struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    pub fn new(dir: PathBuf, tmp: PathBuf) -> Self {
        BlobStore { dir, tmp }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.algorithm().name()).join(digest.hex())
    }

    pub fn exists(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Reads a stored blob and checks it is still what its name says (it may have rotted).
    pub fn read(&self, digest: &Digest) -> Result<Option<Vec<u8>>, Error> {
        let path = self.path(digest);
        match fs::read(&path) {
            Ok(data) => {
                let mut hasher = Hasher::new(digest.algorithm());
                hasher.update(&data);
                if hasher.finish() != *digest {
                    tracing::warn!(%digest, "stored blob is corrupt; removing it");
                    let _ = fs::remove_file(&path);
                    return Ok(None);
                }
                Ok(Some(data))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("read blob {}", path.display()), e)),
        }
    }

    /// Stores a small blob held in memory after verifying it.
    pub fn put(&self, digest: &Digest, data: &[u8], what: &str) -> Result<(), Error> {
        let mut writer = self.writer()?;
        writer.write(data)?;
        writer.commit(digest, data.len() as u64, what)
    }

    /// A writer for a blob that streams in; nothing is visible until [`BlobWriter::commit`].
    pub fn writer(&self) -> Result<BlobWriter, Error> {
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&self.tmp)
            .ctx(|| format!("create temporary blob in {}", self.tmp.display()))?;
        Ok(BlobWriter { file, store_dir: self.dir.clone(), hasher: None, written: 0 })
    }

    pub fn remove(&self, digest: &Digest) -> Result<(), Error> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(format!("remove blob {digest}"), e)),
            _ => Ok(()),
        }
    }

    /// Every stored blob digest.
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
}

/// A blob being written. Dropping it without commit deletes the temporary file.
#[derive(Debug)]
pub(crate) struct BlobWriter {
    file: tempfile::NamedTempFile,
    store_dir: PathBuf,
    /// Set when the writer hashes by itself (small blobs); streamed layers are hashed upstream.
    hasher: Option<Hasher>,
    written: u64,
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.hasher.get_or_insert_with(|| Hasher::new(crate::digest::Algorithm::Sha256));
        self.write_unhashed(data)?;
        Ok(())
    }

    pub fn write_unhashed(&mut self, data: &[u8]) -> Result<(), Error> {
        self.file.write_all(data).ctx(|| "write temporary blob")?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Verifies size and digest (unless `verified_digest` says the caller hashed the same bytes),
    /// fsyncs, and renames the blob into place.
    pub fn commit(self, digest: &Digest, size: u64, what: &str) -> Result<(), Error> {
        if self.written != size {
            return Err(Error::SizeMismatch { what: what.to_owned(), expected: size, actual: self.written });
        }
        if self.hasher.is_some() {
            // Re-hash with the digest's own algorithm (it may be sha512).
            let data = fs::read(self.file.path()).ctx(|| "read back temporary blob")?;
            let mut hasher = Hasher::new(digest.algorithm());
            hasher.update(&data);
            let actual = hasher.finish();
            if actual != *digest {
                return Err(Error::DigestMismatch {
                    what: what.to_owned(),
                    expected: digest.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        self.commit_verified(digest)
    }

    /// For callers that verified the digest of exactly the bytes written.
    pub fn commit_verified(self, digest: &Digest) -> Result<(), Error> {
        self.file.as_file().sync_all().ctx(|| "fsync temporary blob")?;
        let dir = self.store_dir.join(digest.algorithm().name());
        fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        let target = dir.join(digest.hex());
        self.file.persist(&target).map_err(|e| Error::io(format!("store blob {digest}"), e.error))?;
        sync_dir(&dir)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).ctx(|| format!("fsync {}", dir.display()))
}

/// Serialises work on one key (a blob digest, a layer chain id) across concurrent pulls: the
/// second puller waits, then finds the work done. Cancel-safe: a dropped holder releases the key.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub(crate) struct InFlightGuard<'a> {
    owner: &'a InFlight,
    key: String,
    lock: Option<tokio::sync::OwnedMutexGuard<()>>,
    entry: Arc<tokio::sync::Mutex<()>>,
}

impl InFlight {
    pub async fn lock(&self, key: &str) -> InFlightGuard<'_> {
        let entry = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.entry(key.to_owned()).or_default().clone()
        };
        let lock = entry.clone().lock_owned().await;
        InFlightGuard { owner: self, key: key.to_owned(), lock: Some(lock), entry }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.lock.take();
        let mut keys = self.owner.keys.lock().unwrap_or_else(|p| p.into_inner());
        // Two holders left (the map and us) means nobody waits: forget the key.
        if Arc::strong_count(&self.entry) == 2 {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_before_they_become_visible() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let store = BlobStore::new(dir.path().join("blobs"), dir.path().join("tmp"));
        let good = Digest::sha256_of(b"hello");
        let err = store.put(&good, b"hellO", "blob").unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert!(!store.exists(&good));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "temporary file left");
        store.put(&good, b"hello", "blob").unwrap();
        assert_eq!(store.read(&good).unwrap().unwrap(), b"hello");
        assert_eq!(store.list().unwrap(), vec![good.clone()]);
        // A corrupted blob on disk is detected and dropped.
        fs::write(store.path(&good), b"rot").unwrap();
        assert!(store.read(&good).unwrap().is_none());
    }

    #[tokio::test]
    async fn in_flight_serialises_and_forgets() {
        let flight = Arc::new(InFlight::default());
        let g = flight.lock("k").await;
        let f2 = flight.clone();
        let waiter = tokio::spawn(async move {
            let _g = f2.lock("k").await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap();
        assert!(flight.keys.lock().unwrap().is_empty());
    }
}
