//! Pod namespaces without a pause process: each namespace is created once, on a short-lived
//! thread, and pinned by bind-mounting its `/proc/thread-self/ns/<kind>` file under the pod's run
//! dir (as CRI-O's pinns does). Containers join the pinned files; unmounting the pins frees them.
//!
//! A pod with a user namespace gets it from a short-lived child process instead (unshare of a user
//! namespace needs a process of its own; the child shares the daemon's memory, CLONE_VM, so that
//! no page tables are copied), which then creates the pod's network, IPC and UTS
//! namespaces from inside it, so that they belong to it: root in the pod administers its own
//! network, and nothing of the node's.
//!
//! # No pause process, no shim
//!
//! Pod namespaces are created on a short-lived thread and pinned by bind mounts (like CRI-O's
//! pinns); the pod's sysctls (only namespaced ones: `net.*`, IPC) are written once, after CNI, by a
//! thread that joins those namespaces and mounts a procfs of its own (a node that is itself a
//! container has a read-only /proc/sys). A container's unit starts `cri-systemd init`, which joins
//! the pod's namespaces, mounts the overlay rootfs *inside the container's own mount namespace*
//! (nothing to leak on the host), forks the future PID 1, sends systemd `MAINPID=<child>` and
//! `READY=1` once the child exec'd, and exits. systemd adopts the entrypoint as the service's main
//! process.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::pod_mounts::PodMountNamespace;
use crate::userns::IdRange;

/// The namespaces a pod shares among its containers, each pinned at a path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNamespaces {
    pub network: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    /// The pod's user namespace, owner of the three others (absent in older records).
    #[serde(default)]
    pub user: Option<PathBuf>,
    /// The PID namespace of the pod's init process, for pods whose containers share one
    /// (pinned from the running process, see [`pin_process_namespace`]).
    #[serde(default)]
    pub pid: Option<PathBuf>,
    /// The pins but the network's are mounts of the daemon's pod mount namespace
    /// ([`crate::pod_mounts`]), as is the pod's /dev/shm; false in records of older daemons (all
    /// in the node's).
    #[serde(default)]
    pub in_pod_mounts: bool,
}

impl PodNamespaces {
    pub fn pins(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.network, &self.ipc, &self.uts, &self.user, &self.pid].into_iter().flatten()
    }

    /// Every pin a pod can have in `dir`, its pins' directory (the names the pins are made with).
    pub fn every_pin_in(dir: &Path) -> PodNamespaces {
        PodNamespaces {
            network: Some(dir.join("net")),
            ipc: Some(dir.join("ipc")),
            uts: Some(dir.join("uts")),
            user: Some(dir.join("user")),
            pid: Some(dir.join("pid")),
            in_pod_mounts: true,
        }
    }

    /// The pins that are in the pod mount namespace (all but the network's), if they are there.
    pub fn pins_in_pod_mounts(&self) -> Vec<&Path> {
        if !self.in_pod_mounts {
            return Vec::new();
        }
        [&self.ipc, &self.uts, &self.user, &self.pid].into_iter().flatten().map(PathBuf::as_path).collect()
    }
}

/// For each pod's namespaces, whether every pin still holds its namespace (they are gone after a
/// reboot, with /run). The pins in the pod mount namespace are looked at in one step into it for
/// all the pods (a thread each was tens of milliseconds at a daemon start with 1000 pods).
pub fn all_pinned(pods: &[&PodNamespaces], pod_mounts: &PodMountNamespace) -> Vec<bool> {
    let in_node = pods.iter().map(|pod| {
        let in_pod_mounts = pod.pins_in_pod_mounts();
        pod.pins().filter(|pin| !in_pod_mounts.contains(&pin.as_path())).all(|pin| is_pinned(pin))
    });
    let in_pod_mounts: Vec<bool> = if pods.iter().all(|pod| pod.pins_in_pod_mounts().is_empty()) {
        // Records of older daemons only (or none): nothing to step in for, nor to make.
        vec![true; pods.len()]
    } else {
        let look = || pods.iter().map(|pod| pod.pins_in_pod_mounts().iter().all(|pin| is_pinned(pin))).collect();
        pod_mounts.run(look).unwrap_or_else(|_| vec![false; pods.len()])
    };
    in_node.zip(in_pod_mounts).map(|(here, there)| here && there).collect()
}

