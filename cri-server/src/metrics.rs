//! ListMetricDescriptors and ListPodSandboxMetrics: cadvisor's container metrics, read from the
//! pods' and containers' cgroups (`runtime::cgroup_detail`) and the pods' network namespaces.
//!
//! The kubelet with `PodAndContainerStatsFromCRI` serves these on /metrics/cadvisor in place of
//! cadvisor's: it turns each descriptor into a Prometheus description (name, help, label keys)
//! and each metric into a sample of it (`pkg/kubelet/metrics/collectors/cri_metrics.go`), so a
//! metric must carry one value per label key of its descriptor. Names, help and labels are
//! cadvisor's as containerd gives them: `pod`, `namespace`, `container`, `id`, `image`, then
//! `interface` for network metrics, `device` for file system and I/O ones (and `major`, `minor`,
//! `operation` for `container_blkio_device_usage_total`; `failure_type`, `scope` for
//! `container_memory_failures_total`). Values are integers (the CRI's UInt64Value): seconds are
//! whole seconds, as containerd's.
//!
//! A pod's own metrics (container label empty, id the pod's) are its network counters, per
//! interface but loopback, and its slice's CPU, memory and processes; each running container
//! has the rest. A value the node does not have (no PSI, no swap accounting, no per-device I/O)
//! is left out rather than reported as zero.

use proto::cri;
use runtime::cgroup_detail::{CgroupDetail, FsInfo, Pressure};
use runtime::{Container, ContainerFilter, ContainerState, Pod, PodState};

use crate::node::{Node, now_nanos};

const BASE: &[&str] = &["pod", "namespace", "container", "id", "image"];

/// What a descriptor's labels are beyond the base ones.
#[derive(Clone, Copy)]
enum Extra {
    None,
    Interface,
    Device,
    BlkioDevice,
    Failure,
}

use cri::MetricType::{Counter, Gauge};

