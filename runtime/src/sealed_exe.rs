//! The daemon's own binary, as units and exec-in run it: a read-only bind mount of it at
//! `<run_root>/exe/cri-systemd`, made once at daemon start (the CVE-2019-5736 class).
//!
//! init, exec-in and pod-init run this binary in or next to the container until they exec the
//! container's process; a container process that gets hold of `/proc/<pid>/exe` of one of them
//! (a `#!/proc/self/exe` script, an O_PATH descriptor kept until the binary stops running, a
//! process not yet exec'd) reaches the file through the mount it was exec'd from. Exec'd from this
//! read-only mount, every open of it for writing fails with EROFS, whatever the process does
//! later, and the container cannot remount it (the mount is not in its mount namespace). runc
//! copies itself into a sealed memfd at every start instead; one bind mount per daemon start
//! costs nothing per container. (init, exec-in and pod-init are also not dumpable until exec, so
//! that other container processes cannot open their `/proc/<pid>/exe` at all.)

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::Error;

static SEALED: OnceLock<PathBuf> = OnceLock::new();

/// Where the sealed binary is mounted under `run_root`.
pub fn path_under(run_root: &Path) -> PathBuf {
    run_root.join("exe").join("cri-systemd")
}

/// Mounts the running binary (`/proc/self/exe`, so even a binary replaced on disk since the
/// daemon started) read-only, nosuid, nodev at [`path_under`]`(run_root)`, detaching what earlier
/// starts mounted there (their containers keep their own reference). Called once at start.
pub fn seal(run_root: &Path) -> Result<PathBuf, Error> {
    let path = path_under(run_root);
    let dir = path.parent().expect("path_under has a parent");
    let io = |what: String| move |e: Errno| Error::Io { what, source: e.into() };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(Error::io(format!("cannot create {}", dir.display())))?;
    }
    loop {
        match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(e) => return Err(io(format!("cannot detach the old {}", path.display()))(e)),
        }
    }
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o700)
            .open(&path)
            .map_err(Error::io(format!("cannot create the mount point {}", path.display())))?;
    }
    nix::mount::mount(Some("/proc/self/exe"), &path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(io(format!("cannot bind-mount the daemon's binary on {}", path.display())))?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    nix::mount::mount(None::<&str>, &path, None::<&str>, flags, None::<&str>)
        .map_err(io(format!("cannot make {} read-only", path.display())))?;
    let _ = SEALED.set(path.clone());
    Ok(path)
}

/// The sealed binary, for ExecStart/ExecStopPost and exec-in.
pub fn path() -> Result<&'static Path, Error> {
    SEALED.get().map(PathBuf::as_path).ok_or(Error::NotSealed)
}

/// Unit tests start units only in a fake systemd: any path stands for the sealed binary.
#[cfg(test)]
pub(crate) fn set_for_tests() {
    let _ = SEALED.set(PathBuf::from("/nonexistent/cri-systemd"));
}
