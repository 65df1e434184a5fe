//! The node: what the daemon does with the runtime (pods and containers on systemd) and the image
//! store together, so that the CRI handlers only translate requests and answers.
//!
//! Why a layer here and not an image-provider trait that `runtime` consumes: `runtime` and
//! `imagestore` know nothing of each other, and the few places where they meet are policy of this
//! daemon, not of either library: which layers a new container stacks (a lease from the store,
//! held until the runtime has recorded the container), when removed images are collected (after
//! anything that may free their last container: RemoveContainer, RemovePodSandbox, RemoveImage),
//! and what "in use" means to that collection (the images and layer directories in the
//! runtime's container records). A trait in `runtime` would have made the runtime call the store
//! (GC after its own removals) and put both halves of every race in one crate that does not own
//! either. Here each call is a short sequence of library calls, and the handlers stay one call each.
//!
//! Readiness (Status, PodSandboxStatus) and stats (cgroup samples, writable layers, pod networks)
//! are assembled here too: they combine several runtime reads, and the handlers only map the result
//! to CRI messages.

use std::path::PathBuf;
use std::sync::Arc;

use imagestore::{Image, ImageStore, InUse};
use runtime::cgroup_detail::{CgroupDetail, FsInfo};
use runtime::stats::{DiskUsage, InterfaceUsage, Sampler, Usage};
use runtime::{Container, ContainerFilter, ContainerSpec, ContainerState, ManagerInfo, NetworkReadiness, Pod, Runtime};
use tracing::{debug, warn};

/// Why a node operation failed: the library's own error, kept typed for the one mapping to gRPC.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
    #[error(transparent)]
    Images(#[from] imagestore::Error),
    #[error("image {0:?} not found: pull it first")]
    ImageNotFound(String),
    /// An image volume's image is not in the store (the kubelet pulls it before CreateContainer).
    #[error("image volume at {container_path}: image {image:?} not found: pull it first")]
    ImageVolumeNotFound { container_path: String, image: String },
    #[error("image store task failed: {0}")]
    Task(String),
}

/// The runtime and the image store of this node, used together.
#[derive(Debug)]
pub struct Node {
    runtime: Arc<Runtime>,
    images: ImageStore,
    /// Previous CPU samples of pods' and containers' cgroups, for rates.
    sampler: Sampler,
    /// The file system writable layers live on (ContainerStats' fs_id).
    state_root: PathBuf,
}

/// Whether the node can run pods: systemd answers, the network is set up.
#[derive(Debug)]
pub struct Readiness {
    pub systemd: Result<ManagerInfo, String>,
    pub network: Result<(), String>,
}

/// A container's usage as ContainerStats reports it.
#[derive(Debug, Clone)]
pub struct ContainerStats {
    pub container: Container,
    pub usage: Usage,
    pub writable_layer: DiskUsage,
    /// The file system the writable layer is on.
    pub writable_layer_fs: PathBuf,
    /// Processes, swap, pressure (running containers only).
    pub detail: Option<CgroupDetail>,
}

/// A pod's usage as PodSandboxStats reports it.
#[derive(Debug, Clone)]
pub struct PodStats {
    pub pod: Pod,
    pub usage: Usage,
    /// The pod's interfaces but loopback; None for a pod that is not ready or on the node's network.
    pub network: Option<Vec<InterfaceUsage>>,
    pub containers: Vec<ContainerStats>,
    /// Processes, swap, pressure of the pod's slice.
    pub detail: CgroupDetail,
}

