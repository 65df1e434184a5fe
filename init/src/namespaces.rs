//! Entering the container's namespaces: joined ones (a `path`) with setns, new ones with
//! unshare. The parent enters all but the mount and user namespaces before the fork (a new PID
//! namespace applies to the forked child only); the child enters the mount namespace, so that
//! its pivot_root never moves the parent's root (the parent must still reach $NOTIFY_SOCKET and
//! the error file).
//!
//! A user namespace is joined last, by the child, once its mounts are made: the child mounts as
//! the node's root in a mount namespace of the node's user namespace (overlayfs with idmapped
//! layers, proc, sysfs, devpts need that), then becomes root of the pod's user namespace, where
//! its capabilities count for nothing outside.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::idmap::{IdmapNamespaces, Mappings};
use crate::pod_mounts::PodMounts;
use crate::{Context, Error, Result};

/// What the child needs to know about the namespaces it lives in.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The mount namespace to join (then copy), opened before anything else.
    mount: Option<(PathBuf, OwnedFd)>,
    /// The user namespace to join once set up, and its id mappings.
    user: Option<(PathBuf, OwnedFd, Mappings)>,
    /// Namespaces joined in the parent, and the flags of those it unshares.
    joins: Vec<(LinuxNamespaceType, PathBuf, OwnedFd)>,
    unshare: CloneFlags,
    /// The container has a UTS namespace of its own (new or joined): the hostname may be set.
    pub uts: bool,
    /// A new cgroup namespace was created (the cgroup2 file system may be mounted as is).
    pub new_cgroup: bool,
    /// The user namespaces idmapped mounts take their mappings from.
    pub idmaps: IdmapNamespaces,
    /// The pod's mounts of the daemon's pod mount namespace (its /dev/shm), cloned, to attach
    /// at their paths in the container's mount namespace ([`crate::pod_mounts`]).
    pub pod_trees: Vec<(PathBuf, OwnedFd)>,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            mount: None,
            user: None,
            joins: Vec::new(),
            unshare: CloneFlags::empty(),
            uts: false,
            new_cgroup: false,
            idmaps: IdmapNamespaces::default(),
            pod_trees: Vec::new(),
        }
    }
}

impl Plan {
    /// The id mappings of the user namespace the container will be in, if any: ids init uses on
    /// its behalf (owners, mount options) are translated through them.
    pub(crate) fn userns(&self) -> Option<&Mappings> {
        self.user.as_ref().map(|(_, _, mappings)| mappings)
    }

    /// Takes the opened file of namespace `typ` to join, for a caller that joins it otherwise
    /// (restore-in hands them to CRIU).
    pub(crate) fn take_join(&mut self, typ: LinuxNamespaceType) -> Option<OwnedFd> {
        let i = self.joins.iter().position(|(t, _, _)| *t == typ)?;
        Some(self.joins.remove(i).2)
    }
}

fn clone_flag(typ: LinuxNamespaceType) -> CloneFlags {
    match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        // CLONE_NEWTIME has no constant in nix: the kernel's value.
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(0x80),
    }
}

/// In the parent, before anything changes: opens every namespace to join (those `pod_mounts`
/// names in the daemon's pod mount namespace) and works out which to create (see [`enter`]).
pub(crate) fn open(spec: &Spec, pod_mounts: Option<&PodMounts>) -> Result<Plan> {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
    let mut plan = Plan::default();
    let mut in_pod_mounts = pod_mounts.map(PodMounts::open).transpose()?.unwrap_or_default();
    plan.pod_trees = std::mem::take(&mut in_pod_mounts.trees);
    let mut joins: Vec<(LinuxNamespaceType, PathBuf, OwnedFd)> = Vec::new();
    let mut unshare = CloneFlags::empty();
    let mut seen = Vec::new();
    for ns in &namespaces {
        let typ = ns.typ();
        if typ == LinuxNamespaceType::User && ns.path().is_none() {
            return Err(Error::invalid(
                "new user namespaces are not supported: join a prepared one (a user namespace with a path)",
            ));
        }
        if seen.contains(&typ) {
            return Err(Error::invalid(format!("namespace {typ} is listed twice")));
        }
        seen.push(typ);
        match ns.path() {
            // Open every file first: joining the mount namespace would change what paths mean.
            Some(path) => {
                let fd = match in_pod_mounts.take_pin(path) {
                    Some(fd) => fd,
                    None => nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                        .ctx(|| format!("open {typ} namespace {}", path.display()))?,
                };
                joins.push((typ, path.clone(), fd));
            }
            None if typ == LinuxNamespaceType::Mount => {}
            None => unshare |= clone_flag(typ),
        }
        match typ {
            LinuxNamespaceType::Uts => plan.uts = true,
            LinuxNamespaceType::Cgroup => plan.new_cgroup = ns.path().is_none(),
            _ => {}
        }
    }
    if let Some(i) = joins.iter().position(|(typ, _, _)| *typ == LinuxNamespaceType::Mount) {
        let (_, path, fd) = joins.remove(i);
        plan.mount = Some((path, fd));
    }
    if let Some(i) = joins.iter().position(|(typ, _, _)| *typ == LinuxNamespaceType::User) {
        let (_, path, fd) = joins.remove(i);
        let mappings = Mappings::of_spec(spec).ok_or_else(|| {
            Error::invalid(format!(
                "user namespace {}: linux.uidMappings and gidMappings must say what it maps",
                path.display()
            ))
        })?;
        mappings.check("linux.uidMappings/gidMappings")?;
        plan.user = Some((path, fd, mappings));
    } else if Mappings::of_spec(spec).is_some() {
        return Err(Error::invalid("linux.uidMappings/gidMappings are given but no user namespace is joined"));
    }
    plan.joins = joins;
    plan.unshare = unshare;
    Ok(plan)
}

