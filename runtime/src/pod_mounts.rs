//! The pod mount namespace: a mount namespace of the daemon's that holds the pods' pinned IPC,
//! UTS, user and PID namespaces and their /dev/shm tmpfs, so that these mounts are not the
//! node's. The node's mount namespace keeps one mount per pod, its network namespace's pin
//! (CNI plugins, and operators' `nsenter --net=`, open it there).
//!
//! # Why
//!
//! Every mount of the node's namespace costs at every container start and every pod: each
//! container's init copies the whole mount table (unshare(CLONE_NEWNS)) and detaches it again,
//! and systemd (PID 1) re-reads /proc/self/mountinfo at each change and keeps a mount unit per
//! entry. With four mounts per pod there, a start at 1000 pods spent ~6 ms in init's copy and
//! detach alone (strace, `bench density`). Here they are in a namespace nobody copies.
//!
//! # How
//!
//! Made once per boot by the daemon, at its first pod (a copy of the node's, with `/` made a recursive slave so
//! that the node's mounts and unmounts reach it and nothing made here goes back), and pinned at
//! `<run_root>/pod-mounts/mnt` in the node's namespace (a private mount of its own: one more
//! mount on the node, whatever the number of pods), so that it outlives every daemon. (Unmounts
//! reach it through propagation: systemd makes the node's mounts shared at boot. A mount made
//! private on the node before the first pod would stay referenced here until a reboot.) The daemon
//! stays in the node's namespace: the few steps that mount, unmount or look at these pins run on
//! a thread of their own that joins it ([`PodMountNamespace::run`]). init, pod-init and
//! restore-in step into it to open what they need and step back (`init::pod_mounts`). The pin
//! files are plain files on the node's `/run`: a pin's path is the same in both namespaces, and
//! removing the pod's directory from the node's namespace also detaches what is mounted there.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::Error;

/// The directory under `run_root` (a private mount of its own) and the file in it that pins the
/// namespace: a mount namespace's file may not be mounted where the mount would propagate (the
/// copy into the namespace itself would be a loop, which the kernel refuses with EINVAL).
const PIN_DIR: &str = "pod-mounts";
const PIN: &str = "mnt";

/// The daemon's pod mount namespace, opened (or made) at its first use.
#[derive(Debug)]
pub struct PodMountNamespace {
    pin: PathBuf,
    namespace: OnceLock<OwnedFd>,
    /// Held while it is opened or made, so that two first uses make one.
    opening: Mutex<()>,
}

impl PodMountNamespace {
    /// The namespace pinned under `run_root`: opened at the first use, made and pinned there if
    /// there is none (at the first use after a boot, or where a daemon was killed before it
    /// pinned one).
    pub fn new(run_root: &Path) -> PodMountNamespace {
        PodMountNamespace { pin: run_root.join(PIN_DIR).join(PIN), namespace: OnceLock::new(), opening: Mutex::new(()) }
    }

    /// Where it is pinned (what init gets as `podMounts.namespace`).
    pub fn pin(&self) -> &Path {
        &self.pin
    }

    fn namespace(&self) -> std::io::Result<BorrowedFd<'_>> {
        if let Some(namespace) = self.namespace.get() {
            return Ok(namespace.as_fd());
        }
        let _opening = self.opening.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(namespace) = self.namespace.get() {
            return Ok(namespace.as_fd());
        }
        if !is_mount_namespace(&self.pin) {
            let dir = self.pin.parent().expect("the pin is in a directory");
            private_mount_point(dir).and_then(|()| create(&self.pin)).map_err(|e| {
                std::io::Error::new(e.kind(), format!("pin a pod mount namespace at {}: {e}", self.pin.display()))
            })?;
        }
        let namespace: OwnedFd = std::fs::File::open(&self.pin)?.into();
        Ok(self.namespace.get_or_init(|| namespace).as_fd())
    }

    /// Runs `f` on a thread of its own in the pod mount namespace (setns of a mount namespace
    /// moves one thread only once it shares no file system context, and the thread ends after).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
        let namespace = self.namespace()?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter(namespace)?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the pod mount namespace's thread panicked")))
        })
    }

    /// Moves the calling thread into the namespace for good: only for a thread the caller spawned
    /// and ends.
    pub(crate) fn enter_this_thread(&self) -> std::io::Result<()> {
        enter(self.namespace()?)
    }

    /// Unmounts `paths` here and in the node's namespace (records of older daemons have them
    /// there), each of them; what is not mounted is no error. Every failure is returned.
    pub(crate) fn unmount_everywhere(&self, paths: &[&Path]) -> Vec<Error> {
        let unmount_all = || {
            paths
                .iter()
                .filter_map(|path| match nix::mount::umount2(*path, MntFlags::MNT_DETACH) {
                    Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => None,
                    Err(e) => Some(Error::Io { what: format!("unmount {}", path.display()), source: e.into() }),
                })
                .collect::<Vec<_>>()
        };
        let mut errors = self
            .run(unmount_all)
            .unwrap_or_else(|e| vec![Error::Io { what: "enter the pod mount namespace".into(), source: e }]);
        errors.extend(unmount_all());
        errors
    }
}

