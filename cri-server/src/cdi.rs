//! Container Device Interface (CDI): the devices a container asks for by name
//! (`vendor.com/class=name`, in CRI `CDI_devices` or, as device plugins still may set them, in
//! `cdi.k8s.io/*` annotations; containerd honours both, duplicates once), injected into its spec
//! from the spec files on the node, as the CDI library (tags.cncf.io/container-device-interface,
//! SPEC.md 1.1.0) injects them.
//!
//! # Spec files
//!
//! Every `*.json` and `*.yaml` file directly in the config's `cdi.spec_dirs` (`/etc/cdi`,
//! `/var/run/cdi`) is read at each CreateContainer that asks for a CDI device, so that a spec a
//! DRA driver has just written is seen. A file that cannot be read, does not parse (unknown
//! fields are errors), or fails the library's checks (a known `cdiVersion` at least as new as the
//! fields it uses, `kind` `vendor/class`, device names, non-empty device edits, edits' own rules)
//! is skipped with its reason in the journal, as the library records and skips it; other files
//! still count. A device of a later directory replaces one of the same qualified name in an
//! earlier one; two in the same directory make that name ambiguous (even if a later directory
//! defines it again, as in the library), refused naming the files.
//!
//! # Injection
//!
//! For each device, in order: its spec's `containerEdits` (once per spec), then its own. `env`
//! entries set variables (over the config's); `deviceNodes` become devices of the container
//! (`runtime::Device`, made by init with mknod like CRI `devices`, so they work in a user
//! namespace too): type, major, minor and file mode come from the host node (`hostPath`, else
//! `path`, not following a symlink) where the spec leaves them out, the owner is the
//! container process's user and group unless given, cgroup permissions default to `rwm`, `none`
//! gives none; a node replaces any device at the same container path. `mounts` are bind mounts
//! (`type` empty or `bind`, or `bind`/`rbind` among the options) that replace any mount at the
//! same container path, then all mounts are ordered by depth, as the library does; options may be
//! `ro`/`rw`, propagation, `nosuid`, `nodev`, `noexec`; in a pod with a user namespace they are
//! idmapped to the pod's range (the library adds `idmap`/`ridmap`). `additionalGids` (but 0) join
//! the supplemental groups. `hooks` are the container's OCI hooks, appended in order to those of
//! their stage (`hookName`) with their `path`, `args`, `env` and `timeout`, as the library adds
//! them to the OCI spec; init runs them (`init::hooks`: where each stage runs, the state on
//! stdin, the bundle's config.json); a failing createContainer hook fails StartContainer. They
//! run as root of the node, from the paths of the spec files: CDI spec directories are the node
//! admin's, as containerd and CRI-O treat them (SECURITY.md).
//!
//! Refused, naming the device (InvalidArgument, nothing created): an unknown or ambiguous device,
//! a name that is not fully qualified, a hook path that is not absolute, `intelRdt`,
//! `netDevices`, fifo device nodes, mounts of other file system types or options. The result is
//! part of the container's record, so a restarted daemon starts it as it was created, whatever
//! the spec files say by then.
//!
//! Parsing: the Rust port of the CDI library (crate `container-device-interface`) was not used: it
//! brings clap, jsonschema and the archived serde_yaml into the daemon for what is a few structs
//! and checks here. YAML is read with `serde_norway`, a maintained fork of serde_yaml.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::cri;
use runtime::{BindMount, ContainerSpec, Device, DeviceNode, IdMapping, Propagation};
use serde::Deserialize;
use tonic::Status;

/// The annotation prefix of devices requested the older way (device plugins' Allocate answers).
pub const ANNOTATION_PREFIX: &str = "cdi.k8s.io/";

/// The CDI devices a container config asks for: `cdi_devices`, then those of `cdi.k8s.io/*`
/// annotations (comma-separated qualified names), each once.
pub fn requested(config: &cri::ContainerConfig) -> Result<Vec<String>, Status> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    };
    for device in &config.cdi_devices {
        add(&device.name);
    }
    let mut keys: Vec<&String> = config.annotations.keys().filter(|k| k.starts_with(ANNOTATION_PREFIX)).collect();
    keys.sort();
    for key in keys {
        for name in config.annotations[key].split(',') {
            if parse_qualified_name(name).is_err() {
                return Err(Status::invalid_argument(format!(
                    "annotation {key}: {name:?} is not a CDI device name (vendor.com/class=name)"
                )));
            }
            add(name);
        }
    }
    Ok(names)
}

