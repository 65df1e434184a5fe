//! pivot_root into the rootfs, then (paths now the container's) masked and read-only paths,
//! the working directory and the read-only root.

use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;

use crate::{Context, Error, Result, errno_desc};

use super::mounts::{remount, statvfs_flags};
use super::resolve::{clean, mkdir_all};

/// pivot_root(".", ".") then detach the old root stacked on top: no put_old directory needed.
pub(super) fn pivot_root(root: &Path) -> Result<()> {
    let dir = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let old = nix::fcntl::open("/", dir, Mode::empty()).ctx(|| "open /".into())?;
    let new = nix::fcntl::open(root, dir, Mode::empty()).ctx(|| format!("open rootfs {}", root.display()))?;
    nix::unistd::fchdir(&new).ctx(|| format!("chdir to rootfs {}", root.display()))?;
    nix::unistd::pivot_root(".", ".").ctx(|| format!("pivot_root into {}", root.display()))?;
    nix::unistd::fchdir(&old).ctx(|| "chdir to the old root".into())?;
    // The old root's unmount must not propagate anywhere.
    mount(None::<&str>, ".", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>)
        .ctx(|| "make the old root a slave".into())?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detach the old root".into())?;
    nix::unistd::chdir("/").ctx(|| "chdir to /".into())
}

// --- after pivot_root: paths are the container's ---------------------------------------------------

/// Makes `path` a read-only bind of itself (linux.readonlyPaths). A missing path is skipped.
pub(crate) fn readonly_path(path: &str) -> Result<()> {
    match mount(Some(path), path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(Error::new(format!("bind mount readonly path {path}: {}", errno_desc(e)))),
    }
    let flags = statvfs_flags(path).ctx(|| format!("statvfs {path}"))?;
    remount(path, flags | MsFlags::MS_RDONLY).ctx(|| format!("remount readonly path {path} read-only"))
}

/// Hides `path` (linux.maskedPaths): /dev/null bound over a file, an empty read-only tmpfs over
/// a directory. A missing path is skipped.
pub(crate) fn mask_path(path: &str) -> Result<()> {
    match mount(Some("/dev/null"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::ENOTDIR) => mount(Some("tmpfs"), path, Some("tmpfs"), MsFlags::MS_RDONLY, None::<&str>)
            .ctx(|| format!("mask {path} with a tmpfs")),
        Err(e) => Err(Error::new(format!("mask {path}: {}", errno_desc(e)))),
    }
}

/// Creates the working directory `cwd` and its missing parents (owned by the container's root),
/// resolved inside the container's root (`/`, after pivot_root) as openat2's RESOLVE_IN_ROOT does:
/// never through a magic link such as `/proc/self/fd/N`, which could name a directory of the node.
/// Failures are left to the chdir, which names the working directory.
pub(crate) fn create_cwd(cwd: &Path) {
    let Ok(root) = nix::fcntl::open("/", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()) else {
        return;
    };
    let _ = mkdir_all(&root, &clean(cwd));
}

/// Remounts the container's root read-only (root.readonly).
pub(crate) fn remount_root_readonly() -> Result<()> {
    let flags = statvfs_flags("/").ctx(|| "statvfs /".into())?;
    remount("/", flags | MsFlags::MS_RDONLY).ctx(|| "remount rootfs read-only".into())
}
