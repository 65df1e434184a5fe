//! The roll-back and roll-forward of pods and containers, against a fake systemd
//! ([`crate::fake_systemd`]): a failure at a step of RunPodSandbox, CreateContainer, StartContainer
//! or RemoveContainer leaves no unit, record or id range behind, and what a dead daemon left
//! half-done is finished by the next `Runtime::open`. Pods here use the node's namespaces (or
//! fail before theirs are made), so that the tests need no privileges.

use std::path::Path;
use std::sync::Arc;

use crate::fake_systemd::{Call, FakeSystemd};
use crate::pod::{NamespaceMode, PodSpec, PodState};
use crate::userns::{IdRange, UsernsMode};
use crate::{
    CniConfig, ContainerFilter, ContainerImage, ContainerSpec, ContainerState, Error, PodFilter, Runtime,
    RuntimeConfig, UsernsConfig,
};

struct Node {
    // First: fields drop in order.
    _unpin: Unpin,
    dir: tempfile::TempDir,
    systemd: Arc<FakeSystemd>,
    runtime: Runtime,
}

fn config(dir: &Path) -> RuntimeConfig {
    let cni_dir = dir.join("cni");
    std::fs::create_dir_all(&cni_dir).unwrap();
    RuntimeConfig {
        state_root: dir.join("state"),
        run_root: dir.join("run"),
        cni: CniConfig { conf_dir: cni_dir, plugin_dirs: vec![], plugin_timeout_secs: 5 },
        userns: UsernsConfig::default(),
        layer_uid_shift: 0,
        tasks_max: 0,
    }
}

