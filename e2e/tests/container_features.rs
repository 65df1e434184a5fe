//! Container features of cri-api 1.33+ that the kubelet uses, through the real gRPC path to a
//! daemon in a throwaway node, with images from the node's local registry: a config's
//! `stop_signal`, SupplementalGroupsPolicy with ContainerStatus.user, `kubectl debug --target`
//! (PID namespace mode TARGET), the evented PLEG's fields (PodSandboxStatus and GetContainerEvents
//! carrying every container's status) and ImageFsInfo's `container_filesystems`.

use std::time::Duration;

use e2e::crisimple::{
    container_config, create, exec_sync, kubelet_pod, run_pod, run_pod_sandbox, start, status, userns_pod_config,
    wait_exited,
};
use e2e::oci::{self, Compression, ConfigOptions, Image, LayerBuilder};
use e2e::registry::{Registry, RegistryOptions};
use e2e::{CriClient, LOCAL_REGISTRY_PORT, Node, cri, node_with_local_registry};
use tonic::Code;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts registry `name` on the node, pushes `images` (repo, image) as `<repo>:1`, has the daemon
/// pull them, and returns their references.
async fn push_and_pull(node: &Node, client: &mut CriClient, name: &str, images: &[(&str, Image)]) -> Vec<String> {
    let registry = Registry::start(node, name, LOCAL_REGISTRY_PORT, RegistryOptions::default());
    let mut references = Vec::new();
    for (repo, image) in images {
        registry.push_image(repo, "1", image);
        let reference = registry.repo(&format!("{repo}:1"));
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: reference.clone(), ..Default::default() }),
            ..Default::default()
        };
        client.image.pull_image(request).await.expect("PullImage");
        references.push(reference);
    }
    references
}

/// A node with busybox (and `images`) pulled and pod `label` running: (node, client, pod, images).
async fn node_with_pod(label: &str, images: &[(&str, Image)]) -> (Node, CriClient, String, Vec<String>) {
    let node = node_with_local_registry(label, "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let mut all = vec![("busybox", oci::busybox_image(""))];
    all.extend(images.iter().cloned());
    let images = push_and_pull(&node, &mut client, label, &all).await;
    let pod = run_pod(&mut client, label).await;
    (node, client, pod, images)
}

async fn container_count(client: &mut CriClient) -> usize {
    client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner().containers.len()
}

/// Kills the daemon (SIGKILL) and starts it again; returns a new client.
async fn kill_and_restart_daemon(node: &Node) -> CriClient {
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd; systemctl start cri-systemd");
    node.cri(ANSWER_TIMEOUT).await
}

async fn stop(client: &mut CriClient, id: &str, timeout: i64) {
    let request = cri::StopContainerRequest { container_id: id.into(), timeout };
    client.runtime.stop_container(request).await.expect("StopContainer");
}

/// A shell that reports which of TERM and USR1 reached it, with its exit code.
const SIGNAL_REPORTER: &str =
    "trap 'echo got-usr1; exit 7' USR1; trap 'echo got-term; exit 8' TERM; echo ready; while :; do sleep 1; done";

#[tokio::test(flavor = "multi_thread")]
async fn stop_signal_from_the_config_is_used_reported_and_kept() {
    let (node, mut client, pod, images) = node_with_pod("cf-stopsig", &[]).await;
    let image = images[0].clone();
    let sleeper = create(&mut client, &pod, container_config("sleeper", &image, &["/bin/busybox", "sleep", "100000"]))
        .await
        .unwrap();

    // Without stop_signal: the image's (none here), so SIGTERM, reported as containerd does.
    assert_eq!(status(&mut client, &sleeper).await.stop_signal, cri::Signal::Sigterm as i32);

    // An unknown signal number: InvalidArgument naming the field, nothing created.
    let before = container_count(&mut client).await;
    let mut config = container_config("bad-signal", &image, &["/bin/busybox", "sleep", "1"]);
    config.stop_signal = 999;
    let refused = create(&mut client, &pod, config).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("stop_signal 999"), "{refused:?}");
    assert_eq!(container_count(&mut client).await, before, "a refused CreateContainer created nothing");

    // SIGUSR1 from the config, started and stopped at once: the entrypoint (PID 1 of its PID
    // namespace) gets it once its handler is there, not SIGTERM, and not SIGKILL after the grace.
    let mut config = container_config("usr1-now", &image, &["/bin/sh", "-c", SIGNAL_REPORTER]);
    config.stop_signal = cri::Signal::Sigusr1 as i32;
    let now = create(&mut client, &pod, config.clone()).await.expect("CreateContainer with stop_signal");
    assert_eq!(status(&mut client, &now).await.stop_signal, cri::Signal::Sigusr1 as i32);
    start(&mut client, &now).await.unwrap();
    let began = std::time::Instant::now();
    stop(&mut client, &now, 20).await;
    let stopped = wait_exited(&mut client, &now).await;
    assert_eq!(stopped.exit_code, 7, "the trap of SIGUSR1 ended it: {stopped:?}");
    assert!(began.elapsed() < Duration::from_secs(15), "no grace period sat out: {:?}", began.elapsed());

    // Kept in the record: the same after the daemon was killed and started again.
    config.metadata.as_mut().unwrap().name = "usr1-restart".into();
    let kept = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &kept).await.unwrap();
    let mut client = kill_and_restart_daemon(&node).await;
    assert_eq!(status(&mut client, &kept).await.stop_signal, cri::Signal::Sigusr1 as i32);
    stop(&mut client, &kept, 20).await;
    assert_eq!(wait_exited(&mut client, &kept).await.exit_code, 7);

    // RUNTIME_DEFAULT still stops with the image's signal: SIGTERM here.
    let config = container_config("default", &image, &["/bin/sh", "-c", SIGNAL_REPORTER]);
    let default = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &default).await.unwrap();
    stop(&mut client, &default, 20).await;
    assert_eq!(wait_exited(&mut client, &default).await.exit_code, 8);

    // A real-time signal, as the CRI names it (SIGRTMIN+1 = 35 with glibc's numbering): kept and
    // reported by its CRI name.
    let mut config = container_config("rt", &image, &["/bin/busybox", "sleep", "100000"]);
    config.stop_signal = cri::Signal::Sigrtminplus1 as i32;
    let rt = create(&mut client, &pod, config).await.unwrap();
    assert_eq!(status(&mut client, &rt).await.stop_signal, cri::Signal::Sigrtminplus1 as i32);
    start(&mut client, &rt).await.unwrap();
    let unit = format!("cri-{rt}.service");
    assert_eq!(node.sh(&format!("systemctl show -p KillSignal --value {unit}")).trim(), "35");
}

