//! Resolution beneath the container's root: every path of the spec is opened, created and
//! mounted on through a descriptor of the root with RESOLVE_IN_ROOT, so no symlink in the image
//! leads outside it.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

use crate::{Context, Error, Result, errno_desc};

use super::{CREATED_OWNER, own_created};

/// The destination as a path relative to the container's root ("/dev/pts" -> "dev/pts"),
/// `..` resolved lexically (it cannot go above the root either way).
pub(super) fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Opens `rel` inside the rootfs, symlinks resolved as if the rootfs were `/` (never out of it).
pub(crate) fn open_in_root(rootfd: &OwnedFd, rel: &Path, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let rel: &Path = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    loop {
        match openat2(rootfd, rel, how) {
            // openat2 asks for a retry when a rename raced with the resolution.
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// Creates the directory `rel` and its missing parents inside the rootfs; returns it opened O_PATH.
/// A dangling symlink on the way is followed inside the rootfs: its target is created there.
pub(super) fn mkdir_all(rootfd: &OwnedFd, rel: &Path) -> Result<OwnedFd> {
    mkdir_all_at_depth(rootfd, rel, 0)
}

pub(super) fn mkdir_all_at_depth(rootfd: &OwnedFd, rel: &Path, links: usize) -> Result<OwnedFd> {
    const MAX_LINKS: usize = 40;
    let dir = OFlag::O_PATH | OFlag::O_DIRECTORY;
    let names: Vec<&OsStr> =
        rel.components().filter_map(|c| if let Component::Normal(n) = c { Some(n) } else { None }).collect();
    let mut current = PathBuf::new();
    let mut fd = open_in_root(rootfd, &current, dir, Mode::empty()).ctx(|| "open rootfs".into())?;
    for (i, name) in names.iter().enumerate() {
        let parent = current.clone();
        current.push(name);
        let shown = || format!("/{}", current.display());
        fd = match open_in_root(rootfd, &current, dir, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => match nix::sys::stat::mkdirat(&fd, *name, Mode::from_bits_truncate(0o755)) {
                Ok(()) => {
                    own_created(&fd, name).ctx(|| format!("chown {} in rootfs", shown()))?;
                    open_in_root(rootfd, &current, dir, Mode::empty()).ctx(|| format!("open {} in rootfs", shown()))?
                }
                // Something is there but does not resolve: a dangling symlink. Go on from its target.
                Err(Errno::EEXIST) => {
                    if links >= MAX_LINKS {
                        return Err(Error::new(format!(
                            "mkdir {} in rootfs: too many levels of symbolic links",
                            shown()
                        )));
                    }
                    let target = nix::fcntl::readlinkat(&fd, *name).ctx(|| format!("mkdir {} in rootfs", shown()))?;
                    let mut next = parent.join(target);
                    next.extend(&names[i + 1..]);
                    return mkdir_all_at_depth(rootfd, &clean(&next), links + 1);
                }
                Err(e) => return Err(Error::new(format!("mkdir {} in rootfs: {}", shown(), errno_desc(e)))),
            },
            Err(e) => return Err(Error::new(format!("open {} in rootfs: {}", shown(), errno_desc(e)))),
        };
    }
    Ok(fd)
}

/// Creates an empty file at `rel` (a mount point for a file) unless something exists there.
pub(super) fn create_file(rootfd: &OwnedFd, rel: &Path) -> Result<()> {
    if let Some(parent) = rel.parent() {
        mkdir_all(rootfd, parent)?;
    }
    match open_in_root(rootfd, rel, OFlag::O_PATH, Mode::empty()) {
        Ok(_) => Ok(()),
        Err(Errno::ENOENT) => {
            let file = open_in_root(rootfd, rel, OFlag::O_CREAT | OFlag::O_RDONLY, Mode::from_bits_truncate(0o644))
                .ctx(|| format!("create /{} in rootfs", rel.display()))?;
            match CREATED_OWNER.get() {
                Some((uid, gid)) => nix::unistd::fchown(&file, Some((*uid).into()), Some((*gid).into()))
                    .ctx(|| format!("chown /{} in rootfs", rel.display())),
                None => Ok(()),
            }
        }
        Err(e) => Err(Error::new(format!("open /{} in rootfs: {}", rel.display(), errno_desc(e)))),
    }
}

/// Runs `f` on a `/proc/self/fd/N` path to `rel` in the rootfs, freshly resolved: mount targets
/// are never paths that a symlink in the image could send out of the rootfs.
pub(super) fn at<T>(rootfd: &OwnedFd, rel: &Path, f: impl FnOnce(&str) -> nix::Result<T>) -> nix::Result<T> {
    let fd = open_in_root(rootfd, rel, OFlag::O_PATH, Mode::empty())?;
    f(&format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_keeps_destinations_inside_the_root() {
        assert_eq!(clean(Path::new("/dev/pts")), Path::new("dev/pts"));
        assert_eq!(clean(Path::new("/../../etc/./hosts")), Path::new("etc/hosts"));
        assert_eq!(clean(Path::new("/a/../b")), Path::new("b"));
        assert_eq!(clean(Path::new("/")), Path::new(""));
    }
}
