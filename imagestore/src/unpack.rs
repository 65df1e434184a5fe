//! Unpacking one layer's tar stream into a directory that overlayfs can use as a lower layer.
//!
//! Confinement: every path is resolved below the layer directory with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, and the last component is
//! always created or changed with an `*at` call on the parent's file descriptor that does not
//! follow symlinks (`O_NOFOLLOW|O_EXCL`, `mkdirat`, `symlinkat`, `mknodat`, `linkat` without
//! `AT_SYMLINK_FOLLOW`, `AT_SYMLINK_NOFOLLOW`). A symlink planted by the layer is therefore never
//! followed, whatever it points to.
//!
//! Names: like containerd, a leading `/` is dropped (absolute names are taken relative to the
//! layer root) and `.`/`..` are resolved lexically. Unlike containerd, which silently clamps a `..`
//! that climbs above the root, such an entry refuses the whole layer (as moby does): no legitimate
//! layer contains one. An entry whose parent path passes through a symlink is refused too, since
//! following it is exactly what an escape needs and image builders never emit such entries.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dev, FileType, Mode, OFlags, ResolveFlags, Timestamps, XattrFlags};
use rustix::io::Errno;
use tracing::warn;

use crate::config::IdShift;
use crate::error::Error;
use crate::tarstream::{Header, Kind, TarError, TarReader};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const COPY_BUFFER: usize = 256 << 10;
const FILE_CAPS_XATTR: &[u8] = b"security.capability";

/// A file capability (`security.capability`) of a layer stored shifted, as the kernel must see
/// it: revision 3 with the root id shifted like the file's owner. The kernel applies file
/// capabilities only for the root their root id names (v1 and v2 have none: the node's root),
/// seen through the mount; the layers' idmapped mounts show the shifted root as the container's
/// root (0 for pods without a user namespace, the pod's first id in one), and the node's root not
/// at all, so an unconverted v2 capability would be silently ignored in every container.
/// A bad value is passed on unchanged (the kernel refuses it).
fn shifted_file_caps(value: &[u8], shift: IdShift) -> Result<Vec<u8>, String> {
    const V1: u32 = 0x0100_0000;
    const V2: u32 = 0x0200_0000;
    const V3: u32 = 0x0300_0000;
    const REVISION_MASK: u32 = 0xFF00_0000;
    const EFFECTIVE: u32 = 0x0000_0001;
    let word = |at: usize| u32::from_le_bytes(value[at..at + 4].try_into().unwrap());
    if value.len() < 4 {
        return Ok(value.to_vec());
    }
    let magic = word(0);
    // (permitted, inheritable) pairs: one in v1, two (low and high 32 bits) in v2 and v3.
    let (data, root_id) = match (magic & REVISION_MASK, value.len()) {
        (V1, 12) => ([&value[4..12], &[0u8; 8][..]].concat(), 0),
        (V2, 20) => (value[4..20].to_vec(), 0),
        (V3, 24) => (value[4..20].to_vec(), word(20)),
        _ => return Ok(value.to_vec()),
    };
    let shifted = shift
        .map(u64::from(root_id))
        .ok_or_else(|| format!("file capability root id {root_id} is outside 0..65535"))?;
    let mut out = (V3 | (magic & EFFECTIVE)).to_le_bytes().to_vec();
    out.extend_from_slice(&data);
    out.extend_from_slice(&shifted.to_le_bytes());
    Ok(out)
}

/// Per-layer limits against decompression bombs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// File contents plus xattr values, in bytes.
    pub max_bytes: u64,
    pub max_entries: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Unpacks the tar stream `reader` into the existing empty directory `dest`.
