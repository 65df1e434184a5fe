//! The container process after pivot_root: hostname, sysctls, masked and read-only paths,
//! rlimits, user and groups, capabilities, no_new_privs, and the execve of the entrypoint.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::fs::PermissionsExt;

use nix::errno::Errno;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{Capability, LinuxCapabilities, PosixRlimitType, Process, Spec};

use crate::namespaces::{self, Plan};
use crate::{Context, Error, Result, errno_desc, rootfs};

/// The PATH used to find the entrypoint when the spec's env has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Refuses what init does not implement rather than silently running the container without it.
pub(crate) fn validate(spec: &Spec) -> Result<()> {
    let process = spec.process().as_ref().ok_or_else(|| Error::invalid("spec has no process"))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Error::invalid("process.args must not be empty"));
    }
    if process.terminal() == Some(true) {
        return Err(Error::invalid("process.terminal is not supported yet"));
    }
    if !process.cwd().is_absolute() {
        return Err(Error::invalid(format!("cwd {:?} is not an absolute path", process.cwd())));
    }
    if process.selinux_label().as_deref().is_some_and(|l| !l.is_empty()) {
        return Err(Error::invalid("selinux labels are not supported"));
    }
    let root = spec.root().as_ref().ok_or_else(|| Error::invalid("spec has no root"))?;
    if !root.path().is_absolute() {
        return Err(Error::invalid(format!("root.path {} is not an absolute path", root.path().display())));
    }
    if let Some(linux) = spec.linux() {
        if let Some(profile) = linux.seccomp() {
            // Compiled here too, so that a bad profile fails before anything is set up.
            crate::seccomp::compile(profile)?;
        }
        if linux.mount_label().as_deref().is_some_and(|l| !l.is_empty()) {
            return Err(Error::invalid("selinux mount labels are not supported"));
        }
    }
    Ok(())
}

/// First thing in the forked child: a clean slate for what the container inherits.
pub(crate) fn prepare_child() -> Result<()> {
    // Modes of the nodes and dirs init creates are exact; the spec's umask is set before exec.
    nix::sys::stat::umask(Mode::empty());
    // Nothing inherited from systemd or the daemon leaks into the container (stdio excepted).
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only sets flags on this process's descriptors; no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) };
    Errno::result(rc).ctx(|| "mark inherited descriptors close-on-exec".into())?;
    Ok(())
}

/// The process to exec, resolved: what remains once everything else is set up.
#[derive(Debug)]
pub(crate) struct Exec {
    path: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    shown: String,
}