/// Injects the named CDI devices into `spec` from the spec files in `dirs`. `pod_userns`: the
/// pod's user namespace range, if it has one (mounts are idmapped to it).
pub fn inject(
    dirs: &[PathBuf],
    names: &[String],
    pod_userns: Option<IdMapping>,
    spec: &mut ContainerSpec,
) -> Result<(), Status> {
    if names.is_empty() {
        return Ok(());
    }
    for name in names {
        parse_qualified_name(name).map_err(|e| Status::invalid_argument(format!("CDI device {name:?}: {e}")))?;
    }
    let registry = Registry::load(dirs);
    let mut edits: Vec<(&str, &Edits)> = Vec::new();
    let mut specs_seen: HashSet<*const LoadedSpec> = HashSet::new();
    for name in names {
        let (loaded, index) = registry.device(name, dirs)?;
        if specs_seen.insert(Arc::as_ptr(loaded)) {
            edits.push((name, &loaded.spec.container_edits));
        }
        edits.push((name, &loaded.spec.devices[*index].container_edits));
    }
    let mut added_mounts = false;
    for (name, edit) in edits {
        added_mounts |=
            apply(edit, pod_userns, spec).map_err(|e| Status::invalid_argument(format!("CDI device {name}: {e}")))?;
    }
    if added_mounts {
        // As the library orders them (Docker's order): fewer path components first, stable.
        spec.mounts.sort_by_key(|m| Path::new(&m.container_path).components().count());
    }
    Ok(())
}

/// Applies one `containerEdits`; true if it added mounts.
fn apply(edits: &Edits, pod_userns: Option<IdMapping>, spec: &mut ContainerSpec) -> Result<bool, String> {
    for hook in &edits.hooks {
        // The OCI spec's rule; the library leaves it to the runtime.
        if !hook.path.starts_with('/') {
            return Err(format!("its {} hook path {:?} is not absolute", hook.hook_name, hook.path));
        }
        spec.hooks.push(runtime::Hook {
            stage: hook.hook_name.clone(),
            path: hook.path.clone(),
            args: hook.args.clone(),
            env: hook.env.clone(),
            timeout: hook.timeout,
        });
    }
    if edits.intel_rdt.is_some() {
        return Err("its spec sets intelRdt, which cri-systemd does not support".into());
    }
    if let Some(net) = edits.net_devices.first() {
        return Err(format!(
            "its spec moves network device {} into the container, which cri-systemd does not support",
            net.host_interface_name
        ));
    }
    for entry in &edits.env {
        let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
        spec.env.push((key.to_string(), value.to_string()));
    }
    for node in &edits.device_nodes {
        let device = device_of(node)?;
        spec.devices.retain(|d| d.container_path != device.container_path);
        spec.devices.push(device);
    }
    for mount in &edits.mounts {
        let mount = bind_mount_of(mount, pod_userns)?;
        spec.mounts.retain(|m| m.container_path != mount.container_path);
        spec.mounts.push(mount);
    }
    for gid in edits.additional_gids.iter().filter(|g| **g != 0) {
        spec.supplemental_groups.push(i64::from(*gid));
    }
    Ok(!edits.mounts.is_empty())
}

