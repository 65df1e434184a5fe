//! The container's file system, set up by the forked child in its new mount namespace: `/` made
//! rslave (nothing propagates back to the host), the overlay rootfs, the spec's mounts resolved
//! inside the rootfs, image volumes (`image_volume.rs`), /dev, pivot_root; then (after
//! pivot_root) masked and read-only paths.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;

use crate::namespaces::Plan;
use crate::{Context, Error, InitSpec, Result};

mod cgroupfs;
mod devices;
mod image_volume;
mod mounts;
mod options;
mod overlay;
mod pivot;
mod resolve;

use devices::setup_dev;
use image_volume::mount_image_volume;
use mounts::{clone_bind_source, is_bind, make_parent_mount_private, mount_one};
use options::{MountOption, parse_option};
use overlay::mount_overlay;
use pivot::pivot_root;

use crate::hooks::Stage;
use resolve::clean;

pub(crate) use pivot::{create_cwd, mask_path, readonly_path, remount_root_readonly};
pub(crate) use resolve::open_in_root;

/// A rustix error as nix's, which the rest of init uses.
fn nix_errno(e: rustix::io::Errno) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error())
}

/// The host uid and gid of the container's root when it runs in a user namespace: what init
/// creates in the container's tree (mount points, devices, the working directory) is owned by
/// them, as it would be had root of the namespace made it. Set once, by `setup` (init is a
/// single-threaded process that sets up one container).
static CREATED_OWNER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();

/// Gives `name` in `dir` (just created by init) to the container's root, if it is not the node's.
fn own_created(dir: &impl AsFd, name: &OsStr) -> nix::Result<()> {
    match CREATED_OWNER.get() {
        Some((uid, gid)) => nix::unistd::fchownat(
            dir,
            name,
            Some(nix::unistd::Uid::from_raw(*uid)),
            Some(nix::unistd::Gid::from_raw(*gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ),
        None => Ok(()),
    }
}

/// The overlay root alone, mounted at `target` in the caller's mount namespace, as [`setup`]
/// mounts it (a restore: CRIU then builds the container's mounts on it).
pub(crate) fn mount_overlay_at(overlay: &crate::OverlayRootfs, target: &Path, plan: &Plan) -> Result<()> {
    mount_overlay(overlay, target, plan)
}

/// Sets the rootfs up at `root.path` and pivots into it. On return, `/` is the container's root
/// and the host's file system is unreachable.
pub(crate) fn setup(spec: &InitSpec, plan: &Plan, host_pid: u32) -> Result<()> {
    let oci = &spec.oci;
    let root = oci.root().as_ref().map(|r| r.path().clone()).ok_or_else(|| Error::new("spec has no root"))?;
    let root = std::fs::canonicalize(&root).ctx(|| format!("rootfs {}", root.display()))?;
    let linux = oci.linux().as_ref();
    if let Some(userns) = plan.userns() {
        let owner = userns
            .host_uid(0)
            .zip(userns.host_gid(0))
            .ok_or_else(|| Error::new("the user namespace does not map root (id 0)"))?;
        let _ = CREATED_OWNER.set(owner);
    }

    // Nothing done from here on may reach the host's mount table.
    let propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        None | Some("") => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        Some(name) => match parse_option(name) {
            MountOption::Propagation(flags) => flags,
            _ => return Err(Error::new(format!("invalid rootfsPropagation {name:?}"))),
        },
    };
    mount(None::<&str>, "/", None::<&str>, propagation, None::<&str>).ctx(|| "make / a slave mount".into())?;
    // The pod's /dev/shm, at its path in this namespace only: the bind mount below finds it there.
    crate::pod_mounts::attach_trees(&plan.pod_trees)?;
    let mounts = oci.mounts().as_deref().unwrap_or_default();
    // Bind sources are cloned now, before the parent mount of the rootfs is made private: the
    // clones keep the propagation of their source (a peer of the host's mount for "rshared"
    // volumes, a slave of it for "rslave"), even when the source is on that same mount.
    let sources = mounts.iter().map(|m| clone_bind_source(oci, m, plan)).collect::<Result<Vec<_>>>()?;
    // pivot_root refuses a new root whose parent mount is shared (rootfsPropagation "rshared"),
    // and nothing mounted at the rootfs may propagate to the host. After a recursive change to
    // slave, private or unbindable (the default: rslave) no mount is shared: the search of
    // mountinfo for the parent mount, O(mounts on the node), is skipped.
    if !propagation.contains(MsFlags::MS_REC) || propagation.contains(MsFlags::MS_SHARED) {
        make_parent_mount_private(&root)?;
    }

    match &spec.rootfs {
        Some(overlay) => mount_overlay(overlay, &root, plan)?,
        None => mount(Some(&root), &root, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .ctx(|| format!("bind mount rootfs {} on itself", root.display()))?,
    }
    let rootfd = nix::fcntl::open(&root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .ctx(|| format!("open rootfs {}", root.display()))?;

    let mut dev_tmpfs = false;
    for (m, source) in mounts.iter().zip(sources) {
        mount_one(&rootfd, m, source, plan)?;
        if clean(m.destination()) == Path::new("dev") {
            dev_tmpfs = !is_bind(m);
        }
    }
    for volume in &spec.image_volumes {
        mount_image_volume(&rootfd, volume, plan)?;
    }
    if dev_tmpfs {
        setup_dev(&rootfd, linux.and_then(|l| l.devices().as_deref()).unwrap_or_default(), plan.userns())?;
    }
    drop(rootfd);
    // The rootfs is complete at root.path, in this mount namespace only: the hooks that work on
    // it (CDI's createContainer hooks: ld.so.cache, symlinks) run now, before it becomes "/".
    for stage in [Stage::Prestart, Stage::CreateRuntime, Stage::CreateContainer] {
        crate::hooks::run_stage(spec, stage, host_pid)?;
    }
    pivot_root(&root)
}
