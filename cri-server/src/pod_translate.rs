//! CRI pod messages <-> `runtime` pods.

use std::collections::{BTreeMap, HashMap};

use proto::cri;
use runtime::{DnsConfig, IdMapping, NamespaceMode, Pod, PodSpec, PodState, PortMapping, UsernsMode};
use tonic::Status;

use crate::config::RuntimeHandlerConfig;

/// Reads a CRI RunPodSandboxRequest as a runtime PodSpec, with only the default handler (`""`).
pub fn pod_spec(request: cri::RunPodSandboxRequest) -> Result<PodSpec, Status> {
    pod_spec_with_handlers(request, &BTreeMap::new())
}

/// Reads a CRI RunPodSandboxRequest as a runtime PodSpec; `runtimes` are the configured handlers
/// besides the default one (`""`), whose settings apply to the pod.
pub fn pod_spec_with_handlers(
    request: cri::RunPodSandboxRequest,
    runtimes: &BTreeMap<String, RuntimeHandlerConfig>,
) -> Result<PodSpec, Status> {
    let config = request.config.ok_or_else(|| Status::invalid_argument("RunPodSandbox needs a config"))?;
    let handler = runtime_handler(&request.runtime_handler, runtimes)?;
    let metadata = config.metadata.unwrap_or_default();
    let linux = config.linux.unwrap_or_default();
    let namespace_options = linux.security_context.as_ref().and_then(|s| s.namespace_options.clone());
    let selinux_options = linux.security_context.as_ref().is_some_and(|s| s.selinux_options.is_some());
    if let Some(refusal) = runtime::selinux::refusal("the pod sandbox", selinux_options) {
        return Err(Status::failed_precondition(refusal));
    }
    let mut userns = userns_mode(namespace_options.as_ref().and_then(|o| o.userns_options.as_ref()))?;
    let (network, pid, ipc) = match &namespace_options {
        Some(options) => (mode(options.network)?, mode(options.pid)?, mode(options.ipc)?),
        // No namespace options at all (crictl's minimal configs): the kubelet's defaults, which
        // give each container its own PID namespace.
        None => (NamespaceMode::Pod, NamespaceMode::Container, NamespaceMode::Pod),
    };
    if handler.user_namespace && userns == UsernsMode::Node {
        for (what, mode) in [("network", network), ("PID", pid), ("IPC", ipc)] {
            if mode == NamespaceMode::Node {
                return Err(Status::invalid_argument(format!(
                    "runtime handler {:?} gives every pod a user namespace, which a pod with the node's {what} \
                     namespace cannot have",
                    request.runtime_handler
                )));
            }
        }
        // A range from the pool, as for hostUsers: false without the kubelet's mappings.
        userns = UsernsMode::Pod { uid_mappings: Vec::new(), gid_mappings: Vec::new() };
    }
    let port_mappings = config
        .port_mappings
        .iter()
        .map(|p| PortMapping {
            protocol: cri::Protocol::try_from(p.protocol).map(|p| p.as_str_name().to_string()).unwrap_or_default(),
            container_port: p.container_port,
            host_port: p.host_port,
            host_ip: p.host_ip.clone(),
        })
        .collect();
    Ok(PodSpec {
        name: metadata.name,
        uid: metadata.uid,
        namespace: metadata.namespace,
        attempt: metadata.attempt,
        hostname: config.hostname,
        log_directory: config.log_directory.into(),
        dns: config.dns_config.map(|d| DnsConfig { servers: d.servers, searches: d.searches, options: d.options }),
        port_mappings,
        labels: config.labels.into_iter().collect(),
        annotations: config.annotations.into_iter().collect(),
        cgroup_parent: linux.cgroup_parent,
        network,
        pid,
        ipc,
        userns,
        runtime_handler: request.runtime_handler,
        // Sorted, so that a record and its errors do not depend on a map's order.
        sysctls: linux.sysctls.into_iter().collect::<std::collections::BTreeMap<_, _>>().into_iter().collect(),
    })
}

/// The settings of the pod's runtime handler: the default handler's (`""`) or a configured one's;
/// any other name is refused, naming the handlers there are.
pub fn runtime_handler(
    name: &str,
    runtimes: &BTreeMap<String, RuntimeHandlerConfig>,
) -> Result<RuntimeHandlerConfig, Status> {
    if name.is_empty() {
        return Ok(RuntimeHandlerConfig::default());
    }
    runtimes.get(name).cloned().ok_or_else(|| {
        let known: Vec<String> =
            std::iter::once(String::new()).chain(runtimes.keys().cloned()).map(|n| format!("{n:?}")).collect();
        Status::invalid_argument(format!(
            "runtime_handler {name:?} is not configured (cri-systemd has the handlers {}; see [runtimes.<name>] in \
             its config)",
            known.join(", ")
        ))
    })
}