/// busybox with `user` (1002) also listed in group `image-group` (50000) of the image's /etc/group.
fn image_with_group() -> Image {
    let mut top = LayerBuilder::new();
    top.dir("etc", 0o755).file(
        "etc/group",
        0o644,
        b"root:x:0:\nwww-data:x:33:\nuser:x:1002:\nextra:x:1004:\nimage-group:x:50000:user\n",
    );
    Image::new(vec![oci::busybox_layer(Compression::Gzip), top.build(Compression::Gzip)], ConfigOptions::default())
}

#[tokio::test(flavor = "multi_thread")]
async fn supplemental_groups_policy_merge_and_strict_with_the_user_reported() {
    let (node, mut client, pod, images) = node_with_pod("cf-groups", &[("grouped", image_with_group())]).await;
    let image = images[1].clone();
    let answer = client.runtime.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    assert!(answer.features.unwrap().supplemental_groups_policy, "advertised in Status");

    let config = |name: &str, policy: cri::SupplementalGroupsPolicy| {
        let mut config = container_config(name, &image, &["/bin/busybox", "sleep", "100000"]);
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1002 }),
                supplemental_groups: vec![1234],
                supplemental_groups_policy: policy as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        config
    };
    let user = |supplemental_groups: Vec<i64>| cri::ContainerUser {
        linux: Some(cri::LinuxContainerUser { uid: 1002, gid: 1002, supplemental_groups }),
    };
    let groups = async |client: &mut CriClient, id: &str| {
        let out = exec_sync(client, id, &["/bin/busybox", "id", "-G"]).await.expect("ExecSync");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };

    let merge = create(&mut client, &pod, config("merge", cri::SupplementalGroupsPolicy::Merge)).await.unwrap();
    start(&mut client, &merge).await.unwrap();
    assert_eq!(status(&mut client, &merge).await.user, Some(user(vec![1002, 1234, 50000])));
    assert_eq!(groups(&mut client, &merge).await, "1002 1234 50000");

    let strict = create(&mut client, &pod, config("strict", cri::SupplementalGroupsPolicy::Strict)).await.unwrap();
    start(&mut client, &strict).await.unwrap();
    assert_eq!(status(&mut client, &strict).await.user, Some(user(vec![1002, 1234])));
    assert_eq!(groups(&mut client, &strict).await, "1002 1234");

    // An unknown policy: InvalidArgument naming the field, nothing created.
    let before = container_count(&mut client).await;
    let mut bad = config("bad-policy", cri::SupplementalGroupsPolicy::Strict);
    bad.linux.as_mut().unwrap().security_context.as_mut().unwrap().supplemental_groups_policy = 7;
    let refused = create(&mut client, &pod, bad).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("supplemental_groups_policy"), "{refused:?}");
    assert_eq!(container_count(&mut client).await, before);

    // Kept in the record: the same after a daemon kill and restart.
    let mut client = kill_and_restart_daemon(&node).await;
    assert_eq!(status(&mut client, &strict).await.user, Some(user(vec![1002, 1234])));
    assert_eq!(status(&mut client, &merge).await.user, Some(user(vec![1002, 1234, 50000])));
}

