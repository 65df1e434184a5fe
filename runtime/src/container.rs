//! Containers: what the kubelet asks for (`ContainerSpec`), what the runtime records
//! (`Container`), and how a container becomes an OCI spec for `cri-systemd init` and the unit
//! properties of its transient service.
//!
//! # Devices
//!
//! An unprivileged container's unit has `DevicePolicy=strict` and runc's default `DeviceAllow=`
//! list (mknod of anything; read/write of null, zero, full, random, urandom, tty, ptmx, the devpts
//! ptys and /dev/net/tun), by number (`/dev/char/1:3`, `char-pts`) so that systemd need not find
//! the paths in its own /dev; systemd writes the v1 devices controller or attaches a BPF program on
//! v2. `exec-in` joins the unit's devices cgroup like the others. Privileged containers get no
//! policy. A CRI device is resolved by CreateContainer (symlinks followed; it must be a char or
//! block node) into its number, mode and owner, kept in the record; init mknods it at its container
//! path under /dev (as the node's root, before joining a pod's user namespace, owner translated
//! into the pod's range, so the pod's root owns it), and the unit gets
//! `DeviceAllow=/dev/{char,block}/MAJ:MIN` with exactly its permissions. CDI device nodes
//! (cri-server's `cdi.rs`) arrive as the same devices, read from their spec file; theirs may have
//! no cgroup permissions (CDI "none": no `DeviceAllow=`) and be owned by the process's user.
//!
//! # CPU and memory node sets
//!
//! cgroup v2: `AllowedCPUs=`/`AllowedMemoryNodes=`, live. cgroup v1 (systemd does not manage the v1
//! cpuset controller): `CPUAffinity=` at exec, and on an update the daemon sets the affinity of
//! every task of the unit; `exec-in` copies the main process's affinity; memory nodes are
//! `NUMAPolicy=bind`+`NUMAMask=` at exec, for the entrypoint and its children only (not exec'd
//! commands), and cannot change on a running container.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zbus::zvariant::Value;

use crate::Error;
use crate::passwd;
use crate::pod::{NamespaceMode, Pod};
use crate::userns::{IdMapping, RANGE_SIZE};

/// What the runtime needs of an image (the daemon reads it from the image store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerImage {
    /// The image id (its config digest).
    pub id: String,
    /// The image as the kubelet named it (ContainerStatus.image).
    pub name: String,
    /// A repo digest of the image (ContainerStatus.image_ref).
    pub repo_digest: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub stop_signal: String,
}

/// The container's root file system: the image's layers (top first) under a writable layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsLayers {
    pub lowerdirs: Vec<PathBuf>,
    pub upperdir: PathBuf,
    pub workdir: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Propagation {
    #[default]
    Private,
    HostToContainer,
    Bidirectional,
}

/// A host path bind-mounted into the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub container_path: String,
    pub host_path: PathBuf,
    pub readonly: bool,
    /// Read-only including every submount (mount_setattr AT_RECURSIVE).
    #[serde(default)]
    pub recursive_readonly: bool,
    pub propagation: Propagation,
    /// An idmapped mount when given (both): a file owned by `container_id + n` on the host
    /// appears owned by `host_id + n`, as the kubelet asks for the volumes of a pod in a user
    /// namespace (its files, owned by the node's root, are then the pod root's).
    #[serde(default)]
    pub uid_mappings: Vec<IdMapping>,
    #[serde(default)]
    pub gid_mappings: Vec<IdMapping>,
    /// More mount flags: `nosuid`, `nodev`, `noexec` (a CDI spec's mount options).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_options: Vec<String>,
}

/// The flags a bind mount may add through `BindMount::extra_options`.
pub const EXTRA_MOUNT_OPTIONS: &[&str] = &["nosuid", "nodev", "noexec"];

/// The seccomp filter a container runs under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seccomp {
    #[default]
    Unconfined,
    /// containerd's and Docker's default profile (crate::seccomp_profile).
    RuntimeDefault,
    /// A profile file on the node, in Docker's format (the kubelet's `localhost/` profiles).
    Localhost(PathBuf),
}

/// Resource limits, as LinuxContainerResources gives them (0 = not set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_period: i64,
    pub cpu_quota: i64,
    pub cpu_shares: i64,
    pub memory_limit_in_bytes: i64,
    pub oom_score_adj: i64,
    /// A Linux CPU list ("0-3,6"); empty: every CPU.
    #[serde(default)]
    pub cpuset_cpus: String,
    /// A list of NUMA memory nodes, same syntax; empty: every node.
    #[serde(default)]
    pub cpuset_mems: String,
    /// Hugepage limits per page size (crate::hugetlb); enforced when one is not 0.
    #[serde(default)]
    pub hugepage_limits: Vec<HugepageLimit>,
    /// cgroup v2 files by name (CRI `unified`), from the allow-list of `crate::memory_qos`.
    #[serde(default)]
    pub unified: std::collections::BTreeMap<String, String>,
    /// Memory plus swap, as runc's on cgroup v1 (0: not set, -1: unlimited); `crate::memory_qos`.
    #[serde(default)]
    pub memory_swap_limit_in_bytes: i64,
}

/// The most hugepage memory of one page size the container may use (a type of `init.json`).
pub use init::HugepageLimit;

/// A host device node made available in the container (CRI `devices`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// The path the kubelet gave (symlinks are followed when it is resolved).
    pub host_path: PathBuf,
    /// Where it appears in the container: a path under /dev.
    pub container_path: String,
    /// What the container may do with it, in the device cgroup: a subset of "rwm", normalized
    /// to that order; empty (only from a CDI spec's "none") for a node the cgroup does not allow.
    pub permissions: String,
    /// The host node, read by CreateContainer: init makes the container's node from it, and the
    /// unit's `DeviceAllow=` names its number, so a restart or a later start needs no host path.
    #[serde(default)]
    pub node: Option<DeviceNode>,
    /// The node's owner is the container process's uid (gid), not `node.uid` (`node.gid`): a CDI
    /// device node that names no owner belongs to the process's user, as the CDI library does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uid_from_process: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gid_from_process: bool,
}

