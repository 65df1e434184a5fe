//! The processes cri-systemd runs inside units, each a hidden subcommand of the daemon's binary
//! run before anything else in its `main`: `init` (this module), `exec-in` ([`exec_in`]),
//! `pod-init` ([`pod_init`]) and `restore-in` ([`restore`], a container restored by CRIU); and `init.json` ([`InitSpec`]), which the runtime writes and init
//! reads. The runtime depends on this crate, never the reverse.
//! `init` and `exec-in` also make up `cri-systemd-init` ([`helper`]), a binary of this crate alone
//! that the daemon runs instead of its own when the two are of one build (cheaper to exec).
//!
//! `cri-systemd init <spec.json>`: the `ExecStart` of every container unit. It sets the container
//! up (namespaces, rootfs, mounts, identity, capabilities) and ends by exec'ing the container's
//! entrypoint, leaving no process of its own behind.
//!
//! systemd 252 cannot express pivot_root into an overlay rootfs, a private PID namespace, the
//! container's mount setup, capabilities and no_new_privs the way containers need them; this step
//! does, and systemd stays the only supervisor:
//!
//! ```text
//! systemd ──starts──▶ init (main PID, Type=notify)
//!                      │ read spec, open namespaces, make the user namespaces of idmapped
//!                      │ mounts, setns/unshare all but mnt and user (pid, net, ... per spec)
//!                      │ fork ─────────────▶ child (PID 1 of a new PID namespace)
//!                      │                      │ new mnt namespace (always; a copy of a
//!                      │                      │ joined one), mounts, pivot_root, hostname, sysctls,
//!                      │                      │ masked/readonly paths, rlimits, join the user
//!                      │                      │ namespace (if any), user, caps, PATH lookup
//!                      │ ◀──── "ready" ───────┤
//!                      │ sd_notify MAINPID=child (+ barrier)
//!                      ├────── "go" ─────────▶│ execve(entrypoint): the CLOEXEC pipe closes
//!                      │ ◀──── EOF ───────────┘ (or "error: ..." if execve failed)
//!                      │ sd_notify READY=1 (+ barrier), exit 0
//! ```
//!
//! systemd then has the entrypoint as the service's main process: the orphan is reparented to
//! PID 1 (systemd), which reaps it and records its exit status as `ExecMainStatus`/`ExecMainCode`.
//! (systemd 252 logs "Supervising process N which is not our child" once per start: expected.)
//! MAINPID= is sent while the child still waits for "go", so an entrypoint that exits at once
//! keeps its status; init never reaps the child once it was handed over.
//! On any failure the child reports a one-line message through the pipe, init writes it to
//! `error_file` and exits non-zero without `READY=1`, so the start job fails.
//!
//! OCI hooks (from CDI specs) run at their stages within this flow: createContainer (and
//! createRuntime, prestart) in the child once the rootfs is mounted, before pivot_root;
//! startContainer before the child takes the container's identity; poststart before READY=1
//! ([`hooks`]).
//!
//! The same fork pattern is used when the PID namespace is joined or not listed (hostPID): the
//! forked child, not init, becomes the main process, so the flow stays the same.
//!
//! init is single-threaded and starts no async runtime: the child of `fork` may use the allocator.
//! This crate has no async runtime or thread pool among its dependencies (a unit test below checks
//! it), so that stays true; the daemon's `main` runs these subcommands before it starts tokio.
//!
//! # Breakout defences
//!
//! *Descriptors and cwd* (the CVE-2024-21626 class): init, exec-in and pod-init close every
//! descriptor above 2 but their own report pipes and console socket before the chdir
//! (`process::close_descriptors_except`); the working directory is created and opened inside the
//! container's root with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` (so a `/proc/self/fd/N`
//! in the pod spec, the image's WORKDIR or an image symlink is refused), entered with fchdir, and
//! checked with getcwd (the kernel prefixes "(unreachable)" outside the root) before exec; a
//! refusal fails StartContainer/ExecSync with "chdir to cwd (...) failed: ...".
//!
//! *The node's binary* (the CVE-2019-5736 class): at every start the daemon bind-mounts its own
//! running binary (`/proc/self/exe`) read-only, nosuid, nodev at `<run_root>/exe/cri-systemd`
//! (`runtime/src/sealed_exe.rs`; earlier mounts there are lazily detached), and every unit's
//! `ExecStart`/`ExecStopPost` and every exec-in run that path. A `#!/proc/self/exe` script run by
//! init or exec-in, or any process holding a descriptor of `/proc/<pid>/exe`, reaches the file only
//! through that mount: opening it for writing fails with EROFS, even once nothing runs the binary;
//! the container cannot remount it (not in its mount namespace). runc copies itself into a sealed
//! memfd at every start instead; one mount per daemon start costs nothing per container. init,
//! exec-in and pod-init are also not dumpable until they exec.
//!
//! *Other users of the node* (the CVE-2021-41091 class): the directories of pods and containers
//! (`<state_root>/{pods,containers}/<id>`, `<run_root>/pods/<id>`, the parent of the pod's
//! `/dev/shm`) and of CNI results are 0700, records (`pod.json`, `container.json`, `init.json`
//! and a hooked container's `config.json` with the env, exit and CNI results) 0600, CRI log
//! files 0640; a container's `upper/` (its `/`) keeps 0755 behind its 0700 directory. The daemon tightens these modes of an older install at start
//! (`runtime::tighten_modes`). Pod files bind-mounted into containers (hosts, resolv.conf) stay
//! readable for containers in user namespaces.
//!
//! *Requests and config*: a CRI `log_path` must be relative to the pod's log directory without `..`
//! (InvalidArgument before anything is made); container units get `TasksMax=` from
//! `containers.tasks_max` (4096), below the kubelet's podPidsLimit on the pod's cgroup;
//! `images.layer_uid_shift` must be 64K-aligned and a kubelet-chosen user namespace range may not
//! overlap it; credentials are never sent to a plain-HTTP mirror. Tests: `e2e/tests/security.rs`.

