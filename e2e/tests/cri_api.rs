//! What cri-api 1.36 added over 1.32 (proto/README.md has the table), through the real gRPC path to
//! a daemon in a throwaway node: the streaming list RPCs answer what the List RPCs answer, the RPCs
//! 1.36 added answer, and new request fields it cannot honour are InvalidArgument naming the field.

use std::time::Duration;

use e2e::crisimple::{container_config, create, pod_of};
use e2e::{CriClient, cri, node_with_local_registry, sleeping_container};
use tonic::Code;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Every message of a server stream, in order.
async fn all<T>(stream: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>) -> Result<Vec<T>, tonic::Status> {
    let mut stream = stream?.into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.message().await? {
        messages.push(message);
    }
    Ok(messages)
}

async fn streams_match_lists(client: &mut CriClient) {
    let runtime = &mut client.runtime;
    let listed: Vec<String> = runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect();
    let streamed = all(runtime.stream_pod_sandboxes(cri::StreamPodSandboxesRequest::default()).await).await.unwrap();
    assert!(streamed.iter().all(|m| !m.pod_sandboxes.is_empty()), "no empty message: {streamed:?}");
    let streamed: Vec<String> = streamed.into_iter().flat_map(|m| m.pod_sandboxes).map(|p| p.id).collect();
    assert_eq!(streamed, listed);
    assert!(!listed.is_empty());

    let listed: Vec<String> = runtime
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    let streamed: Vec<String> = all(runtime.stream_containers(cri::StreamContainersRequest::default()).await)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|m| m.containers)
        .map(|c| c.id)
        .collect();
    assert_eq!(streamed, listed);

    let listed: Vec<String> = runtime
        .list_container_stats(cri::ListContainerStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .into_iter()
        .map(|s| s.attributes.unwrap().id)
        .collect();
    let streamed: Vec<String> = all(runtime.stream_container_stats(cri::StreamContainerStatsRequest::default()).await)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|m| m.container_stats)
        .map(|s| s.attributes.unwrap().id)
        .collect();
    assert_eq!(streamed, listed);

    let listed: Vec<String> = runtime
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .into_iter()
        .map(|s| s.attributes.unwrap().id)
        .collect();
    let streamed: Vec<String> =
        all(runtime.stream_pod_sandbox_stats(cri::StreamPodSandboxStatsRequest::default()).await)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|m| m.pod_sandbox_stats)
            .map(|s| s.attributes.unwrap().id)
            .collect();
    assert_eq!(streamed, listed);

    let listed: Vec<String> = client
        .image
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.id)
        .collect();
    let streamed: Vec<String> = all(client.image.stream_images(cri::StreamImagesRequest::default()).await)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|m| m.images)
        .map(|i| i.id)
        .collect();
    assert_eq!(streamed, listed);
    assert!(!listed.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_api_1_36_rpcs_and_fields() {
    let node = node_with_local_registry("cri-api-136", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let sleeper = sleeping_container(&node, &mut client, "cri-api-136").await;
    let pod = pod_of(&mut client, &sleeper).await;

    streams_match_lists(&mut client).await;

    // The RPCs 1.36 added: UpdatePodSandboxResources (e2e/tests/resources_qos.rs has its effect)
    // and StreamPodSandboxMetrics, which answers what ListPodSandboxMetrics answers.
    let request = cri::UpdatePodSandboxResourcesRequest { pod_sandbox_id: pod.clone(), ..Default::default() };
    client.runtime.update_pod_sandbox_resources(request).await.expect("UpdatePodSandboxResources");
    let request = cri::UpdatePodSandboxResourcesRequest { pod_sandbox_id: "no-such-pod".into(), ..Default::default() };
    let refused = client.runtime.update_pod_sandbox_resources(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    let listed: Vec<String> = client
        .runtime
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pod_metrics
        .into_iter()
        .map(|m| m.pod_sandbox_id)
        .collect();
    let streamed: Vec<String> =
        all(client.runtime.stream_pod_sandbox_metrics(cri::StreamPodSandboxMetricsRequest {}).await)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|m| m.pod_sandbox_metrics)
            .map(|m| m.pod_sandbox_id)
            .collect();
    assert_eq!(streamed, listed);
    assert!(listed.contains(&pod), "{listed:?}");

    // New request fields that cannot be honoured: InvalidArgument naming them, nothing created.
    let image = client
        .runtime
        .container_status(cri::ContainerStatusRequest { container_id: sleeper.clone(), verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .image
        .unwrap()
        .image;
    let before = client
        .runtime
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers
        .len();
    let mut config = container_config("stop-signal", &image, &["/bin/busybox", "sleep", "1"]);
    // (a known stop_signal is honoured: container_features.rs)
    config.stop_signal = 999;
    let refused = create(&mut client, &pod, config).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("stop_signal 999"), "{refused:?}");
    let mut config = container_config("env-bytes", &image, &["/bin/busybox", "sleep", "1"]);
    config.envs = vec![cri::KeyValue { key: "BINARY".into(), value: vec![0xff, 0xfe] }];
    let refused = create(&mut client, &pod, config).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("envs") && refused.message().contains("BINARY"), "{refused:?}");
    let after = client
        .runtime
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers
        .len();
    assert_eq!(after, before, "a refused CreateContainer created nothing");

    // A UTF-8 value (bytes on the wire since 1.36.2) still reaches the container.
    let mut config = container_config("env-text", &image, &["/bin/busybox", "sleep", "100000"]);
    config.envs = vec![cri::KeyValue { key: "TEXT".into(), value: "grüße".as_bytes().to_vec() }];
    let id = create(&mut client, &pod, config).await.expect("CreateContainer with a UTF-8 env value");
    e2e::crisimple::start(&mut client, &id).await.expect("StartContainer");
    let out = e2e::crisimple::exec_sync(&mut client, &id, &["/bin/busybox", "sh", "-c", "echo \"$TEXT\""])
        .await
        .expect("ExecSync");
    assert_eq!((out.exit_code, String::from_utf8_lossy(&out.stdout).trim()), (0, "grüße"));
}

/// Status(verbose) names the runtime's directories with containerd's keys, as clients expect:
/// critest's user-namespace specs probe idmapped-mount support on the parent of `stateDir`, and
/// skip when that probe lands on a filesystem the runtime does not use.
#[tokio::test(flavor = "multi_thread")]
async fn verbose_status_names_the_state_dir_as_containerd_does() {
    let node = e2e::Node::up("cri-api-statedir", e2e::NodeOptions::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let status = client.runtime.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let config: serde_json::Value = serde_json::from_str(&status.info["config"]).expect("config is JSON");
    assert_eq!(config["rootDir"], "/var/lib/cri-systemd", "{config}");
    assert_eq!(config["stateDir"], "/var/lib/cri-systemd/containers", "{config}");
    // The containers' dir exists and is where their rootfs mounts are made.
    assert!(node.exec(&["test", "-d", "/var/lib/cri-systemd/containers"]).success());
}
