//! Pods: what the kubelet asks for (`PodSpec`), what the runtime records (`Pod`), and how a pod
//! maps onto systemd (its slice).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::namespaces::PodNamespaces;
use crate::userns::{PodUserns, UsernsMode};

/// Linux's limit on a hostname (sethostname fails with EINVAL beyond it).
const HOST_NAME_MAX: usize = 64;

/// Where a namespace comes from: the pod's own, the node's, or (PID only) the container's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceMode {
    #[default]
    Pod,
    Container,
    Node,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub protocol: String,
    pub container_port: i32,
    pub host_port: i32,
    pub host_ip: String,
}

/// A pod as the kubelet describes it (the runtime's reading of a CRI PodSandboxConfig).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub hostname: String,
    pub log_directory: PathBuf,
    pub dns: Option<DnsConfig>,
    pub port_mappings: Vec<PortMapping>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The cgroup the kubelet's systemd cgroup driver chose, as it sends it: the slice's expanded
    /// path (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`);
    /// critest sends `/test.slice`. A bare slice name is taken too.
    pub cgroup_parent: String,
    pub network: NamespaceMode,
    pub pid: NamespaceMode,
    pub ipc: NamespaceMode,
    /// A user namespace of the pod's own, or the node's ids.
    #[serde(default)]
    pub userns: UsernsMode,
    pub runtime_handler: String,
    /// Namespaced sysctls (key, value), set in the pod's network and IPC namespaces.
    #[serde(default)]
    pub sysctls: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    /// RunPodSandbox is under way (or was, when the daemon died: then it is rolled back).
    Creating,
    Ready,
    NotReady,
    /// RemovePodSandbox is under way (or was: then it is finished on restart).
    Removing,
}

/// What the runtime knows of a pod; persisted as `<state_root>/pods/<id>/pod.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub id: String,
    pub spec: PodSpec,
    pub state: PodState,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    pub slice: String,
    pub namespaces: PodNamespaces,
    /// hostname, hosts, resolv.conf and the shm mount point.
    pub files_dir: PathBuf,
    /// The pod's /dev/shm, when it has one of its own (IPC namespace of its own).
    pub shm: Option<PathBuf>,
    /// The addresses CNI gave the pod, IPv4 first (the first is the pod IP); none for host-network
    /// pods, pods on a node without a CNI config, and stopped pods.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The host ids of the pod's user namespace, when it has one; recorded before the namespace
    /// is made, so that a restart knows every range in use.
    #[serde(default)]
    pub userns: Option<PodUserns>,
    /// The unit of the pod's init process (`cri-pod-<id>.service`), PID 1 of the PID namespace
    /// its containers share; only pods with a pod-wide PID namespace have one. Recorded before
    /// the unit is started.
    #[serde(default)]
    pub init_unit: Option<String>,
    /// Whether the runtime started the pod's slice (or shares one that a pod of its own started,
    /// as critest's pods share `/test.slice`): only then does it stop it, once no other pod of
    /// the runtime still uses it. The kubelet starts each pod's slice itself, with the pod's
    /// limits, before RunPodSandbox: that one is the kubelet's to stop. False until the slice is
    /// started (a daemon killed in between leaves an empty slice rather than stop the kubelet's);
    /// records from before this field owned theirs.
    #[serde(default = "records_before_ownership_owned_their_slice")]
    pub owns_slice: bool,
    /// The pod-level resources of the last UpdatePodSandboxResources (none before one).
    #[serde(default)]
    pub resources: Option<PodResources>,
}

/// Pod-level resources (UpdatePodSandboxResources): the sum of its containers' and the pod's
/// overhead, as the kubelet sends them after resizing the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodResources {
    pub resources: crate::container::Resources,
    pub overhead: crate::container::Resources,
}

fn records_before_ownership_owned_their_slice() -> bool {
    true
}

impl PodSpec {
    /// Checks what the CRI requires of a pod config.
    pub fn validate(&self) -> Result<(), Error> {
        for (field, value) in
            [("metadata.name", &self.name), ("metadata.uid", &self.uid), ("metadata.namespace", &self.namespace)]
        {
            if value.is_empty() {
                return Err(Error::InvalidSpec(format!("pod sandbox config has no {field}")));
            }
        }
        if !self.cgroup_parent.is_empty() {
            check_cgroup_parent(&self.cgroup_parent)?;
        }
        if self.hostname.len() > HOST_NAME_MAX {
            return Err(Error::InvalidSpec(format!(
                "hostname {:?} is {} bytes long: a hostname has at most {HOST_NAME_MAX}",
                self.hostname,
                self.hostname.len()
            )));
        }
        for (key, _) in &self.sysctls {
            let (namespace, _) = crate::namespaces::sysctl_file(key)?;
            let (kind, mode) = match namespace {
                crate::namespaces::SysctlNamespace::Network => ("network", self.network),
                crate::namespaces::SysctlNamespace::Ipc => ("IPC", self.ipc),
            };
            if mode == NamespaceMode::Node {
                return Err(Error::InvalidSpec(format!(
                    "sysctl {key} would change the node: the pod uses the node's {kind} namespace"
                )));
            }
        }
        if self.network != NamespaceMode::Node {
            for (field, value) in
                [("metadata.name", &self.name), ("metadata.uid", &self.uid), ("metadata.namespace", &self.namespace)]
            {
                crate::cni::check_cni_arg(field, value)?;
            }
            crate::cni::capability_args(&self.port_mappings, &self.annotations, &[])?;
        }
        if self.userns != UsernsMode::Node {
            // The node's namespaces belong to the node's user namespace: a pod in a user
            // namespace of its own cannot administer them (Kubernetes refuses these too).
            for (kind, mode) in [("network", self.network), ("IPC", self.ipc), ("PID", self.pid)] {
                if mode == NamespaceMode::Node {
                    return Err(Error::InvalidSpec(format!(
                        "a pod in a user namespace cannot use the node's {kind} namespace"
                    )));
                }
            }
            self.userns.requested_range()?;
        }
        Ok(())
    }