/// A debug container as the kubelet configures an ephemeral container with a target
/// (`kubectl debug --target`): PID namespace mode TARGET naming the target container.
fn debug_config(name: &str, image: &str, target: &str) -> cri::ContainerConfig {
    let mut config = container_config(name, image, &["/bin/busybox", "sleep", "100000"]);
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Target as i32,
                target_id: target.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// The command line of PID 1 as container `id` sees it.
async fn pid1_cmdline(client: &mut CriClient, id: &str) -> String {
    let out = exec_sync(client, id, &["/bin/busybox", "cat", "/proc/1/cmdline"]).await.expect("ExecSync");
    String::from_utf8_lossy(&out.stdout).replace('\0', " ").trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_target_joins_the_pid_namespace_of_a_running_container_of_the_pod() {
    let node = node_with_local_registry("cf-target", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = push_and_pull(&node, &mut client, "cf-target", &[("busybox", oci::busybox_image(""))]).await.remove(0);
    let plain = run_pod_sandbox(&mut client, kubelet_pod("cf-target")).await.unwrap();
    let userns = run_pod_sandbox(&mut client, userns_pod_config("cf-target-userns")).await.unwrap();

    let mut targets = Vec::new();
    let mut debuggers = Vec::new();
    for (pod, label) in [(&plain, "plain"), (&userns, "userns")] {
        let config = container_config(&format!("target-{label}"), &image, &["/bin/busybox", "sleep", "424242"]);
        let target = create(&mut client, pod, config).await.unwrap();
        start(&mut client, &target).await.unwrap();
        let debug = create(&mut client, pod, debug_config(&format!("debug-{label}"), &image, &target))
            .await
            .expect("CreateContainer with PID namespace mode TARGET");
        start(&mut client, &debug).await.expect("StartContainer of the debug container");
        // The target's entrypoint is PID 1 of the debug container's PID namespace.
        assert_eq!(pid1_cmdline(&mut client, &debug).await, "/bin/busybox sleep 424242", "{label}");
        let ps = exec_sync(&mut client, &debug, &["/bin/busybox", "ps", "-o", "args"]).await.unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout).to_string();
        assert!(ps.contains("sleep 424242") && ps.contains("sleep 100000"), "{label}: {ps}");
        // The pin is gone once the start is done.
        let pin = format!("/var/lib/cri-systemd/containers/{debug}/target-pid-ns");
        assert_eq!(node.sh(&format!("test -e {pin} && echo left || echo gone")).trim(), "gone");
        targets.push(target);
        debuggers.push(debug);
    }
    // The target keeps its own view: the debug container is not its PID 1.
    assert_eq!(pid1_cmdline(&mut client, &targets[0]).await, "/bin/busybox sleep 424242");

    // Bad targets: a clear error, nothing created.
    let before = container_count(&mut client).await;
    let refused = create(&mut client, &plain, debug_config("nosuch", &image, "0123456789abcdef")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("target_id") && refused.message().contains("no such container"), "{refused:?}");
    let refused = create(&mut client, &plain, debug_config("other-pod", &image, &targets[1])).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("belongs to pod"), "{refused:?}");
    let refused = create(&mut client, &plain, debug_config("no-id", &image, "")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("target_id"), "{refused:?}");
    let done = create(&mut client, &plain, container_config("done", &image, &["/bin/busybox", "true"])).await.unwrap();
    start(&mut client, &done).await.unwrap();
    wait_exited(&mut client, &done).await;
    let before = before + 1;
    let refused = create(&mut client, &plain, debug_config("exited", &image, &done)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("not running"), "{refused:?}");
    assert_eq!(container_count(&mut client).await, before, "a refused CreateContainer created nothing");

    // A debug container created while the target ran, started after it ended: a clear error.
    let late_target =
        create(&mut client, &plain, container_config("late-target", &image, &["/bin/busybox", "sleep", "100000"]))
            .await
            .unwrap();
    start(&mut client, &late_target).await.unwrap();
    let late = create(&mut client, &plain, debug_config("late", &image, &late_target)).await.unwrap();
    stop(&mut client, &late_target, 0).await;
    let refused = start(&mut client, &late).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("not running"), "{refused:?}");

    // Kept in the record: after a daemon kill and restart the debug container still runs there.
    let mut client = kill_and_restart_daemon(&node).await;
    for debug in &debuggers {
        assert_eq!(status(&mut client, debug).await.state, cri::ContainerState::ContainerRunning as i32);
        assert_eq!(pid1_cmdline(&mut client, debug).await, "/bin/busybox sleep 424242");
    }

    // When the target ends, its PID namespace ends, and the debug container with it (the kernel
    // kills a PID namespace with its PID 1, as with containerd and runc).
    stop(&mut client, &targets[0], 10).await;
    let ended = wait_exited(&mut client, &debuggers[0]).await;
    assert_eq!(ended.exit_code, 137, "{ended:?}");
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}

