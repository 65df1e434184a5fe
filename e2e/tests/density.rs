//! Many pods on a node (issue 17): what the daemon does per call must not grow with the pods it
//! holds, and the density benchmark runs end to end.
//!
//! The kubelet asks for one pod's sandboxes and containers by its uid label
//! (`io.kubernetes.pod.uid`) at every status sync of that pod (87 of each in the recorded kubelet
//! 1.32 calls, `e2e/fixtures/kubelet-1.32/`): with N pods, a list that looks at every container's
//! exit record costs N file opens per pod and N² per sync of the node. The test counts the
//! daemon's opens of exit records (strace in the node) during such a list: only the listed
//! pod's containers may be looked at. No timing is asserted.

use std::collections::HashMap;
use std::time::Duration;

use e2e::crisimple::{container_config, pod, run_pod_sandbox, start};
use e2e::{CriClient, Node, cri};

const PODS: usize = 12;
const UID_LABEL: &str = "io.kubernetes.pod.uid";

/// Pod `i` as the kubelet labels it, and its uid.
fn kubelet_labelled_pod(i: usize) -> (cri::PodSandboxConfig, String) {
    let uid = format!("density-{i:02}-0000-1111-2222-333344445555");
    let mut config = pod(&format!("density-{i}")).uid(&uid).hostname("").build();
    config.labels = HashMap::from([(UID_LABEL.into(), uid.clone())]);
    (config, uid)
}

async fn pods_with_a_sleeping_container(client: &mut CriClient, image: &str) -> Vec<String> {
    let mut uids = Vec::new();
    for i in 0..PODS {
        let (config, uid) = kubelet_labelled_pod(i);
        let pod = run_pod_sandbox(client, config.clone()).await.expect("RunPodSandbox");
        let mut container = container_config("sleep", image, &["/bin/busybox", "sleep", "100000"]);
        container.labels.insert(UID_LABEL.into(), uid.clone());
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container),
            sandbox_config: Some(config),
        };
        let id = client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id;
        start(client, &id).await.expect("StartContainer");
        uids.push(uid);
    }
    uids
}

/// The daemon's main PID in the node.
fn daemon_pid(node: &Node) -> String {
    node.sh("systemctl show -p MainPID --value cri-systemd").trim().to_owned()
}

/// Runs strace on the daemon around `work`, returns the paths it opened.
async fn opens_during<F: Future<Output = ()>>(node: &Node, work: F) -> Vec<String> {
    let pid = daemon_pid(node);
    let out = "/run/density-strace.out";
    node.sh(&format!(
        "rm -f {out}; systemd-run --quiet --unit=density-strace strace -f -qq -e trace=open,openat -o {out} -p {pid}"
    ));
    // strace attaches to every thread; its first line says it has. Wait for the attach.
    // strace stops each of the daemon's threads to attach: wait until it is the tracer of all.
    e2e::eventually(Duration::from_secs(20), "strace attached to the daemon", || async {
        let tracers = node.exec(&["sh", "-c", &format!("grep -h TracerPid /proc/{pid}/task/*/status")]).stdout;
        (!tracers.is_empty() && tracers.lines().all(|l| !l.ends_with("\t0"))).then_some(())
    })
    .await;
    work.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.sh("systemctl stop density-strace");
    let text = node.sh(&format!("cat {out}"));
    text.lines().filter_map(|l| l.split('"').nth(1).map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_by_pod_uid_looks_only_at_that_pods_records() {
    let node = e2e::node_with_local_registry("density-lists", "");
    let mut client = node.cri(Duration::from_secs(30)).await;
    let image = e2e::pull_busybox(&node, &mut client, "density").await;
    let uids = pods_with_a_sleeping_container(&mut client, &image).await;
    let selector = HashMap::from([(UID_LABEL.to_string(), uids[3].clone())]);

    let mut listed = (0, 0);
    let opened = opens_during(&node, async {
        let filter = cri::ContainerFilter { label_selector: selector.clone(), ..Default::default() };
        let request = cri::ListContainersRequest { filter: Some(filter) };
        listed.0 = client.runtime.list_containers(request).await.expect("ListContainers").into_inner().containers.len();
        let filter = cri::PodSandboxFilter { label_selector: selector.clone(), ..Default::default() };
        let request = cri::ListPodSandboxRequest { filter: Some(filter) };
        listed.1 = client.runtime.list_pod_sandbox(request).await.expect("ListPodSandbox").into_inner().items.len();
    })
    .await;
    assert_eq!(listed, (1, 1), "one container and one pod carry uid {}", uids[3]);
    let exit_records: Vec<&String> = opened.iter().filter(|p| p.ends_with("/exit.json")).collect();
    assert!(
        exit_records.len() <= 1,
        "a list of one pod's containers ({PODS} pods running) opened {} exit records: {exit_records:#?}",
        exit_records.len()
    );
    // And the lists still see a container that ended: its record is read when it is listed.
    let filter = cri::ContainerFilter { label_selector: selector.clone(), ..Default::default() };
    let id = client
        .runtime
        .list_containers(cri::ListContainersRequest { filter: Some(filter.clone()) })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers[0]
        .id
        .clone();
    node.sh(&format!("systemctl kill --signal=KILL cri-{id}.service"));
    let runtime = client.runtime.clone();
    e2e::eventually(Duration::from_secs(20), "the killed container listed as exited", || {
        let (mut runtime, filter) = (runtime.clone(), filter.clone());
        async move {
            let list = runtime.list_containers(cri::ListContainersRequest { filter: Some(filter) }).await.ok()?;
            (list.into_inner().containers.first()?.state == cri::ContainerState::ContainerExited as i32).then_some(())
        }
    })
    .await;
}

/// `bench density` on cri-systemd alone (a debug build: the numbers mean nothing here), two
/// steps: the table's rows and the plot are there. The bench boots its own node.
#[test]
fn the_density_benchmark_runs_end_to_end() {
    e2e::require_machine(&["systemd-nspawn", "docker-registry"]);
    let plot = std::env::temp_dir().join(format!("density-e2e-{}.png", std::process::id()));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["density", "--only", "cri-systemd", "--pods", "4", "--steps", "2", "--sample", "2", "--execs", "2"])
        .arg("--plot")
        .arg(&plot)
        .env("BENCH_ALLOW_DEBUG", "1")
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench density failed ({}):\n{stdout}\n{stderr}", output.status);
    for row in [
        "RunPodSandbox",
        "Create+StartContainer",
        "ExecSync",
        "StopPodSandbox+Remove",
        "node memory per pod",
        "systemd (PID 1) RSS",
        "floor: bare systemd-run",
        "pod + container p50 / floor p50",
        "load average",
    ] {
        assert!(stdout.contains(row), "no {row:?} row in:\n{stdout}");
    }
    assert!(stdout.contains("cri-systemd @2") && stdout.contains("cri-systemd @4"), "steps 2 and 4:\n{stdout}");
    let png = std::fs::read(&plot).expect("the plot");
    let _ = std::fs::remove_file(&plot);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
}