/// The pod mount namespace's pin is a mount of the machine's namespace: unmounted before the
/// node's directory goes.
struct Unpin(std::path::PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Node {
    async fn new() -> Node {
        crate::sealed_exe::set_for_tests();
        let dir = tempfile::tempdir().unwrap();
        let systemd = Arc::new(FakeSystemd::default());
        let runtime = Runtime::open(config(dir.path()), systemd.clone()).await.unwrap();
        Node { _unpin: Unpin(dir.path().join("run/pod-mounts")), dir, systemd, runtime }
    }

    /// What a restart of the daemon finds: the same directories, a systemd that works.
    async fn restart(self) -> Node {
        let Node { _unpin, dir, runtime, .. } = self;
        drop(runtime);
        let systemd = Arc::new(FakeSystemd::default());
        let runtime = Runtime::open(config(dir.path()), systemd.clone()).await.unwrap();
        Node { _unpin, dir, systemd, runtime }
    }

    fn pod_records(&self) -> Vec<String> {
        dir_names(&self.dir.path().join("state/pods"))
    }

    fn container_dirs(&self) -> Vec<String> {
        dir_names(&self.dir.path().join("state/containers"))
    }

    fn pod_dir_record(&self, id: &str) -> crate::Pod {
        crate::store::read_json(&self.dir.path().join("state/pods").join(id).join("pod.json")).unwrap()
    }

    fn container_record(&self, id: &str) -> crate::Container {
        crate::store::read_json(&self.dir.path().join("state/containers").join(id).join("container.json")).unwrap()
    }

    /// A pod in the node's namespaces, ready; returns its id.
    async fn ready_pod(&self, name: &str) -> String {
        self.runtime.run_pod(host_pod(name)).await.unwrap()
    }

    /// A container created in `pod` over an (empty) image layer in the test's directory.
    async fn created_container(&self, pod: &str, name: &str) -> String {
        self.runtime.create_container(pod, container(name), self.layers()).await.unwrap()
    }

    fn layers(&self) -> Vec<std::path::PathBuf> {
        let lower = self.dir.path().join("layer");
        std::fs::create_dir_all(&lower).unwrap();
        vec![lower]
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => vec![],
    }
}

fn host_pod(name: &str) -> PodSpec {
    PodSpec {
        name: name.into(),
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        network: NamespaceMode::Node,
        ipc: NamespaceMode::Node,
        pid: NamespaceMode::Container,
        ..Default::default()
    }
}

fn container(name: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: ContainerImage { name: "busybox".into(), entrypoint: vec!["/bin/sleep".into()], ..Default::default() },
        args: vec!["60".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn run_pod_whose_slice_fails_to_start_leaves_nothing_and_frees_its_id_range() {
    let node = Node::new().await;
    // A pod in a user namespace of its own, its range from the kubelet: reserved before the slice.
    let range = IdRange { host_id: 65536 * 20, size: 65536 };
    let mapping = crate::IdMapping { container_id: 0, host_id: range.host_id, size: range.size };
    let spec = PodSpec {
        network: NamespaceMode::Pod,
        ipc: NamespaceMode::Pod,
        userns: UsernsMode::Pod { uid_mappings: vec![mapping], gid_mappings: vec![mapping] },
        ..host_pod("a")
    };
    let slice = spec.slice_name();
    node.systemd.fail("start_unless_loaded", &slice);
    let error = node.runtime.run_pod(spec.clone()).await.unwrap_err();
    assert!(matches!(error, Error::Unit { .. }), "{error}");
    assert!(node.runtime.pods(&PodFilter::default()).is_empty());
    assert!(node.pod_records().is_empty(), "records left: {:?}", node.pod_records());
    assert!(node.runtime.userns_ranges.lock().unwrap().user_of(&range).is_none(), "the range is still reserved");
    // Not in the table either: the same pod can be asked for again (no AlreadyExists).
    assert!(node.runtime.pods.lock().unwrap().is_empty());
}

#[tokio::test]
async fn run_pod_whose_init_process_ends_at_once_stops_its_units() {
    let node = Node::new().await;
    // A shared PID namespace: the pod has an init unit. Its main PID is 0: it ended at once.
    let spec = PodSpec { pid: NamespaceMode::Pod, ..host_pod("b") };
    let slice = spec.slice_name();
    let error = node.runtime.run_pod(spec).await.unwrap_err();
    assert!(error.to_string().contains("ended at once"), "{error}");
    assert!(node.systemd.loaded().is_empty(), "units left: {:?}", node.systemd.loaded());
    let calls = node.systemd.calls();
    assert!(calls.contains(&Call::Stop(slice)), "{calls:?}");
    assert!(calls.iter().any(|c| matches!(c, Call::ResetFailed(u) if u.starts_with("cri-pod-"))), "{calls:?}");
    assert!(node.pod_records().is_empty(), "records left: {:?}", node.pod_records());
    assert!(node.runtime.pods(&PodFilter::default()).is_empty());
}

#[tokio::test]
async fn a_slice_the_kubelet_started_is_used_and_never_stopped() {
    let node = Node::new().await;
    let spec = PodSpec {
        cgroup_parent: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podc.slice".into(),
        ..host_pod("c")
    };
    node.systemd.load("kubepods-besteffort-podc.slice");
    let id = node.runtime.run_pod(spec).await.unwrap();
    assert!(!node.runtime.pod(&id).unwrap().owns_slice);
    node.runtime.remove_pod(&id).await.unwrap();
    assert!(node.systemd.is_loaded("kubepods-besteffort-podc.slice"));
    assert!(!node.systemd.calls().contains(&Call::Stop("kubepods-besteffort-podc.slice".into())));
    assert!(node.pod_records().is_empty());

    // A slice the runtime started is stopped with its pod.
    let own = node.ready_pod("d").await;
    let slice = node.runtime.pod(&own).unwrap().slice;
    assert!(node.systemd.is_loaded(&slice));
    node.runtime.remove_pod(&own).await.unwrap();
    assert!(!node.systemd.is_loaded(&slice));
}

#[tokio::test]
async fn a_pod_removal_that_failed_is_kept_unlisted_and_finished_at_restart() {
    let node = Node::new().await;
    let id = node.ready_pod("e").await;
    let slice = node.runtime.pod(&id).unwrap().slice;
    node.systemd.fail("stop", &slice);
    node.runtime.remove_pod(&id).await.unwrap_err();
    assert!(node.runtime.pods(&PodFilter::default()).is_empty(), "a pod being removed is listed");
    assert_eq!(node.pod_dir_record(&id).state, PodState::Removing);

    let node = node.restart().await;
    assert!(node.systemd.calls().contains(&Call::Stop(slice)), "{:?}", node.systemd.calls());
    assert!(node.pod_records().is_empty(), "records left: {:?}", node.pod_records());
    assert!(node.runtime.pod(&id).is_err());
}

#[tokio::test]
async fn a_pod_left_creating_by_a_dead_daemon_is_rolled_back_at_restart() {
    let node = Node::new().await;
    let id = node.ready_pod("f").await;
    let mut record = node.pod_dir_record(&id);
    let slice = record.slice.clone();
    record.state = PodState::Creating;
    crate::store::write_json(&node.dir.path().join("state/pods").join(&id).join("pod.json"), &record).unwrap();

    let node = node.restart().await;
    assert!(node.systemd.calls().contains(&Call::Stop(slice)), "{:?}", node.systemd.calls());
    assert!(node.pod_records().is_empty(), "records left: {:?}", node.pod_records());
    assert!(node.runtime.pods(&PodFilter::default()).is_empty());
}

#[tokio::test]
async fn a_slice_started_but_not_yet_recorded_is_told_from_the_kubelets_by_its_description() {
    let node = Node::new().await;
    let own = node.ready_pod("k").await;
    node.systemd.load("kubepods-besteffort-podkubelets.slice");
    let in_kubelets = node
        .runtime
        .run_pod(PodSpec {
            cgroup_parent: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podkubelets.slice".into(),
            ..host_pod("l")
        })
        .await
        .unwrap();
    // A daemon killed between the slice's start and the record of it.
    for id in [&own, &in_kubelets] {
        let mut record = node.pod_dir_record(id);
        record.state = PodState::Creating;
        record.owns_slice = false;
        crate::store::write_json(&node.dir.path().join("state/pods").join(id).join("pod.json"), &record).unwrap();
    }
    let own_slice = node.runtime.pod(&own).unwrap().slice;
    let systemd = node.systemd.clone();

    // The restart's systemd is the same one: the units are still loaded.
    let Node { dir, runtime, .. } = node;
    drop(runtime);
    let runtime = Runtime::open(config(dir.path()), systemd.clone()).await.unwrap();
    assert!(!systemd.is_loaded(&own_slice), "{systemd:?}");
    assert!(systemd.is_loaded("kubepods-besteffort-podkubelets.slice"), "{systemd:?}");
    assert!(!systemd.calls().contains(&Call::Stop("kubepods-besteffort-podkubelets.slice".into())));
    assert!(runtime.pods(&PodFilter::default()).is_empty());
    assert!(dir_names(&dir.path().join("state/pods")).is_empty());
}

#[tokio::test]
async fn create_container_failing_after_its_files_were_made_leaves_no_record() {
    let node = Node::new().await;
    let pod = node.ready_pod("g").await;
    // Valid, but neither the config nor the image gives a command: the OCI spec, made once the
    // container's directory and writable layer exist, cannot be.
    let no_command = ContainerSpec { args: vec![], image: ContainerImage::default(), ..container("c") };
    let error = node.runtime.create_container(&pod, no_command, node.layers()).await.unwrap_err();
    assert!(matches!(error, Error::InvalidSpec(ref m) if m.contains("no command")), "{error}");
    assert!(node.container_dirs().is_empty(), "left: {:?}", node.container_dirs());
    assert!(node.runtime.containers(&ContainerFilter::default()).is_empty());
    // Its name and attempt are free again.
    node.created_container(&pod, "c").await;
}

#[tokio::test]
async fn create_container_refuses_a_pod_that_is_not_ready_and_keeps_nothing() {
    let node = Node::new().await;
    let pod = node.ready_pod("h").await;
    node.runtime.stop_pod(&pod).await.unwrap();
    let error = node.runtime.create_container(&pod, container("c"), node.layers()).await.unwrap_err();
    assert!(matches!(error, Error::PodNotReady { .. }), "{error}");
    assert!(node.container_dirs().is_empty(), "left: {:?}", node.container_dirs());
}

#[tokio::test]
async fn a_failed_start_leaves_the_container_exited_with_start_error_and_no_unit() {
    let node = Node::new().await;
    let pod = node.ready_pod("i").await;
    let id = node.created_container(&pod, "c").await;
    let unit = format!("cri-{id}.service");
    node.systemd.fail("start", &unit);
    let error = node.runtime.start_container(&id).await.unwrap_err();
    assert!(matches!(error, Error::StartFailed { .. }), "{error}");
    let record = node.runtime.container(&id).unwrap();
    assert_eq!((record.state, record.reason.as_str(), record.exit_code), (ContainerState::Exited, "StartError", 128));
    assert!(node.systemd.calls().contains(&Call::ResetFailed(unit.clone())));
    assert!(!node.systemd.is_loaded(&unit));
}

#[tokio::test]
async fn a_container_removal_that_failed_is_finished_at_restart() {
    let node = Node::new().await;
    let pod = node.ready_pod("j").await;
    let id = node.created_container(&pod, "c").await;
    let unit = format!("cri-{id}.service");
    node.systemd.fail("stop", &unit);
    node.runtime.remove_container(&id).await.unwrap_err();
    assert_eq!(node.container_record(&id).state, ContainerState::Removing);
    assert!(node.runtime.containers(&ContainerFilter::default()).is_empty(), "a container being removed is listed");

    let node = node.restart().await;
    assert!(node.systemd.calls().contains(&Call::Stop(unit.clone())), "{:?}", node.systemd.calls());
    assert!(node.container_dirs().is_empty(), "left: {:?}", node.container_dirs());
    assert!(matches!(node.runtime.container(&id), Err(Error::ContainerNotFound { .. })));
    // The pod itself is untouched.
    assert_eq!(node.runtime.pod(&pod).unwrap().state, PodState::Ready);
}

#[tokio::test]
async fn removing_a_running_container_kills_and_stops_its_unit() {
    let node = Node::new().await;
    let pod = node.ready_pod("k").await;
    let id = node.created_container(&pod, "c").await;
    let unit = format!("cri-{id}.service");
    node.runtime.start_container(&id).await.unwrap();
    assert!(node.systemd.is_loaded(&unit));
    assert_eq!(node.runtime.container(&id).unwrap().state, ContainerState::Running);
    // What ExecStopPost (record-exit) writes when the unit stops.
    let exit_file = node.runtime.container_dir(&id).join("exit.json");
    node.systemd.on_stop(move |_| {
        let exit = crate::exit_record::ExitRecord {
            result: "signal".into(),
            exit_code: 137,
            oom_killed: false,
            finished_at: 1,
            main_status_known: true,
        };
        crate::store::write_json(&exit_file, &exit).unwrap();
    });
    node.runtime.remove_container(&id).await.unwrap();
    let calls = node.systemd.calls();
    let kill = Call::Kill { unit: unit.clone(), whom: "all".into(), signal: libc::SIGKILL };
    assert!(calls.contains(&kill), "{calls:?}");
    assert!(!node.systemd.is_loaded(&unit));
    assert!(node.container_dirs().is_empty(), "left: {:?}", node.container_dirs());
    assert!(matches!(node.runtime.container(&id), Err(Error::ContainerNotFound { .. })));
}

#[tokio::test]
async fn removing_a_pod_removes_its_containers_and_their_units() {
    let node = Node::new().await;
    let pod = node.ready_pod("l").await;
    let first = node.created_container(&pod, "first").await;
    let second = node.created_container(&pod, "second").await;
    node.runtime.remove_pod(&pod).await.unwrap();
    assert!(node.container_dirs().is_empty(), "left: {:?}", node.container_dirs());
    for id in [first, second] {
        assert!(node.systemd.calls().contains(&Call::ResetFailed(format!("cri-{id}.service"))));
    }
    assert!(node.systemd.loaded().is_empty(), "units left: {:?}", node.systemd.loaded());
}
