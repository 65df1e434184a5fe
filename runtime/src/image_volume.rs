//! Image volumes (CRI `Mount.image`, `image_sub_path`): an image the kubelet pulled, mounted
//! read-only at a path of the container, whole or one directory of it.
//!
//! The image's layers (leased by the daemon's `node.rs` and kept in the container's record, so
//! that image GC keeps them while the container exists, whatever RemoveImage does meanwhile) are
//! an overlay, idmapped exactly like the rootfs's layers, over an upper directory of the
//! container's that nothing can write (init mounts only a read-only clone of it). `init` mounts
//! it in the container's mount namespace (`init/src/rootfs/image_volume.rs`), resolving the sub
//! path beneath the image's root with RESOLVE_IN_ROOT.
//!
//! CreateContainer checks the sub path first ([`check_sub_path`]), so that a missing one fails
//! the creation as the KEP asks (and as containerd does), not the start: the path is resolved
//! through the layers as overlayfs merges them (top layer first; a whiteout hides what is
//! below; an opaque directory hides the same directory below; a non-directory ends the merge),
//! one name at a time through directory descriptors and `fstatat(AT_SYMLINK_NOFOLLOW)`, so that
//! no symlink of the image is ever followed on the node: an image's symlink is read and resolved
//! again from the image's root (absolute target) or its directory, and `..` stops at the image's
//! root, as RESOLVE_IN_ROOT does at the start.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::Error;

/// An image mounted read-only in the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVolume {
    /// Where it appears in the container.
    pub container_path: String,
    /// The image as the kubelet named it (Mount.image.image).
    pub image: String,
    /// The image's id (its config digest): ContainerStatus' `mounts[].image.image_ref`.
    pub image_id: String,
    /// The directory of the image to mount, relative to its root; empty: the whole image.
    pub sub_path: String,
    /// The image's layer directories, top first (filled from the daemon's lease of them).
    pub lowerdirs: Vec<PathBuf>,
}

/// Checks what CreateContainer can check without the image: an absolute container path, and a
/// sub path that stays relative and never goes up (`..`), as the kubelet validates subPath.
pub(crate) fn validate(volume: &ImageVolume) -> Result<(), Error> {
    let bad = |why: String| Err(Error::InvalidSpec(format!("image volume at {}: {why}", volume.container_path)));
    let path = Path::new(&volume.container_path);
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return bad("container_path must be absolute without \"..\"".into());
    }
    if volume.image_id.is_empty() {
        return bad("the image was not resolved".into());
    }
    let sub = Path::new(&volume.sub_path);
    if sub.is_absolute() || sub.components().any(|c| c == Component::ParentDir) {
        return bad(format!("image_sub_path {:?} must be relative without \"..\"", volume.sub_path));
    }
    if volume.sub_path.as_bytes().contains(&0) {
        return bad("image_sub_path contains NUL".into());
    }
    Ok(())
}

/// Whether `sub_path` names a directory in the image made of `lowerdirs` (top first), resolved as
/// the overlay of them would resolve it beneath its root. The error names the sub path.
pub(crate) fn check_sub_path(volume: &ImageVolume) -> Result<(), Error> {
    if volume.sub_path.is_empty() {
        return Ok(());
    }
    let fail = |why: &str| {
        Err(Error::InvalidSpec(format!(
            "image volume at {}: image_sub_path {:?} {why} in image {}",
            volume.container_path, volume.sub_path, volume.image
        )))
    };
    match resolve(&volume.lowerdirs, Path::new(&volume.sub_path)) {
        Ok(Found::Directory) => Ok(()),
        Ok(Found::Missing) => fail("does not exist"),
        Ok(Found::NotDirectory) => fail("is not a directory"),
        Ok(Found::TooManyLinks) => fail("has too many levels of symbolic links"),
        Err(e) => fail(&format!("cannot be read ({e})")),
    }
}

