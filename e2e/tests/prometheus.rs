//! The Prometheus endpoint (`[metrics] address`): off by default (nothing listens); once set and
//! the daemon killed and restarted, `/metrics` in the node's network namespace reports what the
//! daemon recovered, and the counters move with real CRI calls: pods with a bridge network (CNI
//! ADD/DEL), containers, ExecSync and an exec streaming session, pulls from the node's registry
//! (bytes, layers, a failure by reason), a failed call by its gRPC code, image GC. A bad address
//! stops the start with the key named, and changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use e2e::crisimple::{container_config, create, exec_sync, run_pod, start, stop_pod};
use e2e::registry::{Registry, RegistryOptions};
use e2e::{CriClient, LOCAL_REGISTRY_PORT, Node, cri, eventually, node_with_local_registry, oci, streaming};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const METRICS_ADDRESS: &str = "127.0.0.1:1338";
const RUNTIME: &str = "runtime.v1.RuntimeService";
const IMAGES: &str = "runtime.v1.ImageService";

/// One sample of the text format: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape, parsed.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    /// The sum of the samples named `name` that carry every label of `labels`; None if there is none.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like `get`, but the sample must be there.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{}", self.text))
    }

    fn calls(&self, service: &str, method: &str, code: &str) -> f64 {
        let labels = [("grpc_service", service), ("grpc_method", method), ("grpc_code", code)];
        self.get("cri_systemd_grpc_server_handled_total", &labels).unwrap_or(0.0)
    }
}

/// Parses the Prometheus text format (0.0.4): `name{label="value",...} value` lines, comments
/// skipped, label values unescaped.
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, mut rest) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').unwrap_or_else(|| panic!("bad labels in {line:?}"))),
            None => (series, ""),
        };
        let mut labels = BTreeMap::new();
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => panic!("bad escape in {line:?}"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value in {line:?}"),
                }
            };
            labels.insert(key.trim_start_matches(',').to_owned(), value);
            rest = &after[end + 1..];
        }
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    samples
}

fn get(node: &Node, path: &str, headers: &[(&str, &str)]) -> std::io::Result<e2e::registry::Response> {
    e2e::registry::http(node, METRICS_ADDRESS, "GET", path, headers, b"")
}

fn scrape(node: &Node) -> Scrape {
    let response = get(node, "/metrics", &[]).expect("GET /metrics");
    let text = String::from_utf8_lossy(&response.body).into_owned();
    assert_eq!(response.status, 200, "{text}");
    assert_eq!(response.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    Scrape { samples: parse(&text), text }
}

async fn pull(client: &mut CriClient, image: &str) -> Result<String, tonic::Status> {
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        ..Default::default()
    };
    client.image.pull_image(request).await.map(|r| r.into_inner().image_ref)
}

/// Kills the daemon (as a crash would) and starts it again; returns a new client.
async fn restart(node: &Node) -> CriClient {
    node.sh("systemctl kill -s KILL cri-systemd; systemctl reset-failed cri-systemd; systemctl restart cri-systemd");
    node.cri(ANSWER_TIMEOUT).await
}

