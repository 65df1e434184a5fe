//! The CRI `RuntimeService`: translates CRI runtime calls into `runtime` calls.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use proto::cri::{self, runtime_service_server::RuntimeService};
use runtime::cgroup_detail::CgroupDetail;
use runtime::{ContainerFilter, PodFilter, Runtime};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::container_translate;
use crate::errors::{node_status, runtime_status};
use crate::list_streaming::{ListStream, chunked};
use crate::node::{self, Node, now_nanos};
use crate::pod_translate;
use crate::streaming::{StreamRequest, StreamingServer};

/// The runtime API version this daemon speaks.
const RUNTIME_API_VERSION: &str = "v1";
const RUNTIME_NAME: &str = "cri-systemd";

/// Serves `runtime.v1.RuntimeService`.
#[derive(Debug)]
pub struct RuntimeApi {
    config: Arc<Config>,
    node: Arc<Node>,
    runtime: Arc<Runtime>,
    streaming: Arc<StreamingServer>,
}

impl RuntimeApi {
    pub fn new(config: Arc<Config>, node: Arc<Node>, streaming: Arc<StreamingServer>) -> Self {
        Self { config, runtime: node.runtime().clone(), node, streaming }
    }
}

fn container_stats(stats: &node::ContainerStats) -> cri::ContainerStats {
    let container = &stats.container;
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: container.id.clone(),
            metadata: Some(cri::ContainerMetadata {
                name: container.spec.name.clone(),
                attempt: container.spec.attempt,
            }),
            labels: container.spec.labels.clone().into_iter().collect(),
            annotations: container.spec.annotations.clone().into_iter().collect(),
        }),
        cpu: Some(cpu_usage(&stats.usage, stats.detail.as_ref())),
        memory: Some(memory_usage(&stats.usage, stats.detail.as_ref())),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: stats.usage.timestamp,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: stats.writable_layer_fs.to_string_lossy().into_owned(),
            }),
            used_bytes: Some(cri::UInt64Value { value: stats.writable_layer.bytes }),
            inodes_used: Some(cri::UInt64Value { value: stats.writable_layer.inodes }),
        }),
        swap: stats.detail.as_ref().map(|d| swap_usage(stats.usage.timestamp, d, &container.spec.resources)),
        io: stats.detail.as_ref().map(|d| io_usage(stats.usage.timestamp, d)),
    }
}

fn pod_stats(stats: &node::PodStats) -> cri::PodSandboxStats {
    let pod = &stats.pod;
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: pod.id.clone(),
            metadata: Some(cri::PodSandboxMetadata {
                name: pod.spec.name.clone(),
                uid: pod.spec.uid.clone(),
                namespace: pod.spec.namespace.clone(),
                attempt: pod.spec.attempt,
            }),
            labels: pod.spec.labels.clone().into_iter().collect(),
            annotations: pod.spec.annotations.clone().into_iter().collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: Some(cpu_usage(&stats.usage, Some(&stats.detail))),
            memory: Some(memory_usage(&stats.usage, Some(&stats.detail))),
            network: stats.network.as_deref().map(network_usage),
            process: Some(cri::ProcessUsage {
                timestamp: stats.usage.timestamp,
                process_count: Some(cri::UInt64Value { value: stats.detail.pids.len() as u64 }),
            }),
            containers: stats.containers.iter().map(container_stats).collect(),
            io: Some(io_usage(stats.usage.timestamp, &stats.detail)),
        }),
        windows: None,
    }
}

/// The pod's network counters, as containerd gives them: eth0 (or the first interface) as the
/// default one, and every interface but loopback.
fn network_usage(interfaces: &[runtime::stats::InterfaceUsage]) -> cri::NetworkUsage {
    let usage = |i: &runtime::stats::InterfaceUsage| cri::NetworkInterfaceUsage {
        name: i.name.clone(),
        rx_bytes: Some(cri::UInt64Value { value: i.rx_bytes }),
        rx_errors: Some(cri::UInt64Value { value: i.rx_errors }),
        tx_bytes: Some(cri::UInt64Value { value: i.tx_bytes }),
        tx_errors: Some(cri::UInt64Value { value: i.tx_errors }),
    };
    let default = interfaces.iter().find(|i| i.name == "eth0").or(interfaces.first());
    cri::NetworkUsage {
        timestamp: now_nanos(),
        default_interface: default.map(usage),
        interfaces: interfaces.iter().map(usage).collect(),
    }
}