/// Pins namespace `kind` of process `pid` at `pin` (a bind mount of `/proc/<pid>/ns/<kind>`), in
/// the pod mount namespace if given, else in the node's.
pub fn pin_process_namespace(
    pid: u32,
    kind: &str,
    pin: &Path,
    pod_mounts: Option<&PodMountNamespace>,
) -> std::io::Result<()> {
    let source = format!("/proc/{pid}/ns/{kind}");
    match pod_mounts {
        Some(pod_mounts) => pod_mounts.run(|| bind_pin(&source, pin))?,
        None => bind_pin(&source, pin),
    }
}

/// Pins the namespace file `source` at `pin` (a file, made here), in the caller's mount namespace.
fn bind_pin(source: &str, pin: &Path) -> std::io::Result<()> {
    std::fs::File::create(pin)?;
    nix::mount::mount(Some(source), pin, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| std::io::Error::other(format!("pin {source} at {}: {e}", pin.display())))
}

/// Which new namespaces a pod gets (NODE mode means the host's, so no new one).
#[derive(Debug, Clone, Copy)]
pub struct NewNamespaces {
    pub network: bool,
    pub ipc: bool,
    pub uts: bool,
}

/// Creates the requested namespaces and pins them in `dir` as files `net`, `ipc`, `uts` (and
/// `user`, owner of the others, when `userns` gives the pod's host id range): the network's in
/// the node's mount namespace, the others in `pod_mounts`. `hostname`, if given, is set in the
/// new UTS namespace (else it keeps the node's name), and loopback is brought up in the new
/// network namespace. `also` runs in `pod_mounts` once the pins are made (the pod's /dev/shm is
/// mounted there). On error nothing stays pinned (what `also` made is the caller's).
pub fn create_pinned(
    dir: &Path,
    wanted: NewNamespaces,
    hostname: Option<&str>,
    userns: Option<IdRange>,
    pod_mounts: &PodMountNamespace,
    also: &(dyn Fn() -> std::io::Result<()> + Sync),
) -> std::io::Result<PodNamespaces> {
    crate::store::create_private_dir_all(dir)?;
    if let Some(range) = userns {
        return create_in_user_namespace(dir, wanted, hostname, range, pod_mounts, also);
    }
    let mut flags = CloneFlags::empty();
    let mut pins = PodNamespaces { in_pod_mounts: true, ..Default::default() };
    if wanted.network {
        flags |= CloneFlags::CLONE_NEWNET;
        pins.network = Some(dir.join("net"));
    }
    if wanted.ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
        pins.ipc = Some(dir.join("ipc"));
    }
    if wanted.uts {
        flags |= CloneFlags::CLONE_NEWUTS;
        pins.uts = Some(dir.join("uts"));
    }
    if flags.is_empty() {
        return Ok(pins);
    }
    let hostname = hostname.map(str::to_string);
    let to_pin = pins.clone();
    // unshare() of these kinds moves only the calling thread; a thread of its own keeps the
    // daemon's other threads (and the tokio runtime) in the host namespaces. The thread ends
    // right after, and the pins keep the namespaces alive.
    let result = std::thread::scope(|scope| {
        scope
            .spawn(move || -> std::io::Result<()> {
                nix::sched::unshare(flags)?;
                if let Some(hostname) = hostname.filter(|_| wanted.uts) {
                    nix::unistd::sethostname(hostname)?;
                }
                if wanted.network {
                    bring_loopback_up()?;
                }
                let pin = |kind: &str, pin: &Path| bind_pin(&format!("/proc/thread-self/ns/{kind}"), pin);
                if let Some(net) = &to_pin.network {
                    pin("net", net)?;
                }
                // This thread ends after: it may stay in the pod mount namespace.
                pod_mounts.enter_this_thread()?;
                for (kind, path) in [("ipc", &to_pin.ipc), ("uts", &to_pin.uts)] {
                    if let Some(path) = path {
                        pin(kind, path)?;
                    }
                }
                also()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    });
    if let Err(e) = result {
        let _ = release(&pins, &[], pod_mounts);
        return Err(e);
    }
    Ok(pins)
}

/// The steps of the namespace child, in the order it takes them; a failure reports its step.
const STEP_USERNS: u8 = 1;
const STEP_NAMESPACES: u8 = 2;
const STEP_HOSTNAME: u8 = 3;
const STEP_LOOPBACK: u8 = 4;

fn step_name(step: u8) -> &'static str {
    match step {
        STEP_USERNS => "unshare the user namespace",
        STEP_NAMESPACES => "unshare the pod's namespaces in its user namespace",
        STEP_HOSTNAME => "set the hostname",
        STEP_LOOPBACK => "bring up loopback",
        _ => "set up namespaces",
    }
}

