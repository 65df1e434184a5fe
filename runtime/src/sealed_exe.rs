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
//!
//! `init` and `exec-in` run from the init helper, `cri-systemd-init` beside the daemon's binary,
//! sealed the same way at `<run_root>/exe/cri-systemd-init` when its build id matches the
//! daemon's (`init::helper`: ~2 ms less per container start and per ExecSync); without one, from
//! the daemon's binary.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::Error;

static SEALED: OnceLock<PathBuf> = OnceLock::new();
static HELPER: OnceLock<PathBuf> = OnceLock::new();

/// Where the sealed binary is mounted under `run_root`.
pub fn path_under(run_root: &Path) -> PathBuf {
    run_root.join("exe").join("cri-systemd")
}

/// Mounts the running binary (`/proc/self/exe`, so even a binary replaced on disk since the
/// daemon started) read-only, nosuid, nodev at [`path_under`]`(run_root)`, detaching what earlier
/// starts mounted there (their containers keep their own reference). Called once at start.
pub fn seal(run_root: &Path) -> Result<PathBuf, Error> {
    let path = path_under(run_root);
    seal_file(Path::new("/proc/self/exe"), &path, "the daemon's binary")?;
    let _ = SEALED.set(path.clone());
    Ok(path)
}

/// Where the init helper (`cri-systemd-init`, see `init::helper`) is mounted under `run_root`.
pub fn helper_path_under(run_root: &Path) -> PathBuf {
    run_root.join("exe").join(init::helper::BINARY)
}

/// Seals `helper` as [`seal`] seals the daemon's binary, at [`helper_path_under`]`(run_root)`,
/// and from then on runs it for `init` and `exec-in` when `accept` says yes to the sealed file
/// (the daemon checks its build id there: after the mount, so that what was checked is what
/// runs). Refused, the mount is removed and the daemon's own binary goes on doing both.
pub fn seal_helper(run_root: &Path, helper: &Path, accept: impl FnOnce(&Path) -> bool) -> Result<bool, Error> {
    let path = helper_path_under(run_root);
    seal_file(helper, &path, "the init helper")?;
    if accept(&path) {
        let _ = HELPER.set(path);
        Ok(true)
    } else {
        forget_helper(run_root);
        Ok(false)
    }
}

/// Detaches a helper that an earlier start sealed, when this start has none to seal.
pub fn forget_helper(run_root: &Path) {
    let path = helper_path_under(run_root);
    while nix::mount::umount2(&path, MntFlags::MNT_DETACH).is_ok() {}
    let _ = std::fs::remove_file(&path);
}

/// Bind-mounts `source` read-only, nosuid, nodev on the file `path` (made 0700 if missing), after
/// detaching every mount earlier starts left there.
fn seal_file(source: &Path, path: &Path, what: &str) -> Result<(), Error> {
    let dir = path.parent().expect("sealed paths have a parent");
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
        match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
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
            .open(path)
            .map_err(Error::io(format!("cannot create the mount point {}", path.display())))?;
    }
    nix::mount::mount(Some(source), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(io(format!("cannot bind-mount {what} on {}", path.display())))?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    nix::mount::mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(io(format!("cannot make {} read-only", path.display())))?;
    Ok(())
}

/// The sealed binary, for ExecStart/ExecStopPost and exec-in.
pub fn path() -> Result<&'static Path, Error> {
    SEALED.get().map(PathBuf::as_path).ok_or(Error::NotSealed)
}

/// The binary that runs `init` and `exec-in`: the sealed helper when the daemon accepted one,
/// else the sealed daemon binary (both take the same command lines).
pub fn init_path() -> Result<&'static Path, Error> {
    HELPER.get().map_or_else(path, |helper| Ok(helper.as_path()))
}

/// Unit tests start units only in a fake systemd: any path stands for the sealed binary.
#[cfg(test)]
pub(crate) fn set_for_tests() {
    let _ = SEALED.set(PathBuf::from("/nonexistent/cri-systemd"));
}