/// The runtime handlers Status lists: the default one (`""`) and the configured ones, sorted by
/// name as containerd lists them. They all run on the same runtime, so they share its features;
/// only features that work end to end are advertised.
fn runtime_handlers(config: &Config) -> Vec<cri::RuntimeHandler> {
    let features = cri::RuntimeHandlerFeatures {
        recursive_read_only_mounts: true,
        // Pods in user namespaces, and idmapped volume mounts (KEP-127).
        user_namespaces: true,
    };
    std::iter::once(String::new())
        .chain(config.runtimes.keys().cloned())
        .map(|name| cri::RuntimeHandler { name, features: Some(features) })
        .collect()
}

fn condition(kind: &str, outcome: Result<(), (&str, String)>) -> cri::RuntimeCondition {
    match outcome {
        Ok(()) => cri::RuntimeCondition { r#type: kind.into(), status: true, ..Default::default() },
        Err((reason, message)) => {
            cri::RuntimeCondition { r#type: kind.into(), status: false, reason: reason.into(), message }
        }
    }
}

/// What an ExecSyncResponse adds to its output: a tag and a length of up to 5 bytes per stream,
/// an exit code of up to 11 (a negative int32), rounded up.
const EXEC_SYNC_FRAMING_BYTES: usize = 32;

#[tonic::async_trait]
impl RuntimeService for RuntimeApi {
    async fn version(&self, _: Request<cri::VersionRequest>) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            // The "kubelet runtime API" version; containerd and CRI-O both answer 0.1.0.
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        }))
    }

    async fn status(&self, request: Request<cri::StatusRequest>) -> Result<Response<cri::StatusResponse>, Status> {
        let readiness = self.node.readiness().await;
        let runtime_ready = readiness.systemd.as_ref().map(|_| ()).map_err(|e| ("SystemdUnreachable", e.clone()));
        let network_ready = readiness.network.map_err(|message| ("NetworkPluginNotReady", message));
        let mut info = HashMap::new();
        if request.get_ref().verbose {
            info.insert("config".into(), verbose_config(&self.config));
            // Records startup recovery could not read, set aside under <state_root>/quarantine.
            info.insert("quarantine".into(), serde_json::to_string(&self.runtime.quarantined()).unwrap_or_default());
            if let Ok(manager) = &readiness.systemd {
                let systemd = serde_json::json!({
                    "version": manager.version,
                    "features": manager.features,
                    "virtualization": manager.virtualization,
                    "systemState": manager.system_state,
                });
                info.insert("systemd".into(), systemd.to_string());
            }
            // The node preflight (`cri-systemd check`), beside the effective config.
            let checks = crate::preflight::run(&self.config, self.runtime.systemd().as_ref()).await;
            info.insert("checks".into(), serde_json::to_string(&checks).unwrap_or_default());
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![condition("RuntimeReady", runtime_ready), condition("NetworkReady", network_ready)],
            }),
            info,
            runtime_handlers: runtime_handlers(&self.config),
            features: Some(cri::RuntimeFeatures {
                // Merge and Strict (runtime::passwd), with ContainerStatus.user filled.
                supplemental_groups_policy: true,
                // A pod in a user namespace with the host's network: not tried end to end.
                user_namespaces_host_network: false,
            }),
        }))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration { cgroup_driver: cri::CgroupDriver::Systemd as i32 }),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let spec = pod_translate::pod_spec_with_handlers(request.into_inner(), &self.config.runtimes)?;
        let pod_sandbox_id = self.runtime.run_pod(spec).await.map_err(runtime_status)?;
        Ok(Response::new(cri::RunPodSandboxResponse { pod_sandbox_id }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        self.runtime.stop_pod(&request.into_inner().pod_sandbox_id).await.map_err(runtime_status)?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        self.node.remove_pod(&request.into_inner().pod_sandbox_id).await.map_err(node_status)?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let request = request.into_inner();
        // The evented PLEG (kubelet's GetPodStatus) takes the pod and container statuses as of
        // `timestamp` (Unix nanoseconds) and drops events older than it: it is taken before
        // anything is read, so that nothing read here is older than it says.
        let timestamp = now_nanos();
        let pod = self.node.pod_status(&request.pod_sandbox_id).await.map_err(node_status)?;
        let mut info = HashMap::new();
        if request.verbose {
            info.insert("info".into(), serde_json::to_string(&pod).unwrap_or_default());
        }
        let filter = ContainerFilter { pod_id: Some(pod.id.clone()), ..Default::default() };
        let containers_statuses = self
            .runtime
            .containers(&filter)
            .iter()
            .map(|c| container_translate::container_status(c, &pod.spec.log_directory))
            .collect();
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(pod_translate::pod_status(&pod)),
            info,
            containers_statuses,
            timestamp,
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let mut filter = PodFilter::default();
        if let Some(cri_filter) = request.into_inner().filter {
            filter.id = Some(cri_filter.id).filter(|id| !id.is_empty());
            filter.state = cri_filter.state.map(|s| pod_translate::pod_state(s.state)).transpose()?;
            filter.labels = cri_filter.label_selector.into_iter().collect();
        }
        let items = self.runtime.pods(&filter).iter().map(pod_translate::pod_sandbox).collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let mut config = request.config.ok_or_else(|| Status::invalid_argument("CreateContainer needs a config"))?;
        let mut image_name = config.image.as_ref().map(|i| i.image.clone()).unwrap_or_default();
        if image_name.is_empty() {
            return Err(Status::invalid_argument("container config names no image"));
        }
        // A checkpoint archive in place of the image: the container runs the checkpointed image
        // and StartContainer restores it (runtime/src/checkpoint.rs).
        let archive = runtime::checkpoint::archive_path(&image_name);
        if let (Some(archive), Some(spec)) = (&archive, config.image.as_mut()) {
            image_name = runtime::checkpoint::archive_image(archive).map_err(runtime_status)?;
            spec.image = image_name.clone();
        }
        let image = self.node.image_for_container(&request.pod_sandbox_id, &image_name).map_err(node_status)?;
        let pod = self.runtime.pod(&request.pod_sandbox_id).map_err(runtime_status)?;
        // The handler's settings as configured now; a handler removed from the config since the
        // pod was made is an error rather than a silent loss of what it enforced.
        let handler = pod_translate::runtime_handler(&pod.spec.runtime_handler, &self.config.runtimes)
            .map_err(|e| Status::failed_precondition(format!("pod sandbox {}: {}", pod.id, e.message())))?;
        let cdi_devices = crate::cdi::requested(&config)?;
        let mut spec = container_translate::container_spec(config, &image)?;
        container_translate::apply_runtime_handler(&mut spec, &handler);
        let pod_userns = pod.userns.map(|u| u.range.mapping());
        crate::cdi::inject(&self.config.cdi.spec_dirs, &cdi_devices, pod_userns, &mut spec)?;
        let container_id =
            self.node.create_container(&request.pod_sandbox_id, &image, spec).await.map_err(node_status)?;
        if let Some(archive) = archive {
            let criu = &self.config.checkpoint.criu_path;
            if let Err(e) = self.runtime.prepare_restore(&container_id, &archive, criu).await {
                let _ = self.node.remove_container(&container_id).await;
                return Err(runtime_status(e));
            }
        }
        Ok(Response::new(cri::CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        self.runtime.start_container(&request.into_inner().container_id).await.map_err(runtime_status)?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let request = request.into_inner();
        self.runtime.stop_container(&request.container_id, request.timeout).await.map_err(runtime_status)?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        self.node.remove_container(&id).await.map_err(node_status)?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let request = request.into_inner();
        let linux =
            request.linux.ok_or_else(|| Status::invalid_argument("UpdateContainerResources needs linux resources"))?;
        let resources = container_translate::resources_of(&linux)?;
        self.runtime.update_resources(&request.container_id, resources).await.map_err(runtime_status)?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let container = self.runtime.container(&request.into_inner().container_id).map_err(runtime_status)?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(container_stats(&self.node.container_stats(&container))),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let mut filter = ContainerFilter::default();
        if let Some(cri_filter) = request.into_inner().filter {
            filter.id = Some(cri_filter.id).filter(|id| !id.is_empty());
            filter.pod_id = Some(cri_filter.pod_sandbox_id).filter(|id| !id.is_empty());
            filter.labels = cri_filter.label_selector.into_iter().collect();
        }
        let stats =
            self.runtime.containers(&filter).iter().map(|c| container_stats(&self.node.container_stats(c))).collect();
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let pod = self.runtime.pod(&request.into_inner().pod_sandbox_id).map_err(runtime_status)?;
        Ok(Response::new(cri::PodSandboxStatsResponse { stats: Some(pod_stats(&self.node.pod_stats(&pod))) }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let mut filter = PodFilter::default();
        if let Some(cri_filter) = request.into_inner().filter {
            filter.id = Some(cri_filter.id).filter(|id| !id.is_empty());
            filter.labels = cri_filter.label_selector.into_iter().collect();
        }
        let stats = self.runtime.pods(&filter).iter().map(|p| pod_stats(&self.node.pod_stats(p))).collect();
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = request.into_inner().container_id;
        self.runtime.reopen_container_log(&id).map_err(runtime_status)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let mut filter = ContainerFilter::default();
        if let Some(cri_filter) = request.into_inner().filter {
            filter.id = Some(cri_filter.id).filter(|id| !id.is_empty());
            filter.pod_id = Some(cri_filter.pod_sandbox_id).filter(|id| !id.is_empty());
            filter.state = cri_filter.state.map(|s| container_translate::container_state(s.state)).transpose()?;
            filter.labels = cri_filter.label_selector.into_iter().collect();
        }
        let containers = self.runtime.containers(&filter).iter().map(container_translate::container).collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let request = request.into_inner();
        let container = self.runtime.container(&request.container_id).map_err(runtime_status)?;
        let pod = self.runtime.pod(&container.pod_id).ok();
        let log_directory = pod.as_ref().map(|p| p.spec.log_directory.clone()).unwrap_or_default();
        let mut info = HashMap::new();
        if request.verbose {
            info.insert("info".into(), serde_json::to_string(&container).unwrap_or_default());
            // The user namespace the container runs in: its pod's (uid and gid mappings), or none.
            let userns = pod.as_ref().and_then(|p| p.userns).map(|u| {
                serde_json::json!({"uidMappings": [u.range.mapping()], "gidMappings": [u.range.mapping()], "fromPool": u.from_pool})
            });
            info.insert("userns".into(), userns.map(|u| u.to_string()).unwrap_or_else(|| "null".into()));
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(container_translate::container_status(&container, &log_directory)),
            info,
        }))
    }

    type GetContainerEventsStream =
        Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send + 'static>>;

    /// Every container event from now on, until the client goes away. A client that reads too
    /// slowly loses the oldest events (logged); the runtime never waits for it.
    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let events = self.runtime.subscribe_events();
        let stream = futures_util::stream::unfold(events, |mut events| async move {
            loop {
                match events.recv().await {
                    Ok(event) => return Some((Ok(container_event(&event)), events)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(lost)) => {
                        tracing::warn!(lost, "a GetContainerEvents client reads too slowly: it lost events");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let request = request.into_inner();
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument("ExecSync needs a command"));
        }
        let timeout = match request.timeout {
            0 => None,
            seconds if seconds > 0 => Some(std::time::Duration::from_secs(seconds as u64)),
            seconds => return Err(Status::invalid_argument(format!("ExecSync timeout {seconds} is negative"))),
        };
        // The answer, framing included, must fit the client's gRPC limit (the kubelet's is 16 MiB,
        // the default cap): the two streams share what the framing leaves.
        let max_output = usize::try_from(self.config.exec.sync_max_output_bytes)
            .unwrap_or(usize::MAX)
            .saturating_sub(EXEC_SYNC_FRAMING_BYTES);
        crate::prometheus::metrics().exec_sync_started();
        let output = self
            .runtime
            .exec_sync(&request.container_id, request.cmd, timeout, max_output)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: output.stdout,
            stderr: output.stderr,
            exit_code: output.exit_code,
        }))
    }
    async fn exec(&self, request: Request<cri::ExecRequest>) -> Result<Response<cri::ExecResponse>, Status> {
        let request = request.into_inner();
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument("Exec needs a command"));
        }
        if !(request.stdin || request.stdout || request.stderr) {
            return Err(Status::invalid_argument("one of stdin, stdout and stderr must be true"));
        }
        if request.tty && request.stderr {
            return Err(Status::invalid_argument(
                "tty and stderr cannot both be true: a tty carries stdout and stderr as one stream",
            ));
        }
        let container = self.runtime.container(&request.container_id).map_err(runtime_status)?;
        if container.state != runtime::ContainerState::Running {
            return Err(Status::failed_precondition(format!("container {} is not running", container.id)));
        }
        let url = self.streaming.url_for(StreamRequest::Exec {
            container_id: container.id,
            command: request.cmd,
            tty: request.tty,
            stdin: request.stdin,
            stdout: request.stdout,
            stderr: request.stderr,
        });
        Ok(Response::new(cri::ExecResponse { url }))
    }
    async fn attach(&self, request: Request<cri::AttachRequest>) -> Result<Response<cri::AttachResponse>, Status> {
        let request = request.into_inner();
        if !(request.stdin || request.stdout || request.stderr) {
            return Err(Status::invalid_argument("one of stdin, stdout and stderr must be true"));
        }
        let container = self.runtime.container(&request.container_id).map_err(runtime_status)?;
        if request.stdin && !container.spec.stdin {
            return Err(Status::invalid_argument(format!(
                "container {} was created without stdin: attach cannot carry stdin to it",
                container.id
            )));
        }
        if request.tty && !container.spec.tty {
            return Err(Status::invalid_argument(format!("container {} was created without a tty", container.id)));
        }
        if container.state != runtime::ContainerState::Running {
            return Err(Status::failed_precondition(format!("container {} is not running", container.id)));
        }
        let url = self.streaming.url_for(StreamRequest::Attach {
            container_id: container.id,
            stdin: request.stdin,
            tty: request.tty,
            stdout: request.stdout,
            stderr: request.stderr,
        });
        Ok(Response::new(cri::AttachResponse { url }))
    }
    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let request = request.into_inner();
        let pod = self.runtime.pod(&request.pod_sandbox_id).map_err(runtime_status)?;
        if pod.state != runtime::PodState::Ready {
            return Err(Status::failed_precondition(format!("pod sandbox {} is not ready", pod.id)));
        }
        let mut ports = Vec::with_capacity(request.port.len());
        for port in request.port {
            match u16::try_from(port) {
                Ok(port) if port > 0 => ports.push(port),
                _ => return Err(Status::invalid_argument(format!("port {port} is not a TCP port"))),
            }
        }
        let url = self.streaming.url_for(StreamRequest::PortForward { pod_id: pod.id, ports });
        Ok(Response::new(cri::PortForwardResponse { url }))
    }
    /// Only the pod CIDR is read (the kubelet sends nothing else): it reaches CNI plugins with the
    /// `ipRanges` capability. A request without a network config changes nothing.
    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        if let Some(network) = request.into_inner().runtime_config.and_then(|c| c.network_config) {
            self.runtime.update_pod_cidr(&network.pod_cidr).map_err(runtime_status)?;
        }
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }
    async fn checkpoint_container(
        &self,
        request: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        let request = request.into_inner();
        if request.container_id.is_empty() {
            return Err(Status::invalid_argument("container_id is empty"));
        }
        let location = std::path::PathBuf::from(&request.location);
        if !location.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "location {:?}: the checkpoint archive must be an absolute path",
                request.location
            )));
        }
        // `timeout` is not applied: a CRIU dump cut short would leave the container frozen.
        let options =
            runtime::checkpoint::CheckpointOptions { location, criu: self.config.checkpoint.criu_path.clone() };
        self.runtime.checkpoint_container(&request.container_id, &options).await.map_err(runtime_status)?;
        Ok(Response::new(cri::CheckpointContainerResponse {}))
    }
    /// cadvisor's metrics (see metrics.rs).
    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse { descriptors: crate::metrics::descriptors() }))
    }
    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        let node = self.node.clone();
        // Reads many files (every process's fds): off the async workers.
        let pod_metrics = tokio::task::spawn_blocking(move || crate::metrics::list(&node))
            .await
            .map_err(|e| Status::internal(format!("metrics collection failed: {e}")))?;
        Ok(Response::new(cri::ListPodSandboxMetricsResponse { pod_metrics }))
    }

    // cri-api 1.36: the streaming forms of the List RPCs (see list_streaming.rs) answer what the
    // unary ones answer.
    type StreamPodSandboxesStream = ListStream<cri::StreamPodSandboxesResponse>;
    async fn stream_pod_sandboxes(
        &self,
        request: Request<cri::StreamPodSandboxesRequest>,
    ) -> Result<Response<Self::StreamPodSandboxesStream>, Status> {
        let list = cri::ListPodSandboxRequest { filter: request.into_inner().filter };
        let items = self.list_pod_sandbox(Request::new(list)).await?.into_inner().items;
        Ok(Response::new(chunked(items, |pod_sandboxes| cri::StreamPodSandboxesResponse { pod_sandboxes })))
    }
    type StreamContainersStream = ListStream<cri::StreamContainersResponse>;
    async fn stream_containers(
        &self,
        request: Request<cri::StreamContainersRequest>,
    ) -> Result<Response<Self::StreamContainersStream>, Status> {
        let list = cri::ListContainersRequest { filter: request.into_inner().filter };
        let items = self.list_containers(Request::new(list)).await?.into_inner().containers;
        Ok(Response::new(chunked(items, |containers| cri::StreamContainersResponse { containers })))
    }
    type StreamContainerStatsStream = ListStream<cri::StreamContainerStatsResponse>;
    async fn stream_container_stats(
        &self,
        request: Request<cri::StreamContainerStatsRequest>,
    ) -> Result<Response<Self::StreamContainerStatsStream>, Status> {
        let list = cri::ListContainerStatsRequest { filter: request.into_inner().filter };
        let items = self.list_container_stats(Request::new(list)).await?.into_inner().stats;
        Ok(Response::new(chunked(items, |container_stats| cri::StreamContainerStatsResponse { container_stats })))
    }
    type StreamPodSandboxStatsStream = ListStream<cri::StreamPodSandboxStatsResponse>;
    async fn stream_pod_sandbox_stats(
        &self,
        request: Request<cri::StreamPodSandboxStatsRequest>,
    ) -> Result<Response<Self::StreamPodSandboxStatsStream>, Status> {
        let list = cri::ListPodSandboxStatsRequest { filter: request.into_inner().filter };
        let items = self.list_pod_sandbox_stats(Request::new(list)).await?.into_inner().stats;
        Ok(Response::new(chunked(items, |pod_sandbox_stats| cri::StreamPodSandboxStatsResponse { pod_sandbox_stats })))
    }
    type StreamPodSandboxMetricsStream = ListStream<cri::StreamPodSandboxMetricsResponse>;
    async fn stream_pod_sandbox_metrics(
        &self,
        _: Request<cri::StreamPodSandboxMetricsRequest>,
    ) -> Result<Response<Self::StreamPodSandboxMetricsStream>, Status> {
        let items =
            self.list_pod_sandbox_metrics(Request::new(cri::ListPodSandboxMetricsRequest {})).await?.into_inner();
        Ok(Response::new(chunked(items.pod_metrics, |pod_sandbox_metrics| cri::StreamPodSandboxMetricsResponse {
            pod_sandbox_metrics,
        })))
    }
    /// The pod-level resources the kubelet sends after resizing a pod (1.33+, in-place pod
    /// resize): validated as a container's, recorded, and applied to a slice of the pod's own
    /// (`Runtime::update_pod_resources`). Either part may be absent.
    async fn update_pod_sandbox_resources(
        &self,
        request: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> Result<Response<cri::UpdatePodSandboxResourcesResponse>, Status> {
        let request = request.into_inner();
        let part = |what: &str, r: Option<cri::LinuxContainerResources>| {
            container_translate::resources_of(&r.unwrap_or_default())
                .map_err(|e| Status::invalid_argument(format!("{what}: {}", e.message())))
        };
        let resources = part("resources", request.resources)?;
        let overhead = part("overhead", request.overhead)?;
        self.runtime
            .update_pod_resources(&request.pod_sandbox_id, resources, overhead)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::UpdatePodSandboxResourcesResponse {}))
    }
}