/// The pod's user namespace, mapping ids 0.. to `range`, with the wanted namespaces created
/// inside it: a forked child unshares the user namespace, this thread writes its id maps (the
/// child cannot map ids of the node), the child creates the other namespaces, and this thread
/// pins all of them from /proc/<child>/ns before letting the child exit.
fn create_in_user_namespace(
    dir: &Path,
    wanted: NewNamespaces,
    hostname: Option<&str>,
    range: IdRange,
    pod_mounts: &PodMountNamespace,
    also: &(dyn Fn() -> std::io::Result<()> + Sync),
) -> std::io::Result<PodNamespaces> {
    let mut flags = 0;
    let mut pins = PodNamespaces { user: Some(dir.join("user")), in_pod_mounts: true, ..Default::default() };
    if wanted.network {
        flags |= libc::CLONE_NEWNET;
        pins.network = Some(dir.join("net"));
    }
    if wanted.ipc {
        flags |= libc::CLONE_NEWIPC;
        pins.ipc = Some(dir.join("ipc"));
    }
    if wanted.uts {
        flags |= libc::CLONE_NEWUTS;
        pins.uts = Some(dir.join("uts"));
    }
    // Everything the child needs is made before the clone: the child shares this process's
    // memory and may not allocate.
    let hostname = hostname
        .map(|h| CString::new(h).map_err(|_| std::io::Error::other("hostname contains a NUL byte")))
        .transpose()?;
    let (to_child_r, to_child_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (from_child_r, from_child_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let child = ChildArgs {
        to_child: to_child_r.as_raw_fd(),
        from_child: from_child_w.as_raw_fd(),
        close: [to_child_w.as_raw_fd(), from_child_r.as_raw_fd()],
        flags,
        wanted,
        hostname: hostname.as_ref(),
    };
    // A process of its own (unshare of a user namespace needs one), but sharing this one's memory
    // (CLONE_VM) on a stack of its own: a fork would copy the daemon's page tables and tear them
    // down again, about 1.6 ms of each pod start (measured with `bench userns`).
    let mut stack = vec![0u128; CHILD_STACK_BYTES / 16];
    // SAFETY: the stack is live until the child is reaped below, and its top is 16-byte aligned
    // (u128 elements); `child` and what it points to outlive the child too. The child runs only
    // raw system calls (namespace_child) on its own stack, touches no memory it shares with us
    // but `child`, which it only reads, and leaves with _exit. It has its own copy of the file
    // descriptor table (no CLONE_FILES) and of the signal handlers (no CLONE_SIGHAND).
    let pid = unsafe {
        libc::clone(
            namespace_child_entry,
            stack.as_mut_ptr().add(stack.len()).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            (&raw const child).cast_mut().cast(),
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(to_child_r);
    drop(from_child_w);
    let result = (|| -> std::io::Result<()> {
        expect_child(&from_child_r, STEP_USERNS)?;
        let line = format!("0 {} {}\n", range.host_id, range.size);
        for map in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{map}"), &line).map_err(|e| {
                std::io::Error::new(e.kind(), format!("write {map} of the pod's user namespace ({}): {e}", line.trim()))
            })?;
        }
        nix::unistd::write(&to_child_w, &[STEP_NAMESPACES])?;
        expect_child(&from_child_r, STEP_LOOPBACK)?;
        let pin = |kind: &str, pin: &Path| bind_pin(&format!("/proc/{pid}/ns/{kind}"), pin);
        if let Some(net) = &pins.network {
            pin("net", net)?;
        }
        pod_mounts.run(|| {
            for (kind, path) in [("user", &pins.user), ("ipc", &pins.ipc), ("uts", &pins.uts)] {
                if let Some(path) = path {
                    pin(kind, path)?;
                }
            }
            also()
        })?
    })();
    // Closing the pipe ends the child, whatever state it is in.
    drop(to_child_w);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    // The child is gone: its stack may go too.
    drop(stack);
    if let Err(e) = result {
        let _ = release(&pins, &[], pod_mounts);
        return Err(e);
    }
    Ok(pins)
}

/// Waits for the child to report `step` done; its failure comes as the step and an errno.
fn expect_child(from_child: &OwnedFd, step: u8) -> std::io::Result<()> {
    let mut message = [0u8; 6];
    let mut got = 0;
    while got < 1 || (message[0] == 0 && got < message.len()) {
        match nix::unistd::read(from_child, &mut message[got..]) {
            Ok(0) => {
                return Err(std::io::Error::other(format!(
                    "the namespace child died before it could {}",
                    step_name(step)
                )));
            }
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    match message[0] {
        0 => {
            let errno = i32::from_ne_bytes([message[2], message[3], message[4], message[5]]);
            let e = std::io::Error::from_raw_os_error(errno);
            Err(std::io::Error::new(e.kind(), format!("{}: {e}", step_name(message[1]))))
        }
        done if done == step => Ok(()),
        other => Err(std::io::Error::other(format!("the namespace child reported step {other}, not {step}"))),
    }
}

/// The forked child: unshare the user namespace, wait for its maps, create the other namespaces
/// inside it, report, and stay alive (so its namespaces can be pinned) until the pipe closes.
/// Only system calls from here on: no allocation, no locks.
const CHILD_STACK_BYTES: usize = 256 * 1024;

/// What the namespace child is given (read only: it shares our memory).
struct ChildArgs<'a> {
    to_child: libc::c_int,
    from_child: libc::c_int,
    /// Our ends of the pipes, which the child closes in its own descriptor table.
    close: [libc::c_int; 2],
    flags: libc::c_int,
    wanted: NewNamespaces,
    /// None: the UTS namespace keeps the node's name.
    hostname: Option<&'a CString>,
}

extern "C" fn namespace_child_entry(args: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `args` is the ChildArgs the parent keeps alive until it has reaped this child.
    let args = unsafe { &*(args as *const ChildArgs<'_>) };
    for fd in args.close {
        // SAFETY: closes a descriptor of this process's own table (a copy of the parent's).
        unsafe { libc::close(fd) };
    }
    namespace_child(args.to_child, args.from_child, args.flags, args.wanted, args.hostname)
}

fn namespace_child(
    to_child: libc::c_int,
    from_child: libc::c_int,
    flags: libc::c_int,
    wanted: NewNamespaces,
    hostname: Option<&CString>,
) -> ! {
    let report = |message: &[u8]| {
        // SAFETY: write on an open descriptor from a live buffer.
        unsafe { libc::write(from_child, message.as_ptr().cast(), message.len()) };
    };
    let fail = |step: u8| -> ! {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO).to_ne_bytes();
        report(&[0, step, errno[0], errno[1], errno[2], errno[3]]);
        // SAFETY: _exit is async-signal-safe and always allowed.
        unsafe { libc::_exit(1) }
    };
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        fail(STEP_USERNS);
    }
    report(&[STEP_USERNS]);
    let mut go = [0u8; 1];
    // SAFETY: read into a live one-byte buffer.
    if unsafe { libc::read(to_child, go.as_mut_ptr().cast(), 1) } != 1 {
        // SAFETY: as above.
        unsafe { libc::_exit(1) }
    }
    // SAFETY: unshare takes flags only; the child is root of its new user namespace now.
    if flags != 0 && unsafe { libc::unshare(flags) } != 0 {
        fail(STEP_NAMESPACES);
    }
    if let Some(hostname) = hostname.filter(|_| wanted.uts) {
        // SAFETY: a pointer and length of a live NUL-terminated string, read only.
        if unsafe { libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len()) } != 0 {
            fail(STEP_HOSTNAME);
        }
    }
    if wanted.network && bring_loopback_up().is_err() {
        fail(STEP_LOOPBACK);
    }
    report(&[STEP_LOOPBACK]);
    // SAFETY: as above; returns once the parent closes its end.
    unsafe { libc::read(to_child, go.as_mut_ptr().cast(), 1) };
    // SAFETY: as above.
    unsafe { libc::_exit(0) }
}

/// Unpins the namespaces (they die with their last user) and removes the pin files, and unmounts
/// `also` (the pod's /dev/shm). Missing pins are fine; every pin is tried, in both mount
/// namespaces, and every failure is returned (none: all released).
pub(crate) fn release(pins: &PodNamespaces, also: &[&Path], pod_mounts: &PodMountNamespace) -> Vec<Error> {
    let paths: Vec<&Path> = pins.pins().map(PathBuf::as_path).chain(also.iter().copied()).collect();
    let mut errors = pod_mounts.unmount_everywhere(&paths);
    for pin in pins.pins() {
        match std::fs::remove_file(pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(Error::Io { what: format!("remove {}", pin.display()), source: e }),
        }
    }
    errors
}

/// Whether `pin` still holds a namespace (it is gone after a reboot, with /run).
pub fn is_pinned(pin: &Path) -> bool {
    // nsfs files report the NSFS magic; an unmounted leftover file is a plain empty file.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(pin).map(|fs| fs.filesystem_type().0 == NSFS_MAGIC).unwrap_or(false)
}

/// How long a connection to a pod's port may take to be made.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to `port` on the loopback of network namespace `netns` (a pinned pod namespace; the
/// daemon's own for `None`, as for hostNetwork pods), IPv4 first, then IPv6, as containerd does.
/// The socket belongs to the namespace it was made in and is used from anywhere after. Blocks.
pub fn connect_loopback(netns: Option<&Path>, port: u16) -> std::io::Result<std::net::TcpStream> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    let netns = netns.map(Path::to_path_buf);
    // A thread of our own: setns moves only the calling thread, and this one ends right after
    // (a pooled thread would be reused in the pod's namespace).
    std::thread::spawn(move || -> std::io::Result<TcpStream> {
        if let Some(netns) = &netns {
            let file = std::fs::File::open(netns)?;
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        }
        let v4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|_| {
            TcpStream::connect_timeout(&SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port), CONNECT_TIMEOUT)
        })
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the connecting thread panicked")))
}

