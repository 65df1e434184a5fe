//! The interface between the daemon and `cri-systemd init`: one JSON file per container start.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Context, Error};

/// Everything `cri-systemd init <spec.json>` needs to set a container up and exec its entrypoint.
///
/// The daemon writes it (e.g. to `<container dir>/init.json`) before starting the container's
/// transient unit, whose `ExecStart` is `cri-systemd init <that file>` (`Type=notify`,
/// `NotifyAccess=all`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitSpec {
    /// The OCI runtime spec of the container. Used: `process` (args, env, cwd, user uid/gid/
    /// additionalGids/umask, capabilities, noNewPrivileges, rlimits; `terminal` must be false),
    /// `root.path` (the mount point of the rootfs, an absolute host path under the container's
    /// dir) and `root.readonly`, `hostname`, `domainname`, `mounts`, `linux.namespaces` (with
    /// `path`: join that pinned namespace file; without: a new one), `linux.rootfsPropagation`,
    /// `linux.devices`, `linux.maskedPaths`, `linux.readonlyPaths`, `linux.sysctl`.
    /// `hooks` run at their stages (`hooks.rs`).
    /// `linux.resources` is ignored here: systemd applies limits through unit properties. So are
    /// `process.oomScoreAdj` (use `OOMScoreAdjust=`), `process.ioPriority`,
    /// `process.scheduler`, `linux.personality`. Refused (the start fails with a message):
    /// `process.terminal`, `linux.seccomp`, AppArmor/SELinux labels, and new user namespaces:
    /// a user namespace must be joined (a `path`), and `linux.uidMappings`/`gidMappings` must
    /// then say what it maps (init mounts as the node's root, then joins it; ids in mount options
    /// and of what it creates are translated with them). Bind mounts with `uidMappings` and
    /// `gidMappings` (options `idmap`, `ridmap`) are idmapped mounts.
    pub oci: oci_spec::runtime::Spec,
    /// The image layers + per-container upper/work dirs, mounted by init as an overlay at
    /// `root.path` inside the container's own mount namespace (so nothing leaks into the host's
    /// mount table and nothing is left mounted when the container dies). `None`: `root.path` is
    /// already a prepared tree (init bind-mounts it onto itself in the container's namespace).
    pub rootfs: Option<OverlayRootfs>,
    /// Where init writes a one-line human-readable error before failing, e.g.
    /// `exec: "nosuch": executable file not found in $PATH`. A host path in an existing
    /// directory; init removes a stale file at start and writes it only on failure.
    pub error_file: PathBuf,
    /// The unit's stdin is a unix socket (the daemon's "console socket"): init opens a pty in the
    /// container's devpts, makes the slave the process's controlling terminal, stdin, stdout and
    /// stderr, and sends the master on that socket (SCM_RIGHTS) before exec.
    #[serde(default)]
    pub console_socket: bool,
    /// Hugepage limits that init applies to its own (the unit's) cgroup before it forks the
    /// entrypoint, creating and joining the v1 hugetlb cgroup if that is where the controller is
    /// (see `hugetlb.rs`). Empty, or only zeros: nothing is done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hugepage_limits: Vec<HugepageLimit>,
    /// The container's id, as OCI hooks get it in the state (`id`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    /// The container's bundle directory, holding a `config.json` (the OCI spec) for hooks to
    /// read (`root.path`); hooks get it in the state (`bundle`). None: the error file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// Images mounted read-only in the container (CRI image volumes), after the spec's mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_volumes: Vec<ImageVolumeMount>,
    /// The node's cgroup file systems, as the daemon read them from its mountinfo once, at its
    /// first CreateContainer (the same mount and cgroup namespaces as init's). None: init reads
    /// its own mountinfo, whose size grows with the pods' mounts on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_mounts: Option<Vec<crate::cgroup::CgroupMount>>,
    /// The pins in `linux.namespaces` and the mounts (the pod's /dev/shm, a bind source in
    /// `mounts`) that are in the daemon's pod mount namespace, not the node's. None: all in the
    /// node's (records of older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_mounts: Option<crate::pod_mounts::PodMounts>,
}

/// An image's root file system (or a directory of it) mounted read-only in the container. init
/// mounts `overlay` (the image's layers, idmapped like the rootfs's, over an upper dir nothing
/// can write to) on `staging` in the container's mount namespace, opens `sub_path` beneath that
/// root (RESOLVE_IN_ROOT: symlinks and `..` in the image stay in the image), and attaches a
/// read-only clone of it at `destination`, resolved inside the container's rootfs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageVolumeMount {
    /// Where it appears in the container (an absolute container path).
    pub destination: PathBuf,
    pub overlay: OverlayRootfs,
    /// An empty directory (a host path) where the overlay is mounted, in the container's mount
    /// namespace only.
    pub staging: PathBuf,
    /// The directory of the image to mount, relative to its root; empty: the whole image.
    #[serde(default, skip_serializing_if = "crate::spec::is_empty_path")]
    pub sub_path: PathBuf,
}

fn is_empty_path(path: &Path) -> bool {
    path.as_os_str().is_empty()
}

/// The most hugepage memory of one page size the container may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugepageLimit {
    /// As CRI names it: "2MB", "1GB", "64KB".
    pub page_size: String,
    /// Bytes.
    pub limit: u64,
}

/// An overlay root file system: read-only image layers under a per-container writable layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OverlayRootfs {
    /// The image layers' directories, top (last applied) layer first. At least one.
    pub lowerdirs: Vec<PathBuf>,
    /// The container's writable layer. Must not be on an overlayfs (e.g. under the state dir).
    pub upperdir: PathBuf,
    /// overlayfs's work dir: an empty directory on the same file system as `upperdir`.
    pub workdir: PathBuf,
    /// When set, each lower dir is an idmapped mount: a file owned by `containerID + n` on disk
    /// appears owned by `hostID + n` (e.g. layers stored in the foreign range, shown as 0..65535
    /// or as the pod's range). Files created in `upperdir` keep the ids they appear with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uid_mappings: Vec<oci_spec::runtime::LinuxIdMapping>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gid_mappings: Vec<oci_spec::runtime::LinuxIdMapping>,
}

impl InitSpec {
    /// Reads and parses the spec file.
    pub fn load(path: &Path) -> crate::Result<InitSpec> {
        let text = std::fs::read(path).ctx(|| format!("read init spec {}", path.display()))?;
        serde_json::from_slice(&text).map_err(|source| Error::ParseSpec { path: path.to_path_buf(), source })
    }

    /// Writes the spec as JSON to `path` (what the daemon does before starting the unit).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        // 0600: the spec holds the container's env (Secrets). An existing file keeps its mode
        // through open(O_CREAT): it is set too.
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        std::io::Write::write_all(&mut file, &text)
    }
}