/// A runtime event as the CRI gives it: with the pod's status and its containers' statuses as
/// they were when it happened, as containerd does.
fn container_event(event: &runtime::ContainerEvent) -> cri::ContainerEventResponse {
    let kind = match event.kind {
        runtime::ContainerEventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        runtime::ContainerEventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
        runtime::ContainerEventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        runtime::ContainerEventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    };
    let log_directory = event.pod.as_ref().map(|p| p.spec.log_directory.clone()).unwrap_or_default();
    cri::ContainerEventResponse {
        container_id: event.container_id.clone(),
        container_event_type: kind as i32,
        created_at: event.created_at,
        pod_sandbox_status: event.pod.as_ref().map(pod_translate::pod_status),
        containers_statuses: event
            .containers
            .iter()
            .map(|c| container_translate::container_status(c, &log_directory))
            .collect(),
    }
}

fn value(v: Option<u64>) -> Option<cri::UInt64Value> {
    v.map(|value| cri::UInt64Value { value })
}

fn cpu_usage(usage: &runtime::stats::Usage, detail: Option<&CgroupDetail>) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: usage.timestamp,
        usage_core_nano_seconds: value(usage.cpu_total_nanos),
        usage_nano_cores: value(usage.cpu_nano_cores),
        psi: detail.and_then(|d| d.cpu_pressure).map(psi),
    }
}