/// The number, type, mode and owner of a device node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub block: bool,
    pub major: u64,
    pub minor: u64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Device {
    /// Checks the request and reads the host node. A missing path or one that is not a character
    /// or block device is refused, naming the path.
    pub fn resolve(host_path: &str, container_path: &str, permissions: &str) -> Result<Device, Error> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        check_device_path(container_path)?;
        let permissions = device_permissions(permissions).ok_or_else(|| {
            Error::InvalidSpec(format!(
                "device {host_path}: permissions {permissions:?} must be a non-empty subset of \"rwm\""
            ))
        })?;
        if !Path::new(host_path).is_absolute() {
            return Err(Error::InvalidSpec(format!("device host path {host_path:?} is not absolute")));
        }
        // metadata follows symlinks (/dev/disk/by-id/... names the device itself).
        let meta = std::fs::metadata(host_path).map_err(|e| Error::InvalidSpec(format!("device {host_path}: {e}")))?;
        let kind = meta.file_type();
        if !kind.is_char_device() && !kind.is_block_device() {
            return Err(Error::InvalidSpec(format!("device {host_path} is not a character or block device node")));
        }
        let rdev = meta.rdev();
        Ok(Device {
            host_path: host_path.into(),
            container_path: container_path.to_string(),
            permissions,
            node: Some(DeviceNode {
                block: kind.is_block_device(),
                major: libc::major(rdev) as u64,
                minor: libc::minor(rdev) as u64,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
            }),
            uid_from_process: false,
            gid_from_process: false,
        })
    }
}

/// "rwm" in that order, from any arrangement of those letters without repeats.
fn device_permissions(given: &str) -> Option<String> {
    if given.is_empty() || given.chars().any(|c| !"rwm".contains(c)) {
        return None;
    }
    let mut seen: Vec<char> = given.chars().collect();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != given.len() {
        return None;
    }
    Some("rwm".chars().filter(|c| given.contains(*c)).collect())
}

/// A device's container path: absolute, under /dev, no "..".
fn check_device_path(path: &str) -> Result<(), Error> {
    let p = Path::new(path);
    let clean = p.is_absolute() && !p.components().any(|c| matches!(c, std::path::Component::ParentDir));
    if !clean || !p.starts_with("/dev") || p == Path::new("/dev") {
        return Err(Error::InvalidSpec(format!("device container path {path:?} must be a path under /dev")));
    }
    Ok(())
}

/// Parses a Linux CPU or memory node list ("0-3,6,8-9") into the numbers it names; "" is none.
pub fn parse_cpu_list(list: &str) -> Result<Vec<u32>, Error> {
    // The kernel's limit on CPU numbers (NR_CPUS is at most 8192): larger ones are typos.
    const MAX: u32 = 8192;
    let bad = || Error::InvalidSpec(format!("cpuset {list:?} is not a list such as \"0-3,6\""));
    let mut ids = Vec::new();
    if list.trim().is_empty() {
        return Ok(ids);
    }
    for part in list.trim().split(',') {
        let part = part.trim();
        let number = |s: &str| s.parse::<u32>().ok().filter(|n| *n < MAX && !s.starts_with('+')).ok_or_else(bad);
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        if first > last {
            return Err(bad());
        }
        ids.extend(first..=last);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The bitmask systemd takes for CPUAffinity=, AllowedCPUs= and AllowedMemoryNodes= (`ay`: bit
/// n of byte n/8 is CPU n).
pub(crate) fn cpu_mask(ids: &[u32]) -> Vec<u8> {
    let mut mask = vec![0u8; ids.iter().max().map_or(0, |m| *m as usize / 8 + 1)];
    for id in ids {
        mask[*id as usize / 8] |= 1 << (id % 8);
    }
    mask
}

/// A container as the kubelet describes it (the runtime's reading of a CRI ContainerConfig).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub name: String,
    pub attempt: u32,
    pub image: ContainerImage,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<BindMount>,
    /// Images mounted read-only (CRI `Mount.image`), after `mounts` (crate::image_volume).
    #[serde(default)]
    pub image_volumes: Vec<crate::ImageVolume>,
    /// Host devices (CRI `devices`), resolved by `Device::resolve`.
    #[serde(default)]
    pub devices: Vec<Device>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Relative to the pod's log directory.
    pub log_path: String,
    pub resources: Resources,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_username: String,
    pub supplemental_groups: Vec<i64>,
    pub readonly_rootfs: bool,
    pub no_new_privs: bool,
    pub privileged: bool,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    /// None: the default masked / read-only /proc paths.
    pub masked_paths: Option<Vec<String>>,
    pub readonly_paths: Option<Vec<String>>,
    /// Privileged containers run unconfined whatever this says, as with containerd.
    #[serde(default)]
    pub seccomp: Seccomp,
    /// Applied, or refused at CreateContainer, by `crate::apparmor`.
    #[serde(default)]
    pub apparmor: crate::apparmor::AppArmor,
    /// The container reads stdin from attach sessions (kept open between them).
    #[serde(default)]
    pub stdin: bool,
    /// stdin closes (the container sees end of file) when the first attach session with stdin ends.
    #[serde(default)]
    pub stdin_once: bool,
    /// stdin, stdout and stderr are a terminal.
    #[serde(default)]
    pub tty: bool,
    /// The config's stop signal (cri-api 1.33), as [`stop_signal`] reads it (`SIGQUIT`,
    /// `SIGRTMIN+1`); None: the image's STOPSIGNAL, else SIGTERM.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Whether the image's /etc/group adds groups to `supplemental_groups` (records without it: Merge).
    #[serde(default)]
    pub supplemental_groups_policy: SupplementalGroupsPolicy,
    /// PID namespace mode TARGET (`kubectl debug --target`): the id of the container of the same
    /// pod whose PID namespace this one joins (checked and made a full id at CreateContainer).
    #[serde(default)]
    pub pid_target: Option<String>,
    /// OCI hooks (today those of CDI devices), run by init at their stages (`init::hooks`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
}

/// The CRI's SupplementalGroupsPolicy (KEP-3619).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupplementalGroupsPolicy {
    /// The groups the image's /etc/group gives the user, plus `supplemental_groups`.
    #[default]
    Merge,
    /// Only the primary group and `supplemental_groups`.
    Strict,
}

/// An OCI hook (runtime-spec config.md "POSIX-platform Hooks") of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// `prestart`, `createRuntime`, `createContainer`, `startContainer`, `poststart` or `poststop`.
    pub stage: String,
    /// An absolute path on the node (in the container for `startContainer`).
    pub path: String,
    /// The argv, `args[0]` included; empty: the path alone.
    #[serde(default)]
    pub args: Vec<String>,
    /// The hook's whole environment (`KEY=value`).
    #[serde(default)]
    pub env: Vec<String>,
    /// Seconds; killed after it.
    #[serde(default)]
    pub timeout: Option<i64>,
}

