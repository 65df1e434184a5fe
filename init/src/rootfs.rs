//! The container's file system, set up by the forked child in its new mount namespace: `/` made
//! rslave (nothing propagates back to the host), the overlay rootfs, the spec's mounts resolved
//! inside the rootfs, /dev, pivot_root; then (after pivot_root) masked and read-only paths.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag};
use oci_spec::runtime::{LinuxDeviceType, Mount};

use crate::idmap::{self, Mappings};
use crate::namespaces::Plan;
use crate::{Context, Error, InitSpec, OverlayRootfs, Result, errno_desc};

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

/// mount(2) copies its data argument into one page: longer overlay options need the new mount API.
const MOUNT_DATA_MAX: usize = 4096 - 1;

/// Sets the rootfs up at `root.path` and pivots into it. On return, `/` is the container's root
/// and the host's file system is unreachable.
pub(crate) fn setup(spec: &InitSpec, plan: &Plan) -> Result<()> {
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
    let mounts = oci.mounts().as_deref().unwrap_or_default();
    // Bind sources are cloned now, before the parent mount of the rootfs is made private: the
    // clones keep the propagation of their source (a peer of the host's mount for "rshared"
    // volumes, a slave of it for "rslave"), even when the source is on that same mount.
    let sources = mounts.iter().map(|m| clone_bind_source(oci, m, plan)).collect::<Result<Vec<_>>>()?;
    // pivot_root refuses a new root whose parent mount is shared (rootfsPropagation "rshared"),
    // and nothing mounted at the rootfs may propagate to the host.
    make_parent_mount_private(&root)?;

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
    if dev_tmpfs {
        setup_dev(&rootfd, linux.and_then(|l| l.devices().as_deref()).unwrap_or_default(), plan.userns())?;
    }
    drop(rootfd);
    pivot_root(&root)
}