/// PSI as the CRI gives it: the `some` and `full` lines, totals in microseconds.
fn psi(p: runtime::cgroup_detail::Pressure) -> cri::PsiStats {
    let data = |l: runtime::cgroup_detail::PressureLine| cri::PsiData {
        total: l.total_usec,
        avg10: l.avg10,
        avg60: l.avg60,
        avg300: l.avg300,
    };
    cri::PsiStats { full: Some(data(p.full)), some: Some(data(p.some)) }
}

fn io_usage(timestamp: i64, detail: &CgroupDetail) -> cri::IoUsage {
    cri::IoUsage { timestamp, psi: detail.io_pressure.map(psi) }
}

/// Swap in use, and what is left of the container's swap limit (none without a limit or
/// without swap accounting).
fn swap_usage(timestamp: i64, detail: &CgroupDetail, resources: &runtime::Resources) -> cri::SwapUsage {
    let limit = runtime::memory_qos::swap_max(resources).ok().filter(|l| *l != u64::MAX);
    cri::SwapUsage {
        timestamp,
        swap_available_bytes: detail
            .memory_swap
            .zip(limit)
            .map(|(used, limit)| cri::UInt64Value { value: limit.saturating_sub(used) }),
        swap_usage_bytes: value(detail.memory_swap),
    }
}