/// The OCI `hooks` object of the container's hooks, each stage's in order.
fn oci_hooks(hooks: &[Hook]) -> serde_json::Value {
    let mut stages = serde_json::Map::new();
    for hook in hooks {
        let mut entry = serde_json::json!({"path": hook.path});
        if !hook.args.is_empty() {
            entry["args"] = serde_json::json!(hook.args);
        }
        if !hook.env.is_empty() {
            entry["env"] = serde_json::json!(hook.env);
        }
        if let Some(timeout) = hook.timeout {
            entry["timeout"] = serde_json::json!(timeout);
        }
        let list = stages.entry(hook.stage.clone()).or_insert_with(|| serde_json::json!([]));
        if let Some(list) = list.as_array_mut() {
            list.push(entry);
        }
    }
    serde_json::Value::Object(stages)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// CreateContainer is under way (rolled back if the daemon died during it).
    Creating,
    Created,
    Running,
    Exited,
    /// RemoveContainer is under way (finished on restart).
    Removing,
}

/// What the runtime knows of a container; persisted as `<state_root>/containers/<id>/container.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub pod_id: String,
    pub spec: ContainerSpec,
    pub rootfs: RootfsLayers,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    /// Completed, Error, OOMKilled, StartError...
    pub reason: String,
    pub message: String,
    /// The transient service, `cri-<id>.service`.
    pub unit: String,
    /// Who the container's processes run as (its init spec's `process.user`), fixed at
    /// CreateContainer; None in records written before it was kept.
    #[serde(default)]
    pub user: Option<crate::passwd::Identity>,
    /// The pod's slice at creation time.
    pub slice: String,
}

/// The capabilities containerd and Docker grant by default.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability, in the kernel's order (CAP_CHOWN is 0), for privileged containers.
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// containerd's defaults: /proc and /sys files that leak host information or allow harm.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
pub const DEFAULT_READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ContainerSpec {
    pub fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty() {
            return Err(Error::InvalidSpec("container config has no metadata.name".into()));
        }
        for mount in &self.mounts {
            check_container_path(&mount.container_path)?;
            if mount.recursive_readonly && (!mount.readonly || mount.propagation != Propagation::Private) {
                return Err(Error::InvalidSpec(format!(
                    "mount at {}: a recursive read-only mount must be read-only with private propagation",
                    mount.container_path
                )));
            }
            if !mount.host_path.is_absolute() {
                return Err(Error::InvalidSpec(format!(
                    "mount host path {:?} is not absolute",
                    mount.host_path.display()
                )));
            }
        }
        for mount in &self.mounts {
            check_mount_mappings(mount)?;
        }
        for volume in &self.image_volumes {
            crate::image_volume::validate(volume)?;
        }
        for mount in &self.mounts {
            if let Some(option) = mount.extra_options.iter().find(|o| !EXTRA_MOUNT_OPTIONS.contains(&o.as_str())) {
                return Err(Error::InvalidSpec(format!(
                    "mount at {}: option {option:?} is not one of {}",
                    mount.container_path,
                    EXTRA_MOUNT_OPTIONS.join(", ")
                )));
            }
        }
        for device in &self.devices {
            check_device_path(&device.container_path)?;
            let permissions_ok = device.permissions.is_empty() || device_permissions(&device.permissions).is_some();
            if device.node.is_none() || !permissions_ok {
                return Err(Error::InvalidSpec(format!(
                    "device {} was not resolved with valid permissions",
                    device.host_path.display()
                )));
            }
        }
        parse_cpu_list(&self.resources.cpuset_cpus)?;
        parse_cpu_list(&self.resources.cpuset_mems)?;
        if let Some(signal) = &self.stop_signal {
            stop_signal(signal)?;
        }
        // A group alone would leave the user to the image, which is not what was asked (containerd
        // and CRI-O refuse it too).
        if let Some(group) = self.run_as_group
            && self.run_as_user.is_none()
            && self.run_as_username.is_empty()
        {
            return Err(Error::InvalidSpec(format!(
                "run_as_group {group} is specified without run_as_user or run_as_username"
            )));
        }
        for cap in self.add_capabilities.iter().chain(&self.drop_capabilities) {
            let name = capability_name(cap);
            if name != "CAP_ALL" && !ALL_CAPABILITIES.contains(&name.as_str()) {
                return Err(Error::InvalidSpec(format!("unknown capability {cap:?}")));
            }
        }
        Ok(())
    }

    /// The process argv, as Kubernetes defines it from the CRI command/args and the image's
    /// Entrypoint/Cmd: command replaces the entrypoint (and drops Cmd); args replace Cmd.
    pub fn argv(&self) -> Result<Vec<String>, Error> {
        let argv: Vec<String> = if !self.command.is_empty() {
            self.command.iter().chain(&self.args).cloned().collect()
        } else if !self.args.is_empty() {
            self.image.entrypoint.iter().chain(&self.args).cloned().collect()
        } else {
            self.image.entrypoint.iter().chain(&self.image.cmd).cloned().collect()
        };
        if argv.is_empty() {
            return Err(Error::InvalidSpec(format!(
                "container {:?} has no command: neither the config nor the image {} gives one",
                self.name, self.image.name
            )));
        }
        Ok(argv)
    }

    /// The environment: the image's, then the config's, a later value replacing an earlier one
    /// for the same name; PATH defaults to the usual one.
    pub fn environment(&self) -> Vec<String> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |key: &str, value: &str| match env.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => env.push((key.to_string(), value.to_string())),
        };
        for entry in &self.image.env {
            let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
            set(key, value);
        }
        for (key, value) in &self.env {
            set(key, value);
        }
        let mut env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_string());
        }
        env
    }

    /// The signal StopContainer sends first: the config's, else the image's STOPSIGNAL, else SIGTERM.
    pub fn stop_signal(&self) -> Result<i32, Error> {
        stop_signal(self.stop_signal.as_deref().unwrap_or(&self.image.stop_signal))
    }

    pub fn cwd(&self) -> String {
        let dir = if !self.working_dir.is_empty() { &self.working_dir } else { &self.image.working_dir };
        if dir.is_empty() { "/".into() } else { dir.clone() }
    }

    /// The identity: run_as_username, else run_as_user (+ run_as_group), else the image USER;
    /// supplementary groups as `supplemental_groups_policy` says.
    pub fn identity(&self, lowerdirs: &[PathBuf]) -> Result<passwd::Identity, Error> {
        let extra: Vec<u32> = self.supplemental_groups.iter().filter_map(|g| u32::try_from(*g).ok()).collect();
        let group = self.run_as_group.map(|g| g.to_string());
        let merge = self.supplemental_groups_policy == SupplementalGroupsPolicy::Merge;
        if !self.run_as_username.is_empty() {
            return passwd::resolve(lowerdirs, &self.run_as_username, group.as_deref(), &extra, merge);
        }
        if let Some(uid) = self.run_as_user {
            let uid =
                u32::try_from(uid).map_err(|_| Error::InvalidSpec(format!("run_as_user {uid} is out of range")))?;
            return passwd::resolve(lowerdirs, &uid.to_string(), group.as_deref(), &extra, merge);
        }
        let (user, image_group) = passwd::split_user(&self.image.user);
        passwd::resolve(lowerdirs, user, group.as_deref().or(image_group), &extra, merge)
    }

    fn capabilities(&self) -> Vec<String> {
        if self.privileged {
            return privileged_capabilities();
        }
        let adds: Vec<String> = self.add_capabilities.iter().map(|c| capability_name(c)).collect();
        let drops: Vec<String> = self.drop_capabilities.iter().map(|c| capability_name(c)).collect();
        // As containerd composes them: ALL added means what the node can grant (the daemon's
        // bounding set; capset fails on more), ALL dropped empties that, then the named ones
        // are added and the named drops taken out.
        let mut caps: Vec<String> = if drops.iter().any(|c| c == "CAP_ALL") {
            Vec::new()
        } else if adds.iter().any(|c| c == "CAP_ALL") {
            privileged_capabilities()
        } else {
            DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect()
        };
        caps.extend(adds.into_iter().filter(|c| c != "CAP_ALL"));
        caps.retain(|c| !drops.contains(c));
        caps.sort();
        caps.dedup();
        caps
    }
}