/// Everything after pivot_root up to (not including) the execve.
/// `keep`: the descriptors the caller still needs (report pipes, console socket); every other one
/// above 2 is closed before the chdir.
pub(crate) fn finish(spec: &Spec, plan: &Plan, console: Option<&std::os::fd::OwnedFd>, keep: &[RawFd]) -> Result<Exec> {
    let process = spec.process().as_ref().ok_or_else(|| Error::new("spec has no process"))?;
    let linux = spec.linux().as_ref();

    if let Some(hostname) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        if !plan.uts {
            return Err(Error::new("unable to set hostname without a private UTS namespace"));
        }
        nix::unistd::sethostname(hostname).ctx(|| format!("set hostname {hostname:?}"))?;
    }
    if let Some(domainname) = spec.domainname().as_deref().filter(|d| !d.is_empty()) {
        if !plan.uts {
            return Err(Error::new("unable to set domainname without a private UTS namespace"));
        }
        // SAFETY: a pointer and length of a live byte slice; the kernel only reads it.
        let rc = unsafe { libc::setdomainname(domainname.as_ptr().cast(), domainname.len()) };
        Errno::result(rc).ctx(|| format!("set domainname {domainname:?}"))?;
    }

    let mut sysctls: Vec<_> = linux.and_then(|l| l.sysctl().as_ref()).map(|s| s.iter().collect()).unwrap_or_default();
    sysctls.sort();
    for (key, value) in sysctls {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).ctx(|| format!("write sysctl {key}={value}"))?;
    }
    for path in linux.and_then(|l| l.readonly_paths().as_deref()).unwrap_or_default() {
        rootfs::readonly_path(path)?;
    }
    for path in linux.and_then(|l| l.masked_paths().as_deref()).unwrap_or_default() {
        rootfs::mask_path(path)?;
    }
    // As runc: a missing working directory is created (while the root is still writable),
    // owned by the container's root.
    let cwd = process.cwd();
    rootfs::create_cwd(cwd);
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        rootfs::remount_root_readonly()?;
    }
    // Everything that needs the node's root is done once the rlimits are set: from there on,
    // root of the pod's user namespace at most (its capabilities are set like anyone's).
    // Mounts that propagate back to the node need the node's mount namespace as their owner.
    let shares_mounts = linux.and_then(|l| l.rootfs_propagation().as_deref()) == Some("rshared");
    prepare_exec(process, linux.and_then(|l| l.seccomp().as_ref()), keep, || {
        namespaces::enter_user(plan)?;
        if !shares_mounts {
            namespaces::own_mounts_in_user_namespace(plan)?;
        }
        // As root of the pod's user namespace, so that the terminal is the container's own.
        match console {
            Some(console) => crate::open_terminal(console),
            // A session of its own, as runc's init makes: CRIU refuses to checkpoint a container
            // whose session leader is outside its PID namespace (init's parent was).
            None => nix::unistd::setsid().map(drop).ctx(|| "setsid".into()),
        }
    })
}

/// The process's own setup, shared by init and `exec-in` (which runs in the container's root
/// already): rlimits, then `enter_user` (joining the container's user namespace, if any: raising
/// a hard limit takes the node's CAP_SYS_RESOURCE, everything after runs as root of that
/// namespace at most), bounding set, user and groups, cwd, capabilities, no_new_privs, umask,
/// environment, and the lookup of the executable.
///
/// Before the chdir, every descriptor above 2 but `keep` (pipes and sockets of the caller's) is
/// closed: none can be reached through `/proc/self/fd/N` by the working directory or the
/// executable's path (CVE-2024-21626). `keep` must hold every descriptor the caller still owns.
pub(crate) fn prepare_exec(
    process: &Process,
    seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
    keep: &[RawFd],
    enter_user: impl FnOnce() -> Result<()>,
) -> Result<Exec> {
    let cwd = process.cwd();
    let seccomp = seccomp.map(crate::seccomp::compile).transpose()?;
    set_rlimits(process)?;
    enter_user()?;
    let caps = process.capabilities().as_ref();
    let last_cap = last_cap();
    if let Some(caps) = caps {
        drop_bounding(caps, last_cap)?;
    }
    if let Some(profile) = process.apparmor_profile().as_deref().filter(|p| !p.is_empty()) {
        apparmor_on_exec(profile)?;
    }
    close_descriptors_except(keep)?;
    let chdir = |cwd: &std::path::Path| {
        enter_cwd(cwd)
            .map_err(|e| Error::new(format!("chdir to cwd ({:?}) set in config.json failed: {}", cwd, errno_desc(e))))
    };
    // As runc: chdir as root first (a dir the user cannot reach), again as the user on EACCES/EPERM.
    let chdir_later = match enter_cwd(cwd) {
        Ok(()) => false,
        Err(Errno::EACCES | Errno::EPERM) => true,
        Err(_) => return chdir(cwd).map(|_| unreachable!()),
    };
    if !chdir_later {
        check_cwd_in_root(cwd)?;
    }
    // Installed while still privileged (as runc does), so that no no_new_privs is needed; the
    // filter allows what is left to do: the user and capability changes and the execve.
    if let Some(programs) = &seccomp {
        crate::seccomp::install(programs)?;
    }
    set_user(process)?;
    if chdir_later {
        chdir(cwd)?;
        check_cwd_in_root(cwd)?;
    }
    if let Some(caps) = caps {
        set_caps(caps, last_cap)?;
    }
    if process.no_new_privileges() == Some(true) {
        nix::sys::prctl::set_no_new_privs().ctx(|| "set no_new_privs".into())?;
    }
    let umask = process.user().umask().unwrap_or(0o022);
    nix::sys::stat::umask(Mode::from_bits_truncate(umask & 0o777));

    let mut env: Vec<String> = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home_of(process.user().uid())));
    }
    let args = process.args().as_deref().unwrap_or_default();
    let path = lookup(&args[0], &env)?;
    let cstring =
        |s: &str, what: &str| CString::new(s).map_err(|_| Error::new(format!("{what} {s:?} contains a NUL byte")));
    Ok(Exec {
        path: cstring(&path, "executable")?,
        args: args.iter().map(|a| cstring(a, "argument")).collect::<Result<_>>()?,
        env: env.iter().map(|e| cstring(e, "environment variable")).collect::<Result<_>>()?,
        shown: path,
    })
}