/// A device node of a spec as the runtime's device, the missing parts read from the host node
/// (the library's `fillMissingInfo`).
fn device_of(node: &SpecDeviceNode) -> Result<Device, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let host_path = if node.host_path.is_empty() { &node.path } else { &node.host_path };
    let minimal = !node.r#type.is_empty() && (node.major != 0 || node.r#type == "p");
    let host = match std::fs::symlink_metadata(host_path) {
        Ok(meta) => {
            let kind = meta.file_type();
            let r#type = if kind.is_block_device() {
                "b"
            } else if kind.is_char_device() {
                "c"
            } else if kind.is_fifo() {
                "p"
            } else {
                return Err(format!("host device {host_path} is not a device node"));
            };
            Some((
                r#type,
                nix::sys::stat::major(meta.rdev()) as i64,
                nix::sys::stat::minor(meta.rdev()) as i64,
                meta.mode() & 0o7777,
            ))
        }
        Err(e) if !minimal => return Err(format!("cannot stat host device {host_path}: {e}")),
        Err(_) => None,
    };
    let mut r#type = node.r#type.as_str();
    let (mut major, mut minor) = (node.major, node.minor);
    if !minimal && let Some((host_type, host_major, host_minor, _)) = host {
        if r#type.is_empty() {
            r#type = host_type;
        }
        let same_kind = r#type == host_type || (r#type == "u" && host_type == "c");
        if !same_kind {
            return Err(format!(
                "device {} is of type {type:?}, host node {host_path} of type {host_type:?}",
                node.path
            ));
        }
        if major == 0 {
            (major, minor) = (host_major, host_minor);
        }
    }
    let block = match r#type {
        "b" => true,
        "c" | "u" => false,
        other => return Err(format!("device {}: device nodes of type {other:?} are not supported", node.path)),
    };
    let (major, minor) = match (u64::try_from(major), u64::try_from(minor)) {
        (Ok(major), Ok(minor)) => (major, minor),
        _ => return Err(format!("device {}: negative device number {major}:{minor}", node.path)),
    };
    let mode = node.file_mode.or(host.map(|h| h.3)).unwrap_or(0o666) & 0o7777;
    let permissions = match node.permissions.as_str() {
        "" => "rwm".to_string(),
        "none" => String::new(),
        given => "rwm".chars().filter(|c| given.contains(*c)).collect(),
    };
    Ok(Device {
        host_path: host_path.into(),
        container_path: node.path.clone(),
        permissions,
        node: Some(DeviceNode { block, major, minor, mode, uid: node.uid.unwrap_or(0), gid: node.gid.unwrap_or(0) }),
        uid_from_process: node.uid.is_none(),
        gid_from_process: node.gid.is_none(),
    })
}

/// A mount of a spec as a bind mount of the container.
fn bind_mount_of(mount: &SpecMount, pod_userns: Option<IdMapping>) -> Result<BindMount, String> {
    let bind = mount.options.iter().any(|o| o == "bind" || o == "rbind");
    if !(mount.r#type.is_empty() || mount.r#type == "bind" || bind) {
        return Err(format!(
            "mount at {}: only bind mounts are supported, not type {:?}",
            mount.container_path, mount.r#type
        ));
    }
    let mut result = BindMount {
        container_path: mount.container_path.clone(),
        host_path: mount.host_path.clone().into(),
        ..Default::default()
    };
    for option in &mount.options {
        match option.as_str() {
            "bind" | "rbind" | "rw" => {}
            "ro" => result.readonly = true,
            "private" | "rprivate" => result.propagation = Propagation::Private,
            "slave" | "rslave" => result.propagation = Propagation::HostToContainer,
            "shared" | "rshared" => result.propagation = Propagation::Bidirectional,
            flag if runtime::EXTRA_MOUNT_OPTIONS.contains(&flag) => result.extra_options.push(flag.to_string()),
            other => return Err(format!("mount at {}: option {other:?} is not supported", mount.container_path)),
        }
    }
    if let Some(mapping) = pod_userns {
        result.uid_mappings = vec![mapping];
        result.gid_mappings = vec![mapping];
    }
    Ok(result)
}

/// The devices of every valid spec file, by qualified name.
struct Registry {
    devices: HashMap<String, Found>,
    /// Files skipped, with why (also logged).
    skipped: Vec<(PathBuf, String)>,
}

enum Found {
    Device(Arc<LoadedSpec>, usize),
    /// Defined in more than one file of the same directory: these files.
    Ambiguous(Vec<PathBuf>),
}

struct LoadedSpec {
    path: PathBuf,
    priority: usize,
    spec: Spec,
}