/// The destination as a path relative to the container's root ("/dev/pts" -> "dev/pts"),
/// `..` resolved lexically (it cannot go above the root either way).
fn clean(path: &Path) -> PathBuf {
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

// --- resolution inside the rootfs ----------------------------------------------------------------

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
fn mkdir_all(rootfd: &OwnedFd, rel: &Path) -> Result<OwnedFd> {
    mkdir_all_at_depth(rootfd, rel, 0)
}

fn mkdir_all_at_depth(rootfd: &OwnedFd, rel: &Path, links: usize) -> Result<OwnedFd> {
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
fn create_file(rootfd: &OwnedFd, rel: &Path) -> Result<()> {
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
fn at<T>(rootfd: &OwnedFd, rel: &Path, f: impl FnOnce(&str) -> nix::Result<T>) -> nix::Result<T> {
    let fd = open_in_root(rootfd, rel, OFlag::O_PATH, Mode::empty())?;
    f(&format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

// --- mount options --------------------------------------------------------------------------------

enum MountOption {
    Set(MsFlags),
    Clear(MsFlags),
    Propagation(MsFlags),
    /// `rro`: read-only, recursively (mount_setattr).
    RecursiveReadonly,
    Ignored,
    Unsupported,
    Data,
}

fn parse_option(option: &str) -> MountOption {
    use MountOption::*;
    use MsFlags as F;
    match option {
        "defaults" => Set(F::empty()),
        "ro" => Set(F::MS_RDONLY),
        "rw" => Clear(F::MS_RDONLY),
        "suid" => Clear(F::MS_NOSUID),
        "nosuid" => Set(F::MS_NOSUID),
        "dev" => Clear(F::MS_NODEV),
        "nodev" => Set(F::MS_NODEV),
        "exec" => Clear(F::MS_NOEXEC),
        "noexec" => Set(F::MS_NOEXEC),
        "sync" => Set(F::MS_SYNCHRONOUS),
        "async" => Clear(F::MS_SYNCHRONOUS),
        "dirsync" => Set(F::MS_DIRSYNC),
        "mand" => Set(F::MS_MANDLOCK),
        "nomand" => Clear(F::MS_MANDLOCK),
        "atime" => Clear(F::MS_NOATIME),
        "noatime" => Set(F::MS_NOATIME),
        "diratime" => Clear(F::MS_NODIRATIME),
        "nodiratime" => Set(F::MS_NODIRATIME),
        "relatime" => Set(F::MS_RELATIME),
        "norelatime" => Clear(F::MS_RELATIME),
        "strictatime" => Set(F::MS_STRICTATIME),
        "nostrictatime" => Clear(F::MS_STRICTATIME),
        "lazytime" => Set(F::MS_LAZYTIME),
        "nolazytime" => Clear(F::MS_LAZYTIME),
        "iversion" => Set(F::MS_I_VERSION),
        "noiversion" => Clear(F::MS_I_VERSION),
        "silent" => Set(F::MS_SILENT),
        "loud" => Clear(F::MS_SILENT),
        "bind" => Set(F::MS_BIND),
        "rbind" => Set(F::MS_BIND | F::MS_REC),
        "remount" => Set(F::MS_REMOUNT),
        "private" => Propagation(F::MS_PRIVATE),
        "rprivate" => Propagation(F::MS_PRIVATE | F::MS_REC),
        "shared" => Propagation(F::MS_SHARED),
        "rshared" => Propagation(F::MS_SHARED | F::MS_REC),
        "slave" => Propagation(F::MS_SLAVE),
        "rslave" => Propagation(F::MS_SLAVE | F::MS_REC),
        "unbindable" => Propagation(F::MS_UNBINDABLE),
        "runbindable" => Propagation(F::MS_UNBINDABLE | F::MS_REC),
        "rro" => RecursiveReadonly,
        // tmpfs copy-up of the image's content under a tmpfs mount: not done (the mount is empty).
        "tmpcopyup" => Ignored,
        // Applied when the source is cloned (clone_bind_source).
        "idmap" | "ridmap" => Ignored,
        "rrw" | "rnosuid" | "rsuid" | "rnodev" | "rdev" | "rnoexec" | "rexec" | "rnoatime" | "ratime" | "rrelatime"
        | "rnorelatime" | "rstrictatime" | "rnostrictatime" | "rnodiratime" | "rdiratime" => Unsupported,
        _ => Data,
    }
}

#[derive(Debug)]
struct MountOptions {
    flags: MsFlags,
    propagation: Vec<MsFlags>,
    recursive_readonly: bool,
    data: Vec<String>,
}

fn parse_options(options: &[String], dest: &Path) -> Result<MountOptions> {
    let mut parsed =
        MountOptions { flags: MsFlags::empty(), propagation: Vec::new(), recursive_readonly: false, data: Vec::new() };
    for option in options {
        match parse_option(option) {
            MountOption::Set(f) => parsed.flags |= f,
            MountOption::Clear(f) => parsed.flags &= !f,
            MountOption::Propagation(f) => parsed.propagation.push(f),
            MountOption::RecursiveReadonly => parsed.recursive_readonly = true,
            MountOption::Ignored => {}
            MountOption::Unsupported => {
                return Err(Error::invalid(format!("mount {}: option {option:?} is not supported", dest.display())));
            }
            MountOption::Data => parsed.data.push(option.clone()),
        }
    }
    Ok(parsed)
}

// --- mounts ---------------------------------------------------------------------------------------

/// A bind mount's source, cloned (a detached mount tree) and ready to be attached.
#[derive(Debug)]
struct BindSource {
    path: PathBuf,
    is_dir: bool,
    tree: OwnedFd,
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options().as_deref().unwrap_or_default().iter().any(|o| o == "bind" || o == "rbind")
}

/// open_tree(OPEN_TREE_CLONE) of a bind mount's source (recursive for rbind), idmapped if the
/// mount has id mappings (`ridmap`: its submounts too); None for other mounts.
fn clone_bind_source(spec: &oci_spec::runtime::Spec, m: &Mount, plan: &Plan) -> Result<Option<BindSource>> {
    if !is_bind(m) {
        return Ok(None);
    }
    let dest = m.destination().display();
    let source = m.source().as_ref().ok_or_else(|| Error::new(format!("bind mount on {dest}: no source")))?;
    // A host path given as a symlink is resolved on the host, before the mount.
    let path = std::fs::canonicalize(source).ctx(|| format!("bind mount source {} for {dest}", source.display()))?;
    let is_dir = std::fs::metadata(&path).ctx(|| format!("bind mount source {}", path.display()))?.is_dir();
    let recursive = m.options().as_deref().unwrap_or_default().iter().any(|o| o == "rbind");
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let flags = OPEN_TREE_CLONE
        | libc::O_CLOEXEC as libc::c_uint
        | if recursive { libc::AT_RECURSIVE as libc::c_uint } else { 0 };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::new(format!("bind mount source for {dest} contains NUL")))?;
    // SAFETY: a NUL-terminated path alive during the call; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c_path.as_ptr(), flags) };
    let fd = Errno::result(fd).ctx(|| format!("clone bind mount source {} for {dest}", path.display()))?;
    // SAFETY: open_tree returned a new fd that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
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
fn attach(tree: &OwnedFd, target: &OwnedFd) -> nix::Result<()> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
    // SAFETY: two valid fds and empty NUL-terminated paths, alive during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    Errno::result(rc).map(drop)
}

fn mount_one(rootfd: &OwnedFd, m: &Mount, source: Option<BindSource>, plan: &Plan) -> Result<()> {
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
fn data_in_userns(typ: &str, data: &[String], userns: &Mappings) -> Result<String> {
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
fn remount(target: &str, flags: MsFlags) -> nix::Result<()> {
    let base = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    match mount(None::<&str>, target, None::<&str>, base | flags, None::<&str>) {
        Err(Errno::EPERM) => {
            let current = statvfs_flags(target)?;
            mount(None::<&str>, target, None::<&str>, base | flags | current, None::<&str>)
        }
        other => other,
    }
}

fn statvfs_flags(path: &str) -> nix::Result<MsFlags> {
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
fn set_readonly_recursive(target: &str) -> nix::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
    let path = CString::new(target).map_err(|_| Errno::EINVAL)?;
    // SAFETY: a NUL-terminated path and a mount_attr struct of the size passed, both alive for
    // the duration of the call; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    Errno::result(rc).map(drop)
}

fn flag_names(flags: MsFlags) -> String {
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
fn make_parent_mount_private(root: &Path) -> Result<()> {
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
fn unescape_mountinfo(field: &str) -> String {
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

// --- overlay rootfs -------------------------------------------------------------------------------

fn mount_overlay(overlay: &OverlayRootfs, target: &Path, plan: &Plan) -> Result<()> {
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
fn mount_overlay_from(overlay: &OverlayRootfs, lowers: &[PathBuf], target: &Path, shown: &Path) -> Result<()> {
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
fn mount_idmapped_overlay(overlay: &OverlayRootfs, target: &Path, plan: &Plan) -> Result<()> {
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
const STAGING_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// In the staging tmpfs at `staging`: attaches `trees` (the idmapped lowers, top first) as "0",
/// "1", ..., mounts the overlay on "merged" from those names, and returns a detached clone of it.
fn stage_and_mount_overlay(overlay: &OverlayRootfs, trees: &[OwnedFd], staging: &Path) -> Result<OwnedFd> {
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
fn open_tree_clone(path: &Path) -> nix::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: a NUL-terminated path alive during the call; returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    let fd = Errno::result(fd)?;
    // SAFETY: open_tree returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The new mount API: one `lowerdir+` per layer (Linux >= 6.8), no page limit on the options.
/// `lowers` are what overlayfs gets for `overlay.lowerdirs` (the same paths, or their idmapped
/// clones, by their names in the staging tmpfs); messages name the lower dirs. `too_long`: called
/// because the options do not fit mount(2), else only for the kernel's reason of its failure.
fn mount_overlay_fsconfig(
    overlay: &OverlayRootfs,
    lowers: &[PathBuf],
    target: &Path,
    shown: &Path,
    too_long: bool,
) -> Result<()> {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let layers = overlay.lowerdirs.len();

    // SAFETY: a NUL-terminated file system name; the kernel returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) };
    let fd = Errno::result(fd).ctx(|| "fsopen overlay".into())?;
    // SAFETY: fsopen returned a new fd that nothing else owns.
    let fsfd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };

    let set = |key: &str, value: &OsStr| -> nix::Result<()> {
        let key = CString::new(key).map_err(|_| Errno::EINVAL)?;
        let value = CString::new(value.as_bytes()).map_err(|_| Errno::EINVAL)?;
        // SAFETY: a valid fs context fd and two NUL-terminated strings alive during the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fsfd.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0 as libc::c_int,
            )
        };
        Errno::result(rc).map(drop)
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
    // SAFETY: a valid fs context fd; no key or value for FSCONFIG_CMD_CREATE.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fsfd.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0 as libc::c_int,
        )
    };
    Errno::result(rc).map_err(|e| {
        Error::new(format!("create overlay rootfs ({layers} lower dirs): {}{}", errno_desc(e), log(&fsfd)))
    })?;
    // SAFETY: a valid, created fs context fd; returns a new mount fd or -1.
    let rc = unsafe { libc::syscall(libc::SYS_fsmount, fsfd.as_raw_fd(), FSMOUNT_CLOEXEC, 0 as libc::c_uint) };
    let mfd = Errno::result(rc).ctx(|| "fsmount overlay rootfs".into())?;
    // SAFETY: fsmount returned a new fd that nothing else owns.
    let mfd = unsafe { OwnedFd::from_raw_fd(mfd as libc::c_int) };
    let target_c = CString::new(target.as_os_str().as_bytes()).map_err(|_| Error::new("rootfs path contains NUL"))?;
    // SAFETY: a valid mount fd with an empty path (MOVE_MOUNT_F_EMPTY_PATH) and a NUL-terminated
    // target path, alive during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mfd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    Errno::result(rc).ctx(|| format!("move overlay rootfs to {}", shown.display()))?;
    Ok(())
}

/// The messages the kernel logged on an fs context (": overlayfs: ..."), for error messages.
fn fs_context_log(fsfd: &OwnedFd) -> String {
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

// --- cgroup file system ---------------------------------------------------------------------------

/// A `cgroup` mount (usually /sys/fs/cgroup, read-only): the container's own cgroup, as runc
/// shows it. cgroup v2: cgroup2 mounted in a new cgroup namespace, else the own cgroup bound.
/// v1 or hybrid: a tmpfs with, for each hierarchy, a fresh mount (cgroup namespace) or a bind of
/// the own cgroup, plus the host's symlinks (cpu -> cpu,cpuacct).
fn mount_cgroup(rootfd: &OwnedFd, rel: &Path, opts: &MountOptions, plan: &Plan) -> Result<()> {
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
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo".into())?;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(mount_point), Some(fstype), Some(super_opts)) =
            (fields.get(4), fields.get(sep + 1), fields.get(sep + 3))
        else {
            continue;
        };
        if *fstype != "cgroup" && *fstype != "cgroup2" {
            continue;
        }
        let Some(name) = mount_point.strip_prefix("/sys/fs/cgroup/") else { continue };
        if name.contains('/') {
            continue;
        }
        let options = super_opts.split(',').filter(|o| *o != "rw" && *o != "ro").collect::<Vec<_>>().join(",");
        let sub = rel.join(name);
        mkdir_all(rootfd, &sub)?;
        mount_hierarchy(rootfd, &sub, Path::new(mount_point), fstype, &options, flags, plan, &own)
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
fn mount_hierarchy(
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
fn own_cgroups() -> Result<Vec<(String, String)>> {
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

// --- /dev -----------------------------------------------------------------------------------------

/// The device nodes every container gets in a tmpfs /dev, as runc: (name, major, minor).
const DEFAULT_DEVICES: [(&str, u64, u64); 6] =
    [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)];

fn setup_dev(rootfd: &OwnedFd, devices: &[oci_spec::runtime::LinuxDevice], userns: Option<&Mappings>) -> Result<()> {
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
fn create_device(
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

// --- pivot_root -----------------------------------------------------------------------------------

/// pivot_root(".", ".") then detach the old root stacked on top: no put_old directory needed.
fn pivot_root(root: &Path) -> Result<()> {
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

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let options: Vec<String> =
            ["rbind", "ro", "nosuid", "rslave", "mode=755", "size=64k", "rw"].iter().map(|s| s.to_string()).collect();
        let parsed = parse_options(&options, Path::new("/x")).unwrap();
        assert_eq!(parsed.flags, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_NOSUID);
        assert_eq!(parsed.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        assert_eq!(parsed.data, vec!["mode=755", "size=64k"]);
        assert!(parse_options(&["rnosuid".to_string()], Path::new("/x")).is_err());
        assert!(parse_options(&["idmap".to_string()], Path::new("/x")).is_ok());
    }

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