impl Node {
    pub fn new(runtime: Arc<Runtime>, images: ImageStore, state_root: PathBuf) -> Node {
        Node { runtime, images, sampler: Sampler::default(), state_root }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Where containers' writable layers live (each container's `upper/` beneath it).
    pub fn writable_layers_dir(&self) -> PathBuf {
        self.state_root.join("containers")
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The image a new container of pod `pod_id` is made from. Unknown pods fail first, before
    /// anything is looked up or prepared.
    pub fn image_for_container(&self, pod_id: &str, name: &str) -> Result<Image, NodeError> {
        self.runtime.pod(pod_id)?;
        self.images.image(name)?.ok_or_else(|| NodeError::ImageNotFound(name.to_owned()))
    }

    /// CreateContainer: the image's layers, leased from the store until the runtime has the
    /// container in its records (which then keep the layers from collection), under a writable
    /// layer the runtime makes. The images of its image volumes are resolved and their layers
    /// leased the same way (the record keeps them too: RemoveImage of such an image hides it, and
    /// its layers stay until the container is removed, as containerd's pod lease keeps them).
    /// A failed creation leaves nothing (the runtime cleans its part).
    pub async fn create_container(
        &self,
        pod_id: &str,
        image: &Image,
        spec: ContainerSpec,
    ) -> Result<String, NodeError> {
        let mut spec = spec;
        let mut leases = Vec::with_capacity(spec.image_volumes.len() + 1);
        for volume in &mut spec.image_volumes {
            let found = self.images.image(&volume.image)?.ok_or_else(|| NodeError::ImageVolumeNotFound {
                container_path: volume.container_path.clone(),
                image: volume.image.clone(),
            })?;
            let lease = self.images.lease_layers(&found.id)?;
            volume.image_id = found.id.to_string();
            volume.lowerdirs = lease.lowerdirs().to_vec();
            leases.push(lease);
        }
        let lease = self.images.lease_layers(&image.id)?;
        let created = self.runtime.create_container(pod_id, spec, lease.lowerdirs().to_vec()).await;
        drop(lease);
        drop(leases);
        Ok(created?)
    }

    /// RemoveContainer, then collects what only that container kept (an image removed meanwhile).
    pub async fn remove_container(&self, id: &str) -> Result<(), NodeError> {
        let cgroup = self.runtime.container(id).ok().map(|c| runtime::stats::cgroup_path(&c.slice, Some(&c.unit)));
        let removed = self.runtime.remove_container(id).await;
        if removed.is_ok()
            && let Some(cgroup) = cgroup
        {
            self.sampler.forget(&cgroup);
        }
        // Even after a failure: part of it may be gone.
        self.collect_garbage().await;
        Ok(removed?)
    }

    /// RemovePodSandbox: the pod with its containers, as RemoveContainer removes them, then
    /// collects what only they kept.
    pub async fn remove_pod(&self, id: &str) -> Result<(), NodeError> {
        let mut cgroups: Vec<String> = Vec::new();
        if let Ok(pod) = self.runtime.pod(id) {
            cgroups.push(runtime::stats::cgroup_path(&pod.slice, None));
            let filter = ContainerFilter { pod_id: Some(pod.id.clone()), ..Default::default() };
            cgroups.extend(
                self.runtime.containers(&filter).iter().map(|c| runtime::stats::cgroup_path(&c.slice, Some(&c.unit))),
            );
        }
        let removed = self.runtime.remove_pod(id).await;
        if removed.is_ok() {
            for cgroup in &cgroups {
                self.sampler.forget(cgroup);
            }
        }
        self.collect_garbage().await;
        Ok(removed?)
    }

    /// RemoveImage: hides the image at once; its content goes now unless a container uses it.
    pub async fn remove_image(&self, name: &str) -> Result<(), NodeError> {
        let store = self.images.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || store.remove(&name))
            .await
            .map_err(|e| NodeError::Task(e.to_string()))??;
        self.collect_garbage().await;
        Ok(())
    }

    /// Removes what no image and no container needs any more: removed images whose last
    /// container is gone, and their layers and blobs. Failures are logged: the next call retries.
    pub async fn collect_garbage(&self) {
        let store = self.images.clone();
        let runtime = self.runtime.clone();
        match tokio::task::spawn_blocking(move || store.gc(|| in_use(&runtime))).await {
            Ok(Ok(report)) => {
                crate::prometheus::metrics().gc_finished(&report);
                debug!(?report, "garbage collected");
            }
            Ok(Err(e)) => warn!("garbage collection: {e}"),
            Err(e) => warn!("garbage collection task: {e}"),
        }
    }

