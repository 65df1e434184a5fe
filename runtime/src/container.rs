//! Containers: what the kubelet asks for (`ContainerSpec`), what the runtime records
//! (`Container`), and how a container becomes an OCI spec for `cri-systemd init` and the unit
//! properties of its transient service.

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
}

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
    /// The container reads stdin from attach sessions (kept open between them).
    #[serde(default)]
    pub stdin: bool,
    /// stdin closes (the container sees end of file) when the first attach session with stdin ends.
    #[serde(default)]
    pub stdin_once: bool,
    /// stdin, stdout and stderr are a terminal.
    #[serde(default)]
    pub tty: bool,
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

/// Every capability, for privileged containers.
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
            return Err(Error::InvalidArgument("container config has no metadata.name".into()));
        }
        for mount in &self.mounts {
            check_container_path(&mount.container_path)?;
            if mount.recursive_readonly && (!mount.readonly || mount.propagation != Propagation::Private) {
                return Err(Error::InvalidArgument(format!(
                    "mount at {}: a recursive read-only mount must be read-only with private propagation",
                    mount.container_path
                )));
            }
            if !mount.host_path.is_absolute() {
                return Err(Error::InvalidArgument(format!(
                    "mount host path {:?} is not absolute",
                    mount.host_path.display()
                )));
            }
        }
        for mount in &self.mounts {
            check_mount_mappings(mount)?;
        }
        for cap in self.add_capabilities.iter().chain(&self.drop_capabilities) {
            let name = capability_name(cap);
            if name != "CAP_ALL" && !ALL_CAPABILITIES.contains(&name.as_str()) {
                return Err(Error::InvalidArgument(format!("unknown capability {cap:?}")));
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
            return Err(Error::InvalidArgument(format!(
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

    pub fn cwd(&self) -> String {
        let dir = if !self.working_dir.is_empty() { &self.working_dir } else { &self.image.working_dir };
        if dir.is_empty() { "/".into() } else { dir.clone() }
    }

    /// The identity: run_as_username, else run_as_user (+ run_as_group), else the image USER.
    pub fn identity(&self, lowerdirs: &[PathBuf]) -> Result<passwd::Identity, Error> {
        let extra: Vec<u32> = self.supplemental_groups.iter().filter_map(|g| u32::try_from(*g).ok()).collect();
        let group = self.run_as_group.map(|g| g.to_string());
        if !self.run_as_username.is_empty() {
            return passwd::resolve(lowerdirs, &self.run_as_username, group.as_deref(), &extra);
        }
        if let Some(uid) = self.run_as_user {
            let uid =
                u32::try_from(uid).map_err(|_| Error::InvalidArgument(format!("run_as_user {uid} is out of range")))?;
            return passwd::resolve(lowerdirs, &uid.to_string(), group.as_deref(), &extra);
        }
        let (user, image_group) = passwd::split_user(&self.image.user);
        passwd::resolve(lowerdirs, user, group.as_deref().or(image_group), &extra)
    }

    fn capabilities(&self) -> Vec<String> {
        if self.privileged {
            return ALL_CAPABILITIES.iter().map(|c| c.to_string()).collect();
        }
        let adds: Vec<String> = self.add_capabilities.iter().map(|c| capability_name(c)).collect();
        let drops: Vec<String> = self.drop_capabilities.iter().map(|c| capability_name(c)).collect();
        let base: &[&str] = if adds.iter().any(|c| c == "CAP_ALL") { ALL_CAPABILITIES } else { DEFAULT_CAPABILITIES };
        let mut caps: Vec<String> =
            base.iter().map(|c| c.to_string()).chain(adds.into_iter().filter(|c| c != "CAP_ALL")).collect();
        if drops.iter().any(|c| c == "CAP_ALL") {
            caps.clear();
        }
        caps.retain(|c| !drops.contains(c));
        caps.sort();
        caps.dedup();
        caps
    }
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
        return Err(Error::InvalidArgument(format!("mount container path {path:?} must be absolute without \"..\"")));
    }
    Ok(())
}

/// Id mappings of an idmapped mount: uids and gids together, lines that fit 32 bits.
fn check_mount_mappings(mount: &BindMount) -> Result<(), Error> {
    let bad = |why: String| Err(Error::InvalidArgument(format!("mount at {}: {why}", mount.container_path)));
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
}

/// Builds the OCI runtime spec `cri-systemd init` applies.
/// A Localhost profile, read and checked now (at CreateContainer): one that would not compile is
/// refused here rather than failing every start.
fn localhost_seccomp(path: &Path, caps: &[String]) -> Result<serde_json::Value, Error> {
    let invalid = |e: String| Error::InvalidArgument(format!("seccomp profile {}: {e}", path.display()));
    if !path.is_absolute() {
        return Err(invalid("not an absolute path".into()));
    }
    let text = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let profile = crate::seccomp_profile::localhost(&text, caps).map_err(invalid)?;
    crate::init::check_seccomp(&profile).map_err(invalid)?;
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
            .map_err(|e| Error::InvalidArgument(format!("mount host path {}: {e}", mount.host_path.display())))?;
        let mut options = vec!["rbind", propagation, if mount.readonly { "ro" } else { "rw" }];
        if mount.recursive_readonly {
            options.push("rro");
        }
        if !mount.uid_mappings.is_empty() {
            options.push("idmap");
        }
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
        (NamespaceMode::Container, _) => namespaces.push(serde_json::json!({"type": "pid"})),
        // The PID namespace of the pod's init process, which all its containers join.
        (NamespaceMode::Pod, Some(pin)) => namespaces.push(serde_json::json!({"type": "pid", "path": pin})),
        (NamespaceMode::Pod, None) => {
            return Err(Error::FailedPrecondition(format!("pod {} shares a PID namespace but has none", pod.id)));
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
            return Err(Error::FailedPrecondition(format!(
                "pod {} has a user namespace range but no user namespace",
                pod.id
            )));
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
    let json = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
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
            "maskedPaths": masked,
            "readonlyPaths": readonly,
        },
    });
    serde_json::from_value(json).map_err(|e| Error::InvalidArgument(format!("cannot build the OCI spec: {e}")))
}

/// The signal number of an image's StopSignal (`SIGTERM`, `TERM`, `15`); SIGTERM when unset.
pub fn stop_signal(name: &str) -> Result<i32, Error> {
    if name.is_empty() {
        return Ok(libc::SIGTERM);
    }
    if let Ok(number) = name.parse::<i32>() {
        return Ok(number);
    }
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    let signal: nix::sys::signal::Signal = format!("SIG{short}")
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("image stop signal {name:?} is not a signal")))?;
    Ok(signal as i32)
}

/// The unit properties that express the container's limits and stop behaviour.
pub(crate) fn resource_properties(spec: &ContainerSpec) -> Result<Vec<(&'static str, Value<'static>)>, Error> {
    let mut properties: Vec<(&'static str, Value<'static>)> = vec![
        ("KillSignal", Value::from(stop_signal(&spec.image.stop_signal)?)),
        // Containers may run as many tasks as the pod's limits allow; systemd's default
        // (15% of pid_max per service) is not a Kubernetes limit.
        ("TasksMax", Value::from(u64::MAX)),
    ];
    properties.extend(limit_properties(&spec.resources));
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
        assert!(matches!(none.argv(), Err(Error::InvalidArgument(_))));
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
        let none =
            ContainerSpec { drop_capabilities: vec!["ALL".into()], add_capabilities: vec!["KILL".into()], ..spec() };
        assert_eq!(none.capabilities(), Vec::<String>::new());
        let bad = ContainerSpec { add_capabilities: vec!["CAP_FLY".into()], ..spec() };
        assert!(bad.validate().is_err());
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
    }
}
