//! Metrics through the CRI (ListMetricDescriptors, ListPodSandboxMetrics) and the extras of the
//! stats RPCs (process counts, I/O, pressure, swap), from a daemon in a node with a bridge
//! network, a real busybox image and a running container; and after the daemon is killed and
//! restarted.

use std::collections::HashMap;
use std::time::Duration;

use e2e::crisimple::{container_config, create, kubelet_pod, run_pod_sandbox, sh, start, status};
use e2e::{CriClient, Node, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The names critest 1.36's metrics spec expects, less the ones it lets runtimes leave out
/// (`unimplementedMetricDescriptors`); those we report when the node has them.
const EXPECTED: &[&str] = &[
    "container_blkio_device_usage_total",
    "container_cpu_cfs_periods_total",
    "container_cpu_cfs_throttled_periods_total",
    "container_cpu_cfs_throttled_seconds_total",
    "container_cpu_system_seconds_total",
    "container_cpu_usage_seconds_total",
    "container_cpu_user_seconds_total",
    "container_file_descriptors",
    "container_fs_inodes_free",
    "container_fs_inodes_total",
    "container_fs_limit_bytes",
    "container_fs_reads_bytes_total",
    "container_fs_reads_total",
    "container_fs_usage_bytes",
    "container_fs_writes_bytes_total",
    "container_fs_writes_total",
    "container_last_seen",
    "container_memory_cache",
    "container_memory_failcnt",
    "container_memory_failures_total",
    "container_memory_kernel_usage",
    "container_memory_mapped_file",
    "container_memory_max_usage_bytes",
    "container_memory_rss",
    "container_memory_swap",
    "container_memory_usage_bytes",
    "container_memory_working_set_bytes",
    "container_network_receive_bytes_total",
    "container_network_receive_errors_total",
    "container_network_receive_packets_dropped_total",
    "container_network_receive_packets_total",
    "container_network_transmit_bytes_total",
    "container_network_transmit_errors_total",
    "container_network_transmit_packets_dropped_total",
    "container_network_transmit_packets_total",
    "container_oom_events_total",
    "container_processes",
    "container_sockets",
    "container_spec_cpu_period",
    "container_spec_cpu_shares",
    "container_spec_memory_limit_bytes",
    "container_spec_memory_swap_limit_bytes",
    "container_start_time_seconds",
    "container_threads",
    "container_threads_max",
];

/// Metrics by name: label values by label key, and the value.
type Found = HashMap<String, Vec<(HashMap<String, String>, u64)>>;

async fn pod_metrics(client: &mut CriClient, descriptors: &[cri::MetricDescriptor], pod: &str) -> Found {
    let answer = client
        .runtime
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .expect("ListPodSandboxMetrics")
        .into_inner();
    let pod_metrics = answer.pod_metrics.into_iter().find(|p| p.pod_sandbox_id == pod).expect("the pod's metrics");
    let mut found = Found::new();
    let all = pod_metrics.metrics.iter().chain(pod_metrics.container_metrics.iter().flat_map(|c| c.metrics.iter()));
    for metric in all {
        let descriptor = descriptors.iter().find(|d| d.name == metric.name).unwrap_or_else(|| {
            panic!("metric {} has no descriptor", metric.name);
        });
        assert_eq!(
            metric.label_values.len(),
            descriptor.label_keys.len(),
            "{}: label values {:?} for keys {:?}",
            metric.name,
            metric.label_values,
            descriptor.label_keys
        );
        let labels = descriptor.label_keys.iter().cloned().zip(metric.label_values.iter().cloned()).collect();
        found.entry(metric.name.clone()).or_default().push((labels, metric.value.as_ref().map_or(0, |v| v.value)));
    }
    found
}

/// The value of `name` for the container (label `container` = `container`).
fn value(found: &Found, name: &str, container: &str) -> u64 {
    found
        .get(name)
        .and_then(|samples| samples.iter().find(|(labels, _)| labels["container"] == container))
        .unwrap_or_else(|| panic!("no {name} for container {container:?}"))
        .1
}

#[tokio::test]
async fn metrics_and_stats_from_cgroups_and_the_pod_network() {
    let node: Node = e2e::node_with_local_registry("metrics", "");
    node.write_file(e2e::CNI_CONFLIST_PATH, e2e::CNI_CONFLIST);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "metrics").await;
    // A PID namespace per container, as the kubelet's pods: no pod-wide init among the processes.
    let pod = run_pod_sandbox(&mut client, kubelet_pod("metrics").build()).await.unwrap();
    let mut config =
        container_config("worker", &image, &["/bin/busybox", "sh", "-c", "sleep 100000 & exec sleep 100000"]);
    config.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 20_000,
            cpu_shares: 1024,
            memory_limit_in_bytes: 64 << 20,
            memory_swap_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &id).await.unwrap();
    let (code, _, err) = sh(&mut client, &id, "busybox dd if=/dev/zero of=/data bs=1M count=4 2>/dev/null; sync").await;
    assert_eq!(code, 0, "{err}");

    // Descriptors: every name critest expects, with help and the base labels.
    let descriptors = client
        .runtime
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await
        .expect("ListMetricDescriptors")
        .into_inner()
        .descriptors;
    for name in EXPECTED {
        let d = descriptors.iter().find(|d| d.name == *name).unwrap_or_else(|| panic!("no descriptor {name}"));
        assert!(!d.help.is_empty());
        assert_eq!(d.label_keys[..5], ["pod", "namespace", "container", "id", "image"], "{name}");
    }

    let found = pod_metrics(&mut client, &descriptors, &pod).await;
    let missing: Vec<&&str> = EXPECTED
        .iter()
        .filter(|n| !found.contains_key(**n))
        // Per-device I/O needs block devices the writes reach (the node's overlay may have none).
        .filter(|n| !n.starts_with("container_fs_reads") && !n.starts_with("container_fs_writes"))
        .filter(|n| **n != "container_blkio_device_usage_total")
        .collect();
    assert!(missing.is_empty(), "metrics missing: {missing:?}");
    // The container's values are its own: limits, processes, start time, writable layer.
    assert_eq!(value(&found, "container_spec_memory_limit_bytes", "worker"), 64 << 20);
    assert_eq!(value(&found, "container_spec_memory_swap_limit_bytes", "worker"), 64 << 20);
    assert_eq!(value(&found, "container_spec_cpu_shares", "worker"), 1024);
    assert_eq!(value(&found, "container_processes", "worker"), 2);
    assert!(value(&found, "container_threads", "worker") >= 2);
    assert!(value(&found, "container_file_descriptors", "worker") >= 2);
    assert!(value(&found, "container_memory_usage_bytes", "worker") > 0);
    assert!(value(&found, "container_fs_usage_bytes", "worker") >= 4 << 20);
    let started = status(&mut client, &id).await.started_at / 1_000_000_000;
    assert_eq!(value(&found, "container_start_time_seconds", "worker"), started as u64);
    let worker = &found["container_processes"].iter().find(|(l, _)| l["container"] == "worker").unwrap().0;
    assert_eq!(
        (worker["id"].as_str(), worker["pod"].as_str(), worker["image"].as_str()),
        (id.as_str(), "metrics", image.as_str())
    );
    // The pod's network: eth0 of its namespace, with the pod's labels (no container).
    let eth0 = found["container_network_receive_bytes_total"]
        .iter()
        .find(|(labels, _)| labels["interface"] == "eth0")
        .expect("eth0's counters");
    assert_eq!((eth0.0["container"].as_str(), eth0.0["id"].as_str()), ("", pod.as_str()));

    // PodSandboxStats: processes of the pod, I/O, and the container's swap.
    let stats = client
        .runtime
        .pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: pod.clone() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let linux = stats.linux.unwrap();
    assert_eq!(linux.process.unwrap().process_count.unwrap().value, 2);
    assert!(linux.io.is_some());
    let container = linux.containers.iter().find(|c| c.attributes.as_ref().unwrap().id == id).unwrap();
    assert!(container.swap.is_some() && container.io.is_some());

    // After a kill and restart the daemon reports the same pod and container from its records.
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd; systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let found = pod_metrics(&mut client, &descriptors, &pod).await;
    assert_eq!(value(&found, "container_processes", "worker"), 2);
    assert_eq!(value(&found, "container_spec_memory_limit_bytes", "worker"), 64 << 20);
}