pub mod cgroup;
mod error;
pub mod exec_in;
pub mod helper;
pub mod hooks;
pub mod hugetlb;
mod idmap;
mod mount_setattr;
mod namespaces;
mod notify;
pub mod pod_init;
pub mod pod_mounts;
mod process;
pub mod restore;
mod rootfs;
mod seccomp;
mod spec;
mod syscalls;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

pub(crate) use error::Context;
pub use error::{Error, Result, errno_desc};
pub use idmap::probe_idmapped_mount;
pub use spec::{HugepageLimit, ImageVolumeMount, InitSpec, OverlayRootfs};

/// The hidden subcommand's name: `cri-systemd init <spec.json>`.
pub const SUBCOMMAND: &str = "init";

/// Whether a seccomp profile (OCI form) compiles as init would compile it.
pub fn check_seccomp(profile: &serde_json::Value) -> Result<()> {
    let profile: oci_spec::runtime::LinuxSeccomp =
        serde_json::from_value(profile.clone()).map_err(|e| Error::invalid(e.to_string()))?;
    seccomp::compile(&profile).map(drop)
}

/// Until it execs, a process running the daemon's binary is not dumpable: container processes
/// cannot open its `/proc/<pid>/exe`, `fd/`, `cwd` or `root` (the CVE-2019-5736 class; see
/// `runtime::sealed_exe`). execve makes the container's process dumpable again, as usual.
pub(crate) fn not_dumpable(who: &str) {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("cri-systemd {who}: cannot make the process not dumpable: {}", errno_desc(e));
        std::process::exit(1);
    }
}

