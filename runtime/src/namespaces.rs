//! Pod namespaces without a pause process: each namespace is created once, on a short-lived
//! thread, and pinned by bind-mounting its `/proc/thread-self/ns/<kind>` file under the pod's run
//! dir (as CRI-O's pinns does). Containers join the pinned files; unmounting the pins frees them.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

/// The namespaces a pod shares among its containers, each pinned at a path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNamespaces {
    pub network: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
}

impl PodNamespaces {
    pub fn pins(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.network, &self.ipc, &self.uts].into_iter().flatten()
    }
}

/// Which new namespaces a pod gets (NODE mode means the host's, so no new one).
#[derive(Debug, Clone, Copy)]
pub struct NewNamespaces {
    pub network: bool,
    pub ipc: bool,
    pub uts: bool,
}

/// Creates the requested namespaces and pins them in `dir` as files `net`, `ipc`, `uts`.
/// `hostname` is set in the new UTS namespace, and loopback is brought up in the new network
/// namespace. On error nothing stays pinned.
pub fn create_pinned(dir: &Path, wanted: NewNamespaces, hostname: &str) -> std::io::Result<PodNamespaces> {
    std::fs::create_dir_all(dir)?;
    let mut flags = CloneFlags::empty();
    let mut pins = PodNamespaces::default();
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
    let hostname = hostname.to_string();
    let to_pin = pins.clone();
    // unshare() of these kinds moves only the calling thread; a thread of its own keeps the
    // daemon's other threads (and the tokio runtime) in the host namespaces. The thread ends
    // right after, and the pins keep the namespaces alive.
    let result = std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::unshare(flags)?;
        if wanted.uts {
            nix::unistd::sethostname(&hostname)?;
        }
        if wanted.network {
            bring_loopback_up()?;
        }
        for (kind, pin) in [("net", &to_pin.network), ("ipc", &to_pin.ipc), ("uts", &to_pin.uts)] {
            if let Some(pin) = pin {
                std::fs::File::create(pin)?;
                let source = format!("/proc/thread-self/ns/{kind}");
                nix::mount::mount(Some(source.as_str()), pin, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
            }
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")));
    if let Err(e) = result {
        let _ = release(&pins);
        return Err(e);
    }
    Ok(pins)
}

/// Unpins the namespaces (they die with their last user) and removes the pin files. Missing pins
/// are fine; every pin is tried, and the errors are reported together.
pub fn release(pins: &PodNamespaces) -> Result<(), String> {
    let mut errors = Vec::new();
    for pin in pins.pins() {
        match nix::mount::umount2(pin, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => errors.push(format!("unmount {}: {e}", pin.display())),
        }
        match std::fs::remove_file(pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("remove {}: {e}", pin.display())),
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

/// Whether `pin` still holds a namespace (it is gone after a reboot, with /run).
pub fn is_pinned(pin: &Path) -> bool {
    // nsfs files report the NSFS magic; an unmounted leftover file is a plain empty file.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(pin).map(|fs| fs.filesystem_type().0 as i64 == NSFS_MAGIC).unwrap_or(false)
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