async fn pod_sandbox_status(client: &mut CriClient, pod: &str) -> cri::PodSandboxStatusResponse {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: false };
    client.runtime.pod_sandbox_status(request).await.expect("PodSandboxStatus").into_inner()
}

/// (id, state) of each container status, in order.
fn states(statuses: &[cri::ContainerStatus]) -> Vec<(String, i32)> {
    statuses.iter().map(|s| (s.id.clone(), s.state)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn evented_pleg_pod_status_and_events_carry_every_container_of_the_pod() {
    use cri::ContainerEventType::{
        ContainerCreatedEvent as Created, ContainerDeletedEvent as Deleted, ContainerStartedEvent as Started,
        ContainerStoppedEvent as Stopped,
    };
    use cri::ContainerState::{ContainerExited as Exited, ContainerRunning as Running};
    let (node, mut client, pod, images) = node_with_pod("cf-pleg", &[]).await;
    let image = images[0].clone();
    let pod_uid = "cf-pleg-0000-1111-2222-333344445555";
    let mut events = client.runtime.get_container_events(cri::GetEventsRequest {}).await.unwrap().into_inner();

    // A lifecycle: a stays running, b runs, stops and is removed.
    let a =
        create(&mut client, &pod, container_config("a", &image, &["/bin/busybox", "sleep", "100000"])).await.unwrap();
    start(&mut client, &a).await.unwrap();
    let b =
        create(&mut client, &pod, container_config("b", &image, &["/bin/busybox", "sleep", "100000"])).await.unwrap();
    start(&mut client, &b).await.unwrap();
    stop(&mut client, &b, 0).await;

    // PodSandboxStatus: every container of the pod, as ContainerStatus has it, and a timestamp
    // (Unix nanoseconds, the kubelet's time.Unix(0, ts)) from within the call.
    let before = now_nanos();
    let answer = pod_sandbox_status(&mut client, &pod).await;
    let after = now_nanos();
    assert!(before <= answer.timestamp && answer.timestamp <= after, "{} not in {before}..{after}", answer.timestamp);
    assert_eq!(states(&answer.containers_statuses), vec![(a.clone(), Running as i32), (b.clone(), Exited as i32)]);
    for listed in &answer.containers_statuses {
        let own = status(&mut client, &listed.id).await;
        assert_eq!(
            (listed.metadata.clone(), listed.started_at, listed.image_ref.clone()),
            (own.metadata, own.started_at, own.image_ref)
        );
    }

    client.runtime.remove_container(cri::RemoveContainerRequest { container_id: b.clone() }).await.unwrap();

    // The events, each with the pod's status and every container's status as they were then.
    let mut seen = Vec::new();
    let mut last_created_at = 0;
    while seen.len() < 6 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("an event within 10 s")
            .expect("the event stream")
            .expect("not the end of the stream");
        let sandbox = event.pod_sandbox_status.as_ref().expect("pod_sandbox_status");
        assert_eq!(sandbox.metadata.as_ref().unwrap().uid, pod_uid, "{event:?}");
        assert_eq!(sandbox.id, pod);
        assert!(event.created_at >= last_created_at && event.created_at <= now_nanos(), "{event:?}");
        last_created_at = event.created_at;
        seen.push((event.container_id.clone(), event.container_event_type, states(&event.containers_statuses)));
    }
    let created = cri::ContainerState::ContainerCreated as i32;
    assert_eq!(
        seen,
        vec![
            (a.clone(), Created as i32, vec![(a.clone(), created)]),
            (a.clone(), Started as i32, vec![(a.clone(), Running as i32)]),
            (b.clone(), Created as i32, vec![(a.clone(), Running as i32), (b.clone(), created)]),
            (b.clone(), Started as i32, vec![(a.clone(), Running as i32), (b.clone(), Running as i32)]),
            (b.clone(), Stopped as i32, vec![(a.clone(), Running as i32), (b.clone(), Exited as i32)]),
            (b.clone(), Deleted as i32, vec![(a.clone(), Running as i32)]),
        ][..],
        "{seen:#?}"
    );

    // Records: the same answer after the daemon was killed and started again.
    let mut client = kill_and_restart_daemon(&node).await;
    let answer = pod_sandbox_status(&mut client, &pod).await;
    assert_eq!(states(&answer.containers_statuses), vec![(a.clone(), Running as i32)]);
    assert!(answer.timestamp > after);
}

#[tokio::test(flavor = "multi_thread")]
async fn image_fs_info_reports_the_writable_layers_filesystem() {
    let (node, mut client, pod, images) = node_with_pod("cf-imagefs", &[]).await;
    let id = create(&mut client, &pod, container_config("writer", &images[0], &["/bin/busybox", "sleep", "100000"]))
        .await
        .unwrap();
    start(&mut client, &id).await.unwrap();
    let answer = client.image.image_fs_info(cri::ImageFsInfoRequest {}).await.unwrap().into_inner();
    // One disk: the container filesystem is the image filesystem, with the same mountpoint (the
    // kubelet takes different mountpoints for a split disk).
    assert_eq!(answer.image_filesystems.len(), 1);
    assert_eq!(answer.container_filesystems, answer.image_filesystems, "{answer:?}");
    let mountpoint = answer.image_filesystems[0].fs_id.as_ref().unwrap().mountpoint.clone();
    assert_eq!(mountpoint, "/var/lib/cri-systemd/images");

    // The writable layers on a file system of their own (a tmpfs over the containers' directory,
    // mounted before the daemon starts): their own entry, with what they use.
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    node.sh("systemctl stop cri-systemd && mount -t tmpfs -o size=64m,mode=0700 split /var/lib/cri-systemd/containers && systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let pod = run_pod(&mut client, "cf-imagefs-split").await;
    let id = create(&mut client, &pod, container_config("writer", &images[0], &["/bin/busybox", "sleep", "100000"]))
        .await
        .unwrap();
    start(&mut client, &id).await.unwrap();
    let out = exec_sync(&mut client, &id, &["/bin/busybox", "dd", "if=/dev/zero", "of=/data", "bs=1M", "count=4"]);
    assert_eq!(out.await.unwrap().exit_code, 0);
    let answer = client.image.image_fs_info(cri::ImageFsInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(answer.image_filesystems[0].fs_id.as_ref().unwrap().mountpoint, "/var/lib/cri-systemd/images");
    let containers = &answer.container_filesystems[0];
    assert_eq!(containers.fs_id.as_ref().unwrap().mountpoint, "/var/lib/cri-systemd/containers", "{answer:?}");
    assert!(containers.used_bytes.unwrap().value >= 4 << 20, "{answer:?}");
}
