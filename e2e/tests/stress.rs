//! Many clients at once, and the daemon killed in the middle of lifecycle calls: nothing may
//! fail that should not, and nothing may leak (units, slices, namespace pins, mounts, records).

use std::time::Duration;

use e2e::crisimple::{PodConfig, pod, run_pod_sandbox};
use e2e::{CriClient, Node, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn node(label: &str) -> Node {
    e2e::node_with_local_registry(label, "")
}

async fn pull_busybox(node: &Node, client: &mut CriClient) -> String {
    e2e::pull_busybox(node, client, "stress").await
}

/// The pods of these tests: in namespace `stress`, without a hostname.
fn stress_pod(name: &str) -> PodConfig {
    pod(name).uid(&format!("{name}-uid")).namespace("stress").hostname("")
}

/// Runs a pod with two sleeping containers; with `shared_pid`, in one PID namespace (the pod's
/// init unit then runs too).
async fn pod_with_two_containers(
    client: &mut CriClient,
    image: &str,
    name: &str,
    shared_pid: bool,
) -> Result<String, tonic::Status> {
    let mut config = stress_pod(name);
    if shared_pid {
        config = config.pid(cri::NamespaceMode::Pod);
    }
    let config = config.build();
    let pod = run_pod_sandbox(client, config.clone()).await?;
    for container in ["a", "b"] {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata { name: container.into(), attempt: 0 }),
                image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
                command: vec!["/bin/busybox".into(), "sleep".into(), "1000".into()],
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        };
        let id = client.runtime.create_container(request).await?.into_inner().container_id;
        client.runtime.start_container(cri::StartContainerRequest { container_id: id }).await?;
    }
    Ok(pod)
}

async fn remove_all_pods(client: &mut CriClient) {
    let pods = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap().into_inner().items;
    for pod in pods {
        client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.id.clone() }).await.unwrap();
        client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.id }).await.unwrap();
    }
}

/// Everything a pod or container could leave behind on the node.
fn leftovers(node: &Node) -> String {
    // The parent slices kubepods.slice and kubepods-besteffort.slice are the node's, not a pod's.
    node.sh(
        "systemctl list-units --all --plain --no-legend 'kubepods-*' 'cri-[0-9a-f]*.service' 'cri-pod-*.service' \
           | awk '{print $1}' | grep -v '^kubepods-besteffort.slice$' || true; \
         find /run/cri-systemd/pods /var/lib/cri-systemd/pods /var/lib/cri-systemd/containers -mindepth 1 -maxdepth 1 2>/dev/null; \
         grep ' nsfs \\|cri-systemd/pods' /proc/self/mountinfo | grep -vc ' /run/cri-systemd/pod-mounts/mnt ' || true",
    ) + &pod_mounts_of_pods(node)
}

/// How many mounts of pods the pod mount namespace holds (none before the first pod made it).
fn pod_mounts_of_pods(node: &Node) -> String {
    if node.exec(&["test", "-e", e2e::POD_MOUNTS]).success() {
        node.sh_in_pod_mounts("grep -c 'cri-systemd/pods' /proc/self/mountinfo || true")
    } else {
        "0\n".into()
    }
}