/// Sets IFF_UP on `lo` in the calling thread's network namespace.
fn bring_loopback_up() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket() has no memory-safety preconditions; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `request`, which we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `request`, which is fully initialised.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The pod namespace a sysctl belongs to (the kubelet's list of namespaced sysctls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlNamespace {
    Network,
    Ipc,
}

/// IPC sysctls under `kernel.`; `fs.mqueue.*` and `net.*` go by prefix.
const IPC_KERNEL_SYSCTLS: &[&str] =
    &["sem", "shmall", "shmmax", "shmmni", "shm_rmid_forced", "msgmax", "msgmnb", "msgmni"];

/// A pod sysctl's namespace and its file under /proc/sys. Keys come dotted
/// (`net.ipv4.ip_forward`) or, when a name has dots of its own, with slashes
/// (`net/ipv4/conf/eth0.100/rp_filter`), as the kubelet allows.
pub fn sysctl_file(key: &str) -> Result<(SysctlNamespace, PathBuf), Error> {
    let slashed = key.find(['.', '/']).is_some_and(|i| key.as_bytes()[i] == b'/');
    let parts: Vec<&str> = if slashed { key.split('/').collect() } else { key.split('.').collect() };
    if parts.iter().any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains(['\0', '/'])) || parts.len() < 2 {
        return Err(Error::InvalidSpec(format!("sysctl {key:?} is not a sysctl name")));
    }
    let namespace = match parts.as_slice() {
        ["net", ..] => SysctlNamespace::Network,
        ["fs", "mqueue", _, ..] => SysctlNamespace::Ipc,
        ["kernel", name] if IPC_KERNEL_SYSCTLS.contains(name) => SysctlNamespace::Ipc,
        _ => {
            return Err(Error::InvalidSpec(format!(
                "sysctl {key} is not namespaced: setting it for a pod would change the node"
            )));
        }
    };
    Ok((namespace, parts.iter().collect()))
}

