//! Container root filesystems: an overlay of an image's layer directories with a per-container
//! upper and work directory.
//!
//! overlayfs takes its lower directories in one mount option string of at most a page (4 KiB),
//! which ~40 layers with full paths exceed. We use the new mount API instead, adding one
//! `lowerdir+` per layer with `fsconfig` (kernel >= 6.8), which has no total limit. On older
//! kernels we fall back to mount(2) with short names: per-container symlinks `lower/0..N` to the
//! layer directories, named through `/proc/self/fd/<dirfd>/N`, about 22 bytes per layer, so the
//! 128 layers docker allows fit in one page.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags};
use tracing::debug;

use crate::error::{Error, IoContext};

/// What to mount for one container: layer directories (topmost first) and, unless read-only,
/// the container's writable upper and work directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// overlayfs lower directories, the image's top layer first.
    pub lowerdirs: Vec<PathBuf>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    /// Where short-name links for the legacy mount path are kept (inside the container dir).
    container_dir: PathBuf,
}

impl Rootfs {
    /// Prepares `container_dir` (`upper/`, `work/`, `empty/`) for `lowerdirs` (top first).
    pub(crate) fn prepare(mut lowerdirs: Vec<PathBuf>, container_dir: &Path, readonly: bool) -> Result<Rootfs, Error> {
        // 0700 (with any parent it makes): the writable layer, with whatever setuid binaries the
        // container writes there, is no business of the node's other users. upper/ itself keeps
        // 0755: it is the container's `/`.
        {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(container_dir)
                .ctx(|| format!("create {}", container_dir.display()))?;
        }
        let (upperdir, workdir) = if readonly {
            (None, None)
        } else {
            let upper = container_dir.join("upper");
            let work = container_dir.join("work");
            for dir in [&upper, &work] {
                fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
            }
            (Some(upper), Some(work))
        };
        // Without an upper directory overlayfs needs two lower ones; an image may have zero or
        // one layer. An empty directory at the bottom changes nothing in the merged view.
        let needed = if readonly { 2 } else { 1 };
        if lowerdirs.len() < needed {
            let empty = container_dir.join("empty");
            fs::create_dir_all(&empty).ctx(|| format!("create {}", empty.display()))?;
            while lowerdirs.len() < needed {
                lowerdirs.push(empty.clone());
            }
        }
        Ok(Rootfs { lowerdirs, upperdir, workdir, container_dir: container_dir.to_path_buf() })
    }

    pub fn readonly(&self) -> bool {
        self.upperdir.is_none()
    }

    /// Mounts the overlay on `target` (which must exist).
    pub fn mount(&self, target: &Path) -> Result<(), Error> {
        match self.mount_with_fsconfig(target) {
            Ok(()) => Ok(()),
            Err(MountError::Unsupported(errno)) => {
                debug!(%errno, "lowerdir+ not supported, falling back to mount(2) with short names");
                self.mount_legacy(target)
            }
            Err(MountError::Failed(e)) => Err(e),
        }
    }

    /// Unmounts an overlay mounted by [`Rootfs::mount`]; nothing mounted there is fine.
    pub fn unmount(target: &Path) -> Result<(), Error> {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(Error::io(format!("unmount {}", target.display()), e.into())),
        }
    }

    fn mount_with_fsconfig(&self, target: &Path) -> Result<(), MountError> {
        let failed = |what: &str, e: Errno| {
            MountError::Failed(Error::io(format!("mount overlay on {}: {what}", target.display()), e.into()))
        };
        let fs = match rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
            Ok(fd) => fd,
            Err(e @ (Errno::NOSYS | Errno::PERM)) if e == Errno::NOSYS => {
                return Err(MountError::Unsupported(e));
            }
            Err(e) => return Err(failed("fsopen", e)),
        };
        for lower in &self.lowerdirs {
            match rustix::mount::fsconfig_set_string(fs.as_fd(), "lowerdir+", lower) {
                Ok(()) => {}
                // Kernels before 6.8 do not know the key.
                Err(e @ Errno::INVAL) if lower == &self.lowerdirs[0] => {
                    return Err(MountError::Unsupported(e));
                }
                Err(e) => return Err(failed(&format!("lowerdir+ {}", lower.display()), e)),
            }
        }
        if let (Some(upper), Some(work)) = (&self.upperdir, &self.workdir) {
            rustix::mount::fsconfig_set_string(fs.as_fd(), "upperdir", upper).map_err(|e| failed("upperdir", e))?;
            rustix::mount::fsconfig_set_string(fs.as_fd(), "workdir", work).map_err(|e| failed("workdir", e))?;
        }
        rustix::mount::fsconfig_create(fs.as_fd()).map_err(|e| failed("create", e))?;
        let attrs = if self.readonly() { MountAttrFlags::MOUNT_ATTR_RDONLY } else { MountAttrFlags::empty() };
        let mnt = rustix::mount::fsmount(fs.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attrs)
            .map_err(|e| failed("fsmount", e))?;
        rustix::mount::move_mount(mnt.as_fd(), "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
            .map_err(|e| failed("move_mount", e))?;
        Ok(())
    }

    /// mount(2) with `lowerdir=/proc/self/fd/N/0:/proc/self/fd/N/1:...`.
    pub(crate) fn mount_legacy(&self, target: &Path) -> Result<(), Error> {
        let links = self.container_dir.join("lower");
        match fs::remove_dir_all(&links) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Error::io(format!("clear {}", links.display()), e));
            }
            _ => {}
        }
        fs::create_dir(&links).ctx(|| format!("create {}", links.display()))?;
        for (i, lower) in self.lowerdirs.iter().enumerate() {
            symlink(lower, links.join(i.to_string())).ctx(|| format!("link lower directory {}", lower.display()))?;
        }
        let dir = rustix::fs::open(&links, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .ctx(|| format!("open {}", links.display()))?;
        let prefix = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
        let lowers: Vec<String> = (0..self.lowerdirs.len()).map(|i| format!("{prefix}/{i}")).collect();
        let mut options = format!("lowerdir={}", lowers.join(":"));
        if let (Some(upper), Some(work)) = (&self.upperdir, &self.workdir) {
            options.push_str(&format!(",upperdir={},workdir={}", upper.display(), work.display()));
        }
        let flags = if self.readonly() { MountFlags::RDONLY } else { MountFlags::empty() };
        let data = std::ffi::CString::new(options.clone())
            .map_err(|_| Error::io("mount options", io::Error::other("nul byte in a path")))?;
        rustix::mount::mount("overlay", target, "overlay", flags, data.as_c_str()).map_err(|e| {
            Error::io(format!("mount overlay on {} ({} bytes of options)", target.display(), options.len()), e.into())
        })
    }
}

enum MountError {
    Unsupported(Errno),
    Failed(Error),
}