#[tokio::test]
async fn hundred_pods_with_two_containers_from_ten_clients() {
    let node = node("stress-100");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let clean = leftovers(&node);

    let mut tasks = Vec::new();
    for worker in 0..10 {
        let mut client = client.clone();
        let image = image.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                pod_with_two_containers(&mut client, &image, &format!("p{worker}-{i}"), false)
                    .await
                    .expect("pod with two containers");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let pods = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap().into_inner().items;
    assert_eq!(pods.len(), 100);
    let running = cri::ContainerFilter {
        state: Some(cri::ContainerStateValue { state: cri::ContainerState::ContainerRunning as i32 }),
        ..Default::default()
    };
    let containers = client
        .runtime
        .list_containers(cri::ListContainersRequest { filter: Some(running) })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(containers.len(), 200);

    // Removed by ten clients too.
    let mut tasks = Vec::new();
    for chunk in pods.chunks(10) {
        let mut client = client.clone();
        let ids: Vec<String> = chunk.iter().map(|p| p.id.clone()).collect();
        tasks.push(tokio::spawn(async move {
            for id in ids {
                client
                    .runtime
                    .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() })
                    .await
                    .unwrap();
                client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(leftovers(&node), clean);
}

#[tokio::test]
async fn daemon_killed_during_lifecycle_calls_recovers_without_leaks() {
    let node = node("stress-kill");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let clean = leftovers(&node);

    // Each round: many creations and removals in flight, then SIGKILL at a different moment.
    for (round, kill_after_ms) in [150u64, 400, 900].into_iter().enumerate() {
        let survivor =
            pod_with_two_containers(&mut client, &image, &format!("survivor-{round}"), round % 2 == 1).await.unwrap();
        let mut tasks = Vec::new();
        for worker in 0..6 {
            let mut client = client.clone();
            let image = image.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..5 {
                    let name = format!("r{round}-w{worker}-{i}");
                    // Half the pods share a PID namespace: their init unit must not leak either.
                    match pod_with_two_containers(&mut client, &image, &name, worker % 2 == 1).await {
                        Ok(pod) if i % 2 == 0 => {
                            let _ = client
                                .runtime
                                .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod })
                                .await;
                        }
                        Ok(_) => {}
                        Err(_) => return, // the daemon is gone
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        node.sh("systemctl kill -s KILL cri-systemd");
        for task in tasks {
            task.await.unwrap();
        }
        // Recovery after a kill in the middle of dozens of calls can take a while on a loaded
        // 2-core machine; systemd itself allows a start 90 s.
        let mut client_after = node.cri(Duration::from_secs(90)).await;

        // The survivor still runs, with its containers, untouched by the restart.
        let status = client_after
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: survivor.clone(), verbose: false })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
        let filter = cri::ContainerFilter { pod_sandbox_id: survivor.clone(), ..Default::default() };
        let containers = client_after
            .runtime
            .list_containers(cri::ListContainersRequest { filter: Some(filter) })
            .await
            .unwrap()
            .into_inner()
            .containers;
        assert_eq!(containers.len(), 2);
        assert!(containers.iter().all(|c| c.state == cri::ContainerState::ContainerRunning as i32), "{containers:?}");

        // Everything listed can be removed, and then nothing is left behind.
        remove_all_pods(&mut client_after).await;
        assert_eq!(leftovers(&node), clean, "after round {round}");
        client = client_after;
    }
}

/// What a daemon killed inside RunPodSandbox leaves when the kill comes after the pod's slice,
/// namespace pins and /dev/shm were made but before the record said so (the record says
/// `Creating`, nothing more): the next start finds them where they are always made, and the
/// slice by the pod id in its Description, and removes them all. (A CI run of the test above
/// left exactly this: the slice, the pod's run dir and three pins.)
#[tokio::test]
async fn a_pod_made_but_not_yet_recorded_when_the_daemon_died_is_rolled_back() {
    let node = node("stress-unrecorded");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let clean = leftovers(&node);
    // A pod with namespaces of its own, and a kubelet-style slice that was there before it.
    let kubelets_slice = "kubepods-besteffort-podkubelets.slice";
    e2e::start_kubelet_slice(&node, kubelets_slice);
    // (A PID namespace per container, as the kubelet asks: the pod has no init unit yet.)
    let own = run_pod_sandbox(&mut client, stress_pod("unrecorded").pid(cri::NamespaceMode::Container).build())
        .await
        .unwrap();
    let config = stress_pod("in-kubelets-slice").pid(cri::NamespaceMode::Container).build();
    let config = cri::PodSandboxConfig {
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/kubepods.slice/kubepods-besteffort.slice/{kubelets_slice}"),
            ..config.linux.clone().unwrap_or_default()
        }),
        ..config
    };
    let in_kubelets = run_pod_sandbox(&mut client, config).await.unwrap();
    let pins = node.sh(&format!("grep -c 'cri-systemd/pods/{own}' /proc/self/mountinfo || true"));
    assert_eq!(pins.trim(), "1", "the net pin");
    let pins = node
        .sh_in_pod_mounts(&format!("grep 'cri-systemd/pods/{own}' /proc/self/mountinfo | grep -vc '/ns/net ' || true"));
    assert_eq!(pins.trim(), "3", "ipc and uts pins and /dev/shm in the pod mount namespace");

    node.sh("systemctl stop cri-systemd");
    // Both records as they were before the pins were recorded.
    for pod in [&own, &in_kubelets] {
        let path = format!("/var/lib/cri-systemd/pods/{pod}/pod.json");
        let mut record: serde_json::Value = serde_json::from_str(&node.sh(&format!("cat {path}"))).unwrap();
        record["state"] = "Creating".into();
        record["owns_slice"] = false.into();
        record["namespaces"] = serde_json::json!({});
        record["shm"] = serde_json::Value::Null;
        record["init_unit"] = serde_json::Value::Null;
        node.write_file(&path, &record.to_string());
    }
    node.sh("systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    let pods = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap().into_inner();
    assert!(pods.items.is_empty(), "{:?}", pods.items);
    // The kubelet's slice is not the runtime's to stop; everything else is gone.
    assert_eq!(node.exec(&["systemctl", "is-active", kubelets_slice]).stdout.trim(), "active");
    node.sh(&format!("systemctl stop {kubelets_slice}"));
    assert_eq!(leftovers(&node), clean, "journal:\n{}", node.logs());
}

/// Containers that end by themselves, many at once: each one's exit code is exactly its own
/// (the kubelet decides restarts and Job success on it), whichever of systemd's events about
/// the end of the main process and of its cgroup comes first.
#[tokio::test]
async fn exit_codes_are_exact_when_many_containers_end_at_once() {
    let node = node("stress-exits");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..8 {
        let mut client = node.cri(ANSWER_TIMEOUT).await;
        let image = image.clone();
        clients.spawn(async move {
            let config = stress_pod(&format!("exits-{c}")).build();
            let pod = run_pod_sandbox(&mut client, config.clone()).await.unwrap();
            let mut expected = Vec::new();
            for n in 0..8 {
                let code = (c * 8 + n) % 5;
                // Half end at once, half after a moment and a child of their own.
                let script = if n % 2 == 0 {
                    format!("exit {code}")
                } else {
                    format!("busybox sleep 0.$((RANDOM % 5)) & wait; exit {code}")
                };
                let request = cri::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(cri::ContainerConfig {
                        metadata: Some(cri::ContainerMetadata { name: format!("c{n}"), attempt: 0 }),
                        image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
                        command: vec!["sh".into(), "-c".into(), script],
                        ..Default::default()
                    }),
                    sandbox_config: Some(config.clone()),
                };
                let id = client.runtime.create_container(request).await.unwrap().into_inner().container_id;
                client.runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }).await.unwrap();
                expected.push((id, code));
            }
            expected
        });
    }
    let mut expected = Vec::new();
    while let Some(joined) = clients.join_next().await {
        expected.extend(joined.unwrap());
    }
    let mut wrong = Vec::new();
    for (id, code) in &expected {
        let status = e2e::eventually(Duration::from_secs(60), "the container exits", || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let request = cri::ContainerStatusRequest { container_id: id, verbose: false };
                let status = client.runtime.container_status(request).await.unwrap().into_inner().status.unwrap();
                (status.state == cri::ContainerState::ContainerExited as i32).then_some(status)
            }
        })
        .await;
        if status.exit_code != *code || status.reason != if *code == 0 { "Completed" } else { "Error" } {
            wrong.push(format!("{id}: expected {code}, got {} ({})", status.exit_code, status.reason));
        }
    }
    assert!(wrong.is_empty(), "{} of {} exit codes wrong:\n{}", wrong.len(), expected.len(), wrong.join("\n"));
}