/// `layer` names the layer in errors. On error `dest` is left for the caller to remove.
/// Returns the reader positioned after the end-of-archive marker, so the caller can hash the rest.
pub fn unpack<R: Read>(
    reader: R,
    dest: &Path,
    layer: &str,
    limits: Limits,
    shift: IdShift,
) -> Result<(UnpackStats, R), Error> {
    let root = rustix::fs::open(dest, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::io(format!("open layer directory {}", dest.display()), e.into()))?;
    let mut unpacker = Unpacker {
        root,
        layer,
        limits,
        shift,
        stats: UnpackStats::default(),
        dir_times: Vec::new(),
        cached_parent: None,
        buffer: vec![0; COPY_BUFFER],
    };
    let mut tar = TarReader::new(reader);
    loop {
        let header = match tar.next_header() {
            Ok(Some(header)) => header,
            Ok(None) => break,
            Err(TarError::Malformed { entry, reason }) => {
                return Err(Error::HostileLayer { layer: layer.to_owned(), entry, reason });
            }
            Err(TarError::Io(e)) => return Err(unpacker.stream_error(e)),
        };
        unpacker.stats.entries += 1;
        if unpacker.stats.entries > limits.max_entries {
            return Err(Error::LayerLimit {
                layer: layer.to_owned(),
                reason: format!("more than {} entries (max_layer_entries)", limits.max_entries),
            });
        }
        unpacker.entry(&header, &mut tar)?;
    }
    unpacker.restore_dir_times();
    Ok((unpacker.stats, tar.into_inner()))
}

struct Unpacker<'a> {
    root: OwnedFd,
    layer: &'a str,
    limits: Limits,
    shift: IdShift,
    stats: UnpackStats,
    /// Directories' mtimes, applied at the end because creating children changes them.
    dir_times: Vec<(Vec<u8>, (i64, u32))>,
    /// The last parent directory used: consecutive entries usually share it.
    cached_parent: Option<(Vec<u8>, OwnedFd)>,
    buffer: Vec<u8>,
}

/// A cleaned entry path: components without `.`, `..` or empty parts.
struct CleanPath {
    parent: Vec<u8>,
    name: Vec<u8>,
}

/// Lexically cleans a tar name; `Err` if it climbs above the root. `Ok(None)` is the root itself.
fn clean(raw: &[u8]) -> Result<Option<CleanPath>, &'static str> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err("path escapes the layer root with '..'");
                }
            }
            part if part.len() > 255 => return Err("a name component is longer than 255 bytes"),
            part => parts.push(part),
        }
    }
    if raw.len() > 4096 {
        return Err("path is longer than 4096 bytes");
    }
    let Some(name) = parts.pop() else {
        return Ok(None);
    };
    Ok(Some(CleanPath { parent: parts.join(&b'/'), name: name.to_vec() }))
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV
}

fn timestamps((secs, nanos): (i64, u32)) -> Timestamps {
    let t = rustix::fs::Timespec { tv_sec: secs, tv_nsec: i64::from(nanos) };
    Timestamps { last_access: t, last_modification: t }
}