impl Registry {
    fn load(dirs: &[PathBuf]) -> Registry {
        let mut registry = Registry { devices: HashMap::new(), skipped: Vec::new() };
        for (priority, dir) in dirs.iter().enumerate() {
            let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
                Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "cannot read the CDI spec directory: {e}");
                    continue;
                }
            };
            paths.sort();
            for path in paths {
                let json = match path.extension().and_then(|e| e.to_str()) {
                    Some("json") => true,
                    Some("yaml") => false,
                    _ => continue,
                };
                if path.is_dir() {
                    continue;
                }
                match read_spec(&path, json) {
                    Ok(spec) => registry.add(Arc::new(LoadedSpec { path, priority, spec })),
                    Err(reason) => {
                        tracing::warn!(path = %path.display(), "CDI spec skipped: {reason}");
                        registry.skipped.push((path, reason));
                    }
                }
            }
        }
        registry
    }

    /// A device of a later directory replaces one of an earlier directory; two of the same
    /// directory make the name ambiguous, for good: the library drops a conflicting name even if
    /// a later directory defines it again (containerd then refuses it), and so does this.
    fn add(&mut self, loaded: Arc<LoadedSpec>) {
        for (index, device) in loaded.spec.devices.iter().enumerate() {
            let name = format!("{}={}", loaded.spec.kind, device.name);
            let found = match self.devices.remove(&name) {
                Some(Found::Device(other, _)) if other.priority == loaded.priority => {
                    Found::Ambiguous(vec![other.path.clone(), loaded.path.clone()])
                }
                Some(Found::Ambiguous(mut paths)) => {
                    paths.push(loaded.path.clone());
                    Found::Ambiguous(paths)
                }
                _ => Found::Device(loaded.clone(), index),
            };
            self.devices.insert(name, found);
        }
    }

    fn device(&self, name: &str, dirs: &[PathBuf]) -> Result<(&Arc<LoadedSpec>, &usize), Status> {
        match self.devices.get(name) {
            Some(Found::Device(spec, index)) => Ok((spec, index)),
            Some(Found::Ambiguous(paths)) => {
                let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                Err(Status::invalid_argument(format!(
                    "CDI device {name} is ambiguous: defined in {}",
                    paths.join(" and ")
                )))
            }
            None => {
                let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                let mut message = format!("CDI device {name} is not defined by any CDI spec in {}", dirs.join(", "));
                if !self.skipped.is_empty() {
                    let skipped: Vec<String> =
                        self.skipped.iter().map(|(p, why)| format!("{}: {why}", p.display())).collect();
                    message.push_str(&format!(" (spec files skipped: {})", skipped.join("; ")));
                }
                Err(Status::invalid_argument(message))
            }
        }
    }
}

/// Reads, parses and checks one spec file.
fn read_spec(path: &Path, json: bool) -> Result<Spec, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let spec: Spec = if json {
        serde_json::from_slice(&data).map_err(|e| e.to_string())?
    } else {
        serde_norway::from_slice(&data).map_err(|e| e.to_string())?
    };
    spec.validate()?;
    Ok(spec)
}

