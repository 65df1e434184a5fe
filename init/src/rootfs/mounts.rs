//! The spec's mounts: bind mounts (idmapped ones too, from detached trees) and file systems,
//! their remounts (read-only, locked flags kept), and the propagation of the rootfs's parent.

use std::ffi::{CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;
use oci_spec::runtime::Mount;
use rustix::mount::{MoveMountFlags, OpenTreeFlags};

use crate::idmap::{self, Mappings};
use crate::namespaces::Plan;
use crate::{Context, Error, Result};

use super::cgroupfs::mount_cgroup;
use super::nix_errno;
use super::options::parse_options;
use super::resolve::{at, clean, create_file, mkdir_all, open_in_root};

/// A bind mount's source, cloned (a detached mount tree) and ready to be attached.
#[derive(Debug)]
pub(super) struct BindSource {
    path: PathBuf,
    is_dir: bool,
    tree: OwnedFd,
}

pub(super) fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options().as_deref().unwrap_or_default().iter().any(|o| o == "bind" || o == "rbind")
}

/// open_tree(OPEN_TREE_CLONE) of a bind mount's source (recursive for rbind), idmapped if the
/// mount has id mappings (`ridmap`: its submounts too); None for other mounts.
pub(super) fn clone_bind_source(spec: &oci_spec::runtime::Spec, m: &Mount, plan: &Plan) -> Result<Option<BindSource>> {
    if !is_bind(m) {
        return Ok(None);
    }
    let dest = m.destination().display();
    let source = m.source().as_ref().ok_or_else(|| Error::new(format!("bind mount on {dest}: no source")))?;
    // A host path given as a symlink is resolved on the host, before the mount.
    let path = std::fs::canonicalize(source).ctx(|| format!("bind mount source {} for {dest}", source.display()))?;
    let is_dir = std::fs::metadata(&path).ctx(|| format!("bind mount source {}", path.display()))?.is_dir();
    let recursive = m.options().as_deref().unwrap_or_default().iter().any(|o| o == "rbind");
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(Error::new(format!("bind mount source for {dest} contains NUL")));
    }
    let tree = rustix::mount::open_tree(rustix::fs::CWD, &path, flags)
        .map_err(nix_errno)
        .ctx(|| format!("clone bind mount source {} for {dest}", path.display()))?;
    if let Some(mappings) = idmap::mount_mappings(spec, m)? {
        let userns = plan
            .idmaps
            .get(&mappings)
            .ok_or_else(|| Error::new(format!("bind mount on {dest}: no user namespace for its id mapping")))?;
        let all = m.options().as_deref().unwrap_or_default().iter().any(|o| o == "ridmap");
        idmap::idmap_tree(&tree, userns, all)
            .map_err(|e| Error::new(format!("idmapped bind mount {} on {dest}: {e}", path.display())))?;
    }
    Ok(Some(BindSource { path, is_dir, tree }))
}

/// move_mount of a detached tree onto `target` (an fd of the mount point).
pub(super) fn attach(tree: &OwnedFd, target: &OwnedFd) -> nix::Result<()> {
    let flags = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH;
    rustix::mount::move_mount(tree, c"", target, c"", flags).map_err(nix_errno)
}

