//! The overlay root file system: mount(2) when its options fit a page, else the new mount API
//! (fsopen/fsconfig), and idmapped lower dirs staged as detached mounts.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags};

use crate::idmap::{self, Mappings};
use crate::namespaces::Plan;
use crate::{Context, Error, OverlayRootfs, Result, errno_desc};

use super::mounts::attach;
use super::nix_errno;

/// mount(2) copies its data argument into one page: longer overlay options need the new mount API.
const MOUNT_DATA_MAX: usize = 4096 - 1;

pub(super) fn mount_overlay(overlay: &OverlayRootfs, target: &Path, plan: &Plan) -> Result<()> {
    if overlay.lowerdirs.is_empty() {
        return Err(Error::new("overlay rootfs: no lower dirs"));
    }
    for dir in overlay.lowerdirs.iter().chain([&overlay.upperdir, &overlay.workdir]) {
        if !dir.is_absolute() {
            return Err(Error::new(format!("overlay rootfs: {} is not an absolute path", dir.display())));
        }
        let meta = std::fs::metadata(dir).ctx(|| format!("overlay rootfs: {}", dir.display()))?;
        if !meta.is_dir() {
            return Err(Error::new(format!("overlay rootfs: {} is not a directory", dir.display())));
        }
    }
    if !overlay.uid_mappings.is_empty() || !overlay.gid_mappings.is_empty() {
        return mount_idmapped_overlay(overlay, target, plan);
    }
    mount_overlay_from(overlay, &overlay.lowerdirs, target, target)
}

/// Mounts the overlay with `lowers` as its lower layers on `target` (messages name the rootfs
/// `shown`): mount(2) when the options fit one page (every kernel with overlayfs; idmapped
/// lowers since 5.19), else the new mount API's `lowerdir+` (Linux >= 6.8), which has no such
/// limit.
pub(super) fn mount_overlay_from(
    overlay: &OverlayRootfs,
    lowers: &[PathBuf],
    target: &Path,
    shown: &Path,
) -> Result<()> {
    let lower = lowers.iter().map(|d| d.to_string_lossy().into_owned()).collect::<Vec<_>>().join(":");
    let data =
        format!("lowerdir={lower},upperdir={},workdir={}", overlay.upperdir.display(), overlay.workdir.display());
    // Characters that the mount(2) option syntax cannot carry as is (the new API takes each
    // path as a whole).
    let awkward = lowers
        .iter()
        .chain([&overlay.upperdir, &overlay.workdir])
        .any(|d| d.as_os_str().as_bytes().iter().any(|b| matches!(b, b',' | b':' | b'\\')));
    if data.len() <= MOUNT_DATA_MAX && !awkward {
        match mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(data.as_str())) {
            Ok(()) => Ok(()),
            // mount(2) says only "invalid argument": the new API gets the kernel's reason.
            Err(e) => mount_overlay_fsconfig(overlay, lowers, target, shown, false).map_err(|detail| {
                Error::new(format!("mount overlay rootfs on {}: {} ({detail})", shown.display(), errno_desc(e)))
            }),
        }
    } else {
        mount_overlay_fsconfig(overlay, lowers, target, shown, true)
    }
}

