//! A record that cannot be read is set aside, never deleted (issue 11, item 5): startup recovery
//! moves it to `<state_root>/quarantine/`, says why in the journal and in Status' verbose info,
//! and leaves the pod's containers running.

use std::time::Duration;

use e2e::{cri, crisimple, node_with_local_registry, pull_busybox, sleeping_container};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn torn_pod_record_is_quarantined_and_its_container_keeps_running() {
    let node = node_with_local_registry("quarantine", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let container = sleeping_container(&node, &mut client, "torn").await;
    let pod = crisimple::status(&mut client, &container).await;
    let pod_id = e2e::crisimple::pod_of(&mut client, &container).await;
    assert_eq!(pod.state, cri::ContainerState::ContainerRunning as i32);
    let unit = format!("cri-{container}.service");

    // A second pod whose container's record will be torn.
    let image = client
        .runtime
        .container_status(cri::ContainerStatusRequest { container_id: container.clone(), verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .image_ref;
    let other_pod = crisimple::run_pod(&mut client, "torn-container").await;
    let config = crisimple::container_config("sleeper", &image, &["/bin/busybox", "sleep", "100000"]);
    let torn_container = crisimple::create(&mut client, &other_pod, config).await.expect("CreateContainer");
    crisimple::start(&mut client, &torn_container).await.expect("StartContainer");
    let torn_unit = format!("cri-{torn_container}.service");

    // Torn records, as a disk that lost the end of a write leaves them.
    let record = format!("/var/lib/cri-systemd/pods/{pod_id}/pod.json");
    node.sh(&format!("truncate -s 100 {record}"));
    let torn = node.sh(&format!("sha256sum < {record}"));
    let container_record = format!("/var/lib/cri-systemd/containers/{torn_container}/container.json");
    node.sh(&format!("truncate -s 0 {container_record}"));
    node.sh("systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    // The daemon answers, and did not stop the pod's container.
    assert_eq!(node.exec(&["systemctl", "is-active", &unit]).stdout.trim(), "active", "{}", node.logs());
    assert_eq!(node.exec(&["systemctl", "is-active", &torn_unit]).stdout.trim(), "active");
    node.sh(&format!("test -e /var/lib/cri-systemd/quarantine/container-{torn_container}-*/container.json"));
    // The record is set aside, byte for byte, not deleted.
    let moved = node.sh(&format!("ls -d /var/lib/cri-systemd/quarantine/pod-{pod_id}-*"));
    let moved = moved.trim();
    assert!(!moved.is_empty(), "no quarantined pod dir; journal:\n{}", node.logs());
    assert_eq!(node.sh(&format!("sha256sum < {moved}/pod.json")), torn);
    assert!(node.exec(&["test", "-e", &format!("/var/lib/cri-systemd/pods/{pod_id}")]).status.code() == Some(1));
    // The reason is in the journal and in Status' verbose info.
    let logs = node.logs();
    assert!(logs.contains("quarantine") && logs.contains(&pod_id), "journal:\n{logs}");
    let status = client.runtime.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let info = status.info.get("quarantine").expect("Status verbose info has `quarantine`");
    assert!(info.contains(&pod_id) && info.contains("pod.json"), "quarantine info: {info}");
    assert!(info.contains(&torn_container) && info.contains("container.json"), "quarantine info: {info}");
    // The torn container is unknown to the daemon now (its record is gone from its view), its pod
    // is not: nothing of it was stopped.
    let pods = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap().into_inner();
    assert!(pods.items.iter().any(|p| p.id == other_pod));

    // Other calls work: the container is still known and running, a new pod runs.
    let again = crisimple::status(&mut client, &container).await;
    assert_eq!(again.state, cri::ContainerState::ContainerRunning as i32);
    let other = crisimple::run_pod(&mut client, "after-quarantine").await;
    let pods = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap().into_inner();
    assert!(pods.items.iter().any(|p| p.id == other));
    assert!(!pods.items.iter().any(|p| p.id == pod_id));

    // A second restart keeps reporting it (the quarantine dir is the record of it).
    node.sh("systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let status = client.runtime.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    assert!(status.info.get("quarantine").is_some_and(|i| i.contains(&pod_id)));
    assert_eq!(node.exec(&["systemctl", "is-active", &unit]).stdout.trim(), "active");
}

/// The first host id and length of a pod's user namespace, as PodSandboxStatus reports it.
async fn userns_range(client: &mut e2e::CriClient, pod: &str) -> (u32, u32) {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: false };
    let status = client.runtime.pod_sandbox_status(request).await.expect("PodSandboxStatus").into_inner();
    let options = status.status.unwrap().linux.unwrap().namespaces.unwrap().options.unwrap();
    let uids = options.userns_options.expect("userns_options in the status").uids;
    let [cri::IdMapping { container_id: 0, host_id, length }] = uids[..] else {
        panic!("one mapping expected: {uids:?}")
    };
    (host_id, length)
}

/// Checks that `unit`'s main process runs in the pod's range, tears the pod's record, restarts the
/// daemon, and checks that the pod went to quarantine while `unit` kept running.
async fn quarantine_pod_running_in_its_range(
    node: &e2e::Node,
    torn: &str,
    unit: &str,
    (host_id, length): (u32, u32),
) -> e2e::CriClient {
    let pid = node.sh(&format!("systemctl show -p MainPID --value {unit}"));
    let uid_map = node.sh(&format!("cat /proc/{}/uid_map", pid.trim()));
    assert!(uid_map.split_whitespace().eq(["0", &host_id.to_string(), &length.to_string()]), "{uid_map}");

    node.sh(&format!("truncate -s 100 /var/lib/cri-systemd/pods/{torn}/pod.json"));
    node.sh("systemctl restart cri-systemd");
    let client = node.cri(ANSWER_TIMEOUT).await;
    node.sh(&format!("test -e /var/lib/cri-systemd/quarantine/pod-{torn}-*/pod.json"));
    assert_eq!(node.exec(&["systemctl", "is-active", unit]).stdout.trim(), "active");
    client
}

/// A quarantined pod's user-namespace range stays reserved: its container keeps running in that
/// range, so a new pod in a user namespace of its own must not get the same host ids (the
/// allocator starts again from the first range after a restart).
#[tokio::test(flavor = "multi_thread")]
async fn quarantined_pods_userns_range_stays_reserved() {
    let node = node_with_local_registry("quarantine-userns", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client, "quarantine-userns").await;
    let torn = crisimple::run_pod_sandbox(&mut client, crisimple::userns_pod_config("torn-userns"))
        .await
        .expect("RunPodSandbox");
    let (host_id, length) = userns_range(&mut client, &torn).await;
    let config = crisimple::container_config("sleeper", &image, &["/bin/busybox", "sleep", "100000"]);
    let container = crisimple::create(&mut client, &torn, config).await.expect("CreateContainer");
    crisimple::start(&mut client, &container).await.expect("StartContainer");
    let unit = format!("cri-{container}.service");
    let mut client = quarantine_pod_running_in_its_range(&node, &torn, &unit, (host_id, length)).await;

    // And again after a second restart, which finds the pod already in quarantine.
    for (round, name) in [(1, "after-userns"), (2, "after-second-restart")] {
        if round == 2 {
            node.sh("systemctl restart cri-systemd");
            client = node.cri(ANSWER_TIMEOUT).await;
        }
        let new =
            crisimple::run_pod_sandbox(&mut client, crisimple::userns_pod_config(name)).await.expect("RunPodSandbox");
        let (new_host_id, new_length) = userns_range(&mut client, &new).await;
        let disjoint = u64::from(new_host_id) + u64::from(new_length) <= u64::from(host_id)
            || u64::from(host_id) + u64::from(length) <= u64::from(new_host_id);
        assert!(
            disjoint,
            "restart {round}: the new pod got host ids {new_host_id}+{new_length}, over the quarantined pod's \
             {host_id}+{length}, in which its container still runs"
        );
    }
}

/// The same for a quarantined pod with no container but a process of its own: the init of a pod
/// that shares one PID namespace runs in the pod's user namespace, so its range stays reserved.
#[tokio::test(flavor = "multi_thread")]
async fn quarantined_pods_init_keeps_its_userns_range_reserved() {
    let node = e2e::Node::up("quarantine-podinit", Default::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let shared = crisimple::kubelet_pod("torn-podinit")
        .pid(cri::NamespaceMode::Pod)
        .userns(cri::NamespaceMode::Pod, None)
        .build();
    let torn = crisimple::run_pod_sandbox(&mut client, shared).await.expect("RunPodSandbox");
    let (host_id, length) = userns_range(&mut client, &torn).await;
    let unit = format!("cri-pod-{torn}.service");
    let mut client = quarantine_pod_running_in_its_range(&node, &torn, &unit, (host_id, length)).await;
    let new = crisimple::run_pod_sandbox(&mut client, crisimple::userns_pod_config("after-podinit"))
        .await
        .expect("RunPodSandbox");
    let (new_host_id, new_length) = userns_range(&mut client, &new).await;
    let disjoint = u64::from(new_host_id) + u64::from(new_length) <= u64::from(host_id)
        || u64::from(host_id) + u64::from(length) <= u64::from(new_host_id);
    assert!(
        disjoint,
        "the new pod got host ids {new_host_id}+{new_length}, over the quarantined pod's {host_id}+{length}, \
         in which its init still runs"
    );
}
