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
    text.lines()
        .filter_map(|l| l.rsplit_once("count ").and_then(|(_, n)| n.trim().parse().ok()))
        .next_back()
        .unwrap_or(0)
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

    // A pod with a user namespace: checkpointed (CRIU dumps the user namespace too), but a restore
    // into such a pod is refused, saying why, and leaves no container.
    let userns_pod =
        run_pod_sandbox(&mut client, e2e::crisimple::userns_pod_config("userns")).await.expect("RunPodSandbox");
    let in_userns =
        create(&mut client, &userns_pod, container_config("c", &image, &["sh", "-c", COUNTER])).await.unwrap();
    start(&mut client, &in_userns).await.expect("StartContainer");
    checkpoint(&mut client, &in_userns, "/var/tmp/userns.tar").await.expect("CheckpointContainer in a userns pod");
    node.sh("tar -tf /var/tmp/userns.tar checkpoint/inventory.img config.dump");
    let mut config = container_config("r", "/var/tmp/userns.tar", &["sh"]);
    config.log_path = String::new();
    let refused = create(&mut client, &userns_pod, config).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("user namespace"), "{refused:?}");

    // A file that is not a checkpoint archive, in place of an image: InvalidArgument naming it.
    node.sh("echo not-a-tar > /var/tmp/junk.tar");
    let pod = run_pod_sandbox(&mut client, pod("junk")).await.expect("RunPodSandbox");
    let junk = create(&mut client, &pod, container_config("c", "/var/tmp/junk.tar", &["sh"])).await.unwrap_err();
    assert_eq!(junk.code(), tonic::Code::InvalidArgument, "{junk:?}");
    assert!(junk.message().contains("image /var/tmp/junk.tar: not a checkpoint archive"), "{junk:?}");
    let listed = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.containers.len(), 2, "a container was left: {listed:?}");
}

#[tokio::test]
async fn a_container_created_from_the_archive_in_a_new_pod_continues_counting_with_its_files() {
    let node = e2e::node_with_local_registry("ckpt-rst", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "ckpt-rst").await;
    let (_pod, id, log) = run_counter(&mut client, "original", &image).await;
    eventually(ANSWER_TIMEOUT, "the counter to count", || async { (last_count(&node, &log) >= 5).then_some(()) }).await;
    checkpoint(&mut client, &id, "/var/tmp/original.tar").await.expect("CheckpointContainer");
    let stop = cri::StopContainerRequest { container_id: id.clone(), timeout: 0 };
    client.runtime.stop_container(stop).await.expect("StopContainer");
    let stopped_at = last_count(&node, &log);

    let dir = "/var/log/pods/e2e_restored";
    let pod = run_pod_sandbox(&mut client, pod("restored").log_directory(dir)).await.expect("RunPodSandbox");
    // As the kubelet and crictl pass it: the archive's path in place of the image.
    let mut config = container_config("counter", "/var/tmp/original.tar", &["never", "run"]);
    config.log_path = "counter/0.log".into();
    let restored = create(&mut client, &pod, config).await.expect("CreateContainer from the archive");
    // What StartContainer restores is on disk: a daemon killed in between still restores it.
    node.sh("systemctl kill -s KILL cri-systemd; systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    if let Err(e) = start(&mut client, &restored).await {
        let restore_log =
            node.exec(&["sh", "-c", "grep -h Error /var/lib/cri-systemd/containers/*/restore/restore.log"]);
        panic!("StartContainer (restore) failed: {e:?}\nrestore.log errors:\n{}\n{}", restore_log.stdout, node.logs());
    }
    let new_log = format!("{dir}/counter/0.log");
    eventually(ANSWER_TIMEOUT, "the restored counter to count", || async {
        (last_count(&node, &new_log) >= 3).then_some(())
    })
    .await;
    let text = node.exec(&["cat", &new_log]).stdout;
    let first = text.lines().find_map(|l| l.rsplit_once("count ").and_then(|(_, n)| n.trim().parse::<u64>().ok()));
    let first = first.expect("a count in the restored log");
    // It goes on from the checkpoint (taken before the stop), not from 1.
    assert!(
        first > 3 && first <= stopped_at + 1,
        "the restored counter starts at {first} (stopped at {stopped_at}):\n{text}"
    );
    let status = e2e::crisimple::status(&mut client, &restored).await;
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    assert_eq!(status.image.map(|i| i.image).unwrap_or_default(), image);
    // The file it wrote in its writable layer before the checkpoint is there, and goes on.
    let (code, out, _) = e2e::crisimple::sh(&mut client, &restored, "cat /count").await;
    assert_eq!(code, 0);
    assert!(out.trim().parse::<u64>().unwrap() >= first, "/count is {out:?}");

    // systemd supervises the restored tree as it does an entrypoint: stop, exit status, removal.
    let stop = cri::StopContainerRequest { container_id: restored.clone(), timeout: 5 };
    client.runtime.stop_container(stop).await.expect("StopContainer of the restored container");
    let status = e2e::crisimple::status(&mut client, &restored).await;
    assert_eq!(status.state, cri::ContainerState::ContainerExited as i32, "{status:?}");
    let remove = cri::RemoveContainerRequest { container_id: restored.clone() };
    client.runtime.remove_container(remove).await.expect("RemoveContainer of the restored container");
    let gone = node.exec(&["test", "-e", &format!("/var/lib/cri-systemd/containers/{restored}")]);
    assert_eq!(gone.status.code(), Some(1), "the restored container's directory is left");
}
