//! Memory QoS, swap and pod-level resources on a node with cgroup v1 memory (the nspawn nodes
//! run hybrid cgroups): `unified` is refused there with a message naming the key (the kubelet
//! sends it only on cgroup v2), unknown keys are refused by name anywhere, a swap limit that
//! grants no swap beyond the memory limit (what the kubelet's NoSwap and critest send) is
//! accepted and reported, and UpdatePodSandboxResources resizes a slice of the pod's own and is
//! kept in the pod's record across a daemon kill. The v2 mapping to systemd properties is
//! checked by the unit tests of `runtime::memory_qos`.

use std::collections::HashMap;
use std::time::Duration;

use e2e::crisimple::{container_config, create, kubelet_pod, run_pod_sandbox, start, status};
use e2e::{CriClient, Node, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn resources(memory: i64, swap: i64, unified: &[(&str, &str)]) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        cpu_shares: 512,
        memory_limit_in_bytes: memory,
        memory_swap_limit_in_bytes: swap,
        unified: unified.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

async fn containers_of(client: &mut CriClient, pod: &str) -> usize {
    let filter = cri::ContainerFilter { pod_sandbox_id: pod.into(), ..Default::default() };
    let request = cri::ListContainersRequest { filter: Some(filter) };
    client.runtime.list_containers(request).await.unwrap().into_inner().containers.len()
}

fn slice_memory_limit(node: &Node, slice: &str) -> String {
    let cgroup = node.sh(&format!("systemctl show -p ControlGroup --value {slice}")).trim().to_string();
    node.sh(&format!("cat /sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes")).trim().to_string()
}

#[tokio::test]
async fn unified_swap_and_pod_resources_on_cgroup_v1() {
    let node = e2e::node_with_local_registry("qos", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "qos").await;
    let pod = run_pod_sandbox(&mut client, kubelet_pod("qos").build()).await.unwrap();
    let sleeper = |r: cri::LinuxContainerResources| {
        let mut config = container_config("c", &image, &["/bin/busybox", "sleep", "100000"]);
        config.linux = Some(cri::LinuxContainerConfig { resources: Some(r), ..Default::default() });
        config
    };

    // unified on cgroup v1: refused, naming the key; an unknown key: refused by name. Nothing made.
    let refused = create(&mut client, &pod, sleeper(resources(64 << 20, 0, &[("memory.high", "50000000")])))
        .await
        .expect_err("memory.high on cgroup v1");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("memory.high") && refused.message().contains("v1"), "{}", refused.message());
    let unknown = create(&mut client, &pod, sleeper(resources(64 << 20, 0, &[("cpu.weight", "100")])))
        .await
        .expect_err("an unknown unified key");
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(unknown.message().contains("\"cpu.weight\""), "{}", unknown.message());
    assert_eq!(containers_of(&mut client, &pod).await, 0);

    // Swap equal to the memory limit (no swap beyond it, critest's and the kubelet's NoSwap on v1).
    let id = create(&mut client, &pod, sleeper(resources(64 << 20, 64 << 20, &[]))).await.unwrap();
    start(&mut client, &id).await.unwrap();
    let reported = status(&mut client, &id).await.resources.unwrap().linux.unwrap();
    assert_eq!((reported.memory_limit_in_bytes, reported.memory_swap_limit_in_bytes), (64 << 20, 64 << 20));

    // An update granting swap on v1 and one below the memory limit: refused, nothing changed.
    for (swap, says) in [(128 << 20, "cgroup v1"), (32 << 20, "below memory_limit_in_bytes")] {
        let update = cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(resources(96 << 20, swap, &[])),
            ..Default::default()
        };
        let refused = client.runtime.update_container_resources(update).await.expect_err("swap update");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("memory_swap_limit_in_bytes") && refused.message().contains(says));
    }
    let unit = format!("cri-{id}.service");
    assert_eq!(slice_memory_limit(&node, &unit), (64u64 << 20).to_string());
    let reported = status(&mut client, &id).await.resources.unwrap().linux.unwrap();
    assert_eq!(reported.memory_swap_limit_in_bytes, 64 << 20);

    // UpdatePodSandboxResources: the pod's own slice gets the sum of resources and overhead.
    let slice = "kubepods-besteffort-podqos_0000_1111_2222_333344445555.slice";
    let request = |pod: &str, memory: i64, unified: &[(&str, &str)]| cri::UpdatePodSandboxResourcesRequest {
        pod_sandbox_id: pod.into(),
        resources: Some(resources(memory, 0, unified)),
        overhead: Some(cri::LinuxContainerResources { memory_limit_in_bytes: 16 << 20, ..Default::default() }),
    };
    client.runtime.update_pod_sandbox_resources(request(&pod, 256 << 20, &[])).await.unwrap();
    assert_eq!(slice_memory_limit(&node, slice), (272u64 << 20).to_string());
    // Bad input changes nothing; an unknown pod is NotFound.
    let refused = client
        .runtime
        .update_pod_sandbox_resources(request(&pod, 512 << 20, &[("memory.min", "1")]))
        .await
        .expect_err("unified on v1");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("memory.min"), "{}", refused.message());
    assert_eq!(slice_memory_limit(&node, slice), (272u64 << 20).to_string());
    let missing = client.runtime.update_pod_sandbox_resources(request("nosuchpod", 1 << 30, &[])).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Kept in the pod's record across a daemon kill.
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd; systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let record: serde_json::Value =
        serde_json::from_str(&node.sh(&format!("cat /var/lib/cri-systemd/pods/{pod}/pod.json"))).unwrap();
    assert_eq!(record["resources"]["resources"]["memory_limit_in_bytes"], 256 << 20, "{record}");
    assert_eq!(record["resources"]["overhead"]["memory_limit_in_bytes"], 16 << 20);
    let reported = status(&mut client, &id).await.resources.unwrap().linux.unwrap();
    assert_eq!(reported.memory_swap_limit_in_bytes, 64 << 20);
}