/// Every metric this runtime reports: name, help, type, extra labels.
const METRICS: &[(&str, &str, cri::MetricType, Extra)] = &[
    ("container_cpu_user_seconds_total", "Cumulative user CPU time consumed in seconds.", Counter, Extra::None),
    ("container_cpu_system_seconds_total", "Cumulative system CPU time consumed in seconds.", Counter, Extra::None),
    ("container_cpu_usage_seconds_total", "Cumulative CPU time consumed in seconds.", Counter, Extra::None),
    ("container_cpu_cfs_periods_total", "Number of elapsed enforcement period intervals.", Counter, Extra::None),
    ("container_cpu_cfs_throttled_periods_total", "Number of throttled period intervals.", Counter, Extra::None),
    (
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
        Counter,
        Extra::None,
    ),
    ("container_memory_cache", "Number of bytes of page cache memory.", Gauge, Extra::None),
    ("container_memory_rss", "Size of RSS in bytes.", Gauge, Extra::None),
    ("container_memory_kernel_usage", "Size of kernel memory allocated in bytes.", Gauge, Extra::None),
    ("container_memory_mapped_file", "Size of memory mapped files in bytes.", Gauge, Extra::None),
    ("container_memory_swap", "Container swap usage in bytes.", Gauge, Extra::None),
    ("container_memory_failcnt", "Number of memory usage hits limits", Counter, Extra::None),
    (
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        Gauge,
        Extra::None,
    ),
    ("container_memory_max_usage_bytes", "Maximum memory usage recorded in bytes", Gauge, Extra::None),
    ("container_memory_working_set_bytes", "Current working set in bytes.", Gauge, Extra::None),
    ("container_memory_total_active_file_bytes", "Current total active file in bytes.", Gauge, Extra::None),
    ("container_memory_total_inactive_file_bytes", "Current total inactive file in bytes.", Gauge, Extra::None),
    ("container_memory_failures_total", "Cumulative count of memory allocation failures.", Counter, Extra::Failure),
    ("container_oom_events_total", "Count of out of memory events observed for the container", Counter, Extra::None),
    (
        "container_pressure_cpu_waiting_seconds_total",
        "Total time duration tasks in the container have waited due to CPU pressure.",
        Counter,
        Extra::None,
    ),
    (
        "container_pressure_cpu_stalled_seconds_total",
        "Total time duration no tasks in the container could make progress due to CPU congestion.",
        Counter,
        Extra::None,
    ),
    (
        "container_pressure_memory_waiting_seconds_total",
        "Total time duration tasks in the container have waited due to memory pressure.",
        Counter,
        Extra::None,
    ),
    (
        "container_pressure_memory_stalled_seconds_total",
        "Total time duration no tasks in the container could make progress due to memory congestion.",
        Counter,
        Extra::None,
    ),
    (
        "container_pressure_io_waiting_seconds_total",
        "Total time duration tasks in the container have waited due to IO pressure.",
        Counter,
        Extra::None,
    ),
    (
        "container_pressure_io_stalled_seconds_total",
        "Total time duration no tasks in the container could make progress due to IO congestion.",
        Counter,
        Extra::None,
    ),
    ("container_fs_inodes_free", "Number of available Inodes", Gauge, Extra::Device),
    ("container_fs_inodes_total", "Number of Inodes", Gauge, Extra::Device),
    (
        "container_fs_limit_bytes",
        "Number of bytes that can be consumed by the container on this filesystem.",
        Gauge,
        Extra::Device,
    ),
    (
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container on this filesystem.",
        Gauge,
        Extra::Device,
    ),
    ("container_fs_reads_bytes_total", "Cumulative count of bytes read", Counter, Extra::Device),
    ("container_fs_reads_total", "Cumulative count of reads completed", Counter, Extra::Device),
    ("container_fs_writes_bytes_total", "Cumulative count of bytes written", Counter, Extra::Device),
    ("container_fs_writes_total", "Cumulative count of writes completed", Counter, Extra::Device),
    ("container_blkio_device_usage_total", "Blkio Device bytes usage", Counter, Extra::BlkioDevice),
    ("container_network_receive_bytes_total", "Cumulative count of bytes received", Counter, Extra::Interface),
    ("container_network_receive_packets_total", "Cumulative count of packets received", Counter, Extra::Interface),
    (
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving",
        Counter,
        Extra::Interface,
    ),
    (
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving",
        Counter,
        Extra::Interface,
    ),
    ("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted", Counter, Extra::Interface),
    ("container_network_transmit_packets_total", "Cumulative count of packets transmitted", Counter, Extra::Interface),
    (
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting",
        Counter,
        Extra::Interface,
    ),
    (
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting",
        Counter,
        Extra::Interface,
    ),
    ("container_processes", "Number of processes running inside the container.", Gauge, Extra::None),
    ("container_file_descriptors", "Number of open file descriptors for the container.", Gauge, Extra::None),
    ("container_sockets", "Number of open sockets for the container.", Gauge, Extra::None),
    (
        "container_threads_max",
        "Maximum number of threads allowed inside the container, infinity if value is zero",
        Gauge,
        Extra::None,
    ),
    ("container_threads", "Number of threads running inside the container", Gauge, Extra::None),
    ("container_last_seen", "Last time a container was seen by the exporter", Gauge, Extra::None),
    ("container_start_time_seconds", "Start time of the container since unix epoch in seconds.", Gauge, Extra::None),
    ("container_spec_cpu_period", "CPU period of the container.", Gauge, Extra::None),
    ("container_spec_cpu_quota", "CPU quota of the container.", Gauge, Extra::None),
    ("container_spec_cpu_shares", "CPU share of the container.", Gauge, Extra::None),
    ("container_spec_memory_limit_bytes", "Memory limit for the container.", Gauge, Extra::None),
    (
        "container_spec_memory_reservation_limit_bytes",
        "Memory reservation limit for the container.",
        Gauge,
        Extra::None,
    ),
    ("container_spec_memory_swap_limit_bytes", "Memory swap limit for the container.", Gauge, Extra::None),
];

fn label_keys(extra: Extra) -> Vec<String> {
    let extra: &[&str] = match extra {
        Extra::None => &[],
        Extra::Interface => &["interface"],
        Extra::Device => &["device"],
        Extra::BlkioDevice => &["device", "major", "minor", "operation"],
        Extra::Failure => &["failure_type", "scope"],
    };
    BASE.iter().chain(extra).map(|k| k.to_string()).collect()
}

/// ListMetricDescriptors: every metric ListPodSandboxMetrics may report.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    METRICS
        .iter()
        .map(|(name, help, _, extra)| cri::MetricDescriptor {
            name: name.to_string(),
            help: help.to_string(),
            label_keys: label_keys(*extra),
        })
        .collect()
}

/// Collects metrics with one set of base labels.
struct Sink {
    labels: Vec<String>,
    timestamp: i64,
    metrics: Vec<cri::Metric>,
}

impl Sink {
    fn new(labels: [&str; 5]) -> Sink {
        Sink { labels: labels.iter().map(|l| l.to_string()).collect(), timestamp: now_nanos(), metrics: Vec::new() }
    }

    fn push(&mut self, name: &str, value: Option<u64>, extra: &[&str]) {
        let Some(value) = value else { return };
        let metric_type = METRICS.iter().find(|m| m.0 == name).map_or(Gauge, |m| m.2);
        self.metrics.push(cri::Metric {
            name: name.to_string(),
            timestamp: self.timestamp,
            metric_type: metric_type as i32,
            label_values: self.labels.iter().cloned().chain(extra.iter().map(|e| e.to_string())).collect(),
            value: Some(cri::UInt64Value { value }),
        });
    }