/// Closes every descriptor above 2 except `keep`.
pub(crate) fn close_descriptors_except(keep: &[RawFd]) -> Result<()> {
    let mut keep: Vec<libc::c_uint> = keep.iter().filter(|fd| **fd > 2).map(|fd| *fd as libc::c_uint).collect();
    keep.sort_unstable();
    keep.dedup();
    let close_range = |first: libc::c_uint, last: libc::c_uint| {
        // SAFETY: close_range only closes this process's descriptors; the caller keeps (and so
        // still owns) only those in `keep`.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) };
        Errno::result(rc).map(drop).ctx(|| format!("close descriptors {first} to {last}"))
    };
    let mut first: libc::c_uint = 3;
    for fd in keep {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd + 1;
    }
    close_range(first, libc::c_uint::MAX)
}

/// chdir to `cwd` resolved inside the root (`/`): symlinks stay in it, magic links such as
/// `/proc/self/fd/N` are refused (ELOOP).
fn enter_cwd(cwd: &std::path::Path) -> std::result::Result<(), Errno> {
    use nix::fcntl::OFlag;
    let root = nix::fcntl::open("/", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    let dir = rootfs::open_in_root(&root, cwd, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())?;
    nix::unistd::fchdir(&dir)
}

/// The kernel's getcwd prefixes "(unreachable)" to a cwd outside the process's root: refuse to
/// exec there, whatever path led to it.
fn check_cwd_in_root(cwd: &std::path::Path) -> Result<()> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the kernel writes at most buf.len() bytes into the buffer, which lives across the call.
    let rc = unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
    let refuse = |why: String| Err(Error::new(format!("chdir to cwd ({cwd:?}) set in config.json failed: {why}")));
    if rc < 0 {
        return refuse(format!("cannot verify the working directory: {}", errno_desc(Errno::last())));
    }
    if buf.first() != Some(&b'/') {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        return refuse(format!(
            "the working directory {:?} is outside the container's root",
            String::from_utf8_lossy(&buf[..end])
        ));
    }
    Ok(())
}

impl Exec {
    /// execve. Returns only on failure.
    pub(crate) fn exec(self) -> Error {
        reset_signals();
        match nix::unistd::execve(&self.path, &self.args, &self.env) {
            Err(e) => Error::new(format!("exec {}: {}", self.shown, errno_desc(e))),
        }
    }
}

/// Confines the process with an AppArmor profile from its next execve on (as runc does): the
/// setup before it is not confined, the entrypoint is from its first instruction. Written before
/// seccomp, the user change and no_new_privs, while the process is still unconfined root.
fn apparmor_on_exec(profile: &str) -> Result<()> {
    let command = format!("exec {profile}");
    // The LSM-specific file since Linux 5.8; the shared one before (and where AppArmor is the LSM).
    let write = |path: &str| std::fs::OpenOptions::new().write(true).open(path)?.write_all(command.as_bytes());
    write("/proc/self/attr/apparmor/exec")
        .or_else(|_| write("/proc/self/attr/exec"))
        .map_err(|e| Error::new(format!("apply apparmor profile {profile:?}: {e}")))
}