fn memory_usage(usage: &runtime::stats::Usage, detail: Option<&CgroupDetail>) -> cri::MemoryUsage {
    cri::MemoryUsage {
        timestamp: usage.timestamp,
        working_set_bytes: value(usage.memory_working_set_bytes),
        available_bytes: None,
        usage_bytes: value(usage.memory_usage_bytes),
        rss_bytes: value(usage.memory_rss_bytes),
        page_faults: value(usage.page_faults),
        major_page_faults: value(usage.major_page_faults),
        psi: detail.and_then(|d| d.memory_pressure).map(psi),
    }
}

/// The effective config as Status' verbose `config`, plus containerd's `rootDir` and `stateDir`
/// keys: clients read those to find the runtime's filesystem (critest's user-namespace specs probe
/// idmapped-mount support on the parent of `stateDir`; containers' rootfs and idmapped layer mounts
/// live under `<state_root>/containers`, so that is ours).
fn verbose_config(config: &Config) -> String {
    let mut json = serde_json::to_value(config).unwrap_or_default();
    if let Some(map) = json.as_object_mut() {
        map.insert("rootDir".into(), config.state_root.display().to_string().into());
        map.insert("stateDir".into(), config.state_root.join("containers").display().to_string().into());
        // The config file and drop-ins it was merged from, in order.
        map.insert("configFiles".into(), serde_json::to_value(&config.sources).unwrap_or_default());
    }
    json.to_string()
}