    /// The systemd slice the pod runs in: the kubelet's choice, or for clients that give none
    /// (crictl), a best-effort slice named after the pod's uid, as the kubelet would name it.
    pub fn slice_name(&self) -> String {
        if !self.cgroup_parent.is_empty() {
            // The kubelet's path ends in the slice's own name (validate checked the rest).
            return self.cgroup_parent.rsplit('/').next().unwrap_or_default().to_string();
        }
        // The kubelet turns the uid's dashes into underscores: dashes nest slices in systemd.
        format!("kubepods-besteffort-pod{}.slice", escape_unit_name_part(&self.uid.replace('-', "_")))
    }

    /// The hostname the pod's config sets, if any: only then does the pod's UTS namespace get
    /// a name of its own (a pod without one keeps the node's, as with containerd).
    pub fn configured_hostname(&self) -> Option<&str> {
        Some(self.hostname.as_str()).filter(|h| !h.is_empty())
    }

    /// The hostname the pod's containers see, for its /etc/hostname and /etc/hosts: the config's,
    /// or else the node's (containerd writes `os.Hostname()` there too).
    pub fn effective_hostname(&self) -> String {
        match self.configured_hostname() {
            Some(hostname) => hostname.to_string(),
            None => nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }
}

/// The unit of a pod's init process (pods with a pod-wide PID namespace only).
pub fn init_unit_name(pod_id: &str) -> String {
    format!("cri-pod-{pod_id}.service")
}

/// Escapes a string for use inside a unit name the way systemd-escape does: bytes outside
/// `[A-Za-z0-9:_.]` become `\xNN`, and a leading dot too.
pub fn escape_unit_name_part(text: &str) -> String {
    let mut escaped = String::new();
    for (index, byte) in text.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric() || byte == b':' || byte == b'_' || (byte == b'.' && index > 0);
        if plain {
            escaped.push(byte as char);
        } else {
            escaped += &format!("\\x{byte:02x}");
        }
    }
    escaped
}

/// Checks a cgroup_parent as the kubelet's systemd driver sends it: a slice's expanded path, each
/// component the parent slice of the next, as systemd nests slices by their dash-separated
/// prefixes (`/a.slice/a-b.slice/a-b-c.slice`); or a bare slice name (`a-b-c.slice`).
fn check_cgroup_parent(parent: &str) -> Result<(), Error> {
    let Some(path) = parent.strip_prefix('/') else { return check_slice_name(parent) };
    let slice = path.rsplit('/').next().unwrap_or_default();
    check_slice_name(slice)?;
    let expected = expand_slice(slice);
    if parent != expected {
        return Err(Error::InvalidSpec(format!(
            "cgroup_parent {parent:?} is not the path of systemd slice {slice:?}, which is {expected:?}"
        )));
    }
    Ok(())
}

/// The cgroup path of a (valid) slice: its ancestors by dash-separated prefix, then itself.
fn expand_slice(slice: &str) -> String {
    let stem = slice.strip_suffix(".slice").unwrap_or(slice);
    let mut path = String::new();
    for (end, _) in stem.match_indices('-').chain([(stem.len(), "")]) {
        path.push('/');
        path.push_str(&stem[..end]);
        path.push_str(".slice");
    }
    path
}