/// Rust ignores SIGPIPE at start-up and ignored signals survive execve: give the container
/// default dispositions and an empty signal mask.
fn reset_signals() {
    for signal in 1..=libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: setting a default disposition installs no handler; failures (signals the C
        // library reserves) are harmless.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    let empty = nix::sys::signal::SigSet::empty();
    let _ = nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&empty), None);
}

/// Finds the entrypoint as runc does (Go's exec.LookPath with the container's PATH).
fn lookup(arg0: &str, env: &[String]) -> Result<String> {
    let check = |path: &str| -> std::result::Result<(), Errno> {
        let meta = std::fs::metadata(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        if meta.is_dir() {
            Err(Errno::EISDIR)
        } else if meta.permissions().mode() & 0o111 == 0 {
            Err(Errno::EACCES)
        } else {
            Ok(())
        }
    };
    if arg0.contains('/') {
        return match check(arg0) {
            Ok(()) => Ok(arg0.to_string()),
            Err(e @ (Errno::ENOENT | Errno::ENOTDIR)) => {
                Err(Error::new(format!("exec: {arg0:?}: stat {arg0}: {}", errno_desc(e))))
            }
            Err(e) => Err(Error::new(format!("exec: {arg0:?}: {}", errno_desc(e)))),
        };
    }
    let path_var = env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = format!("{dir}/{arg0}");
        if check(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(Error::new(format!("exec: {arg0:?}: executable file not found in $PATH")))
}

/// The user's home from the container's /etc/passwd, "/" if none.
fn home_of(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 7 && fields[2].parse() == Ok(uid)).then(|| fields[5].to_string())
        })
        .find(|home| !home.is_empty())
        .unwrap_or_else(|| "/".to_string())
}

fn set_rlimits(process: &Process) -> Result<()> {
    for rlimit in process.rlimits().as_deref().unwrap_or_default() {
        let resource = match rlimit.typ() {
            PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
            PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
            PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
            PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
            PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
            PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
            PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
            PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
            PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
            PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
            PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
            PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
            PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
            PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
            PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
            PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
        };
        let limit = libc::rlimit { rlim_cur: rlimit.soft(), rlim_max: rlimit.hard() };
        // SAFETY: pid 0 (this process), a valid rlimit to read, no old limit requested.
        let rc = unsafe { libc::prlimit(0, resource, &limit, std::ptr::null_mut()) };
        Errno::result(rc)
            .ctx(|| format!("set rlimit {} to soft {} hard {}", rlimit.typ(), rlimit.soft(), rlimit.hard()))?;
    }
    Ok(())
}

fn set_user(process: &Process) -> Result<()> {
    let user = process.user();
    // Capabilities survive the change of uid; set_caps then sets them exactly.
    nix::sys::prctl::set_keepcaps(true).ctx(|| "set keepcaps".into())?;
    let groups: Vec<Gid> =
        user.additional_gids().as_deref().unwrap_or_default().iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&groups)
        .ctx(|| format!("setgroups {:?}", user.additional_gids().as_deref().unwrap_or_default()))?;
    let gid = Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).ctx(|| format!("setgid {gid}"))?;
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).ctx(|| format!("setuid {uid}"))?;
    nix::sys::prctl::set_keepcaps(false).ctx(|| "clear keepcaps".into())?;
    Ok(())
}

/// The highest capability this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