/// `userns_options`: none or mode NODE, the node's ids; mode POD, a user namespace of the pod's
/// own, with the kubelet's mappings if it gives any (the runtime checks them).
fn userns_mode(options: Option<&cri::UserNamespace>) -> Result<UsernsMode, Status> {
    let Some(options) = options else { return Ok(UsernsMode::Node) };
    match cri::NamespaceMode::try_from(options.mode) {
        Ok(cri::NamespaceMode::Node) => {
            if !options.uids.is_empty() || !options.gids.is_empty() {
                return Err(Status::invalid_argument("user namespace mode NODE takes no id mappings"));
            }
            Ok(UsernsMode::Node)
        }
        Ok(cri::NamespaceMode::Pod) => {
            Ok(UsernsMode::Pod { uid_mappings: id_mappings(&options.uids), gid_mappings: id_mappings(&options.gids) })
        }
        _ => Err(Status::invalid_argument(format!(
            "user namespace mode {} is not supported: only POD and NODE are",
            options.mode
        ))),
    }
}

pub fn id_mappings(mappings: &[cri::IdMapping]) -> Vec<IdMapping> {
    mappings.iter().map(|m| IdMapping { container_id: m.container_id, host_id: m.host_id, size: m.length }).collect()
}

pub fn cri_id_mappings(mappings: &[IdMapping]) -> Vec<cri::IdMapping> {
    mappings
        .iter()
        .map(|m| cri::IdMapping { host_id: m.host_id, container_id: m.container_id, length: m.size })
        .collect()
}

/// The pod's user namespace as the CRI reports it.
pub fn cri_userns(pod: &Pod) -> cri::UserNamespace {
    match &pod.userns {
        Some(userns) => cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids: cri_id_mappings(&[userns.range.mapping()]),
            gids: cri_id_mappings(&[userns.range.mapping()]),
        },
        None => cri::UserNamespace { mode: cri::NamespaceMode::Node as i32, ..Default::default() },
    }
}

fn mode(value: i32) -> Result<NamespaceMode, Status> {
    match cri::NamespaceMode::try_from(value) {
        Ok(cri::NamespaceMode::Pod) => Ok(NamespaceMode::Pod),
        Ok(cri::NamespaceMode::Container) => Ok(NamespaceMode::Container),
        Ok(cri::NamespaceMode::Node) => Ok(NamespaceMode::Node),
        _ => Err(Status::invalid_argument(format!("namespace mode {value} is not supported for a pod"))),
    }
}

fn cri_mode(mode: NamespaceMode) -> i32 {
    match mode {
        NamespaceMode::Pod => cri::NamespaceMode::Pod as i32,
        NamespaceMode::Container => cri::NamespaceMode::Container as i32,
        NamespaceMode::Node => cri::NamespaceMode::Node as i32,
    }
}

pub fn cri_state(state: PodState) -> i32 {
    match state {
        PodState::Ready => cri::PodSandboxState::SandboxReady as i32,
        _ => cri::PodSandboxState::SandboxNotready as i32,
    }
}

pub fn pod_state(value: i32) -> Result<PodState, Status> {
    match cri::PodSandboxState::try_from(value) {
        Ok(cri::PodSandboxState::SandboxReady) => Ok(PodState::Ready),
        Ok(cri::PodSandboxState::SandboxNotready) => Ok(PodState::NotReady),
        Err(_) => Err(Status::invalid_argument(format!("unknown pod sandbox state {value}"))),
    }
}

fn metadata(pod: &Pod) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: pod.spec.name.clone(),
        uid: pod.spec.uid.clone(),
        namespace: pod.spec.namespace.clone(),
        attempt: pod.spec.attempt,
    }
}

fn map(from: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    from.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn pod_status(pod: &Pod) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: pod.id.clone(),
        metadata: Some(metadata(pod)),
        state: cri_state(pod.state),
        created_at: pod.created_at,
        network: Some(network_status(pod)),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: cri_mode(pod.spec.network),
                    pid: cri_mode(pod.spec.pid),
                    ipc: cri_mode(pod.spec.ipc),
                    userns_options: Some(cri_userns(pod)),
                    ..Default::default()
                }),
            }),
        }),
        labels: map(&pod.spec.labels),
        annotations: map(&pod.spec.annotations),
        runtime_handler: pod.spec.runtime_handler.clone(),
    }
}

/// The pod IP (IPv4 first) and the others (dual stack); empty for pods without a CNI network.
fn network_status(pod: &Pod) -> cri::PodSandboxNetworkStatus {
    let mut ips = pod.ips.iter().map(|ip| ip.to_string());
    cri::PodSandboxNetworkStatus {
        ip: ips.next().unwrap_or_default(),
        additional_ips: ips.map(|ip| cri::PodIp { ip }).collect(),
    }
}

pub fn pod_sandbox(pod: &Pod) -> cri::PodSandbox {
    cri::PodSandbox {
        id: pod.id.clone(),
        metadata: Some(metadata(pod)),
        state: cri_state(pod.state),
        created_at: pod.created_at,
        labels: map(&pod.spec.labels),
        annotations: map(&pod.spec.annotations),
        runtime_handler: pod.spec.runtime_handler.clone(),
    }
}