/// Makes volume's directories under `dir` (in the container's directory: the overlay's upper and
/// work dirs, and where init mounts it first) and says how init mounts it. `lower_mappings`:
/// the rootfs layers' idmapping, which the image's layers (the same store) get too.
pub(crate) fn prepare(
    volume: &ImageVolume,
    dir: &Path,
    pod: &crate::Pod,
    lower_mappings: &[oci_spec::runtime::LinuxIdMapping],
) -> Result<init::ImageVolumeMount, Error> {
    let mut lowerdirs = volume.lowerdirs.clone();
    // overlayfs needs a lower dir: an image without layers is an empty directory.
    if lowerdirs.is_empty() {
        lowerdirs.push(dir.join("empty"));
    }
    let upperdir = dir.join("upper");
    let workdir = dir.join("work");
    let staging = dir.join("staging");
    for made in lowerdirs.iter().filter(|d| d.starts_with(dir)).chain([&upperdir, &workdir, &staging]) {
        std::fs::create_dir_all(made).map_err(Error::io(format!("cannot create {}", made.display())))?;
    }
    // The upper dir's root is the volume's root directory: the pod's root owns it, as the
    // rootfs's (nothing is ever written to it: init mounts the overlay read-only).
    if let Some(userns) = &pod.userns {
        let root = Some(userns.range.host_id);
        std::os::unix::fs::chown(&upperdir, root, root)
            .map_err(Error::io(format!("cannot give {} to the pod's root", upperdir.display())))?;
    }
    Ok(init::ImageVolumeMount {
        destination: PathBuf::from(&volume.container_path),
        overlay: init::OverlayRootfs {
            lowerdirs,
            upperdir,
            workdir,
            uid_mappings: lower_mappings.to_vec(),
            gid_mappings: lower_mappings.to_vec(),
        },
        staging,
        sub_path: PathBuf::from(&volume.sub_path),
    })
}

/// What a path names in the merged image.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Directory,
    NotDirectory,
    Missing,
    TooManyLinks,
}

/// One name looked up in a merged directory (given as the directories of the layers that make
/// it, top first).
enum Entry {
    Missing,
    /// The layers' directories of that name that merge, top first.
    Directory(Vec<OwnedFd>),
    Symlink(PathBuf),
    Other,
}

const MAX_LINKS: usize = 40;

fn resolve(lowerdirs: &[PathBuf], path: &Path) -> std::io::Result<Found> {
    let open_dir = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut roots = Vec::with_capacity(lowerdirs.len());
    for dir in lowerdirs {
        roots.push(rustix::fs::open(dir, open_dir, Mode::empty())?);
    }
    // The merged directories from the root to where resolution is.
    let mut stack: Vec<Vec<OwnedFd>> = Vec::new();
    let mut remaining: VecDeque<OsString> = names(path);
    let mut links = 0;
    while let Some(name) = remaining.pop_front() {
        if name == ".." {
            stack.pop();
            continue;
        }
        let current = stack.last().unwrap_or(&roots);
        match lookup(current, &name)? {
            Entry::Missing => return Ok(Found::Missing),
            Entry::Directory(dirs) => stack.push(dirs),
            Entry::Other if remaining.is_empty() => return Ok(Found::NotDirectory),
            Entry::Other => return Ok(Found::Missing),
            Entry::Symlink(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return Ok(Found::TooManyLinks);
                }
                if target.is_absolute() {
                    stack.clear();
                }
                for name in names(&target).into_iter().rev() {
                    remaining.push_front(name);
                }
            }
        }
    }
    Ok(Found::Directory)
}

/// The names of `path` in order: `..` kept (resolved against the merged tree), `.` and `/` dropped.
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

fn lookup(dirs: &[OwnedFd], name: &std::ffi::OsStr) -> std::io::Result<Entry> {
    let mut merged = Vec::new();
    for dir in dirs {
        let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let kind = FileType::from_raw_mode(stat.st_mode);
        // overlayfs' whiteout: a 0:0 character device hides the name in the layers below.
        if kind == FileType::CharacterDevice && stat.st_rdev == 0 {
            break;
        }
        if kind != FileType::Directory {
            if !merged.is_empty() {
                // Below a directory, a non-directory is hidden.
                break;
            }
            if kind == FileType::Symlink {
                let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
                return Ok(Entry::Symlink(PathBuf::from(std::ffi::OsStr::from_bytes(target.as_bytes()))));
            }
            return Ok(Entry::Other);
        }
        let opened = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        let opaque = is_opaque(&opened);
        merged.push(opened);
        if opaque {
            break;
        }
    }
    Ok(if merged.is_empty() { Entry::Missing } else { Entry::Directory(merged) })
}