/// Checks that `name` is a valid systemd slice name, as the kubelet's systemd driver produces.
fn check_slice_name(name: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::InvalidSpec(format!("cgroup_parent {name:?} is not a systemd slice name: {why}")));
    let Some(stem) = name.strip_suffix(".slice") else { return bad("it does not end in .slice") };
    if name.len() > 255 {
        return bad("longer than 255 characters");
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return bad("empty or misplaced dash");
    }
    if !stem.bytes().all(|b| b.is_ascii_alphanumeric() || b":_.-\\".contains(&b)) {
        return bad("it has characters systemd does not allow");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PodSpec {
        PodSpec {
            name: "web".into(),
            uid: "0b7c6a1e-2f3d-4e5f-8a9b-1c2d3e4f5a6b".into(),
            namespace: "default".into(),
            pid: NamespaceMode::Container,
            ..Default::default()
        }
    }

    #[test]
    fn slice_from_uid_like_the_kubelet() {
        assert_eq!(spec().slice_name(), "kubepods-besteffort-pod0b7c6a1e_2f3d_4e5f_8a9b_1c2d3e4f5a6b.slice");
        let odd = PodSpec { uid: "a/b c".into(), ..spec() };
        assert_eq!(odd.slice_name(), "kubepods-besteffort-poda\\x2fb\\x20c.slice");
    }

    #[test]
    fn cgroup_parent_is_used_when_valid() {
        let given = PodSpec { cgroup_parent: "kubepods-burstable-pod123.slice".into(), ..spec() };
        given.validate().unwrap();
        assert_eq!(given.slice_name(), "kubepods-burstable-pod123.slice");
        // The kubelet's form: the expanded path; critest's `/test.slice`.
        let path = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b7c6a1e_2f3d.slice";
        let kubelet = PodSpec { cgroup_parent: path.into(), ..spec() };
        kubelet.validate().unwrap();
        assert_eq!(kubelet.slice_name(), "kubepods-besteffort-pod0b7c6a1e_2f3d.slice");
        let critest = PodSpec { cgroup_parent: "/test.slice".into(), ..spec() };
        critest.validate().unwrap();
        assert_eq!(critest.slice_name(), "test.slice");
        let escaped = "/kubepods.slice/kubepods-pod\\x2da.slice";
        PodSpec { cgroup_parent: escaped.into(), ..spec() }.validate().unwrap();
        for bad in [
            "/kubepods/pod123",
            "kubepods--x.slice",
            "-x.slice",
            "a b.slice",
            "/",
            "/-.slice",
            "//test.slice",
            "/test.slice/",
            // Components that are not each other's parents.
            "/kubepods-besteffort-pod1.slice",
            "/kubepods.slice/kubepods-besteffort-pod1.slice",
            "/other.slice/kubepods-pod1.slice",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod1.slice",
            "/kubepods.slice/../kubepods-pod1.slice",
        ] {
            let err = PodSpec { cgroup_parent: bad.into(), ..spec() }.validate().unwrap_err();
            assert!(matches!(err, Error::InvalidSpec(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn network_inputs_are_checked_unless_host_network() {
        let mut bad_bandwidth = spec();
        bad_bandwidth.annotations.insert("kubernetes.io/egress-bandwidth".into(), "lots".into());
        let err = bad_bandwidth.validate().unwrap_err().to_string();
        assert!(err.contains("kubernetes.io/egress-bandwidth") && err.contains("lots"), "{err}");
        let bad_mapping = PodSpec {
            port_mappings: vec![PortMapping {
                protocol: "TCP".into(),
                container_port: 80,
                host_port: 99999,
                host_ip: String::new(),
            }],
            ..spec()
        };
        assert_eq!(bad_mapping.validate().unwrap_err().kind(), crate::ErrorKind::InvalidArgument);
        let odd_name = PodSpec { name: "a;b".into(), ..spec() };
        assert!(odd_name.validate().unwrap_err().to_string().contains("CNI"));
        // Host-network pods make no CNI call: nothing to check.
        PodSpec { network: NamespaceMode::Node, ..odd_name }.validate().unwrap();
    }

    #[test]
    fn records_without_ips_still_read() {
        let pod = Pod {
            id: "x".into(),
            spec: spec(),
            state: PodState::Ready,
            created_at: 1,
            slice: "s.slice".into(),
            namespaces: Default::default(),
            files_dir: "/run/x".into(),
            shm: None,
            ips: vec!["10.88.0.5".parse().unwrap()],
            userns: None,
            init_unit: None,
            owns_slice: false,
            resources: None,
        };
        let mut json = serde_json::to_value(&pod).unwrap();
        assert_eq!(json["ips"], serde_json::json!(["10.88.0.5"]));
        json.as_object_mut().unwrap().remove("ips");
        json.as_object_mut().unwrap().remove("owns_slice");
        let old: Pod = serde_json::from_value(json).unwrap();
        assert!(old.ips.is_empty());
        // Before it was recorded, the runtime had started every pod's slice.
        assert!(old.owns_slice);
    }

    #[test]
    fn user_namespaces_need_pod_namespaces() {
        let userns = UsernsMode::Pod { uid_mappings: vec![], gid_mappings: vec![] };
        PodSpec { userns: userns.clone(), ..spec() }.validate().unwrap();
        let host_network = PodSpec { userns, network: NamespaceMode::Node, ..spec() };
        assert!(matches!(host_network.validate(), Err(Error::InvalidSpec(m)) if m.contains("network")));
    }

    #[test]
    fn metadata_is_required() {
        for spec in [
            PodSpec { name: "".into(), ..spec() },
            PodSpec { uid: "".into(), ..spec() },
            PodSpec { namespace: "".into(), ..spec() },
        ] {
            assert!(matches!(spec.validate(), Err(Error::InvalidSpec(_))));
        }
    }
}