/// Runs `cri-systemd init <spec_path>`. Never returns: exits 0 once the entrypoint runs as the
/// service's main process, non-zero (after writing the spec's `error_file`) on failure.
pub fn run(spec_path: &Path) -> ! {
    not_dumpable("init");
    let spec = match InitSpec::load(spec_path) {
        Ok(spec) => spec,
        Err(e) => {
            // No error_file without a spec: stderr reaches the unit's journal.
            eprintln!("cri-systemd init: {e}");
            std::process::exit(1);
        }
    };
    crate::cgroup::use_given_mounts(spec.cgroup_mounts.as_deref());
    let error_file = ErrorFile::open(&spec.error_file);
    if let Err(e) = hold_output_pipes() {
        let message = format!("reopen stdout and stderr read-write: {e}");
        eprintln!("cri-systemd init: {message}");
        error_file.write(&message);
        std::process::exit(1);
    }
    // Opened while init still sees the node's file systems; written once the child exists.
    let main_pid_file = spec.error_file.parent().and_then(|dir| {
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(dir.join(MAIN_PID_FILE)).ok()
    });
    match supervise(&spec, main_pid_file) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("cri-systemd init: {e}");
            error_file.write(&e.to_string());
            std::process::exit(1);
        }
    }
}

/// When stdout and stderr are the daemon's output pipes (`runtime::logs`), replaces each with the
/// same pipe opened read-write, through the host's /proc while it is still in view. The pipe
/// then never lacks a reader, so a container whose daemon lost its read ends (a `systemctl
/// stop` of the daemon before systemd 254) is never killed by SIGPIPE: its writes wait in the
/// pipe until a restarted daemon opens the pipe again through `/proc/<pid>/fd` (nothing is lost).
/// Reading its own stdout is all it gains.
fn hold_output_pipes() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for target in [1, 2] {
        // SAFETY: fd 1 and 2 stay open for the whole call; borrowed only to look at them.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(target) };
        match nix::sys::stat::fstat(fd) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFIFO => {}
            _ => continue,
        }
        let pipe = nix::fcntl::open(
            format!("/proc/self/fd/{target}").as_str(),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: dup2 on two valid descriptors; `pipe` stays owned and is closed after.
        if unsafe { libc::dup2(pipe.as_raw_fd(), target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The spec's error_file, its directory opened before any namespace is entered, so the message
/// lands on the host whatever mount namespace init ends up in.
struct ErrorFile {
    dir: Option<OwnedFd>,
    name: Vec<u8>,
}

impl ErrorFile {
    fn open(path: &Path) -> ErrorFile {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
        let dir =
            nix::fcntl::open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty());
        match &dir {
            Ok(fd) if !name.is_empty() => {
                match nix::unistd::unlinkat(fd, OsStr::from_bytes(&name), nix::unistd::UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => eprintln!("cri-systemd init: remove stale {}: {}", path.display(), errno_desc(e)),
                }
            }
            Ok(_) => eprintln!("cri-systemd init: error file {} has no file name", path.display()),
            Err(e) => {
                eprintln!("cri-systemd init: open directory of error file {}: {}", path.display(), errno_desc(*e))
            }
        }
        ErrorFile { dir: dir.ok(), name }
    }

    fn write(&self, message: &str) {
        let Some(dir) = &self.dir else { return };
        if self.name.is_empty() {
            return;
        }
        let line = format!("{}\n", message.replace('\n', " "));
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let result = nix::fcntl::openat(
            dir,
            OsStr::from_bytes(&self.name),
            flags,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .map(std::fs::File::from)
        .and_then(|mut file| {
            file.write_all(line.as_bytes()).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        });
        if let Err(e) = result {
            eprintln!("cri-systemd init: write error file: {}", errno_desc(e));
        }
    }
}

/// Messages of the child on the report pipe: `READY` (set up, about to exec), or `ERROR` followed
/// by the message up to EOF. A bare EOF after "go" means execve succeeded (the pipe is CLOEXEC).
const MSG_READY: u8 = b'R';
const MSG_ERROR: u8 = b'E';
const MSG_GO: u8 = b'G';

/// Where init writes the container's main PID (beside the spec's `error_file`), before handing it
/// to systemd: the daemon follows that process without asking systemd (a D-Bus round trip per start).
pub const MAIN_PID_FILE: &str = "main.pid";

/// The parent's side: validate, enter namespaces, fork, and hand the child over to systemd.
fn supervise(spec: &InitSpec, main_pid_file: Option<std::fs::File>) -> Result<()> {
    process::validate(&spec.oci)?;
    let notifier = notify::Notifier::open()?;
    // First, while init is root in the node's namespaces and sees its cgroup file systems: the
    // entrypoint forked below inherits the (v1) cgroup and starts limited.
    if hugetlb::wanted(&spec.hugepage_limits) {
        hugetlb::apply_to_self(&spec.hugepage_limits)?;
    }
    // The v1 hierarchies systemd leaves the unit out of (cpuacct of its own: the pod's CPU).
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if let Some(relative) = cgroup::systemd_cgroup(&cgroups) {
        cgroup::join_unmanaged_v1(&relative)?;
    }
    let mut plan = namespaces::open(&spec.oci, spec.pod_mounts.as_ref())?;
    // Before any namespace is entered: the helpers of the idmaps must be seen in init's /proc
    // and must not be the first process of the container's PID namespace.
    plan.idmaps = idmap::IdmapNamespaces::prepare(spec)?;
    namespaces::enter(&mut plan)?;

    let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "create report pipe".into())?;
    let (go_r, go_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "create go pipe".into())?;

    // SAFETY: init is single-threaded (no async runtime, no thread spawned before this point), so
    // the child may run arbitrary code, allocation included, until it execs or exits.
    let fork = unsafe { nix::unistd::fork() }.ctx(|| "fork container process".into())?;
    let child = match fork {
        ForkResult::Child => {
            drop(report_r);
            drop(go_w);
            child_main(spec, &plan, report_w, go_r)
        }
        ForkResult::Parent { child } => child,
    };
    drop(report_w);
    drop(go_r);
    let mut report = std::fs::File::from(report_r);

    // Phase 1: setup, up to the moment before execve.
    match read_report(&mut report)? {
        Report::Ready => {}
        Report::Error(message) => {
            reap(child);
            return Err(Error::Failed(message));
        }
        Report::Eof => return Err(Error::new(format!("container process died during setup ({})", reap(child)))),
    }

    // Phase 2: the child is alive and blocked on "go": make it the main PID before it can exit.
    if let Some(mut file) = main_pid_file {
        // Best effort: without it the daemon asks systemd.
        let _ = file.write_all(child.to_string().as_bytes());
    }
    notifier.notify(&format!("MAINPID={child}"))?;
    let mut go = std::fs::File::from(go_w);
    go.write_all(&[MSG_GO]).ctx(|| "release container process".into())?;
    drop(go);

    match read_report(&mut report)? {
        // Never reap the child from here on: systemd must collect its exit status.
        Report::Eof => {
            // The entrypoint runs: poststart hooks before StartContainer returns; not fatal.
            hooks::run_stage_logged(spec, hooks::Stage::Poststart, child.as_raw() as u32);
            notifier.notify("READY=1")?;
            Ok(())
        }
        Report::Error(message) => Err(Error::Failed(message)),
        Report::Ready => Err(Error::new("container process: unexpected message after go")),
    }
}

enum Report {
    Ready,
    Error(String),
    Eof,
}

fn read_report(pipe: &mut std::fs::File) -> Result<Report> {
    let mut tag = [0u8; 1];
    loop {
        match pipe.read(&mut tag) {
            Ok(0) => return Ok(Report::Eof),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).ctx(|| "read report of container process".into()),
        }
    }
    match tag[0] {
        MSG_READY => Ok(Report::Ready),
        MSG_ERROR => {
            let mut message = Vec::new();
            pipe.read_to_end(&mut message).ctx(|| "read error of container process".into())?;
            Ok(Report::Error(String::from_utf8_lossy(&message).trim().to_string()))
        }
        other => Err(Error::new(format!("container process sent an unknown message {other:#x}"))),
    }
}

/// Waits for a child that failed during setup; describes how it ended.
fn reap(child: Pid) -> String {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return format!("exit status {code}"),
            Ok(WaitStatus::Signaled(_, signal, _)) => return format!("killed by {signal}"),
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => return format!("wait: {}", errno_desc(e)),
        }
    }
}