/// Sets the pod's sysctls in its network and IPC namespaces, from a short-lived thread that
/// joins them (files under /proc/sys/net and the IPC ones answer for the namespaces of the
/// thread that opens them). The thread writes through a procfs of its own, in a mount namespace
/// of its own that ends with it: where the node itself is a container (kind, systemd-nspawn),
/// the node's /proc/sys is read-only. A value the kernel refuses is the request's fault; the
/// steps before it are the node's.
pub fn apply_sysctls(
    pins: &PodNamespaces,
    sysctls: &[(String, String)],
    pod_mounts: &PodMountNamespace,
) -> Result<(), Error> {
    let node = |what: &str| {
        let what = format!("sysctls: {what}");
        move |e: nix::errno::Errno| Error::Io { what, source: e.into() }
    };
    let mut writes = Vec::new();
    let (mut net, mut ipc) = (None, None);
    for (key, value) in sysctls {
        let (namespace, file) = sysctl_file(key)?;
        let (pin, kind, opened) = match namespace {
            SysctlNamespace::Network => (&pins.network, "network", &mut net),
            SysctlNamespace::Ipc => (&pins.ipc, "IPC", &mut ipc),
        };
        if opened.is_none() {
            let pin = pin.as_ref().ok_or_else(|| {
                Error::InvalidSpec(format!("sysctl {key}: the pod has no {kind} namespace of its own"))
            })?;
            let open = || std::fs::File::open(pin).map_err(Error::io(format!("open {}", pin.display())));
            // Opened where it is pinned; the thread below copies the node's mount namespace,
            // which is small, not the pod mount namespace.
            *opened = Some(if pins.pins_in_pod_mounts().contains(&pin.as_path()) {
                pod_mounts.run(open).map_err(Error::io("enter the pod mount namespace"))??
            } else {
                open()?
            });
        }
        writes.push((key.clone(), value.clone(), file));
    }
    std::thread::spawn(move || -> Result<(), Error> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(node("unshare the mount namespace"))?;
        nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .map_err(node("make mounts private"))?;
        nix::mount::mount(Some("proc"), "/proc", Some("proc"), MsFlags::empty(), None::<&str>)
            .map_err(node("mount a procfs"))?;
        for (ns, kind, flag) in [(net, "network", CloneFlags::CLONE_NEWNET), (ipc, "IPC", CloneFlags::CLONE_NEWIPC)] {
            if let Some(ns) = ns {
                nix::sched::setns(ns, flag).map_err(node(&format!("join the pod's {kind} namespace")))?;
            }
        }
        for (key, value, file) in &writes {
            std::fs::write(Path::new("/proc/sys").join(file), value)
                .map_err(|e| Error::InvalidSpec(format!("sysctl {key}={value:?}: {e}")))?;
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(Error::Io { what: "sysctls".into(), source: std::io::Error::other("the thread panicked") }))
}

#[cfg(test)]
mod pin_tests {
    use super::*;

    #[test]
    fn records_of_older_daemons_keep_every_pin_in_the_nodes_mount_namespace() {
        // A pod.json `namespaces` written before the pod mount namespace existed.
        let old: PodNamespaces =
            serde_json::from_str(r#"{"network": "/r/ns/net", "ipc": "/r/ns/ipc", "uts": "/r/ns/uts"}"#).unwrap();
        assert!(!old.in_pod_mounts);
        assert!(old.pins_in_pod_mounts().is_empty());
        let new = PodNamespaces { in_pod_mounts: true, pid: Some("/r/ns/pid".into()), ..old.clone() };
        assert_eq!(
            new.pins_in_pod_mounts(),
            [Path::new("/r/ns/ipc"), Path::new("/r/ns/uts"), Path::new("/r/ns/pid")],
            "all but the network's"
        );
    }
}

#[cfg(test)]
mod sysctl_tests {
    use super::*;

    #[test]
    fn namespaced_sysctls_and_their_files() {
        let file = |key| sysctl_file(key).map(|(ns, path)| (ns, path.display().to_string())).map_err(|e| e.to_string());
        assert_eq!(file("net.ipv4.ip_forward"), Ok((SysctlNamespace::Network, "net/ipv4/ip_forward".into())));
        assert_eq!(
            file("net/ipv4/conf/eth0.100/rp_filter"),
            Ok((SysctlNamespace::Network, "net/ipv4/conf/eth0.100/rp_filter".into()))
        );
        assert_eq!(file("kernel.shm_rmid_forced"), Ok((SysctlNamespace::Ipc, "kernel/shm_rmid_forced".into())));
        assert_eq!(file("fs.mqueue.msg_max"), Ok((SysctlNamespace::Ipc, "fs/mqueue/msg_max".into())));
        for refused in ["kernel.panic", "vm.swappiness", "fs.file-max", "kernel", "net..x", "net/../../etc", "net."] {
            assert!(file(refused).is_err(), "{refused}");
        }
    }
}

#[cfg(test)]
mod connect_tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn connects_to_the_loopback_of_the_callers_namespace_without_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = connect_loopback(None, port).expect("connected");
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        drop(listener);
        drop(server);
        // Nobody listens there any more (nor on ::1): refused, not hung.
        assert!(connect_loopback(None, port).is_err());
        assert!(connect_loopback(Some(Path::new("/nonexistent/netns")), port).is_err());
    }
}
