//! Seccomp profiles in the OCI form `cri-systemd init` compiles.
//!
//! RuntimeDefault: what containerd and Docker allow by default. Syscalls that need a capability
//! are allowed only when the container has it; `clone` may not create namespaces and `clone3`
//! answers ENOSYS (so that libc falls back to `clone`, whose flags can be checked) unless the
//! container has CAP_SYS_ADMIN.
//!
//! Localhost: a profile file on the node in Docker's seccomp format (the one the kubelet's
//! `localhost/` profiles and containerd use; the OCI form is a subset of it), read once at
//! CreateContainer, so that a later change of the file does not change a created container.
//!
//! # From the daemon to init
//!
//! seccomp RuntimeDefault is built by the daemon as an OCI profile (`seccomp_profile.rs`:
//! containerd's allowlist, capability-gated syscalls only with the capability) and compiled by init
//! with `seccompiler` into stacked BPF filters, installed just before the change of user. Localhost
//! profiles (Docker's format, as the kubelet's are) are read, filtered by their includes/excludes
//! and compiled once at CreateContainer, so a bad profile fails there and a later edit of the file
//! does not change a created container (as with containerd).

use serde::Deserialize;
use serde_json::{Value, json};

/// Allowed for every container.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "arch_prctl",
    "modify_ldt",
];

/// Allowed only with the capability named first.
const WITH_CAPABILITY: &[(&str, &[&str])] = &[
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount2",
            "unshare",
        ],
    ),
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    ("CAP_SYS_MODULE", &["delete_module", "init_module", "finit_module"]),
    ("CAP_SYS_PACCT", &["acct"]),
    ("CAP_SYS_PTRACE", &["kcmp", "pidfd_getfd", "process_madvise"]),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    ("CAP_SYS_TIME", &["settimeofday", "clock_settime"]),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    ("CAP_SYS_NICE", &["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"]),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// Namespace flags of clone(2): CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
/// CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
/// personality(2) values programs commonly need: PER_LINUX, UNAME26, PER_LINUX32, and the query.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];
const AF_VSOCK: u64 = 40;