/// The forked child: set up and exec, reporting failures. Never returns.
fn child_main(spec: &InitSpec, plan: &namespaces::Plan, report: OwnedFd, go: OwnedFd) -> ! {
    let result = (|| -> Result<std::convert::Infallible> {
        process::prepare_child()?;
        // The node's /proc is still in view: our pid as the node sees it, for hooks' state.
        let host_pid = std::fs::read_link("/proc/self")
            .ok()
            .and_then(|p| p.to_str().and_then(|p| p.parse::<u32>().ok()))
            .unwrap_or(0);
        namespaces::enter_mount(plan)?;
        rootfs::setup(spec, plan, host_pid)?;
        hooks::run_stage(spec, hooks::Stage::StartContainer, host_pid)?;
        let console = console_socket(spec)?;
        use std::os::fd::AsRawFd;
        let mut keep = vec![report.as_raw_fd(), go.as_raw_fd()];
        keep.extend(console.as_ref().map(|c| c.as_raw_fd()));
        let exec = process::finish(&spec.oci, plan, console.as_ref(), &keep)?;
        // Set up: tell the parent, which makes us the main PID, then wait for its go.
        write_all(&report, &[MSG_READY]);
        let mut tag = [0u8; 1];
        match nix::unistd::read(&go, &mut tag) {
            Ok(1) if tag[0] == MSG_GO => {}
            // The parent died or failed: nobody will adopt us.
            _ => exit_now(1),
        }
        drop(go);
        Err(exec.exec())
    })();
    let Err(e) = result;
    let mut message = vec![MSG_ERROR];
    message.extend_from_slice(e.to_string().as_bytes());
    write_all(&report, &message);
    exit_now(127)
}