/// A privileged container's capabilities: all those the daemon's bounding set has, as containerd
/// gives (a node without CAP_SYS_RESOURCE, such as a container, could not grant it: the start
/// would fail in capset).
fn privileged_capabilities() -> Vec<String> {
    ALL_CAPABILITIES
        .iter()
        .enumerate()
        // ALL_CAPABILITIES is in the kernel's order: the index is the capability's number.
        // SAFETY: PR_CAPBSET_READ only reads this process's bounding set; -1 (EINVAL) for a
        // number the kernel does not know.
        .filter(|(number, _)| unsafe { libc::prctl(libc::PR_CAPBSET_READ, *number as libc::c_ulong, 0, 0, 0) } == 1)
        .map(|(_, name)| name.to_string())
        .collect()
}

/// `NET_ADMIN`, `net_admin` and `CAP_NET_ADMIN` all name the same capability.
fn capability_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") }
}

/// A container path must be absolute and must not climb out with `..`: it is resolved inside the
/// rootfs by init, but a clear refusal here is better than a surprise there.
fn check_container_path(path: &str) -> Result<(), Error> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(Error::InvalidSpec(format!("mount container path {path:?} must be absolute without \"..\"")));
    }
    Ok(())
}

/// Id mappings of an idmapped mount: uids and gids together, lines that fit 32 bits.
fn check_mount_mappings(mount: &BindMount) -> Result<(), Error> {
    let bad = |why: String| Err(Error::InvalidSpec(format!("mount at {}: {why}", mount.container_path)));
    match (mount.uid_mappings.is_empty(), mount.gid_mappings.is_empty()) {
        (true, true) => return Ok(()),
        (false, false) => {}
        _ => return bad("uid and gid mappings go together".into()),
    }
    for (kind, map) in [("uid", &mount.uid_mappings), ("gid", &mount.gid_mappings)] {
        if map.len() > 340 {
            return bad(format!("more than 340 {kind} mappings"));
        }
        for m in map {
            let fits = |start: u32| u64::from(start) + u64::from(m.size) <= u64::from(u32::MAX);
            if m.size == 0 || !fits(m.container_id) || !fits(m.host_id) {
                return bad(format!("{kind} mapping {m:?} is empty or goes beyond 4294967294"));
            }
        }
    }
    Ok(())
}

/// The id mapping of the image layers' idmapped mounts: the store keeps them shifted by
/// `layer_uid_shift`; the container sees them from 0 (no user namespace) or from its pod's first
/// host id. Empty when no mapping is needed (unshifted layers, no user namespace).
pub(crate) fn lower_mappings(pod: &Pod, layer_uid_shift: u32) -> Vec<IdMapping> {
    let (host_id, pod_size) = pod.userns.map(|u| (u.range.host_id, u.range.size)).unwrap_or((0, RANGE_SIZE));
    if host_id == layer_uid_shift {
        return Vec::new();
    }
    // Shifted layers hold ids 0..65535 only; unshifted ones any id the pod maps.
    let size = if layer_uid_shift == 0 { pod_size } else { RANGE_SIZE };
    vec![IdMapping { container_id: layer_uid_shift, host_id, size }]
}

/// OCI's form of id mappings (linux.uidMappings, mounts[].uidMappings).
pub(crate) fn oci_mappings(mappings: &[IdMapping]) -> serde_json::Value {
    mappings
        .iter()
        .map(|m| serde_json::json!({"containerID": m.container_id, "hostID": m.host_id, "size": m.size}))
        .collect()
}

/// Everything the OCI spec needs besides the container spec itself.
pub(crate) struct SpecContext<'a> {
    pub pod: &'a Pod,
    pub rootfs_mountpoint: &'a Path,
    /// Where StartContainer pins the target's PID namespace, for a container with `pid_target`
    /// in a pod whose containers have PID namespaces of their own.
    pub target_pid_pin: &'a Path,
}

/// Builds the OCI runtime spec `cri-systemd init` applies.
/// A Localhost profile, read and checked now (at CreateContainer): one that would not compile is
/// refused here rather than failing every start.
fn localhost_seccomp(path: &Path, caps: &[String]) -> Result<serde_json::Value, Error> {
    let invalid = |e: String| Error::InvalidSpec(format!("seccomp profile {}: {e}", path.display()));
    if !path.is_absolute() {
        return Err(invalid("not an absolute path".into()));
    }
    let text = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let profile = crate::seccomp_profile::localhost(&text, caps).map_err(|e| invalid(e.to_string()))?;
    init::check_seccomp(&profile).map_err(|e| invalid(e.to_string()))?;
    Ok(profile)
}

