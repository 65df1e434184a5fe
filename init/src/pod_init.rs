//! `cri-systemd pod-init [--net NS] [--ipc NS] [--uts NS] [--user NS] [--pod-mounts MNTNS]`: the `ExecStart` of the
//! unit `cri-pod-<pod id>.service` that only pods sharing one PID namespace among their
//! containers (`shareProcessNamespace`, CRI pid mode POD) get. Its main process is PID 1 of the
//! pod's PID namespace: it holds the namespace, reaps the zombies that the containers' orphans
//! leave, and exits on SIGTERM (the kernel then kills what is left in the namespace).
//!
//! ```text
//! systemd ──starts──▶ pod-init (Type=notify)
//!                      │ open the pod's namespaces; join net, ipc, uts, then the user
//!                      │ namespace (if any) as its root; unshare(CLONE_NEWPID), so that the
//!                      │ new PID namespace belongs to the pod's user namespace
//!                      │ fork ─────────────▶ child (PID 1 of the new PID namespace)
//!                      │                      │ own mount namespace on an empty read-only
//!                      │                      │ tmpfs (nothing of the node through /proc/1/root),
//!                      │                      │ no capabilities, no_new_privs, not dumpable
//!                      │ ◀──── "ready" ───────┤
//!                      │ sd_notify MAINPID=child, READY=1, exit
//!                                             │ loop: SIGCHLD: reap every zombie; SIGTERM: exit
//! ```
//!
//! The daemon pins `/proc/<main pid>/ns/pid` once the unit runs; containers of the pod join that
//! pin (init's `linux.namespaces` entry with a path), and exec-in joins the main process's.
//! Processes of the containers whose parent dies are reparented to this PID 1 (the containers'
//! main processes themselves are systemd's: their parent, init, is outside the namespace).
//!
//! # Around it, in the daemon
//!
//! Container units are ordered `After=` the init unit, so a stop of the slice stops them first:
//! the end of a PID namespace's init SIGKILLs everything left in it. (StopPodSandbox itself first
//! kills every running container through that container's own stop path, as containerd does, so
//! each records exit 137; the ordering covers the slice being stopped by anything else.) The
//! unit's name is in the pod record before it starts (a daemon killed meanwhile stops it with the
//! slice on restart). PodSandboxStatus says NotReady and StartContainer refuses once the init is
//! gone (its namespace is dead), as with a dead pause container elsewhere. If the pod's record is
//! quarantined, the init keeps running and its user-namespace range stays reserved.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::ForkResult;

use crate::pod_mounts::PodMounts;
use crate::{Context, Error, Result, namespaces, notify};

/// The hidden subcommand's name.
pub const SUBCOMMAND: &str = "pod-init";

/// The pod's namespaces to join (pinned files); none given: the node's.
#[derive(Debug, Clone, Default)]
pub struct PodInitArgs {
    pub net: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    pub user: Option<PathBuf>,
    /// The daemon's pod mount namespace: the IPC, UTS and user pins are opened there
    /// ([`crate::pod_mounts`]). None: all in the node's.
    pub pod_mounts: Option<PathBuf>,
}

impl PodInitArgs {
    /// The command line after the subcommand, as [`run`] takes it back.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let flags = [
            ("--net", &self.net),
            ("--ipc", &self.ipc),
            ("--uts", &self.uts),
            ("--user", &self.user),
            ("--pod-mounts", &self.pod_mounts),
        ];
        for (flag, path) in flags {
            if let Some(path) = path {
                args.push(flag.to_string());
                args.push(path.to_string_lossy().into_owned());
            }
        }
        args
    }
}

/// The directory that becomes the PID 1's root (an empty tmpfs is mounted on it, in its own mount
/// namespace only).
const EMPTY_ROOT: &str = "/tmp";

/// Runs `cri-systemd pod-init`. Never returns: the parent exits 0 once the PID 1 runs as the
/// service's main process, 1 (message on stderr, in the unit's journal) on failure; the PID 1
/// exits 0 on SIGTERM.
pub fn run(args: &PodInitArgs) -> ! {
    crate::not_dumpable(SUBCOMMAND);
    match start(args) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("cri-systemd pod-init: {e}");
            std::process::exit(1);
        }
    }
}