/// A CDI spec file (specs-go `Spec`). Unknown fields are errors, as in the library.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    cdi_version: String,
    kind: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    devices: Vec<SpecDevice>,
    #[serde(default)]
    container_edits: Edits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SpecDevice {
    name: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    container_edits: Edits,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Edits {
    env: Vec<String>,
    device_nodes: Vec<SpecDeviceNode>,
    net_devices: Vec<NetDevice>,
    hooks: Vec<Hook>,
    mounts: Vec<SpecMount>,
    intel_rdt: Option<IntelRdt>,
    additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct SpecDeviceNode {
    path: String,
    host_path: String,
    r#type: String,
    major: i64,
    minor: i64,
    file_mode: Option<u32>,
    permissions: String,
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct SpecMount {
    host_path: String,
    container_path: String,
    options: Vec<String>,
    r#type: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Hook {
    hook_name: String,
    path: String,
    args: Vec<String>,
    env: Vec<String>,
    timeout: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct IntelRdt {
    #[serde(rename = "closID")]
    clos_id: String,
    l3_cache_schema: String,
    mem_bw_schema: String,
    schemata: Option<Vec<String>>,
    enable_monitoring: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct NetDevice {
    host_interface_name: String,
    name: String,
}

/// The spec versions the library knows, oldest first; 0.3.0 is the earliest it accepts fields of.
const VERSIONS: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"];

impl Spec {
    /// The library's checks of a spec (`Spec.validate`, `Device.validate`, `ContainerEdits.Validate`).
    fn validate(&self) -> Result<(), String> {
        let version = self.cdi_version.strip_prefix('v').unwrap_or(&self.cdi_version);
        let given =
            VERSIONS.iter().position(|v| *v == version).ok_or(format!("invalid version {:?}", self.cdi_version))?;
        let required = self.required_version();
        if given < required {
            return Err(format!("the spec version must be at least v{}", VERSIONS[required]));
        }
        let (vendor, class) = self.kind.split_once('/').ok_or(format!("kind {:?} is not vendor/class", self.kind))?;
        check_vendor_or_class(vendor).map_err(|e| format!("kind {:?}: invalid vendor: {e}", self.kind))?;
        check_vendor_or_class(class).map_err(|e| format!("kind {:?}: invalid class: {e}", self.kind))?;
        self.container_edits.validate()?;
        let mut names = HashSet::new();
        for device in &self.devices {
            check_device_name(&device.name)?;
            if device.container_edits.is_empty() {
                return Err(format!("device {:?} has no container edits", device.name));
            }
            device.container_edits.validate().map_err(|e| format!("device {:?}: {e}", device.name))?;
            if !names.insert(&device.name) {
                return Err(format!("device {:?} is defined twice", device.name));
            }
        }
        if self.devices.is_empty() {
            return Err("no devices".into());
        }
        Ok(())
    }

    /// The index in VERSIONS of the oldest version that has every field the spec uses.
    fn required_version(&self) -> usize {
        let edits: Vec<&Edits> =
            std::iter::once(&self.container_edits).chain(self.devices.iter().map(|d| &d.container_edits)).collect();
        let at = |v: &str| VERSIONS.iter().position(|known| *known == v).unwrap_or(0);
        if edits.iter().any(|e| {
            !e.net_devices.is_empty()
                || e.intel_rdt.as_ref().is_some_and(|r| r.schemata.is_some() || r.enable_monitoring)
        }) {
            return at("1.1.0");
        }
        if edits.iter().any(|e| e.intel_rdt.is_some() || !e.additional_gids.is_empty()) {
            return at("0.7.0");
        }
        let class_with_dot = self.kind.split_once('/').is_some_and(|(_, class)| class.contains('.'));
        if !self.annotations.is_empty() || self.devices.iter().any(|d| !d.annotations.is_empty()) || class_with_dot {
            return at("0.6.0");
        }
        if self.devices.iter().any(|d| d.name.starts_with(|c: char| c.is_ascii_digit()))
            || edits.iter().any(|e| e.device_nodes.iter().any(|n| !n.host_path.is_empty()))
        {
            return at("0.5.0");
        }
        if edits.iter().any(|e| e.mounts.iter().any(|m| !m.r#type.is_empty())) {
            return at("0.4.0");
        }
        at("0.3.0")
    }
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.device_nodes.is_empty()
            && self.hooks.is_empty()
            && self.mounts.is_empty()
            && self.additional_gids.is_empty()
            && self.intel_rdt.is_none()
            && self.net_devices.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        check_env(&self.env)?;
        for node in &self.device_nodes {
            if node.path.is_empty() {
                return Err("a device node has an empty path".into());
            }
            if !["", "b", "c", "u", "p"].contains(&node.r#type.as_str()) {
                return Err(format!("device node {:?}: invalid type {:?}", node.path, node.r#type));
            }
            let permissions_ok = node.permissions.is_empty()
                || node.permissions == "none"
                || node.permissions.chars().all(|c| "rwm".contains(c));
            if !permissions_ok {
                return Err(format!("device node {:?}: invalid permissions {:?}", node.path, node.permissions));
            }
        }
        for hook in &self.hooks {
            let names = ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"];
            if !names.contains(&hook.hook_name.as_str()) {
                return Err(format!("invalid hook name {:?}", hook.hook_name));
            }
            if hook.path.is_empty() {
                return Err(format!("hook {:?} has an empty path", hook.hook_name));
            }
            check_env(&hook.env).map_err(|e| format!("hook {:?}: {e}", hook.hook_name))?;
            if hook.timeout.is_some_and(|t| t <= 0) {
                return Err(format!("hook {:?}: timeout must be positive", hook.hook_name));
            }
        }
        for mount in &self.mounts {
            if mount.host_path.is_empty() || mount.container_path.is_empty() {
                return Err("a mount has an empty host or container path".into());
            }
        }
        if let Some(rdt) = &self.intel_rdt {
            let c = &rdt.clos_id;
            if c != "/" && (c.len() >= 4096 || c == "." || c == ".." || c.contains(['/', '\n'])) {
                return Err("invalid intelRdt closID".into());
            }
        }
        let (mut hosts, mut names) = (HashSet::new(), HashSet::new());
        for net in &self.net_devices {
            if net.host_interface_name.is_empty() || net.name.is_empty() {
                return Err("a net device has an empty hostInterfaceName or name".into());
            }
            if !hosts.insert(&net.host_interface_name) || !names.insert(&net.name) {
                return Err(format!("net device {:?} is given twice", net.host_interface_name));
            }
        }
        Ok(())
    }
}

fn check_env(env: &[String]) -> Result<(), String> {
    match env.iter().find(|e| e.find('=').is_none_or(|at| at == 0)) {
        Some(bad) => Err(format!("invalid environment variable {bad:?}")),
        None => Ok(()),
    }
}

/// A vendor or class: a letter first, alphanumerics last, `_-.` and alphanumerics between.
fn check_vendor_or_class(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (None, _) | (_, None) => Err("empty name".into()),
        (Some(first), _) if !first.is_ascii_alphabetic() => Err(format!("{name:?} should start with a letter")),
        (_, Some(last)) if !last.is_ascii_alphanumeric() => Err(format!("{name:?} should end with a letter or digit")),
        _ if bytes.iter().any(|c| !(c.is_ascii_alphanumeric() || b"_-.".contains(c))) => {
            Err(format!("invalid character in {name:?}"))
        }
        _ => Ok(()),
    }
}

/// A device name: alphanumerics first and last, `_-.:` and alphanumerics between.
fn check_device_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let ends_ok = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !ends_ok(bytes.first()) || !ends_ok(bytes.last()) {
        return Err(format!("invalid device name {name:?}: it should start and end with a letter or digit"));
    }
    if bytes.iter().any(|c| !(c.is_ascii_alphanumeric() || b"_-.:".contains(c))) {
        return Err(format!("invalid character in device name {name:?}"));
    }
    Ok(())
}

/// `vendor.com/class=name` -> (vendor, class, name), checked as the library checks it.
fn parse_qualified_name(device: &str) -> Result<(&str, &str, &str), String> {
    let unqualified = || format!("{device:?} is not a fully qualified CDI device name (vendor.com/class=name)");
    let (kind, name) = device.split_once('=').ok_or_else(unqualified)?;
    let (vendor, class) = kind.split_once('/').ok_or_else(unqualified)?;
    if vendor.is_empty() || class.is_empty() || name.is_empty() {
        return Err(unqualified());
    }
    check_vendor_or_class(vendor).map_err(|e| format!("invalid vendor: {e}"))?;
    check_vendor_or_class(class).map_err(|e| format!("invalid class: {e}"))?;
    check_device_name(name)?;
    Ok((vendor, class, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOP_JSON: &str = r#"{
        "cdiVersion": "0.6.0",
        "kind": "example.com/disk",
        "annotations": {"a": "b"},
        "containerEdits": {"env": ["FROM_SPEC=1"]},
        "devices": [{
            "name": "null0",
            "containerEdits": {
                "env": ["DISK=null0", "SHARED=device"],
                "deviceNodes": [{"path": "/dev/disk0", "hostPath": "/dev/null", "permissions": "rw"}],
                "mounts": [{"hostPath": "/tmp", "containerPath": "/cdi/tmp", "options": ["ro", "nosuid", "rbind"]}]
            }
        }]
    }"#;

    const YAML: &str = "cdiVersion: 0.7.0\nkind: example.com/yaml\ndevices:\n  - name: \"1\"\n    containerEdits:\n      \
                        env: [\"YAML=yes\"]\n      additionalGids: [0, 44]\n      deviceNodes:\n        - path: /dev/y\n          \
                        type: c\n          major: 1\n          minor: 5\n          uid: 7\n";

    fn dirs(files: &[(&str, &str, &str)]) -> (tempfile::TempDir, Vec<PathBuf>) {
        let root = tempfile::tempdir().unwrap();
        let dirs = vec![root.path().join("etc"), root.path().join("run")];
        for dir in &dirs {
            std::fs::create_dir(dir).unwrap();
        }
        for (dir, name, text) in files {
            std::fs::write(root.path().join(dir).join(name), text).unwrap();
        }
        (root, dirs)
    }

    fn spec() -> ContainerSpec {
        ContainerSpec { name: "c".into(), env: vec![("SHARED".into(), "config".into())], ..Default::default() }
    }

    fn inject_names(dirs: &[PathBuf], names: &[&str], userns: Option<IdMapping>) -> Result<ContainerSpec, Status> {
        let mut spec = spec();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        inject(dirs, &names, userns, &mut spec).map(|()| spec)
    }

    #[test]
    fn edits_of_json_and_yaml_specs_are_applied() {
        let (_root, dirs) = dirs(&[("etc", "disk.json", LOOP_JSON), ("run", "y.yaml", YAML)]);
        let spec = inject_names(&dirs, &["example.com/disk=null0", "example.com/yaml=1"], None).unwrap();
        // The spec's edits, then the device's; later values of a name win (environment()).
        assert_eq!(
            spec.env,
            [("SHARED", "config"), ("FROM_SPEC", "1"), ("DISK", "null0"), ("SHARED", "device"), ("YAML", "yes")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let disk = &spec.devices[0];
        assert_eq!((disk.container_path.as_str(), disk.permissions.as_str()), ("/dev/disk0", "rw"));
        let node = disk.node.unwrap();
        // Type and number from the host node (/dev/null is char 1:3), as is its mode.
        assert_eq!((node.block, node.major, node.minor), (false, 1, 3));
        assert_eq!(
            node.mode,
            std::fs::metadata("/dev/null")
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                .unwrap()
        );
        assert!(disk.uid_from_process && disk.gid_from_process);
        // A fully specified node keeps what the spec says; its owner uid too.
        let y = &spec.devices[1];
        assert_eq!(y.node.map(|n| (n.major, n.minor, n.uid)), Some((1, 5, 7)));
        assert!(!y.uid_from_process && y.gid_from_process);
        assert_eq!(y.permissions, "rwm");
        assert_eq!(spec.supplemental_groups, [44]);
        let mount = &spec.mounts[0];
        assert_eq!((mount.container_path.as_str(), mount.readonly), ("/cdi/tmp", true));
        assert_eq!(mount.extra_options, ["nosuid"]);
        assert!(mount.uid_mappings.is_empty());
        spec.validate().unwrap();

        // In a pod with a user namespace, mounts are idmapped to the pod's range.
        let range = IdMapping { container_id: 0, host_id: 524288, size: 65536 };
        let spec = inject_names(&dirs, &["example.com/disk=null0"], Some(range)).unwrap();
        assert_eq!(
            (spec.mounts[0].uid_mappings.clone(), spec.mounts[0].gid_mappings.clone()),
            (vec![range], vec![range])
        );
    }

    #[test]
    fn later_directories_win_and_one_directory_twice_is_ambiguous() {
        let other = LOOP_JSON.replace("DISK=null0", "DISK=run");
        let (_root, dirs_) = dirs(&[("etc", "a.json", LOOP_JSON), ("run", "b.json", &other)]);
        let spec = inject_names(&dirs_, &["example.com/disk=null0"], None).unwrap();
        assert!(spec.env.contains(&("DISK".into(), "run".into())), "{:?}", spec.env);

        let (_root, dirs_) =
            dirs(&[("etc", "a.json", LOOP_JSON), ("etc", "b.json", &other), ("run", "c.json", LOOP_JSON)]);
        let error = inject_names(&dirs_, &["example.com/disk=null0"], None).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(error.message().contains("ambiguous") && error.message().contains("a.json"), "{}", error.message());
        assert!(error.message().contains("b.json"), "{}", error.message());
    }

    #[test]
    fn bad_spec_files_are_skipped_and_named_when_a_device_is_missing() {
        let old_version = LOOP_JSON.replace("0.6.0", "0.4.0");
        let unknown_field = LOOP_JSON.replace("\"kind\"", "\"colour\": 1, \"kind\"");
        let files = [
            ("etc", "broken.yaml", "cdiVersion: [\n"),
            ("etc", "old.json", old_version.as_str()),
            ("etc", "field.json", unknown_field.as_str()),
            ("etc", "ignored.txt", "not a spec"),
            ("run", "y.yaml", YAML),
        ];
        let (_root, dirs_) = dirs(&files);
        // The valid file still counts.
        inject_names(&dirs_, &["example.com/yaml=1"], None).unwrap();
        let error = inject_names(&dirs_, &["example.com/disk=null0"], None).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        let message = error.message();
        assert!(message.contains("example.com/disk=null0") && message.contains("not defined"), "{message}");
        assert!(
            message.contains("broken.yaml") && message.contains("old.json: the spec version must be at least v0.6.0"),
            "{message}"
        );
        assert!(message.contains("field.json") && message.contains("colour"), "{message}");
        assert!(!message.contains("ignored.txt"), "{message}");
    }

    #[test]
    fn what_cri_systemd_cannot_do_is_refused_naming_the_device() {
        let hook = LOOP_JSON.replace(
            "\"containerEdits\": {\"env\": [\"FROM_SPEC=1\"]}",
            "\"containerEdits\": {\"hooks\": [{\"hookName\": \"createContainer\", \"path\": \"usr/bin/hook\"}]}",
        );
        let tmpfs = LOOP_JSON.replace("\"options\": [\"ro\", \"nosuid\", \"rbind\"]", "\"type\": \"tmpfs\"");
        let (_root, dirs_) = dirs(&[("etc", "hook.json", &hook), ("run", "y.yaml", YAML)]);
        let error = inject_names(&dirs_, &["example.com/yaml=1", "example.com/disk=null0"], None).unwrap_err();
        let message = error.message();
        assert!(
            message.contains("example.com/disk=null0") && message.contains("\"usr/bin/hook\" is not absolute"),
            "{message}"
        );
        let (_root, dirs_) = dirs(&[("etc", "tmpfs.json", &tmpfs)]);
        let error = inject_names(&dirs_, &["example.com/disk=null0"], None).unwrap_err();
        assert!(error.message().contains("tmpfs"), "{}", error.message());
        for bad in ["disk=null0", "example.com/disk", "example.com/disk=", "/dev/null", "example.com/disk=-x"] {
            let error = inject_names(&dirs_, &[bad], None).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(error.message().contains(bad), "{bad}: {}", error.message());
        }
    }

    #[test]
    fn hooks_are_appended_in_order_spec_edits_first_with_args_env_and_timeout() {
        let hooks = LOOP_JSON
            .replace(
                "\"containerEdits\": {\"env\": [\"FROM_SPEC=1\"]}",
                "\"containerEdits\": {\"hooks\": [{\"hookName\": \"createContainer\", \"path\": \"/bin/ldcache\", \
                 \"args\": [\"ldcache\", \"-f\"], \"env\": [\"A=1\"], \"timeout\": 5}]}",
            )
            .replace(
                "\"env\": [\"DISK=null0\", \"SHARED=device\"],",
                "\"hooks\": [{\"hookName\": \"poststop\", \"path\": \"/bin/cleanup\"}, \
                 {\"hookName\": \"createContainer\", \"path\": \"/bin/symlinks\"}],",
            );
        let (_root, dirs_) = dirs(&[("etc", "hooks.json", &hooks)]);
        let spec = inject_names(&dirs_, &["example.com/disk=null0"], None).unwrap();
        let got: Vec<(&str, &str)> = spec.hooks.iter().map(|h| (h.stage.as_str(), h.path.as_str())).collect();
        assert_eq!(
            got,
            [("createContainer", "/bin/ldcache"), ("poststop", "/bin/cleanup"), ("createContainer", "/bin/symlinks")]
        );
        assert_eq!(spec.hooks[0].args, ["ldcache", "-f"]);
        assert_eq!(spec.hooks[0].env, ["A=1"]);
        assert_eq!(spec.hooks[0].timeout, Some(5));
        let zero = hooks.replace("\"timeout\": 5", "\"timeout\": 0");
        let (_root, dirs_) = dirs(&[("etc", "zero.json", &zero)]);
        let error = inject_names(&dirs_, &["example.com/disk=null0"], None).unwrap_err();
        assert!(error.message().contains("timeout must be positive"), "{}", error.message());
    }

    #[test]
    fn devices_come_from_the_field_then_the_annotations_once_each() {
        let config = cri::ContainerConfig {
            cdi_devices: vec![cri::CdiDevice { name: "a.com/x=1".into() }],
            annotations: [
                ("cdi.k8s.io/plugin_dev".to_string(), "a.com/x=1,b.com/y=2".to_string()),
                ("other".to_string(), "not=a,device".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        assert_eq!(requested(&config).unwrap(), ["a.com/x=1", "b.com/y=2"]);
        let bad = cri::ContainerConfig {
            annotations: [("cdi.k8s.io/p".to_string(), "gpu0".to_string())].into(),
            ..Default::default()
        };
        let error = requested(&bad).unwrap_err();
        assert!(error.message().contains("cdi.k8s.io/p") && error.message().contains("gpu0"), "{}", error.message());
    }
}