pub(super) fn mount_one(rootfd: &OwnedFd, m: &Mount, source: Option<BindSource>, plan: &Plan) -> Result<()> {
    let dest = m.destination();
    let rel = clean(dest);
    if rel.as_os_str().is_empty() {
        return Err(Error::new(format!(
            "mount on {}: mounts on the container's root are not supported",
            dest.display()
        )));
    }
    let typ = m.typ().as_deref().unwrap_or("");
    let opts = parse_options(m.options().as_deref().unwrap_or_default(), dest)?;
    let shown = dest.display();

    if let Some(source) = source {
        if source.is_dir {
            mkdir_all(rootfd, &rel)?;
        } else {
            create_file(rootfd, &rel)?;
        }
        open_in_root(rootfd, &rel, OFlag::O_PATH, Mode::empty())
            .and_then(|target| attach(&source.tree, &target))
            .ctx(|| format!("bind mount {} on {shown}", source.path.display()))?;
        // Flags other than bind (ro, nosuid, ...) need a remount of the new mount.
        let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        // `ro` is the bind mount's own (as runc's remount): sub-mounts stay as they are unless
        // `rro` asks for them too (CRI recursive_read_only; critest checks both).
        let recursive_ro = opts.recursive_readonly;
        if !extra.is_empty() {
            at(rootfd, &rel, |target| remount(target, extra))
                .ctx(|| format!("remount {shown} ({})", flag_names(extra)))?;
        }
        if recursive_ro {
            at(rootfd, &rel, set_readonly_recursive).ctx(|| format!("make {shown} read-only recursively"))?;
        }
    } else if typ == "cgroup" || typ == "cgroup2" {
        mkdir_all(rootfd, &rel)?;
        mount_cgroup(rootfd, &rel, &opts, plan)?;
    } else {
        if typ.is_empty() {
            return Err(Error::new(format!("mount on {shown}: no type")));
        }
        mkdir_all(rootfd, &rel)?;
        let source = m.source().as_ref().map(|s| s.as_os_str()).unwrap_or(OsStr::new(typ));
        let data = match plan.userns() {
            Some(userns) => {
                data_in_userns(typ, &opts.data, userns).map_err(|e| e.context(format!("mount {typ} on {shown}")))?
            }
            None => opts.data.join(","),
        };
        let flags = opts.flags & !MsFlags::MS_REMOUNT;
        at(rootfd, &rel, |target| {
            mount(Some(source), target, Some(typ), flags, Some(data.as_str()).filter(|d| !d.is_empty()))
        })
        .ctx(|| format!("mount {typ} on {shown}"))?;
        if opts.recursive_readonly {
            at(rootfd, &rel, set_readonly_recursive).ctx(|| format!("make {shown} read-only recursively"))?;
        }
    }
    for propagation in &opts.propagation {
        at(rootfd, &rel, |target| mount(None::<&str>, target, None::<&str>, *propagation, None::<&str>))
            .ctx(|| format!("set propagation of {shown} ({})", flag_names(*propagation)))?;
    }
    Ok(())
}

/// Mount data for a mount init makes as the node's root on behalf of a container in a user
/// namespace: `uid=`/`gid=` options name container ids, translated to host ids; a tmpfs root
/// belongs to the container's root (who would have mounted it).
pub(super) fn data_in_userns(typ: &str, data: &[String], userns: &Mappings) -> Result<String> {
    let mut out = Vec::with_capacity(data.len() + 2);
    let (mut uid_given, mut gid_given) = (false, false);
    for option in data {
        let translated = match option.split_once('=') {
            Some((key @ ("uid" | "gid"), value)) => {
                let id: u32 = value.parse().map_err(|_| Error::invalid(format!("option {option}: not an id")))?;
                let host = if key == "uid" { userns.host_uid(id) } else { userns.host_gid(id) };
                let host = host.ok_or_else(|| {
                    Error::invalid(format!("option {option}: id {id} is not mapped in the user namespace"))
                })?;
                if key == "uid" {
                    uid_given = true
                } else {
                    gid_given = true
                }
                format!("{key}={host}")
            }
            _ => option.clone(),
        };
        out.push(translated);
    }
    if typ == "tmpfs" {
        if let (false, Some(uid)) = (uid_given, userns.host_uid(0)) {
            out.push(format!("uid={uid}"));
        }
        if let (false, Some(gid)) = (gid_given, userns.host_gid(0)) {
            out.push(format!("gid={gid}"));
        }
    }
    Ok(out.join(","))
}

/// Remounts the bind mount at `target` with `flags` (ro, nosuid, ...), keeping the flags it
/// already has that could be locked (nosuid, nodev, noexec, atime flags) unless asked to clear them.
pub(super) fn remount(target: &str, flags: MsFlags) -> nix::Result<()> {
    let base = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    match mount(None::<&str>, target, None::<&str>, base | flags, None::<&str>) {
        Err(Errno::EPERM) => {
            let current = statvfs_flags(target)?;
            mount(None::<&str>, target, None::<&str>, base | flags | current, None::<&str>)
        }
        other => other,
    }
}