pub(crate) fn oci_spec(
    spec: &ContainerSpec,
    rootfs: &RootfsLayers,
    context: &SpecContext<'_>,
) -> Result<oci_spec::runtime::Spec, Error> {
    let pod = context.pod;
    let identity = spec.identity(&rootfs.lowerdirs)?;
    let caps = spec.capabilities();
    let mut mounts = vec![
        serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        serde_json::json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        serde_json::json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        serde_json::json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    let shm = match &pod.shm {
        Some(shm) => {
            serde_json::json!({"destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev"]})
        }
        None => {
            serde_json::json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
        }
    };
    mounts.push(shm);
    // The pod's files, unless the kubelet mounts its own (it manages /etc/hosts itself).
    for file in ["hostname", "hosts", "resolv.conf"] {
        let destination = format!("/etc/{file}");
        if !spec.mounts.iter().any(|m| m.container_path == destination) {
            mounts.push(serde_json::json!({
                "destination": destination, "type": "bind", "source": pod.files_dir.join(file),
                "options": ["rbind", "rprivate", if spec.readonly_rootfs { "ro" } else { "rw" }],
            }));
        }
    }
    for mount in &spec.mounts {
        let propagation = match mount.propagation {
            Propagation::Private => "rprivate",
            Propagation::HostToContainer => "rslave",
            Propagation::Bidirectional => "rshared",
        };
        // A host path given as a symlink is resolved before it is mounted (here, as root on the
        // host, so that the container cannot swap it later).
        let source = std::fs::canonicalize(&mount.host_path)
            .map_err(|e| Error::InvalidSpec(format!("mount host path {}: {e}", mount.host_path.display())))?;
        let mut options = vec!["rbind", propagation, if mount.readonly { "ro" } else { "rw" }];
        if mount.recursive_readonly {
            options.push("rro");
        }
        if !mount.uid_mappings.is_empty() {
            options.push("idmap");
        }
        options.extend(mount.extra_options.iter().map(String::as_str));
        let mut oci_mount = serde_json::json!({
            "destination": mount.container_path, "type": "bind", "source": source, "options": options,
        });
        if !mount.uid_mappings.is_empty() {
            oci_mount["uidMappings"] = oci_mappings(&mount.uid_mappings);
            oci_mount["gidMappings"] = oci_mappings(&mount.gid_mappings);
        }
        mounts.push(oci_mount);
    }
    let mut namespaces = vec![serde_json::json!({"type": "mount"})];
    match (pod.spec.pid, &pod.namespaces.pid) {
        (NamespaceMode::Node, _) => {}
        // The target container's, pinned for the start (crate::containers, "PID namespace target").
        (NamespaceMode::Container, _) if spec.pid_target.is_some() => {
            namespaces.push(serde_json::json!({"type": "pid", "path": context.target_pid_pin}))
        }
        (NamespaceMode::Container, _) => namespaces.push(serde_json::json!({"type": "pid"})),
        // The PID namespace of the pod's init process, which all its containers join.
        (NamespaceMode::Pod, Some(pin)) => namespaces.push(serde_json::json!({"type": "pid", "path": pin})),
        (NamespaceMode::Pod, None) => {
            return Err(Error::PodInit(format!("pod {} shares a PID namespace but has none", pod.id)));
        }
    }
    for (kind, pin) in [
        ("network", &pod.namespaces.network),
        ("ipc", &pod.namespaces.ipc),
        ("uts", &pod.namespaces.uts),
        ("user", &pod.namespaces.user),
    ] {
        if let Some(pin) = pin {
            namespaces.push(serde_json::json!({"type": kind, "path": pin}));
        }
    }
    let userns_mappings = match (&pod.userns, &pod.namespaces.user) {
        (Some(userns), Some(_)) => oci_mappings(&[userns.range.mapping()]),
        (Some(_), None) => {
            return Err(Error::PodInit(format!("pod {} has a user namespace range but no user namespace", pod.id)));
        }
        _ => serde_json::json!([]),
    };
    let (masked, readonly): (Vec<String>, Vec<String>) = if spec.privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            spec.masked_paths.clone().unwrap_or_else(|| DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect()),
            spec.readonly_paths
                .clone()
                .unwrap_or_else(|| DEFAULT_READONLY_PATHS.iter().map(|s| s.to_string()).collect()),
        )
    };
    // Privileged containers run unconfined, as with containerd.
    let seccomp = match &spec.seccomp {
        _ if spec.privileged => None,
        Seccomp::Unconfined => None,
        Seccomp::RuntimeDefault => Some(crate::seccomp_profile::runtime_default(&caps)),
        Seccomp::Localhost(path) => Some(localhost_seccomp(path, &caps)?),
    };
    let apparmor = crate::apparmor::resolve(&spec.apparmor, spec.privileged)?;
    let mut json = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "apparmorProfile": apparmor,
            "user": {"uid": identity.uid, "gid": identity.gid, "additionalGids": identity.additional_gids},
            "args": spec.argv()?,
            "env": spec.environment(),
            "cwd": spec.cwd(),
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []},
            // No rlimits: containers inherit systemd's defaults for services, as with
            // containerd 2 (a fixed RLIMIT_NOFILE may exceed what the node allows).
            "noNewPrivileges": spec.no_new_privs,
        },
        "root": {"path": context.rootfs_mountpoint, "readonly": spec.readonly_rootfs},
        "mounts": mounts,
        "linux": {
            // A bidirectional mount needs the rootfs shared, or nothing propagates back.
            "rootfsPropagation": if spec.mounts.iter().any(|m| m.propagation == Propagation::Bidirectional) { "rshared" } else { "rslave" },
            "namespaces": namespaces,
            "seccomp": seccomp,
            "uidMappings": userns_mappings,
            "gidMappings": userns_mappings,
            "devices": oci_devices(&spec.devices, &identity),
            "maskedPaths": masked,
            "readonlyPaths": readonly,
        },
    });
    if !spec.hooks.is_empty() {
        // Hooks read the container's annotations in the state they get on stdin.
        json["hooks"] = oci_hooks(&spec.hooks);
        json["annotations"] = serde_json::json!(spec.annotations);
    }
    serde_json::from_value(json).map_err(|e| Error::InvalidSpec(format!("cannot build the OCI spec: {e}")))
}

/// OCI linux.devices: init makes each node in the container's /dev (as the node's root, before it
/// joins a pod's user namespace, so it works there too; the owner is translated into the pod's
/// range). mknod rather than a bind mount of the host node: the node then belongs to the
/// container's root in a user namespace as well, where a bound host node would stay the host
/// root's and be unusable unless world-accessible.
fn oci_devices(devices: &[Device], process: &passwd::Identity) -> serde_json::Value {
    devices
        .iter()
        .filter_map(|d| d.node.map(|n| (d, n)))
        .map(|(d, n)| {
            let uid = if d.uid_from_process { process.uid } else { n.uid };
            let gid = if d.gid_from_process { process.gid } else { n.gid };
            serde_json::json!({
                "path": d.container_path, "type": if n.block { "b" } else { "c" },
                "major": n.major, "minor": n.minor, "fileMode": n.mode, "uid": uid, "gid": gid,
            })
        })
        .collect()
}