/// The overlay over idmapped lower dirs, O(1) in the size of the image (nothing is copied or
/// chowned). Each layer is cloned (open_tree), given the overlay's mapping (mount_setattr) and
/// attached in a staging tmpfs mounted on `target` in this (the container's) mount namespace:
/// overlayfs before Linux 6.8 only takes lowers attached in the caller's mount namespace, given
/// as paths or as /proc/self/fd/N alike. The overlay is made inside the staging tmpfs from short
/// relative names (cwd there: "0:1:...", 128 layers in ~400 bytes of the one-page option limit),
/// cloned, the staging tmpfs detached with everything in it, and the clone attached at `target`.
/// overlayfs keeps private clones of its layers, so nothing of the staging stays visible.
pub(super) fn mount_idmapped_overlay(overlay: &OverlayRootfs, target: &Path, plan: &Plan) -> Result<()> {
    let mappings = Mappings { uids: overlay.uid_mappings.clone(), gids: overlay.gid_mappings.clone() };
    let userns = plan
        .idmaps
        .get(&mappings)
        .ok_or_else(|| Error::new("overlay rootfs: no user namespace for the lower dirs' id mapping"))?;
    let mut trees = Vec::with_capacity(overlay.lowerdirs.len());
    for dir in &overlay.lowerdirs {
        let tree = open_tree_clone(dir).ctx(|| format!("overlay rootfs: clone lower dir {}", dir.display()))?;
        idmap::idmap_tree(&tree, userns, false)
            .map_err(|e| Error::new(format!("overlay rootfs: idmap lower dir {}: {e}", dir.display())))?;
        trees.push(tree);
    }

    mount(Some("tmpfs"), target, Some("tmpfs"), STAGING_FLAGS, Some("mode=700,size=64k"))
        .ctx(|| format!("overlay rootfs: mount a staging tmpfs on {}", target.display()))?;
    let merged = stage_and_mount_overlay(overlay, &trees, target);
    // Detached whatever happened: on success, the overlay's clone no longer needs it.
    let detached = umount2(target, MntFlags::MNT_DETACH)
        .ctx(|| format!("overlay rootfs: detach the staging tmpfs on {}", target.display()));
    let merged = merged?;
    detached?;
    let target_fd = nix::fcntl::open(target, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .ctx(|| format!("open rootfs {}", target.display()))?;
    attach(&merged, &target_fd).ctx(|| format!("overlay rootfs: move the overlay to {}", target.display()))
}

/// The staging tmpfs holds no file: only mount points. Never executable, never a device.
pub(super) const STAGING_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// In the staging tmpfs at `staging`: attaches `trees` (the idmapped lowers, top first) as "0",
/// "1", ..., mounts the overlay on "merged" from those names, and returns a detached clone of it.
pub(super) fn stage_and_mount_overlay(overlay: &OverlayRootfs, trees: &[OwnedFd], staging: &Path) -> Result<OwnedFd> {
    let shown = staging.display();
    let dir = nix::fcntl::open(staging, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .ctx(|| format!("overlay rootfs: open the staging tmpfs on {shown}"))?;
    let mut names = Vec::with_capacity(trees.len());
    for (i, (tree, lower)) in trees.iter().zip(&overlay.lowerdirs).enumerate() {
        let name = i.to_string();
        nix::sys::stat::mkdirat(&dir, name.as_str(), Mode::from_bits_truncate(0o700))
            .and_then(|()| {
                nix::fcntl::openat(
                    &dir,
                    name.as_str(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
            })
            .and_then(|point| attach(tree, &point))
            .ctx(|| format!("overlay rootfs: attach idmapped lower dir {} in the staging tmpfs", lower.display()))?;
        names.push(PathBuf::from(name));
    }
    nix::sys::stat::mkdirat(&dir, "merged", Mode::from_bits_truncate(0o700))
        .ctx(|| format!("overlay rootfs: mkdir {shown}/merged"))?;
    // The relative lower names resolve against the cwd, while the overlay is mounted.
    let cwd = nix::fcntl::open(".", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .ctx(|| "open the working directory".into())?;
    nix::unistd::fchdir(&dir).ctx(|| format!("chdir to the staging tmpfs on {shown}"))?;
    let mounted = mount_overlay_from(overlay, &names, Path::new("merged"), staging);
    nix::unistd::fchdir(&cwd).ctx(|| "chdir back from the staging tmpfs".into())?;
    mounted?;
    let merged = staging.join("merged");
    open_tree_clone(&merged).ctx(|| format!("overlay rootfs: clone the overlay at {}", merged.display()))
}

/// open_tree(OPEN_TREE_CLONE) of `path`: a detached copy of the mount there (not its submounts).
pub(super) fn open_tree_clone(path: &Path) -> nix::Result<OwnedFd> {
    let flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    rustix::mount::open_tree(rustix::fs::CWD, path, flags).map_err(nix_errno)
}

/// The new mount API: one `lowerdir+` per layer (Linux >= 6.8), no page limit on the options.
/// `lowers` are what overlayfs gets for `overlay.lowerdirs` (the same paths, or their idmapped
/// clones, by their names in the staging tmpfs); messages name the lower dirs. `too_long`: called
/// because the options do not fit mount(2), else only for the kernel's reason of its failure.
pub(super) fn mount_overlay_fsconfig(
    overlay: &OverlayRootfs,
    lowers: &[PathBuf],
    target: &Path,
    shown: &Path,
    too_long: bool,
) -> Result<()> {
    let layers = overlay.lowerdirs.len();

    let fsfd = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(nix_errno)
        .ctx(|| "fsopen overlay".into())?;

    let set = |key: &str, value: &OsStr| -> nix::Result<()> {
        rustix::mount::fsconfig_set_string(&fsfd, key, value).map_err(nix_errno)
    };
    let log = |fsfd: &OwnedFd| fs_context_log(fsfd);

    set("source", OsStr::new("overlay")).ctx(|| "fsconfig overlay source".into())?;
    for (i, (dir, source)) in overlay.lowerdirs.iter().zip(lowers).enumerate() {
        if let Err(e) = set("lowerdir+", source.as_os_str()) {
            let why = log(&fsfd);
            return Err(if e == Errno::EINVAL && i == 0 && why.is_empty() {
                Error::new(if too_long {
                    format!(
                        "overlay rootfs: the options of {layers} layers do not fit in one page and this kernel's overlayfs does not take lowerdir+ (linux >= 6.8)"
                    )
                } else {
                    "no reason given by this kernel's overlayfs (lowerdir+ needs linux >= 6.8)".into()
                })
            } else {
                Error::new(format!("overlay rootfs: lower dir {}: {}{why}", dir.display(), errno_desc(e)))
            });
        }
    }
    set("upperdir", overlay.upperdir.as_os_str()).map_err(|e| {
        Error::new(format!("overlay rootfs: upperdir {}: {}{}", overlay.upperdir.display(), errno_desc(e), log(&fsfd)))
    })?;
    set("workdir", overlay.workdir.as_os_str()).map_err(|e| {
        Error::new(format!("overlay rootfs: workdir {}: {}{}", overlay.workdir.display(), errno_desc(e), log(&fsfd)))
    })?;
    rustix::mount::fsconfig_create(&fsfd).map_err(nix_errno).map_err(|e| {
        Error::new(format!("create overlay rootfs ({layers} lower dirs): {}{}", errno_desc(e), log(&fsfd)))
    })?;
    let mfd = rustix::mount::fsmount(&fsfd, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(nix_errno)
        .ctx(|| "fsmount overlay rootfs".into())?;
    if target.as_os_str().as_bytes().contains(&0) {
        return Err(Error::new("rootfs path contains NUL"));
    }
    rustix::mount::move_mount(&mfd, c"", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(nix_errno)
        .ctx(|| format!("move overlay rootfs to {}", shown.display()))?;
    Ok(())
}

/// The messages the kernel logged on an fs context (": overlayfs: ..."), for error messages.
pub(super) fn fs_context_log(fsfd: &OwnedFd) -> String {
    let mut messages = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = nix::unistd::read(fsfd.as_fd(), &mut buf) {
        if n == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf[..n]);
        // "e overlay: ..." (e=error, w=warning, i=info).
        messages.push(line.get(2..).unwrap_or(&line).trim().to_string());
    }
    if messages.is_empty() { String::new() } else { format!(" ({})", messages.join("; ")) }
}
