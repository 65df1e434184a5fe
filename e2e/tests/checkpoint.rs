//! Checkpoint and restore with CRIU: CheckpointContainer (the kubelet's checkpoint API and
//! `crictl checkpoint`) writes a checkpointctl-layout archive at `location` and leaves the
//! container running; a container created from such an archive continues where it was.

use std::time::Duration;

use e2e::crisimple::{container_config, create, pod, run_pod_sandbox, start};
use e2e::{CriClient, Node, cri, eventually};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The counter the checkpointed container runs: one line a step on stdout, and the last value
/// in /count (its writable layer).
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo count $i; echo $i > /count; sleep 0.2; done";

async fn checkpoint(client: &mut CriClient, id: &str, location: &str) -> Result<(), tonic::Status> {
    let request = cri::CheckpointContainerRequest { container_id: id.into(), location: location.into(), timeout: 60 };
    client.runtime.checkpoint_container(request).await.map(|_| ())
}

/// The counter's last value in its log (0 before the first line).
fn last_count(node: &Node, log: &str) -> u64 {
    let text = node.exec(&["cat", log]).stdout;
    text.lines().filter_map(|l| l.rsplit_once("count ").and_then(|(_, n)| n.trim().parse().ok())).last().unwrap_or(0)
}

/// Runs pod `name` with the counter in it; returns (pod, container, log path in the node).
async fn run_counter(client: &mut CriClient, name: &str, image: &str) -> (String, String, String) {
    let dir = format!("/var/log/pods/e2e_{name}");
    let pod = run_pod_sandbox(client, pod(name).log_directory(&dir)).await.expect("RunPodSandbox");
    let mut config = container_config("counter", image, &["sh", "-c", COUNTER]);
    config.log_path = "counter/0.log".into();
    let id = create(client, &pod, config).await.expect("CreateContainer");
    start(client, &id).await.expect("StartContainer");
    (pod, id, format!("{dir}/counter/0.log"))
}

#[tokio::test]
async fn a_counting_container_is_checkpointed_keeps_running_and_the_archive_has_the_checkpointctl_layout() {
    let node = e2e::node_with_local_registry("ckpt", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "ckpt").await;
    let (_pod, id, log) = run_counter(&mut client, "counted", &image).await;
    eventually(ANSWER_TIMEOUT, "the counter to count", || async { (last_count(&node, &log) >= 3).then_some(()) }).await;

    checkpoint(&mut client, &id, "/var/tmp/counter.tar").await.expect("CheckpointContainer");
    let before = last_count(&node, &log);
    eventually(ANSWER_TIMEOUT, "the counter to go on after the checkpoint", || async {
        (last_count(&node, &log) > before + 2).then_some(())
    })
    .await;
    let status = e2e::crisimple::status(&mut client, &id).await;
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);

    let listing = node.sh("tar -tf /var/tmp/counter.tar | sort");
    for entry in
        ["config.dump", "spec.dump", "status.dump", "rootfs-diff.tar", "checkpoint", "checkpoint/inventory.img"]
    {
        assert!(listing.lines().any(|l| l.trim_end_matches('/') == entry), "no {entry} in the archive:\n{listing}");
    }
    let config = node.sh("tar -xOf /var/tmp/counter.tar config.dump");
    let config: serde_json::Value = serde_json::from_str(&config).expect("config.dump is JSON");
    assert_eq!(config["id"], id.as_str());
    assert_eq!(config["name"], "counter");
    assert_eq!(config["rootfsImageName"], image.as_str());
    let diff = node.sh("tar -xOf /var/tmp/counter.tar rootfs-diff.tar | tar -t");
    assert!(diff.lines().any(|l| l.trim_start_matches("./") == "count"), "no /count in rootfs-diff.tar:\n{diff}");
}

#[tokio::test]
async fn checkpoint_refuses_unknown_and_stopped_containers_and_bad_locations_leaving_nothing() {
    let node = e2e::node_with_local_registry("ckpt-err", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "ckpt-err").await;
    let (_pod, id, log) = run_counter(&mut client, "refused", &image).await;
    eventually(ANSWER_TIMEOUT, "the counter to count", || async { (last_count(&node, &log) >= 1).then_some(()) }).await;

    let unknown = checkpoint(&mut client, "no-such-container", "/var/tmp/x.tar").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let relative = checkpoint(&mut client, &id, "x.tar").await.unwrap_err();
    assert_eq!(relative.code(), tonic::Code::InvalidArgument, "{relative:?}");
    assert!(relative.message().contains("location"), "{relative:?}");
    let unwritable = checkpoint(&mut client, &id, "/no/such/dir/x.tar").await.unwrap_err();
    assert_eq!(unwritable.code(), tonic::Code::InvalidArgument, "{unwritable:?}");
    assert!(unwritable.message().contains("location /no/such/dir/x.tar"), "{unwritable:?}");
    // Still running, untouched.
    let before = last_count(&node, &log);
    eventually(ANSWER_TIMEOUT, "the counter to go on", || async { (last_count(&node, &log) > before).then_some(()) })
        .await;

    let stop = cri::StopContainerRequest { container_id: id.clone(), timeout: 0 };
    client.runtime.stop_container(stop).await.expect("StopContainer");
    let stopped = checkpoint(&mut client, &id, "/var/tmp/stopped.tar").await.unwrap_err();
    assert_eq!(stopped.code(), tonic::Code::FailedPrecondition, "{stopped:?}");
    assert!(stopped.message().contains("only running containers"), "{stopped:?}");
    assert!(node.exec(&["test", "-e", "/var/tmp/stopped.tar"]).status.code() == Some(1), "an archive was left");
    assert!(node.exec(&["test", "-e", "/var/tmp/x.tar"]).status.code() == Some(1), "an archive was left");
}
