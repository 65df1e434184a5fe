//! `cri-systemd exec-in [--tty] <init.json> <unit> <main pid> -- <command>...`: runs a command
//! inside a running container (ExecSync, Exec). The daemon spawns it; it is single-threaded,
//! which setns(CLONE_NEWNS) requires and a tokio daemon is not.
//!
//! ```text
//! daemon ──spawn (stdio pipes, control socket as fd 3)──▶ exec-in (host namespaces)
//!                                                      │ open /proc/<main>/ns/*, /proc/<main>/root
//!                                                      │ check: <main> is in <unit>'s cgroup
//!                                                      │ join <main>'s cgroups, every hierarchy
//!                                                      │ setns(pid); fork ──────▶ child
//!                                                      │                          │ setns ipc uts net mnt
//!                                                      │                          │ chroot to <main>'s root
//!                                                      │                          │ setsid; pty (tty only, master
//!   ◀── {"tty"} + master fd ──────────────────────────────────────────────────────┤ sent to the daemon)
//!                                                      │                          │ user namespace (if the
//!                                                      │                          │ container has its own),
//!                                                      │                          │ user, caps, no_new_privs,
//!                                                      │                          │ cwd, env (init.json's process)
//!                                                      │ ◀── EOF (exec'd) / error ┘ execve(command)
//!   ◀── {"started"} or {"failed"} ─────────────────────┤
//!   ── "K" or EOF ────────────────────────────────────▶ │ SIGKILL to the command's process group
//!   ◀── {"exited"} / {"killed"} ───────────────────────┘ when the command ends; exit
//! ```
//!
//! The command joins the container's cgroups (exec-in writes itself into the cgroup of the main
//! process in every mounted hierarchy, v1 controllers, name=systemd and unified alike, as runc
//! exec does; systemd's AttachProcessesToUnit refuses units without Delegate=yes), its PID
//! namespace (it dies with the container's PID 1), and the other namespaces; its stdio are
//! exec-in's (pipes from the daemon) or the pty. exec-in keeps none of those open after the fork,
//! so the daemon sees EOF once the command and its children are done. Closing the control
//! socket (the daemon ended the session, or died) kills the command's process group.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::cgroup::systemd_cgroup;
use crate::{Context, Error, InitSpec, Result, errno_desc, namespaces, process};

/// The hidden subcommand's name.
pub const SUBCOMMAND: &str = "exec-in";
/// The control socket (SOCK_SEQPACKET, one message per record) is this descriptor in exec-in.
pub const CONTROL_FD: RawFd = 3;
/// Daemon to exec-in: kill the command (the timeout expired, the client went away).
pub const MSG_KILL: u8 = b'K';

/// exec-in (and its child) to the daemon, one JSON record each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Report {
    /// Sent with the pty master as SCM_RIGHTS, before `Started`.
    Tty,
    /// The command runs (execve succeeded); `pid` in the host's PID namespace.
    Started {
        pid: i32,
    },
    /// The command could not be started. `exit_code`: 127 (not found) or 126 (not executable)
    /// when the command itself is at fault, as a shell reports it; `None` for a setup failure.
    Failed {
        message: String,
        exit_code: Option<i32>,
    },
    Exited {
        code: i32,
    },
    Killed {
        signal: i32,
    },
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecInArgs {
    pub init_spec: PathBuf,
    /// The container's unit: its main process must be in this unit's cgroup.
    pub unit: String,
    pub main_pid: i32,
    pub tty: bool,
    pub command: Vec<String>,
}

/// Runs exec-in. Never returns: exits 0 once the command's end was reported, 1 otherwise.
pub fn run(args: &ExecInArgs) -> ! {
    crate::not_dumpable(SUBCOMMAND);
    // SAFETY: F_GETFD only queries a descriptor number; it is valid or EBADF.
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_GETFD) } < 0 {
        eprintln!("cri-systemd {SUBCOMMAND}: no control socket on fd {CONTROL_FD}: it is started by the daemon only");
        std::process::exit(2);
    }
    // SAFETY: fd 3 is open (checked above) and handed to us by the daemon; nothing else owns it.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let code = match supervise(args, &control) {
        Ok(()) => 0,
        Err(e) => {
            send(&control, &Report::Failed { message: e.to_string(), exit_code: None }, None);
            1
        }
    };
    std::process::exit(code)
}

