//! /dev: a tmpfs with the default devices, the spec's devices, and the standard links.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MsFlags, mount};
use nix::sys::stat::{Mode, SFlag};
use oci_spec::runtime::LinuxDeviceType;

use crate::idmap::Mappings;
use crate::{Context, Error, Result, errno_desc};

use super::own_created;
use super::resolve::{at, clean, mkdir_all, open_in_root};

/// The device nodes every container gets in a tmpfs /dev, as runc: (name, major, minor).
pub(super) const DEFAULT_DEVICES: [(&str, u64, u64); 6] =
    [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)];

pub(super) fn setup_dev(
    rootfd: &OwnedFd,
    devices: &[oci_spec::runtime::LinuxDevice],
    userns: Option<&Mappings>,
) -> Result<()> {
    // Device owners are container ids; in a user namespace the nodes belong to their host ids.
    let owner = |uid: u32, gid: u32, path: &Path| -> Result<(u32, u32)> {
        match userns {
            None => Ok((uid, gid)),
            Some(m) => m.host_uid(uid).zip(m.host_gid(gid)).ok_or_else(|| {
                Error::new(format!("device {}: owner {uid}:{gid} is not mapped in the user namespace", path.display()))
            }),
        }
    };
    for (name, major, minor) in DEFAULT_DEVICES {
        let rel = Path::new("dev").join(name);
        let (uid, gid) = owner(0, 0, &rel)?;
        create_device(rootfd, &rel, SFlag::S_IFCHR, major, minor, 0o666, uid, gid)?;
    }
    for device in devices {
        let rel = clean(device.path());
        if !rel.starts_with("dev") || rel == Path::new("dev") {
            return Err(Error::new(format!("device {}: not under /dev", device.path().display())));
        }
        let kind = match device.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(Error::new(format!("device {}: type \"a\" is not a device", device.path().display())));
            }
        };
        let mode = device.file_mode().unwrap_or(0o666) & 0o7777;
        let (major, minor) = (u64::try_from(device.major()).unwrap_or(0), u64::try_from(device.minor()).unwrap_or(0));
        let (uid, gid) = owner(device.uid().unwrap_or(0), device.gid().unwrap_or(0), device.path())?;
        create_device(rootfd, &rel, kind, major, minor, mode, uid, gid)?;
    }
    let dev = mkdir_all(rootfd, Path::new("dev"))?;
    let mut links = vec![
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    if Path::new("/proc/kcore").exists() {
        links.push(("core", "/proc/kcore"));
    }
    // /dev/ptmx is the devpts instance's (newinstance): a symlink, replacing any node.
    if open_in_root(rootfd, Path::new("dev/pts/ptmx"), OFlag::O_PATH, Mode::empty()).is_ok() {
        match nix::unistd::unlinkat(&dev, "ptmx", nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(Error::new(format!("remove /dev/ptmx: {}", errno_desc(e)))),
        }
        links.push(("ptmx", "pts/ptmx"));
    }
    for (name, target) in links {
        match nix::unistd::symlinkat(target, &dev, name) {
            Ok(()) => own_created(&dev, OsStr::new(name)).ctx(|| format!("chown /dev/{name}"))?,
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(Error::new(format!("symlink /dev/{name} -> {target}: {}", errno_desc(e)))),
        }
    }
    Ok(())
}

/// mknod, or (where mknod is not permitted) a bind mount of the host's node of the same path.
#[allow(clippy::too_many_arguments)]
pub(super) fn create_device(
    rootfd: &OwnedFd,
    rel: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<()> {
    let shown = format!("/{}", rel.display());
    let parent = mkdir_all(rootfd, rel.parent().unwrap_or(Path::new("dev")))?;
    let name = rel.file_name().ok_or_else(|| Error::new(format!("device {shown}: no file name")))?;
    match nix::unistd::unlinkat(&parent, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(Error::new(format!("remove {shown}: {}", errno_desc(e)))),
    }
    let dev = nix::sys::stat::makedev(major, minor);
    match nix::sys::stat::mknodat(&parent, name, kind, Mode::from_bits_truncate(mode), dev) {
        Ok(()) => {
            nix::unistd::fchownat(
                &parent,
                name,
                Some(uid.into()),
                Some(gid.into()),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .ctx(|| format!("chown {shown}"))?;
            // mknod applies the umask; the mode must be exact.
            nix::sys::stat::fchmodat(
                &parent,
                name,
                Mode::from_bits_truncate(mode),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .ctx(|| format!("chmod {shown}"))?;
            Ok(())
        }
        Err(Errno::EPERM) => {
            let host = Path::new("/").join(rel);
            // Only the very device may stand in: a CRI device's container path need not be where
            // the node has it.
            let same = nix::sys::stat::stat(&host).is_ok_and(|st| {
                st.st_rdev == dev && SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == kind
            });
            if !same {
                return Err(Error::new(format!(
                    "mknod {shown}: not permitted, and {} is not device {major}:{minor} to bind instead",
                    host.display()
                )));
            }
            nix::fcntl::openat(
                &parent,
                name,
                OFlag::O_CREAT | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .ctx(|| format!("create {shown}"))?;
            at(rootfd, rel, |t| mount(Some(&host), t, None::<&str>, MsFlags::MS_BIND, None::<&str>))
                .ctx(|| format!("bind mount {} on {shown} (mknod not permitted)", host.display()))
        }
        Err(e) => Err(Error::new(format!("mknod {shown}: {}", errno_desc(e)))),
    }
}