fn enter(namespace: BorrowedFd<'_>) -> std::io::Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_FS)?;
    nix::sched::setns(namespace, CloneFlags::CLONE_NEWNS)
        .map_err(|e| std::io::Error::new(std::io::Error::from(e).kind(), format!("join the pod mount namespace: {e}")))
}

/// Whether `path` is a pinned mount namespace.
fn is_mount_namespace(path: &Path) -> bool {
    // NS_GET_NSTYPE answers the CLONE_NEW* flag of a namespace file; anything else fails.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    let Ok(file) = std::fs::File::open(path) else { return false };
    // SAFETY: an ioctl without an argument on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    kind == libc::CLONE_NEWNS
}

/// Makes `dir` a mount point of its own (a bind mount on itself, once) that propagates nothing.
fn private_mount_point(dir: &Path) -> std::io::Result<()> {
    crate::store::create_private_dir_all(dir)?;
    let mount_id = |path: &Path| {
        rustix::fs::statx(rustix::fs::CWD, path, rustix::fs::AtFlags::empty(), rustix::fs::StatxFlags::MNT_ID)
            .map(|s| s.stx_mnt_id)
            .map_err(std::io::Error::from)
    };
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if mount_id(dir)? == mount_id(parent)? {
        nix::mount::mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| std::io::Error::other(format!("bind mount {} on itself: {e}", dir.display())))?;
    }
    nix::mount::mount(None::<&str>, dir, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(|e| std::io::Error::other(format!("make {} a private mount: {e}", dir.display())))
}

/// Makes a slave copy of the node's mount namespace and pins it at `pin` from here (a
/// namespace's file cannot be mounted inside that same namespace).
///
/// The kernel refuses (EINVAL) to mount a mount namespace's file in a namespace whose id is not
/// smaller than its own (its check against loops). Ids come from per-CPU batches, not in order
/// of creation across CPUs (Linux 6.18, NS_GET_MNTNS_ID in a test node: the node's namespace
/// 5017, new ones made on CPU 1 5024, 5025..., on CPU 0 1051, 1052..., refused). A CPU's ids
/// only grow, so a namespace made on the CPU that made the node's is always taken: each allowed
/// CPU is tried in turn.
fn create(pin: &Path) -> std::io::Result<()> {
    std::fs::File::create(pin)?;
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    let cpus: Vec<usize> =
        (0..nix::sched::CpuSet::count()).filter(|&cpu| allowed.is_set(cpu).unwrap_or(false)).collect();
    let mut refused = 0;
    for cpu in &cpus {
        match make_and_pin(pin, *cpu) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => refused += 1,
            result => {
                tracing::debug!(cpu, refused, "pod mount namespace pinned");
                return result;
            }
        }
    }
    Err(std::io::Error::other(format!(
        "the kernel refused a new mount namespace as a pin (EINVAL) from each of the {} CPUs allowed",
        cpus.len()
    )))
}

/// One attempt of [`create`], in a child forked onto `cpu` (unshare of a mount namespace moves a
/// thread only if it shares no file system context: simplest in a process of its own).
fn make_and_pin(pin: &Path, cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit set: all zeros is the empty set; CPU_SET checks bounds.
    let mut on_cpu: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on a set we own.
    unsafe { libc::CPU_SET(cpu, &mut on_cpu) };
    let (from_child_r, from_child_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (to_child_r, to_child_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the child runs raw system calls only (no allocation, no locks: the daemon has other
    // threads) and leaves with _exit.
    let child = match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            let (report, wait) = (from_child_w.as_raw_fd(), to_child_r.as_raw_fd());
            // SAFETY: close, unshare and mount take descriptors, flags and NUL-terminated
            // literals; write and read use live one-byte buffers; _exit is always allowed.
            unsafe {
                // The parent's ends: its close of to_child_w must be the last one.
                libc::close(to_child_w.as_raw_fd());
                libc::close(from_child_r.as_raw_fd());
                let made = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &on_cpu) == 0
                    && libc::unshare(libc::CLONE_NEWNS) == 0
                    && libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null(),
                    ) == 0;
                let errno = if made { 0 } else { *libc::__errno_location() as u8 };
                libc::write(report, (&raw const errno).cast(), 1);
                let mut go = 0u8;
                // Alive until pinned: the namespace is this process's only reference.
                libc::read(wait, (&raw mut go).cast(), 1);
                libc::_exit(0)
            }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(from_child_w);
    drop(to_child_r);
    let mut errno = [0u8; 1];
    let result = match nix::unistd::read(&from_child_r, &mut errno) {
        Ok(1) if errno[0] == 0 => {
            let source = format!("/proc/{child}/ns/mnt");
            nix::mount::mount(Some(source.as_str()), pin, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(std::io::Error::from)
        }
        Ok(1) => Err(std::io::Error::other(format!(
            "make a mount namespace: {}",
            std::io::Error::from_raw_os_error(i32::from(errno[0]))
        ))),
        _ => Err(std::io::Error::other("the namespace child died")),
    };
    drop(to_child_w);
    let _ = nix::sys::wait::waitpid(child, None);
    result
}
