//! Entering the container's namespaces: joined ones (a `path`) with setns, new ones with
//! unshare. The parent enters all but the mount namespace before the fork (a new PID namespace
//! applies to the forked child only); the child enters the mount namespace, so that its
//! pivot_root never moves the parent's root (the parent must still reach $NOTIFY_SOCKET and
//! the error file).

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::{Context, Error, Result};

/// What the child needs to know about the namespaces it lives in.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// The mount namespace to join (then copy), opened before anything else.
    mount: Option<(PathBuf, OwnedFd)>,
    /// The container has a UTS namespace of its own (new or joined): the hostname may be set.
    pub uts: bool,
    /// A new cgroup namespace was created (the cgroup2 file system may be mounted as is).
    pub new_cgroup: bool,
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

/// In the parent: joins the namespaces that have a path, then unshares the new ones, all but the
/// mount namespace (see [`enter_mount`]).
pub(crate) fn enter(spec: &Spec) -> Result<Plan> {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
    let mut plan = Plan::default();
    let mut joins: Vec<(LinuxNamespaceType, PathBuf, OwnedFd)> = Vec::new();
    let mut unshare = CloneFlags::empty();
    let mut seen = Vec::new();
    for ns in &namespaces {
        let typ = ns.typ();
        if typ == LinuxNamespaceType::User {
            return Err(Error::new("user namespaces are not supported yet"));
        }
        if seen.contains(&typ) {
            return Err(Error::new(format!("namespace {typ} is listed twice")));
        }
        seen.push(typ);
        match ns.path() {
            // Open every file first: joining the mount namespace would change what paths mean.
            Some(path) => {
                let fd = nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .ctx(|| format!("open {typ} namespace {}", path.display()))?;
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
    for (typ, path, fd) in &joins {
        nix::sched::setns(fd, clone_flag(*typ)).ctx(|| format!("join {typ} namespace {}", path.display()))?;
    }
    if !unshare.is_empty() {
        nix::sched::unshare(unshare).ctx(|| format!("unshare namespaces ({})", names(unshare)))?;
    }
    Ok(plan)
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
