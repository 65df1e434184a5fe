//! `cri-systemd restore-in`: the ExecStart of a container created from a checkpoint archive
//! (`runtime/src/checkpoint.rs`). In a mount namespace of its own it mounts a fresh procfs (CRIU
//! writes the UTS namespace's sysctls through it; /proc/sys may be read-only where the unit
//! runs, as in systemd-nspawn) and the container's overlay root at `root.path` (idmapped lowers,
//! as init mounts it), then execs `criu restore --restore-detached` with the new pod's namespaces
//! (`--inherit-fd` for the network namespace, `--join-ns` for IPC and UTS), the new bind-mount
//! sources for the dumped mounts, and the unit's stdio in place of the dumped one. CRIU writes the
//! restored tree's PID file and exits: the unit is `Type=forking` and systemd supervises the tree.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use oci_spec::runtime::LinuxNamespaceType;

use crate::{Context, Error, InitSpec, Result, idmap, namespaces};

/// The hidden subcommand's name.
pub const SUBCOMMAND: &str = "restore-in";

/// In the restore directory, written at checkpoint time: the dumped fds 0, 1 and 2 (runc's
/// descriptors.json) and the CRIU keys of those that were files outside the container.
pub const DESCRIPTORS_JSON: &str = "descriptors.json";
pub const EXTERNAL_FILES_JSON: &str = "external-files.json";

/// `restore-in INIT_SPEC RESTORE_DIR CRIU`.
#[derive(Debug, Clone)]
pub struct RestoreArgs {
    pub init_spec: PathBuf,
    /// Holds `checkpoint/` (CRIU's images); CRIU's log and the PID file go here.
    pub restore_dir: PathBuf,
    pub criu: PathBuf,
}

pub fn run(args: &RestoreArgs) -> ! {
    let Err(e) = restore(args);
    eprintln!("cri-systemd restore-in: {e}");
    std::process::exit(1)
}

fn restore(args: &RestoreArgs) -> Result<std::convert::Infallible> {
    let spec = InitSpec::load(&args.init_spec)?;
    let root = spec.oci.root().as_ref().map(|r| r.path().clone()).ok_or_else(|| Error::new("spec has no root"))?;
    let mut plan = namespaces::open(&spec.oci, spec.pod_mounts.as_ref())?;
    plan.idmaps = idmap::IdmapNamespaces::prepare(&spec)?;
    unshare(CloneFlags::CLONE_NEWNS).ctx(|| "unshare the mount namespace".into())?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>)
        .ctx(|| "make / a slave mount".into())?;
    // The pod's /dev/shm at its path, where CRIU's external bind mount takes it from.
    crate::pod_mounts::attach_trees(&plan.pod_trees)?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .ctx(|| "mount a fresh /proc".into())?;
    let overlay = spec.rootfs.as_ref().ok_or_else(|| Error::new("a restore needs the overlay rootfs"))?;
    crate::rootfs::mount_overlay_at(overlay, &root, &plan)?;

    let dir = &args.restore_dir;
    let mut criu: Vec<String> = vec![
        "restore".into(),
        "--images-dir".into(),
        dir.join("checkpoint").to_string_lossy().into_owned(),
        "--work-dir".into(),
        dir.to_string_lossy().into_owned(),
        "--log-file".into(),
        "restore.log".into(),
        "-v4".into(),
        "--root".into(),
        root.to_string_lossy().into_owned(),
        "--restore-detached".into(),
        "--pidfile".into(),
        dir.join("pid").to_string_lossy().into_owned(),
        "--manage-cgroups=ignore".into(),
        "--tcp-established".into(),
        "--file-locks".into(),
    ];
    // Kept open (no CLOEXEC) until the exec: CRIU takes them by number.
    let mut keep: Vec<OwnedFd> = Vec::new();
    // The pod's namespaces as init opened them (IPC and UTS pins are in the daemon's pod mount
    // namespace, out of CRIU's sight): CRIU gets them as inherited descriptors.
    if let Some(net) = plan.take_join(LinuxNamespaceType::Network) {
        let fd = inheritable(&net)?;
        criu.extend(["--inherit-fd".into(), format!("fd[{}]:extRootNetNS", fd.as_raw_fd())]);
        keep.push(fd);
    }
    for (typ, name) in [(LinuxNamespaceType::Ipc, "ipc"), (LinuxNamespaceType::Uts, "uts")] {
        if let Some(ns) = plan.take_join(typ) {
            let fd = inheritable(&ns)?;
            criu.extend(["--join-ns".into(), format!("{name}:/proc/self/fd/{}", fd.as_raw_fd())]);
            keep.push(fd);
        }
    }
    for m in spec.oci.mounts().as_deref().unwrap_or_default() {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options().as_deref().unwrap_or_default().iter().any(|o| o == "bind" || o == "rbind");
        if let (true, Some(source)) = (bind, m.source()) {
            let destination = m.destination().display();
            criu.extend(["--external".into(), format!("mnt[{destination}]:{}", source.display())]);
        }
    }
    // The dumped stdio: pipes get the unit's (the daemon reads them into the CRI log), files
    // outside the container (systemd's /dev/null) the unit's fd of the same number.
    let images = dir.join("checkpoint");
    let descriptors: Vec<String> = read_json(&images.join(DESCRIPTORS_JSON))?;
    let external_files: Vec<(i32, String)> = read_json(&images.join(EXTERNAL_FILES_JSON)).unwrap_or_default();
    for (fd, target) in descriptors.iter().enumerate().take(3) {
        let key = if target.starts_with("pipe:[") {
            Some(target.clone())
        } else {
            external_files.iter().find(|(n, _)| *n == fd as i32).map(|(_, key)| key.clone())
        };
        if let Some(key) = key {
            // SAFETY: fds 0, 1 and 2 are the unit's stdio, open for the whole process.
            let stdio = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd as i32) };
            let copy =
                nix::fcntl::fcntl(stdio, nix::fcntl::FcntlArg::F_DUPFD(3)).ctx(|| format!("duplicate fd {fd}"))?;
            // SAFETY: F_DUPFD returned a new descriptor that nothing else owns.
            let copy = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
            criu.extend(["--inherit-fd".into(), format!("fd[{}]:{key}", copy.as_raw_fd())]);
            keep.push(copy);
        }
    }
    let program =
        CString::new(args.criu.as_os_str().as_encoded_bytes()).map_err(|_| Error::new("criu path has a NUL"))?;
    let mut argv = vec![program.clone()];
    for arg in &criu {
        argv.push(CString::new(arg.as_str()).map_err(|_| Error::new("criu argument has a NUL"))?);
    }
    let errno = nix::unistd::execvp(&program, &argv).unwrap_err();
    drop(keep);
    Err(Error::new(format!("exec {}: {}", args.criu.display(), crate::errno_desc(errno))))
}

/// A copy of `fd` that the exec'd CRIU inherits (no close-on-exec).
fn inheritable(fd: &OwnedFd) -> Result<OwnedFd> {
    let copy = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD(3)).ctx(|| "duplicate a namespace file".into())?;
    // SAFETY: F_DUPFD returned a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).ctx(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| Error::new(format!("{}: {e}", path.display())))
}