fn send(control: &OwnedFd, report: &Report, fd: Option<RawFd>) {
    let text = serde_json::to_vec(report).expect("reports serialize");
    let fds = fd.map(|fd| [fd]);
    let cmsgs: Vec<ControlMessage<'_>> =
        fds.as_ref().map(|fds| vec![ControlMessage::ScmRights(fds)]).unwrap_or_default();
    loop {
        match sendmsg::<()>(control.as_raw_fd(), &[IoSlice::new(&text)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            // The daemon is gone: nobody to tell.
            _ => return,
        }
    }
}

/// One byte from the daemon; `None` at EOF (the daemon closed the session).
fn receive(control: &OwnedFd) -> Result<Option<u8>> {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(control, &mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(byte[0])),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::new(format!("read control socket: {}", errno_desc(e)))),
        }
    }
}

/// The namespaces joined, in this order (mnt last: the paths of the others are host paths).
const NAMESPACES: [(&str, CloneFlags); 4] = [
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

fn supervise(args: &ExecInArgs, control: &OwnedFd) -> Result<()> {
    nix::fcntl::fcntl(control, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .ctx(|| "mark control socket close-on-exec".into())?;
    // Blocked before the fork, read through a signalfd after; the child unblocks them before execve.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).ctx(|| "block signals".into())?;
    let signalfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).ctx(|| "create signalfd".into())?;

    let spec = InitSpec::load(&args.init_spec)?;
    crate::cgroup::use_given_mounts(spec.cgroup_mounts.as_deref());
    let mut process = spec.oci.process().clone().ok_or_else(|| Error::new("the container's spec has no process"))?;
    if args.command.is_empty() {
        return Err(Error::new("no command given"));
    }
    process.set_args(Some(args.command.clone()));

    let main = args.main_pid;
    let open = |what: &str| {
        let path = format!("/proc/{main}/{what}");
        nix::fcntl::open(path.as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .ctx(|| format!("open {path} (has the container stopped?)"))
    };
    let pid_ns = open("ns/pid")?;
    let joins = NAMESPACES
        .iter()
        .map(|(kind, flag)| Ok((*kind, *flag, open(&format!("ns/{kind}"))?)))
        .collect::<Result<Vec<_>>>()?;
    let root = nix::fcntl::open(
        format!("/proc/{main}/root").as_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| format!("open the root of process {main}"))?;
    // A container in a user namespace of its own (a pod's): the command joins it too, last,
    // so that it is root of that namespace at most, never the node's root.
    let user_ns = open("ns/user")?;
    let own_user_ns = std::fs::metadata("/proc/self/ns/user").ctx(|| "stat /proc/self/ns/user".into())?;
    let theirs = nix::sys::stat::fstat(&user_ns).ctx(|| format!("stat /proc/{main}/ns/user"))?;
    let user_ns = {
        use std::os::unix::fs::MetadataExt;
        (theirs.st_ino != own_user_ns.ino() || theirs.st_dev != own_user_ns.dev()).then_some(user_ns)
    };
    // The descriptors above belong to the container only if <main> is still its process (a
    // reused PID is not): checked after opening them.
    let cgroups = std::fs::read_to_string(format!("/proc/{main}/cgroup"))
        .ctx(|| format!("read /proc/{main}/cgroup (has the container stopped?)"))?;
    let unit_cgroup =
        systemd_cgroup(&cgroups).ok_or_else(|| Error::new(format!("/proc/{main}/cgroup names no systemd cgroup")))?;
    if unit_cgroup.rsplit('/').next() != Some(args.unit.as_str()) {
        return Err(Error::new(format!(
            "process {main} is not the main process of {} (its cgroup is {unit_cgroup}): the container stopped",
            args.unit
        )));
    }
    join_cgroups(&cgroups)?;
    // The container's CPUs: on cgroup v1 they are an affinity (CPUAffinity=, or set by the daemon
    // on an update), which a process joining the cgroups does not get by itself.
    let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(main))
        .ctx(|| format!("read the CPU affinity of process {main}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).ctx(|| "set the CPU affinity".into())?;
    nix::sched::setns(&pid_ns, CloneFlags::CLONE_NEWPID).ctx(|| "join pid namespace".into())?;
    drop(pid_ns);

    let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "create report pipe".into())?;
    let parent = nix::unistd::getpid();
    // SAFETY: exec-in is single-threaded (no runtime, no thread spawned), so the child may run
    // arbitrary code, allocation included, until it execs or exits.
    let child = match unsafe { nix::unistd::fork() }.ctx(|| "fork command process".into())? {
        ForkResult::Child => {
            drop(report_r);
            child_main(
                args.tty,
                &process,
                spec.oci.linux().as_ref().and_then(|l| l.seccomp().as_ref()),
                &joins,
                user_ns.as_ref(),
                &root,
                control,
                report_w,
                parent,
            )
        }
        ForkResult::Parent { child } => child,
    };
    drop(report_w);
    drop(joins);
    drop(root);
    // Keep no stdio of the session: its pipes must reach EOF when the command's side closes.
    let null = nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .ctx(|| "open /dev/null".into())?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto a standard descriptor number; both are valid.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }

    let mut message = Vec::new();
    let mut report = std::fs::File::from(report_r);
    std::io::Read::read_to_end(&mut report, &mut message).ctx(|| "read report of command process".into())?;
    if !message.is_empty() {
        let message = String::from_utf8_lossy(&message).trim().to_string();
        let exit_code = command_fault(&message);
        let _ = waitpid(child, None);
        send(control, &Report::Failed { message, exit_code }, None);
        return Ok(());
    }
    send(control, &Report::Started { pid: child.as_raw() }, None);
    wait(child, control, &signalfd)
}

/// A failure of the command itself (as opposed to the setup) gets a shell's exit code: the
/// messages are init's own (`process::lookup`, `Exec::exec`).
fn command_fault(message: &str) -> Option<i32> {
    if message.contains("executable file not found in $PATH")
        || (message.starts_with("exec: ") && message.contains("no such file or directory"))
    {
        Some(127)
    } else if message.starts_with("exec ") || message.starts_with("exec: ") {
        Some(126)
    } else {
        None
    }
}

/// Waits for the command, killing its process group on the daemon's word, the daemon's end, or
/// a terminating signal, and reports how it ended.
fn wait(child: Pid, control: &OwnedFd, signalfd: &SignalFd) -> Result<()> {
    let mut control_open = true;
    let kill = || {
        // The command called setsid: its process group is its PID (absent if it has not yet).
        let _ = nix::sys::signal::kill(Pid::from_raw(-child.as_raw()), Signal::SIGKILL);
        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
    };
    loop {
        let mut fds = [
            libc::pollfd { fd: signalfd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: if control_open { control.as_raw_fd() } else { -1 }, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two initialised pollfd structs that live across the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(Error::new(format!("poll: {}", errno_desc(e)))),
            }
        }
        if fds[1].revents != 0 {
            match receive(control) {
                Ok(Some(MSG_KILL)) => kill(),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    control_open = false;
                    kill();
                }
            }
        }
        if fds[0].revents != 0 {
            let Ok(Some(info)) = signalfd.read_signal() else { continue };
            if info.ssi_signo != Signal::SIGCHLD as u32 {
                kill();
                continue;
            }
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => {
                    send(control, &Report::Exited { code }, None);
                    return Ok(());
                }
                Ok(WaitStatus::Signaled(_, signal, _)) => {
                    send(control, &Report::Killed { signal: signal as i32 }, None);
                    return Ok(());
                }
                Ok(_) => {}
                Err(Errno::ECHILD) => return Err(Error::new("the command process vanished")),
                Err(_) => {}
            }
        }
    }
}