    /// Whether systemd answers and the pod network is ready.
    pub async fn readiness(&self) -> Readiness {
        let systemd = self.runtime.systemd().manager_info().await.map_err(|e| e.to_string());
        let network = match self.runtime.network_readiness() {
            NetworkReadiness::Ready { .. } => Ok(()),
            NetworkReadiness::NotReady { message } => Err(message),
        };
        Readiness { systemd, network }
    }

    /// The pod as PodSandboxStatus gives it: a pod whose init process ended has lost its PID
    /// namespace, and its containers with it: not ready, so that the kubelet makes a new one (as
    /// with a dead pause container).
    pub async fn pod_status(&self, id: &str) -> Result<Pod, NodeError> {
        let mut pod = self.runtime.pod(id)?;
        if pod.state == runtime::PodState::Ready && !self.runtime.pod_init_running(&pod).await? {
            pod.state = runtime::PodState::NotReady;
        }
        Ok(pod)
    }

    /// The usage of a container: its cgroup's while it runs, and its writable layer's.
    pub fn container_stats(&self, container: &Container) -> ContainerStats {
        let cgroup = runtime::stats::cgroup_path(&container.slice, Some(&container.unit));
        let running = container.state == ContainerState::Running;
        let usage =
            if running { self.sampler.sample(&cgroup) } else { Usage { timestamp: now_nanos(), ..Default::default() } };
        ContainerStats {
            container: container.clone(),
            usage,
            writable_layer: runtime::stats::disk_usage(&container.rootfs.upperdir),
            writable_layer_fs: self.state_root.clone(),
            detail: running.then(|| runtime::cgroup_detail::sample(&cgroup)),
        }
    }

    /// The usage of a pod: its slice's, its network's (while ready), and each container's.
    pub fn pod_stats(&self, pod: &Pod) -> PodStats {
        let slice = runtime::stats::cgroup_path(&pod.slice, None);
        let usage = self.sampler.sample(&slice);
        let filter = ContainerFilter { pod_id: Some(pod.id.clone()), ..Default::default() };
        let containers = self.runtime.containers(&filter).iter().map(|c| self.container_stats(c)).collect();
        let network = self.pod_network(pod);
        PodStats { pod: pod.clone(), usage, network, containers, detail: runtime::cgroup_detail::sample(&slice) }
    }

    /// The counters of a ready pod's interfaces (None: not ready, on the node's network, or
    /// unreadable; a stopped pod's network namespace is gone with its pin).
    pub fn pod_network(&self, pod: &Pod) -> Option<Vec<InterfaceUsage>> {
        (pod.state == runtime::PodState::Ready).then_some(pod.namespaces.network.as_deref()).flatten().and_then(
            |netns| match runtime::stats::network_usage(netns) {
                Ok(interfaces) => Some(interfaces),
                Err(e) => {
                    warn!(pod = %pod.id, "cannot read the pod's network counters: {e}");
                    None
                }
            },
        )
    }

    /// The file system writable layers live on (the state root's).
    pub fn writable_layer_fs(&self) -> Option<FsInfo> {
        runtime::cgroup_detail::fs_info(&self.state_root)
    }
}

/// What the runtime's containers use, for garbage collection: their images, and the layer
/// directories they mount. An image id that is not a digest (a record of another version, or
/// edited) cannot keep its image's record, but its layers stay: they are kept by path.
fn in_use(runtime: &Runtime) -> InUse {
    let mut images = std::collections::HashSet::new();
    for id in runtime.images_in_use() {
        match id.parse() {
            Ok(image) => {
                images.insert(image);
            }
            Err(e) => warn!(image = %id, "a container's image id is not a digest ({e}); its layers are kept by path"),
        }
    }
    InUse { images, layers: runtime.layers_in_use() }
}

pub fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}