/// An opaque directory (the store sets overlayfs' xattr) hides the same directory below.
fn is_opaque(dir: &OwnedFd) -> bool {
    let mut value = [0u8; 4];
    matches!(rustix::fs::fgetxattr(dir, "trusted.overlay.opaque", &mut value), Ok(1) if value[0] == b'y')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn volume(lowerdirs: Vec<PathBuf>, sub_path: &str) -> ImageVolume {
        ImageVolume {
            container_path: "/mnt/v".into(),
            image: "img".into(),
            image_id: "sha256:00".into(),
            sub_path: sub_path.into(),
            lowerdirs,
        }
    }

    /// Two layers: `top` over `bottom`; a node directory `outside` next to them that no
    /// resolution may reach.
    fn layers() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("top");
        let bottom = tmp.path().join("bottom");
        for d in ["top/etc", "bottom/etc/ssl", "bottom/usr/share", "outside/secret"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        std::fs::write(bottom.join("etc/passwd"), "root").unwrap();
        (tmp, top, bottom)
    }

    fn found(lowerdirs: &[PathBuf], path: &str) -> Found {
        resolve(lowerdirs, Path::new(path)).unwrap()
    }

    #[test]
    fn directories_of_every_layer_merge() {
        let (_tmp, top, bottom) = layers();
        let lowers = [top, bottom];
        assert_eq!(found(&lowers, "etc"), Found::Directory);
        assert_eq!(found(&lowers, "etc/ssl"), Found::Directory);
        assert_eq!(found(&lowers, "usr/share/"), Found::Directory);
        assert_eq!(found(&lowers, "./usr/./share"), Found::Directory);
        assert_eq!(found(&lowers, "etc/passwd"), Found::NotDirectory);
        assert_eq!(found(&lowers, "nothing"), Found::Missing);
        assert_eq!(found(&lowers, "etc/passwd/x"), Found::Missing);
    }

    #[test]
    fn a_file_of_an_upper_layer_hides_a_directory_below() {
        let (_tmp, top, bottom) = layers();
        std::fs::write(top.join("usr"), "a file").unwrap();
        assert_eq!(found(&[top, bottom], "usr/share"), Found::Missing);
    }

    #[test]
    fn symlinks_of_the_image_resolve_inside_the_image() {
        let (tmp, top, bottom) = layers();
        // An absolute link to the node's directory, and relative ones climbing out of the layer.
        symlink(tmp.path().join("outside"), top.join("abs")).unwrap();
        symlink("../../../../../outside", top.join("climb")).unwrap();
        symlink("/etc/ssl", top.join("certs")).unwrap();
        symlink("../../usr", top.join("etc/up")).unwrap();
        symlink("loop", top.join("loop")).unwrap();
        let lowers = [top, bottom];
        // `<tmp>/outside` does not exist in the image; `/outside` neither.
        assert_eq!(found(&lowers, "abs"), Found::Missing);
        assert_eq!(found(&lowers, "climb"), Found::Missing);
        assert_eq!(found(&lowers, "climb/secret"), Found::Missing);
        assert_eq!(found(&lowers, "certs"), Found::Directory);
        assert_eq!(found(&lowers, "etc/up/share"), Found::Directory);
        assert_eq!(found(&lowers, "loop"), Found::TooManyLinks);
        // The same names, once the node's directory is in the image, resolve to the image's.
        std::fs::create_dir_all(lowers[1].join("outside")).unwrap();
        assert_eq!(found(&lowers, "climb"), Found::Directory);
        assert_eq!(found(&lowers, "climb/secret"), Found::Missing);
    }

    #[test]
    fn a_layer_that_is_a_symlink_is_not_followed() {
        let (tmp, _top, bottom) = layers();
        let link = tmp.path().join("link-layer");
        symlink(&bottom, &link).unwrap();
        assert!(resolve(&[link], Path::new("etc")).is_err());
    }

    #[test]
    fn whiteouts_and_opaque_directories_hide_what_is_below() {
        let (_tmp, top, bottom) = layers();
        let whiteout = top.join("usr");
        if rustix::fs::mknodat(rustix::fs::CWD, &whiteout, FileType::CharacterDevice, Mode::empty(), 0).is_err() {
            eprintln!("skipped: mknod needs root");
            return;
        }
        let etc = rustix::fs::open(top.join("etc"), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        rustix::fs::fsetxattr(&etc, "trusted.overlay.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
        let lowers = [top, bottom];
        assert_eq!(found(&lowers, "usr"), Found::Missing);
        assert_eq!(found(&lowers, "usr/share"), Found::Missing);
        assert_eq!(found(&lowers, "etc"), Found::Directory);
        assert_eq!(found(&lowers, "etc/ssl"), Found::Missing);
    }

    #[test]
    fn check_and_validate_name_the_sub_path() {
        let (_tmp, top, bottom) = layers();
        let lowers = vec![top, bottom];
        assert!(check_sub_path(&volume(lowers.clone(), "etc")).is_ok());
        assert!(check_sub_path(&volume(lowers.clone(), "")).is_ok());
        let missing = check_sub_path(&volume(lowers.clone(), "not-existing")).unwrap_err().to_string();
        assert!(missing.contains("image_sub_path \"not-existing\" does not exist"), "{missing}");
        let file = check_sub_path(&volume(lowers.clone(), "etc/passwd")).unwrap_err().to_string();
        assert!(file.contains("is not a directory"), "{file}");
        for bad in ["/etc", "../etc", "etc/../../x"] {
            let e = validate(&volume(lowers.clone(), bad)).unwrap_err().to_string();
            assert!(e.contains("image_sub_path") && e.contains("relative without"), "{e}");
        }
        assert!(validate(&volume(lowers, "etc/ssl")).is_ok());
    }
}