fn start(args: &PodInitArgs) -> Result<()> {
    let notifier = notify::Notifier::open()?;
    let mut in_pod_mounts = match &args.pod_mounts {
        Some(namespace) => PodMounts {
            namespace: namespace.clone(),
            pins: [&args.ipc, &args.uts, &args.user].into_iter().flatten().cloned().collect(),
            trees: Vec::new(),
        }
        .open()?,
        None => Default::default(),
    };
    let mut open = |kind: &str, path: &Option<PathBuf>| -> Result<Option<OwnedFd>> {
        path.as_ref()
            .map(|p| match in_pod_mounts.take_pin(p) {
                Some(fd) => Ok(fd),
                None => nix::fcntl::open(p, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .ctx(|| format!("open {kind} namespace {}", p.display())),
            })
            .transpose()
    };
    let joins = [
        ("net", CloneFlags::CLONE_NEWNET, open("net", &args.net)?),
        ("ipc", CloneFlags::CLONE_NEWIPC, open("ipc", &args.ipc)?),
        ("uts", CloneFlags::CLONE_NEWUTS, open("uts", &args.uts)?),
    ];
    let user = open("user", &args.user)?;
    for (kind, flag, fd) in &joins {
        if let Some(fd) = fd {
            nix::sched::setns(fd, *flag).ctx(|| format!("join {kind} namespace"))?;
        }
    }
    if let Some(fd) = &user {
        namespaces::join_user(fd, "of the pod")?;
    }
    drop(joins);
    drop(user);
    // After the user namespace: the PID namespace belongs to it, so that the pod's root is root
    // over its processes and nothing more.
    nix::sched::unshare(CloneFlags::CLONE_NEWPID).ctx(|| "unshare pid namespace".into())?;
    // Blocked before the fork, so that PID 1 never misses one (a PID 1 ignores signals it has no
    // handler for unless they are blocked and waited for).
    let signals = handled_signals();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).ctx(|| "block signals".into())?;
    let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "create report pipe".into())?;
    // SAFETY: pod-init is single-threaded (no async runtime, no thread), so the child may run
    // arbitrary code, allocation included.
    let child = match unsafe { nix::unistd::fork() }.ctx(|| "fork the pod's PID 1".into())? {
        ForkResult::Child => {
            drop(report_r);
            drop(notifier);
            pid1(report_w, &signals)
        }
        ForkResult::Parent { child } => child,
    };
    drop(report_w);
    let mut report = Vec::new();
    std::fs::File::from(report_r).read_to_end(&mut report).ctx(|| "read the report of the pod's PID 1".into())?;
    match report.first() {
        Some(b'R') => {}
        _ => {
            let _ = waitpid(child, None);
            let message = String::from_utf8_lossy(report.get(1..).unwrap_or_default()).trim().to_string();
            return Err(Error::new(if message.is_empty() {
                "the pod's PID 1 died during setup".into()
            } else {
                message
            }));
        }
    }
    notifier.notify(&format!("MAINPID={child}"))?;
    notifier.notify("READY=1")
}

fn handled_signals() -> SigSet {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals
}

/// The pod's PID 1: sets itself apart, reports, then reaps until SIGTERM. Never returns.
fn pid1(report: OwnedFd, signals: &SigSet) -> ! {
    use std::os::fd::AsRawFd;
    // Nothing of the node's stays open in a process the containers can see (ps).
    if let Err(e) = crate::process::close_descriptors_except(&[report.as_raw_fd()]).and_then(|()| isolate()) {
        let mut file = std::fs::File::from(report);
        let _ = file.write_all(format!("E{e}").as_bytes());
        // SAFETY: _exit is always allowed; the forked child must not run the parent's exit handlers.
        unsafe { libc::_exit(1) }
    }
    let mut file = std::fs::File::from(report);
    let _ = file.write_all(b"R");
    drop(file);
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => reap_all(),
            Ok(Signal::SIGTERM | Signal::SIGINT) => std::process::exit(0),
            _ => {}
        }
    }
}

/// Reaps every child that has ended (SIGCHLD signals coalesce).
fn reap_all() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// A mount namespace of its own whose root is an empty read-only tmpfs, no capabilities,
/// no_new_privs, not dumpable: a container that can see this process (ps) cannot reach the
/// node's file system or anything else through it.
fn isolate() -> Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).ctx(|| "unshare mnt namespace".into())?;
    nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .ctx(|| "make / private".into())?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    nix::mount::mount(Some("pod-init"), EMPTY_ROOT, Some("tmpfs"), flags, Some("size=4k,mode=0555"))
        .ctx(|| format!("mount an empty tmpfs on {EMPTY_ROOT}"))?;
    nix::unistd::chdir(EMPTY_ROOT).ctx(|| format!("chdir {EMPTY_ROOT}"))?;
    nix::unistd::pivot_root(".", ".").ctx(|| "pivot_root to the empty tmpfs".into())?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH).ctx(|| "detach the old root".into())?;
    nix::unistd::chdir("/").ctx(|| "chdir /".into())?;
    // Every capability out of the bounding set (up to the first the kernel does not know), then
    // the other sets emptied.
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            match Errno::last() {
                Errno::EINVAL => break,
                e => return Err(e).ctx(|| format!("drop capability {cap} from the bounding set")),
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) };
    Errno::result(rc).ctx(|| "clear ambient capabilities".into())?;
    let none = rustix::thread::CapabilitySet::empty();
    let sets = rustix::thread::CapabilitySets { effective: none, permitted: none, inheritable: none };
    rustix::thread::set_capabilities(None, sets).ctx(|| "drop capabilities (capset)".into())?;
    nix::sys::prctl::set_no_new_privs().ctx(|| "set no_new_privs".into())?;
    nix::sys::prctl::set_dumpable(false).ctx(|| "make the process not dumpable".into())?;
    Ok(())
}
