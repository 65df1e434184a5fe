//! Plain CRI calls the end-to-end tests make over and over: a pod config, a container config, and
//! the lifecycle calls with the answers unwrapped.

use std::collections::HashMap;
use std::time::Duration;

use crate::{CriClient, cri, eventually};

/// A pod config with a name-derived uid, in namespace `e2e`.
pub fn pod_config(name: &str) -> cri::PodSandboxConfig {
    pod(name).build()
}

/// `pod_config(name)` in a user namespace of its own (mode POD, a range from the daemon's pool)
/// with a PID namespace per container, as the kubelet asks for `hostUsers: false`.
pub fn userns_pod_config(name: &str) -> cri::PodSandboxConfig {
    kubelet_pod(name).userns(cri::NamespaceMode::Pod, None).build()
}

/// A pod config to build on: `pod(name)` is [`pod_config`]`(name)`; each method sets one thing.
pub fn pod(name: &str) -> PodConfig {
    PodConfig(cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-0000-1111-2222-333344445555"),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        ..Default::default()
    })
}

/// `pod(name)` with a PID namespace per container, as the kubelet asks for a pod without
/// `shareProcessNamespace`.
pub fn kubelet_pod(name: &str) -> PodConfig {
    pod(name).pid(cri::NamespaceMode::Container)
}

/// A pod config being built (see [`pod`]).
#[derive(Debug, Clone)]
pub struct PodConfig(cri::PodSandboxConfig);

impl PodConfig {
    pub fn build(self) -> cri::PodSandboxConfig {
        self.0
    }

    fn metadata(&mut self) -> &mut cri::PodSandboxMetadata {
        self.0.metadata.get_or_insert_with(Default::default)
    }

    fn namespace_options(&mut self) -> &mut cri::NamespaceOption {
        let linux = self.0.linux.get_or_insert_with(Default::default);
        let context = linux.security_context.get_or_insert_with(Default::default);
        context.namespace_options.get_or_insert_with(Default::default)
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.metadata().uid = uid.into();
        self
    }

    /// The Kubernetes namespace (`e2e` by default).
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.metadata().namespace = namespace.into();
        self
    }

    pub fn hostname(mut self, hostname: &str) -> Self {
        self.0.hostname = hostname.into();
        self
    }

    pub fn log_directory(mut self, dir: &str) -> Self {
        self.0.log_directory = dir.into();
        self
    }

    /// The PID namespace mode (the kubelet's default is `Container`, one per container).
    pub fn pid(mut self, mode: cri::NamespaceMode) -> Self {
        self.namespace_options().pid = mode as i32;
        self
    }

    /// The network namespace mode (`Node` for `hostNetwork: true`).
    pub fn network(mut self, mode: cri::NamespaceMode) -> Self {
        self.namespace_options().network = mode as i32;
        self
    }

    /// The user namespace: `mode`, and with `Some((host_id, length))` the kubelet's mapping of
    /// container id 0 (for uids and gids alike) instead of a range from the daemon's pool.
    pub fn userns(mut self, mode: cri::NamespaceMode, mapping: Option<(u32, u32)>) -> Self {
        let ids: Vec<cri::IdMapping> =
            mapping.into_iter().map(|(host_id, length)| cri::IdMapping { host_id, container_id: 0, length }).collect();
        self.namespace_options().userns_options =
            Some(cri::UserNamespace { mode: mode as i32, uids: ids.clone(), gids: ids });
        self
    }
}

impl From<PodConfig> for cri::PodSandboxConfig {
    fn from(config: PodConfig) -> Self {
        config.build()
    }
}

/// A container config running `command` in `image`, labelled `container=<name>`.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        labels: HashMap::from([("container".into(), name.into())]),
        ..Default::default()
    }
}

/// RunPodSandbox of `pod_config(name)`; returns the pod id.
pub async fn run_pod(client: &mut CriClient, name: &str) -> String {
    run_pod_sandbox(client, pod_config(name)).await.expect("RunPodSandbox")
}

/// RunPodSandbox of `config`; returns the pod id or the daemon's refusal.
pub async fn run_pod_sandbox(
    client: &mut CriClient,
    config: impl Into<cri::PodSandboxConfig>,
) -> Result<String, tonic::Status> {
    let request = cri::RunPodSandboxRequest { config: Some(config.into()), runtime_handler: String::new() };
    client.runtime.run_pod_sandbox(request).await.map(|r| r.into_inner().pod_sandbox_id)
}

/// StopPodSandbox, which must succeed.
pub async fn stop_pod(client: &mut CriClient, id: &str) {
    let request = cri::StopPodSandboxRequest { pod_sandbox_id: id.into() };
    client.runtime.stop_pod_sandbox(request).await.expect("StopPodSandbox");
}

/// RemovePodSandbox, which must succeed.
pub async fn remove_pod(client: &mut CriClient, id: &str) {
    let request = cri::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
    client.runtime.remove_pod_sandbox(request).await.expect("RemovePodSandbox");
}