pub(super) fn statvfs_flags(path: &str) -> nix::Result<MsFlags> {
    use nix::sys::statvfs::FsFlags;
    let st = nix::sys::statvfs::statvfs(path)?;
    let f = st.flags();
    let mut flags = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) {
            flags |= ms;
        }
    }
    Ok(flags)
}

/// mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY): the mount at `target` and all its submounts.
pub(super) fn set_readonly_recursive(target: &str) -> nix::Result<()> {
    let path = CString::new(target).map_err(|_| Errno::EINVAL)?;
    let recursive = libc::AT_RECURSIVE as libc::c_uint;
    crate::mount_setattr::mount_setattr(rustix::fs::CWD, &path, recursive, libc::MOUNT_ATTR_RDONLY, None)
}

pub(super) fn flag_names(flags: MsFlags) -> String {
    let names = [
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_NOSUID, "nosuid"),
        (MsFlags::MS_NODEV, "nodev"),
        (MsFlags::MS_NOEXEC, "noexec"),
        (MsFlags::MS_SYNCHRONOUS, "sync"),
        (MsFlags::MS_DIRSYNC, "dirsync"),
        (MsFlags::MS_NOATIME, "noatime"),
        (MsFlags::MS_NODIRATIME, "nodiratime"),
        (MsFlags::MS_RELATIME, "relatime"),
        (MsFlags::MS_STRICTATIME, "strictatime"),
        (MsFlags::MS_PRIVATE, "private"),
        (MsFlags::MS_SHARED, "shared"),
        (MsFlags::MS_SLAVE, "slave"),
        (MsFlags::MS_UNBINDABLE, "unbindable"),
        (MsFlags::MS_REC, "recursive"),
    ];
    names.iter().filter(|(f, _)| flags.contains(*f)).map(|(_, n)| *n).collect::<Vec<_>>().join(",")
}

/// Makes the mount that holds `root` private if it is shared: pivot_root needs that.
pub(super) fn make_parent_mount_private(root: &Path) -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo".into())?;
    let mut best: Option<(PathBuf, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        let Some(mount_point) = fields.get(4) else { continue };
        let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
        if !root.starts_with(&mount_point) {
            continue;
        }
        let shared = fields[6..sep].iter().any(|f| f.starts_with("shared:"));
        // Later lines of the same mount point are mounted over the earlier ones.
        if best.as_ref().is_none_or(|(p, _)| mount_point.components().count() >= p.components().count()) {
            best = Some((mount_point, shared));
        }
    }
    if let Some((mount_point, true)) = best {
        mount(None::<&str>, &mount_point, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>)
            .ctx(|| format!("make {} private", mount_point.display()))?;
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
pub(super) fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_data_in_a_user_namespace_names_host_ids() {
        let line = |c: u32, h: u32, n: u32| -> oci_spec::runtime::LinuxIdMapping {
            serde_json::from_value(serde_json::json!({"containerID": c, "hostID": h, "size": n})).unwrap()
        };
        let userns = Mappings { uids: vec![line(0, 0x9_0000, 65536)], gids: vec![line(0, 0x9_0000, 65536)] };
        let data = |typ: &str, options: &[&str]| {
            data_in_userns(typ, &options.iter().map(|o| o.to_string()).collect::<Vec<_>>(), &userns)
        };
        assert_eq!(data("tmpfs", &["mode=755"]).unwrap(), "mode=755,uid=589824,gid=589824");
        assert_eq!(data("tmpfs", &["uid=1000", "mode=1777"]).unwrap(), "uid=590824,mode=1777,gid=589824");
        assert_eq!(data("devpts", &["newinstance", "gid=5"]).unwrap(), "newinstance,gid=589829");
        assert_eq!(data("mqueue", &[]).unwrap(), "");
        assert!(data("devpts", &["gid=70000"]).unwrap_err().to_string().contains("not mapped"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