/// The devices every unprivileged container may use, as runc allows them by default: mknod of any
/// device (what is made cannot be opened unless allowed below), /dev/null, zero, full, random,
/// urandom, tty, ptmx, the ptys of devpts (`char-pts`: every major /proc/devices calls "pts"), and
/// /dev/net/tun: runc dropped it in 1.2.0 and restored it in 1.2.4, since VPN containers mknod it
/// themselves (opencontainers/runc#4555); creating an interface still needs CAP_NET_ADMIN.
/// Numbers rather than paths: systemd stats paths in its own /dev, which need not have them.
const DEFAULT_DEVICE_ALLOW: &[(&str, &str)] = &[
    ("char-*", "m"),
    ("block-*", "m"),
    ("/dev/char/1:3", "rwm"),
    ("/dev/char/1:5", "rwm"),
    ("/dev/char/1:7", "rwm"),
    ("/dev/char/1:8", "rwm"),
    ("/dev/char/1:9", "rwm"),
    ("/dev/char/5:0", "rwm"),
    ("/dev/char/5:2", "rwm"),
    ("char-pts", "rwm"),
    ("/dev/char/10:200", "rwm"),
];

/// The device cgroup of an unprivileged container: `DevicePolicy=strict` (nothing but what
/// `DeviceAllow=` lists; systemd writes devices.deny/allow on cgroup v1 and attaches a BPF
/// program on v2), the defaults, and its CRI devices with exactly their permissions. Privileged
/// containers get no properties: their unit's device cgroup allows everything, as with runc.
pub(crate) fn device_properties(spec: &ContainerSpec) -> Vec<(&'static str, Value<'static>)> {
    if spec.privileged {
        return Vec::new();
    }
    let mut allow: Vec<(String, String)> =
        DEFAULT_DEVICE_ALLOW.iter().map(|(path, perms)| (path.to_string(), perms.to_string())).collect();
    for device in &spec.devices {
        if let Some(n) = device.node.filter(|_| !device.permissions.is_empty()) {
            let kind = if n.block { "block" } else { "char" };
            allow.push((format!("/dev/{kind}/{}:{}", n.major, n.minor), device.permissions.clone()));
        }
    }
    vec![("DevicePolicy", Value::from("strict")), ("DeviceAllow", Value::from(allow))]
}

/// Refuses CPUs and memory nodes the node does not have online: systemd would fail the start
/// (or an update) with a less clear error.
pub(crate) fn check_cpuset_on_node(r: &Resources) -> Result<(), Error> {
    for (what, list, online) in [
        ("cpuset_cpus", &r.cpuset_cpus, "/sys/devices/system/cpu/online"),
        ("cpuset_mems", &r.cpuset_mems, "/sys/devices/system/node/online"),
    ] {
        let wanted = parse_cpu_list(list)?;
        if wanted.is_empty() {
            continue;
        }
        // Without NUMA support there is no node directory: node 0 only.
        let online_text = std::fs::read_to_string(online).unwrap_or_else(|_| "0".into());
        let have = parse_cpu_list(online_text.trim())?;
        if let Some(missing) = wanted.iter().find(|id| !have.contains(id)) {
            return Err(Error::InvalidSpec(format!(
                "{what} {list:?} names {missing}, which is not online on this node ({})",
                online_text.trim()
            )));
        }
    }
    Ok(())
}

/// Whether the node's cgroups are the unified hierarchy (v2) rather than v1 or hybrid.
pub fn cgroup_unified() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// CPU and memory node sets. cgroup v2: `AllowedCPUs=`/`AllowedMemoryNodes=` (the cpuset
/// controller; systemd changes them live). cgroup v1, whose cpuset controller systemd does not
/// manage: the CPUs as `CPUAffinity=` (set at exec; an update sets the affinity of the unit's
/// tasks, see `Runtime::update_resources`), the memory nodes as `NUMAPolicy=bind` +
/// `NUMAMask=` (set at exec, not changeable on a running container).
pub(crate) fn cpuset_properties(r: &Resources, unified: bool) -> Result<Vec<(&'static str, Value<'static>)>, Error> {
    let cpus = parse_cpu_list(&r.cpuset_cpus)?;
    let mems = parse_cpu_list(&r.cpuset_mems)?;
    let mut properties: Vec<(&'static str, Value<'static>)> = Vec::new();
    if unified {
        // An empty mask lifts the restriction, as an update to "" should.
        properties.push(("AllowedCPUs", Value::from(cpu_mask(&cpus))));
        properties.push(("AllowedMemoryNodes", Value::from(cpu_mask(&mems))));
    } else {
        if !cpus.is_empty() {
            properties.push(("CPUAffinity", Value::from(cpu_mask(&cpus))));
        }
        if !mems.is_empty() {
            properties.push(("NUMAPolicy", Value::from(libc::MPOL_BIND)));
            properties.push(("NUMAMask", Value::from(cpu_mask(&mems))));
        }
    }
    Ok(properties)
}

/// The signal number of a stop signal: an image's StopSignal (`SIGTERM`, `TERM`, `15`) or a
/// config's (`SIGRTMIN+1`, as containerd spells the CRI's `SIGRTMINPLUS1`); SIGTERM when unset.
/// Real-time signals count from glibc's SIGRTMIN (34), as runc and moby's signal tables do.
pub fn stop_signal(name: &str) -> Result<i32, Error> {
    if name.is_empty() {
        return Ok(libc::SIGTERM);
    }
    let invalid = || Error::InvalidSpec(format!("stop signal {name:?} is not a signal"));
    if let Ok(number) = name.parse::<i32>() {
        return if (1..=libc::SIGRTMAX()).contains(&number) { Ok(number) } else { Err(invalid()) };
    }
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    let realtime = |base: i32, rest: &str| -> Option<i32> {
        let number = match rest.as_bytes().first() {
            None => base,
            Some(b'+') => base.checked_add(rest[1..].parse::<i32>().ok()?)?,
            Some(b'-') => base.checked_sub(rest[1..].parse::<i32>().ok()?)?,
            Some(_) => return None,
        };
        (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&number).then_some(number)
    };
    if let Some(rest) = short.strip_prefix("RTMIN") {
        return realtime(libc::SIGRTMIN(), rest).ok_or_else(invalid);
    }
    if let Some(rest) = short.strip_prefix("RTMAX") {
        return realtime(libc::SIGRTMAX(), rest).ok_or_else(invalid);
    }
    // The aliases the CRI's Signal enum lists, which nix parses under their other names.
    let short = match short {
        "CLD" => "CHLD",
        "POLL" => "IO",
        "IOT" => "ABRT",
        other => other,
    };
    let signal: nix::sys::signal::Signal = format!("SIG{short}").parse().map_err(|_| invalid())?;
    Ok(signal as i32)
}