    fn cgroup(&mut self, detail: &CgroupDetail) {
        let seconds = |nanos: Option<u64>| nanos.map(|n| n / 1_000_000_000);
        self.push("container_cpu_usage_seconds_total", seconds(detail.cpu_usage_nanos), &[]);
        self.push("container_cpu_user_seconds_total", seconds(detail.cpu_user_nanos), &[]);
        self.push("container_cpu_system_seconds_total", seconds(detail.cpu_system_nanos), &[]);
        self.push("container_cpu_cfs_periods_total", detail.cfs_periods, &[]);
        self.push("container_cpu_cfs_throttled_periods_total", detail.cfs_throttled_periods, &[]);
        self.push("container_cpu_cfs_throttled_seconds_total", seconds(detail.cfs_throttled_nanos), &[]);
        self.push("container_memory_usage_bytes", detail.memory_usage, &[]);
        self.push("container_memory_max_usage_bytes", detail.memory_max_usage, &[]);
        self.push("container_memory_working_set_bytes", detail.memory_working_set, &[]);
        self.push("container_memory_cache", detail.memory_cache, &[]);
        self.push("container_memory_rss", detail.memory_rss, &[]);
        self.push("container_memory_kernel_usage", detail.memory_kernel, &[]);
        self.push("container_memory_mapped_file", detail.memory_mapped_file, &[]);
        self.push("container_memory_swap", detail.memory_swap, &[]);
        self.push("container_memory_failcnt", detail.memory_failcnt, &[]);
        self.push("container_memory_total_active_file_bytes", detail.memory_active_file, &[]);
        self.push("container_memory_total_inactive_file_bytes", detail.memory_inactive_file, &[]);
        self.push("container_memory_failures_total", detail.pgfault, &["pgfault", "container"]);
        self.push("container_memory_failures_total", detail.pgmajfault, &["pgmajfault", "container"]);
        self.push("container_oom_events_total", detail.oom_kills, &[]);
        let mut pressure = |what: &str, p: Option<Pressure>| {
            let Some(p) = p else { return };
            let waiting = format!("container_pressure_{what}_waiting_seconds_total");
            let stalled = format!("container_pressure_{what}_stalled_seconds_total");
            self.push(&waiting, Some(p.some.total_usec / 1_000_000), &[]);
            self.push(&stalled, Some(p.full.total_usec / 1_000_000), &[]);
        };
        pressure("cpu", detail.cpu_pressure);
        pressure("memory", detail.memory_pressure);
        pressure("io", detail.io_pressure);
        self.push("container_processes", Some(detail.pids.len() as u64), &[]);
        self.push("container_threads", detail.threads, &[]);
        self.push("container_threads_max", detail.threads_max, &[]);
        let (files, sockets) = runtime::cgroup_detail::open_files(&detail.pids);
        self.push("container_file_descriptors", Some(files), &[]);
        self.push("container_sockets", Some(sockets), &[]);
        for io in &detail.io {
            let device = format!("{}:{}", io.major, io.minor);
            let (major, minor) = (io.major.to_string(), io.minor.to_string());
            self.push("container_fs_reads_bytes_total", Some(io.read_bytes), &[&device]);
            self.push("container_fs_reads_total", Some(io.reads), &[&device]);
            self.push("container_fs_writes_bytes_total", Some(io.write_bytes), &[&device]);
            self.push("container_fs_writes_total", Some(io.writes), &[&device]);
            self.push("container_blkio_device_usage_total", Some(io.read_bytes), &[&device, &major, &minor, "Read"]);
            self.push("container_blkio_device_usage_total", Some(io.write_bytes), &[&device, &major, &minor, "Write"]);
        }
    }
}

/// cadvisor reports an unset limit as 0.
fn limit(value: i64) -> Option<u64> {
    Some(value.max(0) as u64)
}

