//! A record that cannot be read is set aside, never deleted (issue 11, item 5): startup recovery
//! moves it to `<state_root>/quarantine/`, says why in the journal and in Status' verbose info,
//! and leaves the pod's containers running.

use std::time::Duration;

use e2e::{cri, crisimple, node_with_local_registry, sleeping_container};

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