/// The console socket (the unit's stdin) under a descriptor of its own, as fd 0 becomes the
/// terminal's slave.
fn console_socket(spec: &InitSpec) -> Result<Option<OwnedFd>> {
    if !spec.console_socket {
        return Ok(None);
    }
    let stdin = std::io::stdin();
    nix::fcntl::fcntl(stdin.as_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
        .map(|fd| Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }))
        .ctx(|| "duplicate the console socket".into())
}

/// The container's terminal: a new session, a pty of the container's devpts as controlling
/// terminal and stdio, and its master sent to the daemon on the console socket.
pub(crate) fn open_terminal(console: &OwnedFd) -> Result<()> {
    nix::unistd::setsid().ctx(|| "setsid".into())?;
    let master = exec_in::open_pty()?;
    let fds = [std::os::fd::AsRawFd::as_raw_fd(&master)];
    let cmsgs = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(b"T")];
    loop {
        let sent = nix::sys::socket::sendmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(console),
            &iov,
            &cmsgs,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        );
        match sent {
            Err(Errno::EINTR) => continue,
            other => return other.map(drop).ctx(|| "send the terminal to cri-systemd".into()),
        }
    }
}

fn write_all(fd: &OwnedFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match nix::unistd::write(fd.as_fd(), bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// Leaves the forked child without running atexit handlers or flushing the parent's buffers.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and always allowed.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    /// Crates that start threads behind the caller's back (async runtimes, thread pools). init
    /// forks and runs arbitrary code in the child, which is only safe single-threaded: none of
    /// them may ever be a (normal) dependency of this crate.
    const THREADED: &[&str] =
        &["tokio", "async-std", "smol", "async-executor", "async-global-executor", "futures-executor", "rayon"];

    #[test]
    fn no_async_runtime_or_thread_pool_in_the_dependency_tree() {
        let output = std::process::Command::new(env!("CARGO"))
            .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "--format", "{p}", "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .args(["-p", env!("CARGO_PKG_NAME")])
            .output()
            .expect("run cargo tree");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
        let names: Vec<&str> = stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
        assert!(names.contains(&"nix"), "cargo tree listed no dependencies: {stdout}");
        let threaded: Vec<&str> = names.iter().copied().filter(|n| THREADED.contains(n)).collect();
        assert!(threaded.is_empty(), "init must stay single-threaded, but depends on {threaded:?}");
    }
}