#[tokio::test]
async fn metrics_endpoint_counts_what_the_daemon_does() {
    let node = Arc::new(node_with_local_registry("prom", ""));
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    node.write_file(e2e::CNI_CONFLIST_PATH, e2e::CNI_CONFLIST);
    let registry = Registry::start(&node, "prom", LOCAL_REGISTRY_PORT, RegistryOptions::default());
    registry.push_image("busybox", "1", &oci::busybox_image(""));
    let busybox = registry.repo("busybox:1");
    pull(&mut client, &busybox).await.expect("PullImage busybox");

    // Off by default: nothing listens.
    let refused = get(&node, "/metrics", &[]).expect_err("nothing listens with metrics off");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

    // A pod and a running container before the restart: what the daemon recovers.
    let before = run_pod(&mut client, "prom-before").await;
    let sleeper =
        create(&mut client, &before, container_config("sleeper", &busybox, &["/bin/busybox", "sleep", "100000"]))
            .await
            .expect("CreateContainer");
    start(&mut client, &sleeper).await.expect("StartContainer");

    node.sh(&format!("printf '\\n[metrics]\\naddress = \"{METRICS_ADDRESS}\"\\n' >> /etc/cri-systemd/config.toml"));
    let mut client = restart(&node).await;
    let first = scrape(&node);
    assert_eq!(first.value("cri_systemd_recovered_records", &[("kind", "pod")]), 1.0);
    assert_eq!(first.value("cri_systemd_recovered_records", &[("kind", "container")]), 1.0);
    assert_eq!(first.value("cri_systemd_quarantined_records", &[]), 0.0);
    assert_eq!(first.value("cri_systemd_pods", &[("state", "ready")]), 1.0);
    assert_eq!(first.value("cri_systemd_containers", &[("state", "running")]), 1.0);
    assert!(first.value("cri_systemd_start_time_seconds", &[]) > 1.7e9);
    assert_eq!(first.value("cri_systemd_build_info", &[]), 1.0);

    // Two more pods (CNI ADDs), a container in one, three ExecSyncs.
    let pods = [run_pod(&mut client, "prom-a").await, run_pod(&mut client, "prom-b").await];
    let worker =
        create(&mut client, &pods[0], container_config("worker", &busybox, &["/bin/busybox", "sleep", "100000"]))
            .await
            .expect("CreateContainer");
    start(&mut client, &worker).await.expect("StartContainer");
    for _ in 0..3 {
        exec_sync(&mut client, &worker, &["/bin/busybox", "true"]).await.expect("ExecSync");
    }
    // A failed call, counted with its code.
    let missing = client
        .runtime
        .container_status(cri::ContainerStatusRequest { container_id: "no-such-container".into(), verbose: false })
        .await
        .expect_err("ContainerStatus of nothing");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // A pull with a layer of its own, and one of an image the registry does not have.
    registry.push_image("big", "1", &oci::big_image(7, 1, 256 * 1024));
    let big = registry.repo("big:1");
    pull(&mut client, &big).await.expect("PullImage big");
    let failed = pull(&mut client, &registry.repo("nothing:1")).await.expect_err("PullImage of nothing");
    assert_eq!(failed.code(), tonic::Code::NotFound, "{failed}");

    let seen = scrape(&node);
    assert_eq!(seen.calls(RUNTIME, "RunPodSandbox", "OK"), 2.0);
    assert_eq!(seen.calls(RUNTIME, "ExecSync", "OK"), 3.0);
    assert_eq!(seen.calls(RUNTIME, "ContainerStatus", "NotFound"), 1.0);
    assert_eq!(seen.calls(IMAGES, "PullImage", "OK"), 1.0);
    assert_eq!(seen.calls(IMAGES, "PullImage", "NotFound"), 1.0);
    let run_pod_latency = [("grpc_service", RUNTIME), ("grpc_method", "RunPodSandbox"), ("grpc_code", "OK")];
    assert_eq!(seen.value("cri_systemd_grpc_server_handling_seconds_count", &run_pod_latency), 2.0);
    assert!(seen.value("cri_systemd_grpc_server_handling_seconds_sum", &run_pod_latency) > 0.0);
    let mut all_buckets = run_pod_latency.to_vec();
    all_buckets.push(("le", "+Inf"));
    assert_eq!(seen.value("cri_systemd_grpc_server_handling_seconds_bucket", &all_buckets), 2.0);
    assert_eq!(seen.value("cri_systemd_pods", &[("state", "ready")]), 3.0);
    assert_eq!(seen.value("cri_systemd_containers", &[("state", "running")]), 2.0);
    assert_eq!(seen.value("cri_systemd_exec_sessions_total", &[("kind", "exec_sync")]), 3.0);
    let adds = [("operation", "add"), ("result", "success")];
    assert_eq!(seen.value("cri_systemd_cni_operation_duration_seconds_count", &adds), 2.0);
    assert!(seen.value("cri_systemd_cni_operation_duration_seconds_sum", &adds) > 0.0);
    assert_eq!(seen.value("cri_systemd_image_pulls_success_total", &[]), 1.0);
    assert_eq!(seen.value("cri_systemd_image_pulls_failure_total", &[("reason", "not_found")]), 1.0);
    assert_eq!(seen.value("cri_systemd_image_pull_duration_seconds_count", &[]), 2.0);
    assert_eq!(seen.value("cri_systemd_image_pulls_in_progress", &[]), 0.0);
    assert!(seen.value("cri_systemd_image_pulls_bytes_total", &[]) >= 256.0 * 1024.0, "{}", seen.text);
    assert_eq!(seen.value("cri_systemd_image_layers_unpacked_total", &[]), 1.0);

    // An exec session is active while its connection is open.
    let request = cri::ExecRequest {
        container_id: worker.clone(),
        cmd: vec!["/bin/busybox".into(), "sleep".into(), "20".into()],
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let url = client.runtime.exec(request).await.expect("Exec").into_inner().url;
    let (opened, is_open) = std::sync::mpsc::channel();
    let (close, closing) = std::sync::mpsc::channel::<()>();
    let n = node.clone();
    let session = std::thread::spawn(move || {
        let (_, mut writer, reader) = streaming::spdy_connect(&n, &url, &["v4.channel.k8s.io"]).expect("upgrade");
        writer.open(&[("streamType", "error")]).unwrap();
        writer.open(&[("streamType", "stdout")]).unwrap();
        writer.open(&[("streamType", "stderr")]).unwrap();
        opened.send(()).unwrap();
        let _ = closing.recv();
        writer.drop_connection();
        drop(reader);
    });
    is_open.recv().expect("the session opened");
    let during = scrape(&node);
    assert_eq!(during.value("cri_systemd_streaming_sessions_active", &[("kind", "exec")]), 1.0);
    assert_eq!(during.value("cri_systemd_exec_sessions_total", &[("kind", "exec")]), 1.0);
    close.send(()).unwrap();
    session.join().unwrap();
    let node_ref = node.clone();
    eventually(Duration::from_secs(30), "the exec session to end", || {
        let active = scrape(&node_ref).get("cri_systemd_streaming_sessions_active", &[("kind", "exec")]);
        async move { (active == Some(0.0)).then_some(()) }
    })
    .await;

    // A stopped pod: a DEL. A removed image: collected.
    stop_pod(&mut client, &pods[1]).await;
    let request = cri::RemoveImageRequest { image: Some(cri::ImageSpec { image: big, ..Default::default() }) };
    client.image.remove_image(request).await.expect("RemoveImage");
    let after = scrape(&node);
    assert_eq!(after.value("cri_systemd_cni_operation_duration_seconds_count", &[("operation", "del")]), 1.0);
    assert_eq!(after.value("cri_systemd_pods", &[("state", "not_ready")]), 1.0);
    assert!(after.value("cri_systemd_image_gc_runs_total", &[]) >= 1.0);
    assert_eq!(after.value("cri_systemd_image_gc_removed_total", &[("kind", "image")]), 1.0);
    assert_eq!(after.value("cri_systemd_image_gc_removed_total", &[("kind", "layer")]), 1.0);
    assert!(after.value("cri_systemd_image_gc_freed_bytes_total", &[]) >= 256.0 * 1024.0, "{}", after.text);

    // OpenMetrics when asked for; containerd's path; nothing else.
    let open = get(&node, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]).unwrap();
    assert!(open.header("content-type").unwrap_or_default().starts_with("application/openmetrics-text"));
    assert!(String::from_utf8_lossy(&open.body).ends_with("# EOF\n"));
    assert_eq!(get(&node, "/v1/metrics", &[]).unwrap().status, 200);
    assert_eq!(get(&node, "/", &[]).unwrap().status, 404);

    // A bad address (the registry's port, taken) stops the start, naming the key; nothing changed.
    node.sh(&format!(
        "sed -i 's/^address = \"{METRICS_ADDRESS}\"/address = \"127.0.0.1:{LOCAL_REGISTRY_PORT}\"/' /etc/cri-systemd/config.toml"
    ));
    let started = node.exec(&["sh", "-c", "systemctl kill -s KILL cri-systemd; systemctl restart cri-systemd"]);
    assert!(!started.success(), "the daemon started on a taken metrics address");
    let journal = node.logs();
    assert!(
        journal.contains(&format!("cannot listen on 127.0.0.1:{LOCAL_REGISTRY_PORT} for metrics"))
            && journal.contains("`metrics.address`"),
        "{journal}"
    );
    node.sh(&format!(
        "sed -i 's/^address = \"127.0.0.1:{LOCAL_REGISTRY_PORT}\"/address = \"{METRICS_ADDRESS}\"/' /etc/cri-systemd/config.toml"
    ));
    let _client = restart(&node).await;
    let back = scrape(&node);
    assert_eq!(back.value("cri_systemd_recovered_records", &[("kind", "pod")]), 3.0);
    assert_eq!(back.value("cri_systemd_recovered_records", &[("kind", "container")]), 2.0);
    assert_eq!(back.value("cri_systemd_containers", &[("state", "running")]), 2.0);
}