/// In the parent: joins the namespaces that have a path, then unshares the new ones, all but the
/// mount and user namespaces (see [`enter_mount`] and [`enter_user`]).
pub(crate) fn enter(plan: &mut Plan) -> Result<()> {
    for (typ, path, fd) in &plan.joins {
        nix::sched::setns(fd, clone_flag(*typ)).ctx(|| format!("join {typ} namespace {}", path.display()))?;
    }
    plan.joins.clear();
    if !plan.unshare.is_empty() {
        nix::sched::unshare(plan.unshare).ctx(|| format!("unshare namespaces ({})", names(plan.unshare)))?;
    }
    Ok(())
}

/// In the child, once everything that needs the node's root is done: joins the user namespace
/// and becomes its root (setns keeps the node's uid, which the namespace does not map), then
/// checks the namespace maps what the spec says.
pub(crate) fn enter_user(plan: &Plan) -> Result<()> {
    let Some((path, fd, mappings)) = &plan.user else { return Ok(()) };
    join_user(fd, &path.display().to_string())?;
    for (file, expected) in [("uid_map", &mappings.uids), ("gid_map", &mappings.gids)] {
        let text = match std::fs::read_to_string(format!("/proc/self/{file}")) {
            Ok(text) => text,
            // A container without /proc: nothing to compare with.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).ctx(|| format!("read /proc/self/{file}")),
        };
        let actual: Vec<(u32, u32, u32)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace().map(|f| f.parse::<u32>().ok());
                Some((fields.next()??, fields.next()??, fields.next()??))
            })
            .collect();
        let wanted: Vec<(u32, u32, u32)> = expected.iter().map(|m| (m.container_id(), m.host_id(), m.size())).collect();
        if actual != wanted {
            return Err(Error::invalid(format!(
                "user namespace {} maps {file} {actual:?}, not {wanted:?} as the spec says",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Once in the pod's user namespace: a copy of the container's mount namespace that this user
/// namespace owns, as runc's containers have, so that root in the pod can mount what a user
/// namespace may (a tmpfs, say) with CAP_SYS_ADMIN. Every mount set up so far comes along locked
/// (MNT_LOCKED): it cannot be unmounted, uncovered or made writable from inside, so masked and
/// read-only paths stay so. The copy keeps the root and working directory.
pub(crate) fn own_mounts_in_user_namespace(plan: &Plan) -> Result<()> {
    if plan.user.is_none() {
        return Ok(());
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .ctx(|| "unshare a mnt namespace owned by the pod's user namespace".into())
}

/// In the forked child: the container's own mount namespace, always new (a private copy of the
/// joined one if the spec gives a path).
pub(crate) fn enter_mount(plan: &Plan) -> Result<()> {
    if let Some((path, fd)) = &plan.mount {
        nix::sched::setns(fd, CloneFlags::CLONE_NEWNS).ctx(|| format!("join mnt namespace {}", path.display()))?;
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).ctx(|| "unshare mnt namespace".into())
}

fn names(flags: CloneFlags) -> String {
    let all = [
        (CloneFlags::CLONE_NEWNS, "mnt"),
        (CloneFlags::CLONE_NEWCGROUP, "cgroup"),
        (CloneFlags::CLONE_NEWUTS, "uts"),
        (CloneFlags::CLONE_NEWIPC, "ipc"),
        (CloneFlags::CLONE_NEWPID, "pid"),
        (CloneFlags::CLONE_NEWNET, "net"),
        (CloneFlags::from_bits_retain(0x80), "time"),
    ];
    all.iter().filter(|(f, _)| flags.contains(*f)).map(|(_, n)| *n).collect::<Vec<_>>().join(" ")
}

/// Joins the user namespace `fd` and becomes its root: setns keeps the node's uid, which the
/// namespace does not map (init, and exec-in for a command in a container in a user namespace).
pub(crate) fn join_user(fd: &OwnedFd, shown: &str) -> Result<()> {
    nix::sched::setns(fd, CloneFlags::CLONE_NEWUSER).ctx(|| format!("join user namespace {shown}"))?;
    let root = nix::unistd::Gid::from_raw(0);
    nix::unistd::setresgid(root, root, root).ctx(|| "become root of the user namespace (setgid 0)".into())?;
    let root = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresuid(root, root, root).ctx(|| "become root of the user namespace (setuid 0)".into())
}