/// The name of signal `number` as the CRI's Signal enum spells it once `PLUS` and `MINUS` are
/// written `+` and `-` (`SIGTERM`, `SIGRTMIN+3`, `SIGRTMAX-1`); None for no signal of this node.
pub fn signal_name(number: i32) -> Option<String> {
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    match number {
        n if n == min => Some("SIGRTMIN".into()),
        n if n == max => Some("SIGRTMAX".into()),
        // The CRI names SIGRTMIN+1..+15, then SIGRTMAX-14..-1.
        n if n > min && n - min <= 15 => Some(format!("SIGRTMIN+{}", n - min)),
        n if n > min && n < max => Some(format!("SIGRTMAX-{}", max - n)),
        n => nix::sys::signal::Signal::try_from(n).ok().map(|s| s.as_str().to_string()),
    }
}

/// The unit properties that express the container's limits and stop behaviour.
/// `tasks_max`: the config's `containers.tasks_max` (0: none of its own, only the pod's limits).
pub(crate) fn resource_properties(
    spec: &ContainerSpec,
    tasks_max: u64,
) -> Result<Vec<(&'static str, Value<'static>)>, Error> {
    let mut properties: Vec<(&'static str, Value<'static>)> = vec![
        ("KillSignal", Value::from(spec.stop_signal()?)),
        // A finite default, so that a fork bomb stops in its container; the kubelet's pod pids
        // limit is on the pod's cgroup, above (systemd's own default, 15% of pid_max per service,
        // is no Kubernetes limit).
        ("TasksMax", Value::from(if tasks_max == 0 { u64::MAX } else { tasks_max })),
    ];
    properties.extend(limit_properties(&spec.resources));
    properties.extend(crate::memory_qos::properties(&spec.resources, cgroup_unified())?);
    if spec.resources.oom_score_adj != 0 {
        // Applied when the process starts; the kubelet never changes it later.
        properties.push(("OOMScoreAdjust", Value::from(spec.resources.oom_score_adj.clamp(-1000, 1000) as i32)));
    }
    Ok(properties)
}