/// CreateContainer; returns the container id or the daemon's refusal.
pub async fn create(client: &mut CriClient, pod: &str, config: cri::ContainerConfig) -> Result<String, tonic::Status> {
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(pod_config("x")),
    };
    client.runtime.create_container(request).await.map(|r| r.into_inner().container_id)
}

pub async fn start(client: &mut CriClient, id: &str) -> Result<(), tonic::Status> {
    client.runtime.start_container(cri::StartContainerRequest { container_id: id.into() }).await.map(|_| ())
}

/// ExecSync of `cmd` with a 30 s timeout.
pub async fn exec_sync(client: &mut CriClient, id: &str, cmd: &[&str]) -> Result<cri::ExecSyncResponse, tonic::Status> {
    let request =
        cri::ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout: 30 };
    client.runtime.exec_sync(request).await.map(|r| r.into_inner())
}

/// `sh -c script` in the container: (exit code, stdout, stderr).
pub async fn sh(client: &mut CriClient, id: &str, script: &str) -> (i32, String, String) {
    let out = exec_sync(client, id, &["/bin/sh", "-c", script]).await.expect("ExecSync");
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn status(client: &mut CriClient, id: &str) -> cri::ContainerStatus {
    let request = cri::ContainerStatusRequest { container_id: id.into(), verbose: false };
    client.runtime.container_status(request).await.expect("ContainerStatus").into_inner().status.expect("a status")
}

/// The container's status once it has exited (within 30 s).
pub async fn wait_exited(client: &mut CriClient, id: &str) -> cri::ContainerStatus {
    eventually(Duration::from_secs(30), "the container to exit", || {
        let mut client = client.clone();
        let id = id.to_string();
        async move {
            let s = status(&mut client, &id).await;
            (s.state == cri::ContainerState::ContainerExited as i32).then_some(s)
        }
    })
    .await
}

/// Every line of a CRI log file: (stream, tag, text), after checking the timestamp's form.
pub fn parse_log(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .map(|line| {
            let mut fields = line.splitn(4, ' ');
            let (time, stream, tag) = (fields.next().unwrap(), fields.next().unwrap(), fields.next().unwrap());
            let bytes = time.as_bytes();
            assert!(
                time.len() == 30 && bytes[4] == b'-' && bytes[10] == b'T' && bytes[19] == b'.' && time.ends_with('Z'),
                "not an RFC3339Nano time: {line:?}"
            );
            (stream.to_string(), tag.to_string(), fields.next().unwrap_or("").to_string())
        })
        .collect()
}

/// The id of the pod sandbox container `id` belongs to, as ListContainers says.
pub async fn pod_of(client: &mut CriClient, id: &str) -> String {
    let listed = client.runtime.list_containers(cri::ListContainersRequest::default()).await.expect("ListContainers");
    listed.into_inner().containers.into_iter().find(|c| c.id == id).expect("the container is listed").pod_sandbox_id
}

/// RemoveContainer, which must succeed.
pub async fn remove_container(client: &mut CriClient, id: &str) {
    let request = cri::RemoveContainerRequest { container_id: id.into() };
    client.runtime.remove_container(request).await.expect("RemoveContainer");
}

/// A loop device of the host attached, from inside `node`, to a 1 MiB file on the node's tmpfs
/// that starts with `LOOP_TEXT`; detached on drop. (The machine's own disk cannot be opened even by
/// the host's root, so a disk would prove nothing; any loop device can be.)
#[derive(Debug)]
pub struct LoopDevice<'n> {
    node: &'n crate::Node,
    pub path: String,
    /// "MAJ MIN"
    pub number: String,
}

pub const LOOP_TEXT: &str = "hello-device";

impl<'n> LoopDevice<'n> {
    pub fn attach(node: &'n crate::Node) -> LoopDevice<'n> {
        // The node's /dev (nspawn's tmpfs) has no loop nodes: make those the kernel has, then
        // attach (again if another user took the free device meanwhile).
        let path = node.sh(&format!(
            "test -e /dev/loop-control || mknod /dev/loop-control c 10 237; \
             printf {LOOP_TEXT} > /tmp/loop.img && truncate -s 1M /tmp/loop.img; \
             for try in 1 2 3 4 5; do \
               for f in /sys/class/block/loop*/dev; do d=/dev/${{f#/sys/class/block/}}; d=${{d%/dev}}; \
                 test -e $d || mknod $d b $(tr : ' ' < $f); done; \
               if l=$(losetup -f --show /tmp/loop.img 2>/dev/null); then echo $l; exit 0; fi; \
             done; exit 1"
        ));
        let path = path.trim().to_string();
        let name = path.trim_start_matches("/dev/");
        let number = node.sh(&format!("tr : ' ' < /sys/class/block/{name}/dev")).trim().to_string();
        LoopDevice { node, path, number }
    }
}

impl Drop for LoopDevice<'_> {
    fn drop(&mut self) {
        let run = self.node.exec(&["losetup", "-d", &self.path]);
        if !run.success() {
            eprintln!("cannot detach {}: {}", self.path, run.stderr);
        }
    }
}
