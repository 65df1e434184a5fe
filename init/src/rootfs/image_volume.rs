//! Image volumes (CRI `Mount.image`): an image's layers as an overlay, read-only, at a path of the
//! container. The overlay is mounted on a staging directory in the container's own mount
//! namespace (nothing reaches the host's mount table); the wanted directory of it is opened
//! beneath the overlay's root with RESOLVE_IN_ROOT, so a symlink or `..` in the image resolves
//! inside the image, never on the node; a clone of just that directory is made read-only and
//! attached at the destination, itself resolved inside the container's rootfs.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, umount2};
use nix::sys::stat::Mode;
use rustix::mount::OpenTreeFlags;

use crate::namespaces::Plan;
use crate::{Context, Error, ImageVolumeMount, Result, errno_desc};

use super::mounts::attach;
use super::nix_errno;
use super::overlay::mount_overlay;
use super::resolve::{clean, mkdir_all, open_in_root};

/// Mounts `volume` in the rootfs opened as `rootfd`.
pub(super) fn mount_image_volume(rootfd: &OwnedFd, volume: &ImageVolumeMount, plan: &Plan) -> Result<()> {
    let dest = volume.destination.display();
    let rel = clean(&volume.destination);
    if rel.as_os_str().is_empty() {
        return Err(Error::new(format!("image volume on {dest}: mounts on the container's root are not supported")));
    }
    mount_overlay(&volume.overlay, &volume.staging, plan)
        .map_err(|e| Error::new(format!("image volume on {dest}: {e}")))?;
    let tree = clone_sub_path(volume);
    // The clone keeps the overlay alive; the staging mount is no longer needed.
    let detached = umount2(&volume.staging, MntFlags::MNT_DETACH)
        .ctx(|| format!("image volume on {dest}: detach {}", volume.staging.display()));
    let tree = tree?;
    detached?;
    let point = mkdir_all(rootfd, &rel)?;
    attach(&tree, &point).ctx(|| format!("image volume on {dest}: attach"))
}

/// A detached, read-only clone of the image's `sub_path` directory (of its root when empty).
fn clone_sub_path(volume: &ImageVolumeMount) -> Result<OwnedFd> {
    let dest = volume.destination.display();
    let root = nix::fcntl::open(&volume.staging, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .ctx(|| format!("image volume on {dest}: open the image's root"))?;
    let sub =
        open_in_root(&root, &volume.sub_path, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).map_err(|e| {
            let sub = volume.sub_path.display();
            Error::new(match e {
                Errno::ENOENT => format!("image volume on {dest}: sub path {sub:?} does not exist in the image"),
                Errno::ENOTDIR => format!("image volume on {dest}: sub path {sub:?} is not a directory in the image"),
                e => format!("image volume on {dest}: sub path {sub:?}: {}", errno_desc(e)),
            })
        })?;
    let flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_EMPTY_PATH;
    let tree = rustix::mount::open_tree(&sub, c"", flags)
        .map_err(nix_errno)
        .ctx(|| format!("image volume on {dest}: clone the image's directory"))?;
    // Read-only whatever the request said (CreateContainer refuses a writable one); no device
    // node of an image opens through it.
    let attrs = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NODEV;
    crate::mount_setattr::mount_setattr(tree.as_fd(), c"", libc::AT_EMPTY_PATH as libc::c_uint, attrs, None)
        .ctx(|| format!("image volume on {dest}: make it read-only"))?;
    Ok(tree)
}