fn container_metrics(container: &Container, pod: &Pod, fs: Option<&FsInfo>) -> cri::ContainerMetrics {
    let mut sink = Sink::new([
        &pod.spec.name,
        &pod.spec.namespace,
        &container.spec.name,
        &container.id,
        &container.spec.image.name,
    ]);
    sink.push("container_last_seen", Some((sink.timestamp / 1_000_000_000) as u64), &[]);
    sink.push("container_start_time_seconds", Some((container.started_at.max(0) / 1_000_000_000) as u64), &[]);
    let r = &container.spec.resources;
    sink.push("container_spec_cpu_period", Some(if r.cpu_period > 0 { r.cpu_period as u64 } else { 100_000 }), &[]);
    sink.push("container_spec_cpu_quota", limit(r.cpu_quota), &[]);
    // The kernel's default weight when none is set (cpu.shares 1024).
    sink.push("container_spec_cpu_shares", Some(if r.cpu_shares > 0 { r.cpu_shares as u64 } else { 1024 }), &[]);
    sink.push("container_spec_memory_limit_bytes", limit(r.memory_limit_in_bytes), &[]);
    let reservation = r.unified.get("memory.low").and_then(|v| v.parse().ok()).unwrap_or(0);
    sink.push("container_spec_memory_reservation_limit_bytes", Some(reservation), &[]);
    sink.push("container_spec_memory_swap_limit_bytes", limit(r.memory_swap_limit_in_bytes), &[]);
    let cgroup = runtime::stats::cgroup_path(&container.slice, Some(&container.unit));
    sink.cgroup(&runtime::cgroup_detail::sample(&cgroup));
    if let Some(fs) = fs {
        let device = fs.device.as_str();
        let usage = runtime::stats::disk_usage(&container.rootfs.upperdir);
        sink.push("container_fs_usage_bytes", Some(usage.bytes), &[device]);
        sink.push("container_fs_limit_bytes", Some(fs.capacity_bytes), &[device]);
        sink.push("container_fs_inodes_total", Some(fs.inodes_total), &[device]);
        sink.push("container_fs_inodes_free", Some(fs.inodes_free), &[device]);
    }
    cri::ContainerMetrics { container_id: container.id.clone(), metrics: sink.metrics }
}

fn pod_metrics(node: &Node, pod: &Pod, fs: Option<&FsInfo>) -> cri::PodSandboxMetrics {
    let mut sink = Sink::new([&pod.spec.name, &pod.spec.namespace, "", &pod.id, ""]);
    sink.cgroup(&runtime::cgroup_detail::sample(&runtime::stats::cgroup_path(&pod.slice, None)));
    for i in node.pod_network(pod).unwrap_or_default() {
        let name = [i.name.as_str()];
        sink.push("container_network_receive_bytes_total", Some(i.rx_bytes), &name);
        sink.push("container_network_receive_packets_total", Some(i.rx_packets), &name);
        sink.push("container_network_receive_packets_dropped_total", Some(i.rx_dropped), &name);
        sink.push("container_network_receive_errors_total", Some(i.rx_errors), &name);
        sink.push("container_network_transmit_bytes_total", Some(i.tx_bytes), &name);
        sink.push("container_network_transmit_packets_total", Some(i.tx_packets), &name);
        sink.push("container_network_transmit_packets_dropped_total", Some(i.tx_dropped), &name);
        sink.push("container_network_transmit_errors_total", Some(i.tx_errors), &name);
    }
    let filter = ContainerFilter { pod_id: Some(pod.id.clone()), ..Default::default() };
    let container_metrics = node
        .runtime()
        .containers(&filter)
        .iter()
        .filter(|c| c.state == ContainerState::Running)
        .map(|c| container_metrics(c, pod, fs))
        .collect();
    cri::PodSandboxMetrics { pod_sandbox_id: pod.id.clone(), metrics: sink.metrics, container_metrics }
}

/// ListPodSandboxMetrics: every ready pod's metrics and its running containers'.
pub fn list(node: &Node) -> Vec<cri::PodSandboxMetrics> {
    let fs = node.writable_layer_fs();
    node.runtime()
        .pods(&Default::default())
        .iter()
        .filter(|p| p.state == PodState::Ready)
        .map(|p| pod_metrics(node, p, fs.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_help_and_unique_names() {
        let descriptors = descriptors();
        let mut names: Vec<&str> = descriptors.iter().map(|d| d.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), descriptors.len());
        assert!(descriptors.iter().all(|d| !d.help.is_empty() && d.label_keys.len() >= 5));
    }

    #[test]
    fn every_metric_has_one_value_per_label_key() {
        let detail = CgroupDetail {
            cpu_usage_nanos: Some(3_000_000_000),
            pgfault: Some(1),
            pids: vec![std::process::id() as i32],
            io: vec![runtime::cgroup_detail::DeviceIo { major: 8, ..Default::default() }],
            cpu_pressure: Some(Pressure::default()),
            ..Default::default()
        };
        let mut sink = Sink::new(["p", "ns", "c", "id", "img"]);
        sink.cgroup(&detail);
        sink.push("container_network_receive_bytes_total", Some(1), &["eth0"]);
        let descriptors = descriptors();
        for metric in &sink.metrics {
            let descriptor = descriptors.iter().find(|d| d.name == metric.name).expect(&metric.name);
            assert_eq!(metric.label_values.len(), descriptor.label_keys.len(), "{}", metric.name);
        }
        let cpu = sink.metrics.iter().find(|m| m.name == "container_cpu_usage_seconds_total").unwrap();
        assert_eq!(cpu.value.as_ref().unwrap().value, 3);
        assert_eq!(cpu.metric_type, Counter as i32);
    }
}