fn cap_number(cap: Capability) -> u32 {
    use Capability::*;
    match cap {
        Chown => 0,
        DacOverride => 1,
        DacReadSearch => 2,
        Fowner => 3,
        Fsetid => 4,
        Kill => 5,
        Setgid => 6,
        Setuid => 7,
        Setpcap => 8,
        LinuxImmutable => 9,
        NetBindService => 10,
        NetBroadcast => 11,
        NetAdmin => 12,
        NetRaw => 13,
        IpcLock => 14,
        IpcOwner => 15,
        SysModule => 16,
        SysRawio => 17,
        SysChroot => 18,
        SysPtrace => 19,
        SysPacct => 20,
        SysAdmin => 21,
        SysBoot => 22,
        SysNice => 23,
        SysResource => 24,
        SysTime => 25,
        SysTtyConfig => 26,
        Mknod => 27,
        Lease => 28,
        AuditWrite => 29,
        AuditControl => 30,
        Setfcap => 31,
        MacOverride => 32,
        MacAdmin => 33,
        Syslog => 34,
        WakeAlarm => 35,
        BlockSuspend => 36,
        AuditRead => 37,
        Perfmon => 38,
        Bpf => 39,
        CheckpointRestore => 40,
    }
}

/// The capability numbers of a set, those beyond this kernel's last left out (as runc does).
fn numbers(set: Option<&HashSet<Capability>>, last_cap: u32) -> Vec<u32> {
    let mut numbers: Vec<u32> = set.into_iter().flatten().map(|c| cap_number(*c)).filter(|n| *n <= last_cap).collect();
    numbers.sort_unstable();
    numbers
}

fn prctl(option: libc::c_int, arg: libc::c_ulong, arg2: libc::c_ulong) -> nix::Result<()> {
    // SAFETY: the capability prctls used here take integer arguments only.
    let rc = unsafe { libc::prctl(option, arg, arg2, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    Errno::result(rc).map(drop)
}

/// Drops from the bounding set what the spec's bounding set lacks (needs CAP_SETPCAP: done
/// before the change of user).
fn drop_bounding(caps: &LinuxCapabilities, last_cap: u32) -> Result<()> {
    let keep = numbers(caps.bounding().as_ref(), last_cap);
    for cap in 0..=last_cap {
        if !keep.contains(&cap) {
            prctl(libc::PR_CAPBSET_DROP, cap.into(), 0)
                .ctx(|| format!("drop capability {cap} from the bounding set"))?;
        }
    }
    Ok(())
}

/// Sets the effective, permitted, inheritable and ambient sets exactly as in the spec.
fn set_caps(caps: &LinuxCapabilities, last_cap: u32) -> Result<()> {
    let set = |caps: Option<&HashSet<Capability>>| {
        let bits = numbers(caps, last_cap).into_iter().fold(0u64, |bits, cap| bits | 1 << cap);
        rustix::thread::CapabilitySet::from_bits_retain(bits)
    };
    let sets = rustix::thread::CapabilitySets {
        effective: set(caps.effective().as_ref()),
        permitted: set(caps.permitted().as_ref()),
        inheritable: set(caps.inheritable().as_ref()),
    };
    rustix::thread::set_capabilities(None, sets).ctx(|| "set capabilities (capset)".into())?;

    prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0)
        .ctx(|| "clear ambient capabilities".into())?;
    for cap in numbers(caps.ambient().as_ref(), last_cap) {
        prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong, cap.into())
            .ctx(|| format!("raise ambient capability {cap} (it must be permitted and inheritable)"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_numbers_match_the_kernel() {
        assert_eq!(cap_number(Capability::Chown), 0);
        assert_eq!(cap_number(Capability::NetBindService), 10);
        assert_eq!(cap_number(Capability::SysAdmin), 21);
        assert_eq!(cap_number(Capability::CheckpointRestore), 40);
    }

    #[test]
    fn lookup_follows_path_and_reports_like_runc() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = vec![format!("PATH=/nonexistent:{}", dir.path().display())];
        assert_eq!(lookup("tool", &env).unwrap(), exe.display().to_string());
        assert_eq!(
            lookup("nosuch", &env).unwrap_err().to_string(),
            "exec: \"nosuch\": executable file not found in $PATH"
        );
        assert_eq!(
            lookup("/nope", &env).unwrap_err().to_string(),
            "exec: \"/nope\": stat /nope: no such file or directory"
        );
    }
}