/// Writes this process into the cgroups listed in `cgroups` (another process's
/// /proc/<pid>/cgroup), in every hierarchy mounted here.
fn join_cgroups(cgroups: &str) -> Result<()> {
    let mounts = crate::cgroup::mounts().ctx(|| "read /proc/self/mountinfo".into())?;
    let pid = std::process::id().to_string();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let wanted: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
        let mount = mounts.iter().find(|m| {
            if wanted.is_empty() {
                m.controllers.is_empty()
            } else {
                !m.controllers.is_empty() && wanted.iter().all(|w| m.controllers.iter().any(|c| c == w))
            }
        });
        // A hierarchy not mounted here (some v1 controllers in a node) cannot be joined; nor
        // does it hold the unit.
        let Some(mount) = mount else { continue };
        let relative = if mount.root == "/" { Some(path) } else { path.strip_prefix(mount.root.as_str()) };
        let Some(relative) = relative else { continue };
        let procs = Path::new(&mount.mount_point).join(relative.trim_start_matches('/')).join("cgroup.procs");
        std::fs::write(&procs, &pid).ctx(|| format!("join cgroup {}", procs.display()))?;
    }
    Ok(())
}

/// The forked child: joins the namespaces and root, sets up the process, execs. Never returns.
#[allow(clippy::too_many_arguments)]
fn child_main(
    tty: bool,
    process: &oci_spec::runtime::Process,
    seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
    joins: &[(&str, CloneFlags, OwnedFd)],
    user_ns: Option<&OwnedFd>,
    root: &OwnedFd,
    control: &OwnedFd,
    report: OwnedFd,
    parent: Pid,
) -> ! {
    let result = (|| -> Result<std::convert::Infallible> {
        for (kind, flag, fd) in joins {
            nix::sched::setns(fd, *flag).ctx(|| format!("join {kind} namespace"))?;
        }
        // Joining a mount namespace puts us at its root; the container's root is <main>'s, which
        // pivot_root made of its overlay: go there as nsenter --root does.
        nix::unistd::fchdir(root).ctx(|| "enter the container's root".into())?;
        nix::unistd::chroot(".").ctx(|| "chroot to the container's root".into())?;
        nix::unistd::chdir("/").ctx(|| "chdir /".into())?;
        nix::unistd::setsid().ctx(|| "setsid".into())?;
        if tty {
            let master = open_pty()?;
            send(control, &Report::Tty, Some(master.as_raw_fd()));
        }
        process::prepare_child()?;
        // Of the descriptors this child still owns, only the report pipe is needed from here on
        // (the others are the parent's, never dropped here: the child execs or _exits).
        let exec = process::prepare_exec(process, seccomp, &[report.as_raw_fd()], || match user_ns {
            Some(fd) => namespaces::join_user(fd, "of the container"),
            None => Ok(()),
        })?;
        // Set after the change of user, which would clear it: the command dies with exec-in.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).ctx(|| "set parent death signal".into())?;
        // exec-in is outside the container's PID namespace, so it shows as PID 0 (or as itself
        // with hostPID); an adoptive parent would show as a real PID.
        let ppid = nix::unistd::getppid();
        if ppid.as_raw() != 0 && ppid != parent {
            return Err(Error::new("exec-in ended before the command started"));
        }
        Err(exec.exec())
    })();
    let Err(e) = result;
    let text = e.to_string();
    let mut bytes = text.as_bytes();
    while !bytes.is_empty() {
        match nix::unistd::write(&report, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    // SAFETY: _exit is always allowed; the forked child must not run the parent's exit handlers.
    unsafe { libc::_exit(127) }
}

/// A pty of the container's devpts instance: the slave becomes stdin, stdout, stderr and the
/// controlling terminal; the master is returned to be sent to the daemon.
pub(crate) fn open_pty() -> Result<OwnedFd> {
    let master = nix::fcntl::open("/dev/ptmx", OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty())
        .ctx(|| "open /dev/ptmx".into())?;
    let mut unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int we own.
    Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &mut unlock) })
        .ctx(|| "unlock pty".into())?;
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int we own.
    Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) })
        .ctx(|| "get pty number".into())?;
    let path = format!("/dev/pts/{number}");
    let slave = nix::fcntl::open(path.as_str(), OFlag::O_RDWR | OFlag::O_NOCTTY, Mode::empty())
        .ctx(|| format!("open {path}"))?;
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal); we lead a new session.
    Errno::result(unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) })
        .ctx(|| "set controlling terminal".into())?;
    for fd in 0..=2 {
        // SAFETY: dup2 of a valid descriptor onto a standard one.
        Errno::result(unsafe { libc::dup2(slave.as_raw_fd(), fd) }).ctx(|| format!("dup pty onto fd {fd}"))?;
    }
    Ok(master)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_faults_get_shell_exit_codes() {
        assert_eq!(command_fault("exec: \"nosuch\": executable file not found in $PATH"), Some(127));
        assert_eq!(command_fault("exec: \"/nope\": stat /nope: no such file or directory"), Some(127));
        assert_eq!(command_fault("exec /etc/passwd: permission denied"), Some(126));
        assert_eq!(command_fault("join mnt namespace: operation not permitted"), None);
    }

    #[test]
    fn reports_are_one_json_record_each() {
        let text = serde_json::to_string(&Report::Failed { message: "m".into(), exit_code: Some(127) }).unwrap();
        assert_eq!(text, r#"{"failed":{"message":"m","exit_code":127}}"#);
        assert_eq!(serde_json::to_string(&Report::Tty).unwrap(), r#""tty""#);
    }
}