/// The unit properties for resource limits; unset limits are `infinity` so that an update can
/// lift a limit set before.
pub(crate) fn limit_properties(r: &Resources) -> Vec<(&'static str, Value<'static>)> {
    let mut properties: Vec<(&'static str, Value<'static>)> = Vec::new();
    let memory = if r.memory_limit_in_bytes > 0 { r.memory_limit_in_bytes as u64 } else { u64::MAX };
    properties.push(("MemoryMax", Value::from(memory)));
    if r.cpu_shares > 0 {
        // CPUShares maps 1:1 to cpu.shares on cgroup v1; on v2 systemd converts it to a weight.
        properties.push(("CPUShares", Value::from(r.cpu_shares as u64)));
    }
    if r.cpu_quota > 0 {
        let period = if r.cpu_period > 0 { r.cpu_period as u64 } else { 100_000 };
        properties.push(("CPUQuotaPerSecUSec", Value::from(r.cpu_quota as u64 * 1_000_000 / period)));
        properties.push(("CPUQuotaPeriodUSec", Value::from(period)));
    } else {
        properties.push(("CPUQuotaPerSecUSec", Value::from(u64::MAX)));
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "c".into(),
            image: ContainerImage {
                name: "busybox".into(),
                entrypoint: vec!["/entry".into()],
                cmd: vec!["cmd1".into(), "cmd2".into()],
                env: vec!["PATH=/bin".into(), "A=image".into(), "B=image".into()],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn argv_follows_kubernetes_rules() {
        assert_eq!(spec().argv().unwrap(), ["/entry", "cmd1", "cmd2"]);
        let args_only = ContainerSpec { args: vec!["x".into()], ..spec() };
        assert_eq!(args_only.argv().unwrap(), ["/entry", "x"]);
        let command = ContainerSpec { command: vec!["/bin/sh".into()], ..spec() };
        assert_eq!(command.argv().unwrap(), ["/bin/sh"]);
        let both = ContainerSpec { command: vec!["/bin/sh".into()], args: vec!["-c".into(), "true".into()], ..spec() };
        assert_eq!(both.argv().unwrap(), ["/bin/sh", "-c", "true"]);
        let mut none = spec();
        none.image.entrypoint.clear();
        none.image.cmd.clear();
        assert!(matches!(none.argv(), Err(Error::InvalidSpec(_))));
    }

    #[test]
    fn env_merges_with_config_winning() {
        let s = ContainerSpec { env: vec![("B".into(), "config".into()), ("C".into(), "new".into())], ..spec() };
        assert_eq!(s.environment(), ["PATH=/bin", "A=image", "B=config", "C=new"]);
        let mut no_path = spec();
        no_path.image.env.clear();
        assert!(no_path.environment()[0].starts_with("PATH=/usr/local/sbin"));
    }

    #[test]
    fn capabilities_add_and_drop() {
        let s = ContainerSpec {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["CAP_CHOWN".into(), "mknod".into()],
            ..spec()
        };
        let caps = s.capabilities();
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_CHOWN".to_string()) && !caps.contains(&"CAP_MKNOD".to_string()));
        let only_kill =
            ContainerSpec { drop_capabilities: vec!["ALL".into()], add_capabilities: vec!["KILL".into()], ..spec() };
        assert_eq!(only_kill.capabilities(), ["CAP_KILL"]);
        let none = ContainerSpec { drop_capabilities: vec!["ALL".into()], ..spec() };
        assert_eq!(none.capabilities(), Vec::<String>::new());
        let all_but_chown =
            ContainerSpec { add_capabilities: vec!["ALL".into()], drop_capabilities: vec!["chown".into()], ..spec() };
        let mut expected = privileged_capabilities();
        expected.retain(|c| c != "CAP_CHOWN");
        expected.sort();
        assert_eq!(all_but_chown.capabilities(), expected);
        let bad = ContainerSpec { add_capabilities: vec!["CAP_FLY".into()], ..spec() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn a_group_needs_a_user() {
        let group_only = ContainerSpec { run_as_group: Some(1002), ..spec() };
        assert!(matches!(group_only.validate(), Err(Error::InvalidSpec(_))));
        ContainerSpec { run_as_group: Some(1002), run_as_user: Some(1001), ..spec() }.validate().unwrap();
        ContainerSpec { run_as_group: Some(1002), run_as_username: "www".into(), ..spec() }.validate().unwrap();
    }

    #[test]
    fn cpu_lists_parse_and_become_masks() {
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpu_list("0").unwrap(), [0]);
        assert_eq!(parse_cpu_list("0-2,5, 9-10").unwrap(), [0, 1, 2, 5, 9, 10]);
        assert_eq!(parse_cpu_list("3,1-3").unwrap(), [1, 2, 3]);
        for bad in ["0-", "-1", "1-0", "a", "0,,1", "+1", "0-99999", "1 2"] {
            assert!(matches!(parse_cpu_list(bad), Err(Error::InvalidSpec(_))), "{bad:?} was accepted");
        }
        assert_eq!(cpu_mask(&[]), Vec::<u8>::new());
        assert_eq!(cpu_mask(&[0]), [1]);
        assert_eq!(cpu_mask(&[1, 9]), [2, 2]);
    }

    #[test]
    fn device_requests_are_checked() {
        assert_eq!(device_permissions("mrw").as_deref(), Some("rwm"));
        assert_eq!(device_permissions("r").as_deref(), Some("r"));
        for bad in ["", "rr", "rx", "RW"] {
            assert_eq!(device_permissions(bad), None, "{bad:?}");
        }
        let null = Device::resolve("/dev/null", "/dev/mynull", "rw").unwrap();
        assert_eq!(null.node.map(|n| (n.block, n.major, n.minor)), Some((false, 1, 3)));
        for (host, container, permissions) in [
            ("/etc/passwd", "/dev/x", "r"),
            ("/dev/no-such", "/dev/x", "r"),
            ("dev/null", "/dev/x", "r"),
            ("/dev/null", "/etc/x", "r"),
            ("/dev/null", "/dev", "r"),
            ("/dev/null", "/dev/../x", "r"),
            ("/dev/null", "/dev/x", "rwx"),
        ] {
            assert!(matches!(Device::resolve(host, container, permissions), Err(Error::InvalidSpec(_))), "{host}");
        }
        let unprivileged = ContainerSpec { devices: vec![null], ..spec() };
        let properties = device_properties(&unprivileged);
        assert_eq!(properties[0].1, Value::from("strict"));
        let allow = format!("{:?}", properties[1].1);
        assert!(allow.contains("/dev/char/1:3") && allow.contains("char-pts"), "{allow}");
        assert!(device_properties(&ContainerSpec { privileged: true, ..unprivileged.clone() }).is_empty());
        // A CDI node with no cgroup permissions ("none") is made, but not allowed.
        let mut none = unprivileged.devices[0].clone();
        (none.permissions, none.container_path) = (String::new(), "/dev/none".into());
        none.node = none.node.map(|n| DeviceNode { major: 250, minor: 7, ..n });
        let with_none = ContainerSpec { devices: vec![none], ..unprivileged };
        with_none.validate().unwrap();
        assert!(!format!("{:?}", device_properties(&with_none)[1].1).contains("/dev/char/250:7"));
        // A CDI node that names no owner belongs to the container process's user and group.
        let process = passwd::Identity { uid: 1000, gid: 2000, additional_gids: Vec::new() };
        let mut owned = with_none.devices[0].clone();
        owned.node = owned.node.map(|n| DeviceNode { uid: 5, gid: 6, ..n });
        owned.uid_from_process = true;
        let json = oci_devices(&[owned], &process);
        assert_eq!((json[0]["uid"].as_u64(), json[0]["gid"].as_u64()), (Some(1000), Some(6)));
    }

    #[test]
    fn hooks_become_oci_hooks_by_stage_in_order() {
        let hook = |stage: &str, path: &str| Hook { stage: stage.into(), path: path.into(), ..Default::default() };
        let hooks = vec![
            Hook { args: vec!["a".into()], env: vec!["E=1".into()], timeout: Some(5), ..hook("createContainer", "/x") },
            hook("poststop", "/y"),
            hook("createContainer", "/z"),
        ];
        let json = oci_hooks(&hooks);
        let parsed: oci_spec::runtime::Hooks = serde_json::from_value(json.clone()).unwrap();
        let create: Vec<_> = parsed.create_container().clone().unwrap().iter().map(|h| h.path().clone()).collect();
        assert_eq!(create, [std::path::PathBuf::from("/x"), "/z".into()]);
        assert_eq!(json["createContainer"][0]["args"], serde_json::json!(["a"]));
        assert_eq!(json["createContainer"][0]["env"], serde_json::json!(["E=1"]));
        assert_eq!(json["createContainer"][0]["timeout"], 5);
        assert!(json["createContainer"][1].get("args").is_none());
        assert_eq!(parsed.poststop().clone().unwrap().len(), 1);
    }

    #[test]
    fn privileged_capabilities_follow_the_kernels_numbering() {
        assert_eq!(ALL_CAPABILITIES[24], "CAP_SYS_RESOURCE");
        assert_eq!(ALL_CAPABILITIES[27], "CAP_MKNOD");
        assert_eq!(ALL_CAPABILITIES[40], "CAP_CHECKPOINT_RESTORE");
        assert!(privileged_capabilities().contains(&"CAP_CHOWN".to_string()));
    }

    #[test]
    fn mounts_and_signals_are_checked() {
        let bad = ContainerSpec {
            mounts: vec![BindMount {
                container_path: "/a/../../etc".into(),
                host_path: "/tmp".into(),
                ..Default::default()
            }],
            ..spec()
        };
        assert!(bad.validate().is_err());
        assert_eq!(stop_signal("").unwrap(), 15);
        assert_eq!(stop_signal("SIGQUIT").unwrap(), 3);
        assert_eq!(stop_signal("KILL").unwrap(), 9);
        assert_eq!(stop_signal("2").unwrap(), 2);
        assert!(stop_signal("SIGNOPE").is_err());
        assert!(stop_signal("0").is_err());
        assert_eq!(stop_signal("SIGRTMIN").unwrap(), 34);
        assert_eq!(stop_signal("SIGRTMIN+1").unwrap(), 35);
        assert_eq!(stop_signal("SIGRTMAX-14").unwrap(), 50);
        assert_eq!(stop_signal("SIGRTMAX").unwrap(), 64);
        assert!(stop_signal("SIGRTMAX+1").is_err());
        assert!(stop_signal("SIGRTMIN-1").is_err());
        assert_eq!(stop_signal("SIGIOT").unwrap(), libc::SIGABRT);
        assert_eq!(stop_signal("SIGCLD").unwrap(), libc::SIGCHLD);
        assert_eq!(stop_signal("SIGPOLL").unwrap(), libc::SIGIO);
        for n in 1..=64 {
            if n == 32 || n == 33 {
                // glibc's own real-time signals: no name, as for runc.
                assert_eq!(signal_name(n), None);
                continue;
            }
            let name = signal_name(n).unwrap();
            assert_eq!(stop_signal(&name).unwrap(), n, "{name}");
        }
        assert_eq!(signal_name(50).unwrap(), "SIGRTMAX-14");
        assert_eq!(signal_name(49).unwrap(), "SIGRTMIN+15");
    }
}
