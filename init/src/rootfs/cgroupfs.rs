//! The container's `cgroup` mount: a cgroup namespace's own view, or its own cgroup bound.

use std::os::fd::OwnedFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;

use crate::namespaces::Plan;
use crate::{Context, Error, Result, errno_desc};

use super::mounts::remount;
use super::options::MountOptions;
use super::resolve::{at, mkdir_all, open_in_root};

/// A `cgroup` mount (usually /sys/fs/cgroup, read-only): the container's own cgroup, as runc
/// shows it. cgroup v2: cgroup2 mounted in a new cgroup namespace, else the own cgroup bound.
/// v1 or hybrid: a tmpfs with, for each hierarchy, a fresh mount (cgroup namespace) or a bind of
/// the own cgroup, plus the host's symlinks (cpu -> cpu,cpuacct).
pub(super) fn mount_cgroup(rootfd: &OwnedFd, rel: &Path, opts: &MountOptions, plan: &Plan) -> Result<()> {
    let shown = format!("/{}", rel.display());
    let flags = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
    let host = Path::new("/sys/fs/cgroup");
    let statfs = nix::sys::statfs::statfs(host).ctx(|| "statfs /sys/fs/cgroup".into())?;
    let own = own_cgroups()?;
    if statfs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return mount_hierarchy(rootfd, rel, host, "cgroup2", "", flags, plan, &own)
            .map_err(|e| e.context(format!("cgroup on {shown}")));
    }
    at(rootfd, rel, |t| mount(Some("tmpfs"), t, Some("tmpfs"), flags & !MsFlags::MS_RDONLY, Some("mode=755")))
        .ctx(|| format!("mount tmpfs for cgroups on {shown}"))?;
    for hierarchy in crate::cgroup::mounts().ctx(|| "read /proc/self/mountinfo".into())? {
        let Some(name) = hierarchy.mount_point.strip_prefix("/sys/fs/cgroup/") else { continue };
        if name.contains('/') {
            continue;
        }
        let options = hierarchy.controllers.join(",");
        let sub = rel.join(name);
        mkdir_all(rootfd, &sub)?;
        let mount_point = Path::new(&hierarchy.mount_point);
        mount_hierarchy(rootfd, &sub, mount_point, hierarchy.fstype(), &options, flags, plan, &own)
            .map_err(|e| e.context(format!("cgroup {name} on {shown}/{name}")))?;
    }
    let entries = std::fs::read_dir(host).ctx(|| "read /sys/fs/cgroup".into())?;
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        let link = rel.join(entry.file_name());
        let dir = open_in_root(rootfd, rel, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
            .ctx(|| format!("open {shown}"))?;
        match nix::unistd::symlinkat(&target, &dir, entry.file_name().as_os_str()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(Error::new(format!("symlink /{}: {}", link.display(), errno_desc(e)))),
        }
    }
    if flags.contains(MsFlags::MS_RDONLY) {
        at(rootfd, rel, |t| remount(t, flags)).ctx(|| format!("remount {shown} read-only"))?;
    }
    Ok(())
}

/// One cgroup hierarchy at `rel`: mounted fresh in a new cgroup namespace (its root is the
/// container's cgroup), else the container's own cgroup directory bound from the host mount.
#[allow(clippy::too_many_arguments)]
pub(super) fn mount_hierarchy(
    rootfd: &OwnedFd,
    rel: &Path,
    host_mount: &Path,
    fstype: &str,
    options: &str,
    flags: MsFlags,
    plan: &Plan,
    own: &[(String, String)],
) -> Result<()> {
    if plan.new_cgroup {
        let data = Some(options).filter(|o| !o.is_empty());
        return at(rootfd, rel, |t| mount(Some("cgroup"), t, Some(fstype), flags, data))
            .ctx(|| format!("mount {fstype}"));
    }
    // The hierarchy's line in /proc/self/cgroup: "0::/path" for cgroup2, else the controllers
    // (or name=...) listed in the mount's super options.
    let wanted: Vec<&str> =
        options.split(',').filter(|o| !o.is_empty() && *o != "xattr" && !o.starts_with("release_agent")).collect();
    let path = own
        .iter()
        .find(|(controllers, _)| {
            if fstype == "cgroup2" {
                controllers.is_empty()
            } else {
                let have: Vec<&str> = controllers.split(',').collect();
                !wanted.is_empty() && wanted.iter().all(|w| have.contains(w))
            }
        })
        .map(|(_, path)| path.clone())
        .ok_or_else(|| Error::new(format!("no entry in /proc/self/cgroup for {}", host_mount.display())))?;
    let source = host_mount.join(path.trim_start_matches('/'));
    at(rootfd, rel, |t| mount(Some(&source), t, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>))
        .ctx(|| format!("bind {}", source.display()))?;
    at(rootfd, rel, |t| remount(t, flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC))
        .ctx(|| format!("remount {}", source.display()))
}

/// (controllers, path) of each line of /proc/self/cgroup.
pub(super) fn own_cgroups() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ctx(|| "read /proc/self/cgroup".into())?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect())
}