/// The profile for a container with capabilities `caps` (names like `CAP_SYS_ADMIN`).
pub fn runtime_default(caps: &[String]) -> Value {
    let has = |cap: &str| caps.iter().any(|c| c == cap);
    let mut allowed: Vec<&str> = ALLOWED.to_vec();
    for (cap, names) in WITH_CAPABILITY {
        if has(cap) {
            allowed.extend_from_slice(names);
        }
    }
    let mut syscalls = vec![
        json!({"names": allowed, "action": "SCMP_ACT_ALLOW"}),
        json!({"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]}),
    ];
    for personality in PERSONALITIES {
        syscalls.push(json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": personality, "op": "SCMP_CMP_EQ"}]}));
    }
    if !has("CAP_SYS_ADMIN") {
        syscalls.push(json!({
            "names": ["clone"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
        syscalls.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}));
    }
    json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": libc::EPERM, "syscalls": syscalls})
}

/// Docker's seccomp profile format, as far as it differs from the OCI form.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerProfile {
    default_action: String,
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    arch_map: Vec<Value>,
    #[serde(default)]
    syscalls: Vec<DockerSyscall>,
    #[serde(default)]
    flags: Vec<String>,
    listener_path: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerSyscall {
    /// The old single-name form.
    #[serde(default)]
    name: String,
    #[serde(default)]
    names: Vec<String>,
    action: String,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

/// When a syscall entry applies: `includes` needs all of it, `excludes` any of it.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    min_kernel: Option<String>,
}

/// This machine's names in profiles: Docker's (Go's) and libseccomp's.
fn native_arch_names() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "x86_64" => &["amd64", "x86_64", "SCMP_ARCH_X86_64"],
        "aarch64" => &["arm64", "aarch64", "SCMP_ARCH_AARCH64"],
        _ => &[],
    }
}

/// `major.minor` of the running kernel.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    parse_version(&release).unwrap_or((0, 0))
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Why a Localhost profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("not a seccomp profile: {0}")]
    NotAProfile(#[from] serde_json::Error),
    #[error("seccomp notify listeners (listenerPath) are not supported")]
    Listener,
    #[error("a profile may give architectures or archMap, not both")]
    ArchitecturesAndArchMap,
    #[error("syscalls[{0}] gives both name and names")]
    NameAndNames(usize),
    #[error("syscalls[{0}] names no syscall")]
    NoSyscall(usize),
    #[error("bad minKernel {0:?}")]
    BadMinKernel(String),
}

impl Filter {
    /// Whether this filter, read as `includes`, admits the entry.
    fn includes(&self, caps: &[String], kernel: (u32, u32)) -> Result<bool, ProfileError> {
        Ok(self.caps.iter().all(|c| caps.contains(c))
            && (self.arches.is_empty() || self.arches.iter().any(|a| native_arch_names().contains(&a.as_str())))
            && match &self.min_kernel {
                Some(min) => kernel >= parse_version(min).ok_or_else(|| ProfileError::BadMinKernel(min.clone()))?,
                None => true,
            })
    }

    /// Whether this filter, read as `excludes`, rules the entry out.
    fn excludes(&self, caps: &[String], kernel: (u32, u32)) -> Result<bool, ProfileError> {
        Ok(self.caps.iter().any(|c| caps.contains(c))
            || self.arches.iter().any(|a| native_arch_names().contains(&a.as_str()))
            || match &self.min_kernel {
                Some(min) => kernel >= parse_version(min).ok_or_else(|| ProfileError::BadMinKernel(min.clone()))?,
                None => false,
            })
    }
}

/// A Localhost profile (Docker's format) for a container with capabilities `caps`, in the OCI
/// form; entries whose includes/excludes do not fit this container and machine are left out, as
/// Docker and containerd do.
pub fn localhost(text: &[u8], caps: &[String]) -> Result<Value, ProfileError> {
    localhost_on(text, caps, kernel_version())
}

fn localhost_on(text: &[u8], caps: &[String], kernel: (u32, u32)) -> Result<Value, ProfileError> {
    let profile: DockerProfile = serde_json::from_slice(text)?;
    if profile.listener_path.as_deref().is_some_and(|p| !p.is_empty()) {
        return Err(ProfileError::Listener);
    }
    if !profile.architectures.is_empty() && !profile.arch_map.is_empty() {
        return Err(ProfileError::ArchitecturesAndArchMap);
    }
    let mut syscalls = Vec::new();
    for (index, call) in profile.syscalls.iter().enumerate() {
        if call.excludes.excludes(caps, kernel)? || !call.includes.includes(caps, kernel)? {
            continue;
        }
        let names = match (call.name.is_empty(), call.names.is_empty()) {
            (false, true) => vec![call.name.clone()],
            (true, false) => call.names.clone(),
            (false, false) => return Err(ProfileError::NameAndNames(index)),
            (true, true) => return Err(ProfileError::NoSyscall(index)),
        };
        let mut rule = json!({"names": names, "action": call.action, "args": call.args});
        if let Some(errno) = call.errno_ret {
            rule["errnoRet"] = json!(errno);
        }
        syscalls.push(rule);
    }
    let mut oci = json!({"defaultAction": profile.default_action, "syscalls": syscalls});
    if let Some(errno) = profile.default_errno_ret {
        oci["defaultErrnoRet"] = json!(errno);
    }
    if !profile.flags.is_empty() {
        oci["flags"] = json!(profile.flags);
    }
    Ok(oci)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_profiles_keep_the_entries_that_fit() {
        let profile = br#"{
            "defaultAction": "SCMP_ACT_ERRNO",
            "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
            "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW", "comment": "always"},
                {"name": "mkdir", "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["chroot"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_CHROOT"]}},
                {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "5.8"}},
                {"names": ["s390_pci_mmio_read"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}}
            ]
        }"#;
        let oci = localhost_on(profile, &["CAP_SYS_CHROOT".into()], (5, 4)).unwrap();
        let names: Vec<String> = oci["syscalls"].as_array().unwrap().iter().map(|r| r["names"].to_string()).collect();
        assert_eq!(names, [r#"["read","write"]"#, r#"["mkdir"]"#]);
        assert_eq!(oci["syscalls"][1]["errnoRet"], 13);
        let oci = localhost_on(profile, &["CAP_SYS_ADMIN".into()], (6, 1)).unwrap();
        assert_eq!(oci["syscalls"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn malformed_localhost_profiles_are_refused() {
        for (profile, message) in [
            (&b"{"[..], "not a seccomp profile"),
            (br#"{"syscalls": []}"#, "defaultAction"),
            (br#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"action": "SCMP_ACT_ALLOW"}]}"#, "names no syscall"),
            (br#"{"defaultAction": "SCMP_ACT_ERRNO", "listenerPath": "/run/x.sock"}"#, "listenerPath"),
        ] {
            let error = localhost_on(profile, &[], (6, 1)).unwrap_err().to_string();
            assert!(error.contains(message), "{error}");
        }
    }

    #[test]
    fn capabilities_open_their_syscalls() {
        let plain = runtime_default(&["CAP_CHOWN".into()]).to_string();
        assert!(!plain.contains("\"mount\"") && plain.contains("\"clone3\""));
        let admin = runtime_default(&["CAP_SYS_ADMIN".into()]).to_string();
        assert!(admin.contains("\"mount\"") && !admin.contains("ERRNO\",\"errnoRet\":38"));
    }
}