impl Unpacker<'_> {
    fn hostile(&self, entry: &[u8], reason: impl Into<String>) -> Error {
        Error::HostileLayer {
            layer: self.layer.to_owned(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    fn fs_error(&self, entry: &[u8], what: &str, e: impl Into<io::Error>) -> Error {
        let e: io::Error = e.into();
        Error::io(format!("layer {}: entry {:?}: {what}", self.layer, String::from_utf8_lossy(entry)), e)
    }

    /// Errors from the decompressing/verifying reader keep their own kind (limits, digests).
    fn stream_error(&self, e: io::Error) -> Error {
        crate::layers::stream_error_into(e, self.layer)
    }

    fn charge(&mut self, entry: &[u8], bytes: u64) -> Result<(), Error> {
        self.stats.bytes = self.stats.bytes.saturating_add(bytes);
        if self.stats.bytes > self.limits.max_bytes {
            return Err(Error::LayerLimit {
                layer: self.layer.to_owned(),
                reason: format!(
                    "entry {:?} takes the unpacked size over {} bytes (max_layer_bytes)",
                    String::from_utf8_lossy(entry),
                    self.limits.max_bytes
                ),
            });
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, header: &Header, tar: &mut TarReader<R>) -> Result<(), Error> {
        let raw = &header.path;
        let path = clean(raw).map_err(|reason| self.hostile(raw, reason))?;
        let Some(path) = path else {
            // The layer root itself ("./"): only a directory may name it.
            if header.kind != Kind::Directory {
                return Err(self.hostile(raw, "a non-directory entry names the layer root"));
            }
            let root = rustix::fs::openat(
                &self.root,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.fs_error(raw, "open root", e))?;
            self.apply_metadata_fd(raw, root.as_fd(), header)?;
            self.dir_times.push((Vec::new(), header.mtime));
            return Ok(());
        };
        let charge = header.xattrs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
        self.charge(raw, charge)?;

        if path.name.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(header, &path);
        }
        let parent = self.open_parent(raw, &path.parent)?;
        match header.kind {
            Kind::Regular => {
                // A declared size past the budget is refused before a byte is written.
                self.charge(raw, header.size)?;
                let file = self.create_file(raw, parent.as_fd(), &path.name)?;
                let mut file = std::fs::File::from(file);
                let mut data = tar.data();
                loop {
                    let n = match data.read(&mut self.buffer) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            return Err(self.hostile(raw, "tar stream ends before the entry's declared size"));
                        }
                        Err(e) => return Err(self.stream_error(e)),
                    };
                    file.write_all(&self.buffer[..n]).map_err(|e| self.fs_error(raw, "write", e))?;
                }
                self.apply_metadata_fd(raw, file.as_fd(), header)?;
            }
            Kind::Directory => {
                let dir = self.create_dir(raw, parent.as_fd(), &path.name)?;
                self.apply_metadata_fd(raw, dir.as_fd(), header)?;
                let mut full = path.parent.clone();
                if !full.is_empty() {
                    full.push(b'/');
                }
                full.extend_from_slice(&path.name);
                self.dir_times.push((full, header.mtime));
            }
            Kind::Symlink => {
                if header.link.is_empty() {
                    return Err(self.hostile(raw, "symlink without a target"));
                }
                self.charge(raw, header.link.len() as u64)?;
                self.retry_if_exists(raw, parent.as_fd(), &path.name, |p, n| {
                    rustix::fs::symlinkat(os(&header.link), p, os(n))
                })?;
                self.apply_metadata_at(raw, parent.as_fd(), &path.name, header, false)?;
            }
            Kind::HardLink => self.hard_link(header, parent.as_fd(), &path)?,
            Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => {
                let file_type = match header.kind {
                    Kind::CharDevice => FileType::CharacterDevice,
                    Kind::BlockDevice => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev: Dev = rustix::fs::makedev(header.dev_major, header.dev_minor);
                self.retry_if_exists(raw, parent.as_fd(), &path.name, |p, n| {
                    rustix::fs::mknodat(p, os(n), file_type, Mode::from_raw_mode(0o600), dev)
                })?;
                self.apply_metadata_at(raw, parent.as_fd(), &path.name, header, true)?;
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, header: &Header, path: &CleanPath) -> Result<(), Error> {
        let raw = &header.path;
        let parent = self.open_parent(raw, &path.parent)?;
        if path.name == OPAQUE_MARKER {
            // The directory hides everything below it in lower layers.
            let dir =
                rustix::fs::openat(&parent, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| self.fs_error(raw, "open opaque directory", e))?;
            rustix::fs::fsetxattr(&dir, OVERLAY_OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| self.fs_error(raw, "set trusted.overlay.opaque", e))?;
            return Ok(());
        }
        if path.name.starts_with(b".wh..wh.") {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): meaningless for overlay, skipped as docker does.
            return Ok(());
        }
        let hidden = &path.name[WHITEOUT_PREFIX.len()..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(self.hostile(raw, "whiteout names no file"));
        }
        if !matches!(header.kind, Kind::Regular | Kind::CharDevice) {
            return Err(self.hostile(raw, "whiteout entry is not a plain file"));
        }
        // overlayfs' whiteout is a 0:0 character device with the hidden file's name.
        let hidden = hidden.to_vec();
        self.retry_if_exists(raw, parent.as_fd(), &hidden, |p, n| {
            rustix::fs::mknodat(p, os(n), FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0))
        })?;
        let (uid, gid) = self.owner(raw, header)?;
        rustix::fs::chownat(&parent, os(&hidden), Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.fs_error(raw, "chown whiteout", e))?;
        Ok(())
    }

    fn hard_link(&mut self, header: &Header, parent: BorrowedFd<'_>, path: &CleanPath) -> Result<(), Error> {
        let raw = &header.path;
        let target = match clean(&header.link) {
            Ok(Some(target)) => target,
            Ok(None) => return Err(self.hostile(raw, "hard link to the layer root")),
            Err(reason) => return Err(self.hostile(raw, format!("hard link target: {reason}"))),
        };
        if target.parent == path.parent && target.name == path.name {
            return Err(self.hostile(raw, "hard link to itself"));
        }
        let target_parent = match self.lookup_dir(&target.parent) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => {
                return Err(self.hostile(raw, "hard link target is not in this layer"));
            }
            Err(Errno::LOOP) | Err(Errno::XDEV) => {
                return Err(self.hostile(raw, "hard link target path passes through a symlink"));
            }
            Err(e) => return Err(self.fs_error(raw, "open hard link target directory", e)),
        };
        let target_stat = match rustix::fs::statat(&target_parent, os(&target.name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => {
                return Err(self.hostile(raw, "hard link target is not in this layer"));
            }
            Err(e) => return Err(self.fs_error(raw, "stat hard link target", e)),
        };
        if FileType::from_raw_mode(target_stat.st_mode) == FileType::Directory {
            return Err(self.hostile(raw, "hard link to a directory"));
        }
        // linkat without AT_SYMLINK_FOLLOW links a symlink itself, never what it points to.
        self.retry_if_exists(raw, parent, &path.name, |p, n| {
            rustix::fs::linkat(&target_parent, os(&target.name), p, os(n), AtFlags::empty())
        })
    }

    /// Runs `create`; if the name exists, removes what is there (a file, or a directory with its
    /// contents) and runs it once more: a later tar entry replaces an earlier one.
    fn retry_if_exists(
        &mut self,
        raw: &[u8],
        parent: BorrowedFd<'_>,
        name: &[u8],
        create: impl Fn(BorrowedFd<'_>, &[u8]) -> Result<(), Errno>,
    ) -> Result<(), Error> {
        match create(parent, name) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => {
                self.remove_existing(raw, parent, name)?;
                create(parent, name).map_err(|e| self.fs_error(raw, "create", e))
            }
            Err(e) => Err(self.fs_error(raw, "create", e)),
        }
    }

    fn remove_existing(&mut self, raw: &[u8], parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), Error> {
        let stat = rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.fs_error(raw, "stat existing", e))?;
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            // std's remove_dir_all never follows symlinks (it works with openat/unlinkat); the
            // /proc/self/fd path names our own, already confined parent directory.
            let path = Path::new("/proc/self/fd").join(parent.as_raw_fd().to_string()).join(os(name));
            std::fs::remove_dir_all(&path).map_err(|e| self.fs_error(raw, "replace directory", e))?;
            self.cached_parent = None;
        } else {
            rustix::fs::unlinkat(parent, os(name), AtFlags::empty()).map_err(|e| self.fs_error(raw, "replace", e))?;
        }
        Ok(())
    }

    fn create_file(&mut self, raw: &[u8], parent: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Error> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mode = Mode::from_raw_mode(0o600);
        match rustix::fs::openat(parent, os(name), flags, mode) {
            Ok(fd) => Ok(fd),
            Err(Errno::EXIST) => {
                self.remove_existing(raw, parent, name)?;
                rustix::fs::openat(parent, os(name), flags, mode).map_err(|e| self.fs_error(raw, "create", e))
            }
            Err(e) => Err(self.fs_error(raw, "create", e)),
        }
    }

    /// Creates a directory, or reuses an existing one (keeping its contents, as tar does).
    fn create_dir(&mut self, raw: &[u8], parent: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Error> {
        match rustix::fs::mkdirat(parent, os(name), Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let stat = rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.fs_error(raw, "stat existing", e))?;
                if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
                    self.remove_existing(raw, parent, name)?;
                    rustix::fs::mkdirat(parent, os(name), Mode::from_raw_mode(0o700))
                        .map_err(|e| self.fs_error(raw, "mkdir", e))?;
                }
            }
            Err(e) => return Err(self.fs_error(raw, "mkdir", e)),
        }
        rustix::fs::openat(
            parent,
            os(name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.fs_error(raw, "open directory", e))
    }

    /// Resolves an existing directory below the root without following any symlink.
    fn lookup_dir(&self, rel: &[u8]) -> Result<OwnedFd, Errno> {
        if rel.is_empty() {
            return rustix::fs::openat(
                &self.root,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            );
        }
        rustix::fs::openat2(
            &self.root,
            os(rel),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_flags(),
        )
    }

    /// The parent directory of an entry, creating missing directories (owned by root, 0755, as
    /// tar does for implied parents).
    fn open_parent(&mut self, raw: &[u8], rel: &[u8]) -> Result<OwnedFd, Error> {
        if let Some((cached, fd)) = &self.cached_parent
            && cached.as_slice() == rel
        {
            return fd.try_clone().map_err(|e| self.fs_error(raw, "dup", e));
        }
        let fd = match self.lookup_dir(rel) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => self.create_parents(raw, rel)?,
            Err(Errno::LOOP) | Err(Errno::XDEV) => {
                return Err(self.hostile(raw, "parent path passes through a symlink"));
            }
            Err(Errno::NOTDIR) => {
                return Err(self.hostile(raw, "a parent of the entry is not a directory"));
            }
            Err(e) => return Err(self.fs_error(raw, "open parent directory", e)),
        };
        self.cached_parent = Some((rel.to_vec(), fd.try_clone().map_err(|e| self.fs_error(raw, "dup", e))?));
        Ok(fd)
    }

    fn create_parents(&mut self, raw: &[u8], rel: &[u8]) -> Result<OwnedFd, Error> {
        let mut dir = self.lookup_dir(b"").map_err(|e| self.fs_error(raw, "open root", e))?;
        for part in rel.split(|&b| b == b'/') {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            dir = match rustix::fs::openat(&dir, os(part), flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    rustix::fs::mkdirat(&dir, os(part), Mode::from_raw_mode(0o755))
                        .map_err(|e| self.fs_error(raw, "create parent directory", e))?;
                    let (uid, gid) = self.ids(raw, 0, 0)?;
                    rustix::fs::chownat(&dir, os(part), Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| self.fs_error(raw, "chown parent directory", e))?;
                    rustix::fs::openat(&dir, os(part), flags, Mode::empty())
                        .map_err(|e| self.fs_error(raw, "open parent directory", e))?
                }
                // O_NOFOLLOW|O_PATH on a symlink opens the link, so O_DIRECTORY reports ENOTDIR.
                Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                    return Err(self.hostile(raw, "a parent of the entry is a symlink or not a directory"));
                }
                Err(e) => return Err(self.fs_error(raw, "open parent directory", e)),
            };
        }
        Ok(dir)
    }

    fn ids(&self, raw: &[u8], uid: u64, gid: u64) -> Result<(rustix::fs::Uid, rustix::fs::Gid), Error> {
        let map = |id: u64, what: &str| {
            self.shift.map(id).ok_or_else(|| {
                let reason = if self.shift == IdShift::IDENTITY {
                    format!("{what} {id} is outside the supported id range")
                } else {
                    format!(
                        "{what} {id} is outside 0..65535, the ids a layer may use when layers are stored shifted to {} (images.layer_uid_shift)",
                        self.shift.root()
                    )
                };
                self.hostile(raw, reason)
            })
        };
        Ok((rustix::fs::Uid::from_raw(map(uid, "uid")?), rustix::fs::Gid::from_raw(map(gid, "gid")?)))
    }

    fn owner(&self, raw: &[u8], header: &Header) -> Result<(rustix::fs::Uid, rustix::fs::Gid), Error> {
        self.ids(raw, header.uid, header.gid)
    }

    /// Owner, then mode (chown clears set-id bits), then xattrs (chown clears
    /// security.capability), then times.
    fn apply_metadata_fd(&self, raw: &[u8], fd: BorrowedFd<'_>, header: &Header) -> Result<(), Error> {
        let (uid, gid) = self.owner(raw, header)?;
        rustix::fs::fchown(fd, Some(uid), Some(gid)).map_err(|e| self.fs_error(raw, "chown", e))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(header.mode)).map_err(|e| self.fs_error(raw, "chmod", e))?;
        for (name, value) in &header.xattrs {
            if self.skip_xattr(raw, name) {
                continue;
            }
            let value = self.xattr_value(raw, name, value)?;
            rustix::fs::fsetxattr(fd, os(name), &value, XattrFlags::empty())
                .map_err(|e| self.fs_error(raw, &format!("set xattr {}", String::from_utf8_lossy(name)), e))?;
        }
        if header.kind != Kind::Directory {
            rustix::fs::futimens(fd, &timestamps(header.mtime)).map_err(|e| self.fs_error(raw, "set times", e))?;
        }
        Ok(())
    }

    /// Metadata for nodes we cannot open (symlinks, devices, fifos), by name in their parent.
    fn apply_metadata_at(
        &self,
        raw: &[u8],
        parent: BorrowedFd<'_>,
        name: &[u8],
        header: &Header,
        chmod: bool,
    ) -> Result<(), Error> {
        let (uid, gid) = self.owner(raw, header)?;
        rustix::fs::chownat(parent, os(name), Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.fs_error(raw, "chown", e))?;
        if chmod {
            // fchmodat cannot refuse symlinks; it is only used on the device or fifo we just
            // created in our private temporary directory, which nothing else writes to.
            rustix::fs::chmodat(parent, os(name), Mode::from_raw_mode(header.mode), AtFlags::empty())
                .map_err(|e| self.fs_error(raw, "chmod", e))?;
        }
        for (xname, value) in &header.xattrs {
            if self.skip_xattr(raw, xname) {
                continue;
            }
            let value = self.xattr_value(raw, xname, value)?;
            // The l-variant does not follow the last component; /proc/self/fd/N is our own
            // confined parent directory.
            let path = Path::new("/proc/self/fd").join(parent.as_raw_fd().to_string()).join(os(name));
            rustix::fs::lsetxattr(&path, os(xname), &value, XattrFlags::empty())
                .map_err(|e| self.fs_error(raw, &format!("set xattr {}", String::from_utf8_lossy(xname)), e))?;
        }
        rustix::fs::utimensat(parent, os(name), &timestamps(header.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.fs_error(raw, "set times", e))?;
        Ok(())
    }

    /// The value to store for xattr `name`: as in the layer, except file capabilities of a
    /// shifted layer (below).
    fn xattr_value<'v>(&self, raw: &[u8], name: &[u8], value: &'v [u8]) -> Result<std::borrow::Cow<'v, [u8]>, Error> {
        if name != FILE_CAPS_XATTR || self.shift == IdShift::IDENTITY {
            return Ok(std::borrow::Cow::Borrowed(value));
        }
        shifted_file_caps(value, self.shift).map(std::borrow::Cow::Owned).map_err(|reason| self.hostile(raw, reason))
    }

    /// overlayfs' own xattrs (redirect, metacopy, origin...) steer how overlay resolves lower
    /// layers; a layer must not set them, only the whiteout conversion above may.
    fn skip_xattr(&self, raw: &[u8], name: &[u8]) -> bool {
        let skip = name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.");
        if skip {
            warn!(layer = self.layer, entry = %String::from_utf8_lossy(raw), xattr = %String::from_utf8_lossy(name), "ignoring overlay xattr from layer");
        }
        skip
    }

    fn restore_dir_times(&mut self) {
        // In tar order, so that a directory listed twice gets its last entry's time.
        for (rel, mtime) in &self.dir_times {
            let dir = if rel.is_empty() {
                rustix::fs::openat(&self.root, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            } else {
                rustix::fs::openat2(
                    &self.root,
                    os(rel),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    resolve_flags(),
                )
            };
            // A directory replaced by a later entry is simply gone; its time no longer matters.
            if let Ok(dir) = dir {
                let _ = rustix::fs::futimens(&dir, &timestamps(*mtime));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning() {
        let c = |s: &str| {
            clean(s.as_bytes())
                .map(|p| p.map(|p| (String::from_utf8(p.parent).unwrap(), String::from_utf8(p.name).unwrap())))
        };
        assert_eq!(c("./a/b"), Ok(Some(("a".into(), "b".into()))));
        assert_eq!(c("/etc/passwd"), Ok(Some(("etc".into(), "passwd".into()))));
        assert_eq!(c("a/../b/"), Ok(Some(("".into(), "b".into()))));
        assert_eq!(c("./"), Ok(None));
        assert!(c("../x").is_err());
        assert!(c("a/../../x").is_err());
        assert!(c("/../x").is_err());
        assert!(c(&format!("a/{}", "n".repeat(256))).is_err());
        assert!(c(&"a/".repeat(2100)).is_err());
    }

    #[test]
    fn file_capabilities_of_shifted_layers_become_v3_with_the_shifted_root() {
        let shift = IdShift::new(0x7FFE_0000);
        let root = 0x7FFE_0000u32.to_le_bytes();
        // cap_net_bind_service+ep, v2: permitted bit 10, the effective flag.
        let v2 = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let v3 = [&[1, 0, 0, 3, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..], &root].concat();
        assert_eq!(shifted_file_caps(&v2, shift).unwrap(), v3);
        // v3 of root 1000 (a capability for a user namespace whose root is 1000 in the layer).
        let mut v3_1000 = v3.clone();
        v3_1000[20..].copy_from_slice(&1000u32.to_le_bytes());
        let mut want = v3.clone();
        want[20..].copy_from_slice(&(0x7FFE_0000u32 + 1000).to_le_bytes());
        assert_eq!(shifted_file_caps(&v3_1000, shift).unwrap(), want);
        // v1 (one 32-bit pair), no effective flag.
        let v1 = [0, 0, 0, 1, 0, 4, 0, 0, 0, 0, 0, 0];
        let want = [&[0, 0, 0, 3, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..], &root].concat();
        assert_eq!(shifted_file_caps(&v1, shift).unwrap(), want);
        // A root id the shifted range cannot hold is refused; garbage goes to the kernel as is.
        v3_1000[20..].copy_from_slice(&70000u32.to_le_bytes());
        assert!(shifted_file_caps(&v3_1000, shift).is_err());
        assert_eq!(shifted_file_caps(&[9, 9], shift).unwrap(), vec![9, 9]);
        assert_eq!(shifted_file_caps(&v2[..19], shift).unwrap(), v2[..19].to_vec());
    }
}
