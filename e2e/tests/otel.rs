//! OpenTelemetry traces of CRI calls (`[tracing]`, cri-server/src/otel.rs): a daemon in a node
//! exports to a tiny OTLP collector stand-in, an OTLP/gRPC TraceService (opentelemetry-proto's
//! types) that this test serves on the node's loopback, from a socket bound in the node's network
//! namespace. Checked: the span of each CRI call with its pod and container attributes, the
//! caller's W3C `traceparent` as its parent, the steps inside it as its children (image pull, the
//! slice and unit starts over D-Bus, the pod's namespaces, CNI ADD, the container's preparation),
//! gRPC codes of refused calls, the flush when the daemon stops, calls that go on as before
//! (with a warning in the journal) when the collector is gone, and bad `[tracing]` values.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::crisimple::{container_config, pod, start};
use e2e::registry::NodeNet;
use e2e::{CriClient, Node, cri, eventually};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The batch processor exports every 5 s; a little more for the collector's connection.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(15);
const COLLECTOR_PORT: u16 = 4317;

/// A span as the collector received it, its attributes as text.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    service_name: String,
}

impl Received {
    fn attr(&self, key: &str) -> &str {
        self.attributes
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("span {} has no {key}: {self:?}", self.name))
    }
}

#[derive(Debug, Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    name: span.name,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                        .collect(),
                    service_name: service_name.clone(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves OTLP/gRPC on 127.0.0.1:`port` in the node until the returned sender is dropped or used.
    fn serve_in(&self, node: &Node, port: u16) -> tokio::sync::oneshot::Sender<()> {
        let listener = NodeNet::of(node)
            .run(move || {
                let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .expect("bind the collector in the node");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        stop
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits for the span of CRI call `method` for which `matches` holds.
    async fn call(&self, method: &str, matches: impl Fn(&Received) -> bool) -> Received {
        let name = if ["PullImage", "ImageStatus", "RemoveImage", "ListImages"].contains(&method) {
            format!("runtime.v1.ImageService/{method}")
        } else {
            format!("runtime.v1.RuntimeService/{method}")
        };
        eventually(EXPORT_TIMEOUT, &format!("a {name} span"), || {
            let found = self.spans().into_iter().find(|s| s.name == name && matches(s));
            async move { found }
        })
        .await
    }

    /// The spans whose parent is `span`.
    fn children(&self, span: &Received) -> Vec<Received> {
        self.spans().into_iter().filter(|s| s.parent_span_id == span.span_id && s.trace_id == span.trace_id).collect()
    }
}

fn names(spans: &[Received]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

fn with_traceparent<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    request
}

// Multi-threaded: the collector must answer while the test waits on blocking node commands
// (`systemctl stop` waits for the daemon's last export).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_calls_are_traced_over_otlp_with_their_steps() {
    let config =
        format!("[tracing]\notlp_endpoint = \"http://127.0.0.1:{COLLECTOR_PORT}\"\nservice_name = \"e2e-node\"\n");
    let node: Node = e2e::node_with_local_registry("otel", &config);
    node.write_file(e2e::CNI_CONFLIST_PATH, e2e::CNI_CONFLIST);
    let collector = Collector::default();
    let stop_collector = collector.serve_in(&node, COLLECTOR_PORT);
    let mut client: CriClient = node.cri(ANSWER_TIMEOUT).await;

    // Bad `[tracing]` values stop the daemon with the key and the file named.
    for (bad, key) in [
        ("[tracing]\notlp_endpoint = \"127.0.0.1:4317\"\n", "tracing.otlp_endpoint"),
        ("[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsampling_ratio = 2.0\n", "tracing.sampling_ratio"),
        ("[tracing]\nendpoint = \"http://127.0.0.1:4317\"\n", "endpoint"),
    ] {
        node.write_file("/root/bad-tracing.toml", bad);
        let run = node.exec(&["cri-systemd", "--config", "/root/bad-tracing.toml", "config"]);
        assert!(!run.success(), "{bad} was accepted: {}", run.stdout);
        assert!(run.stderr.contains(key) && run.stderr.contains("bad-tracing.toml"), "{bad}: {}", run.stderr);
    }

    // PullImage, with the store's pull as its child.
    let image = e2e::pull_busybox(&node, &mut client, "otel").await;
    let pull = collector.call("PullImage", |s| s.attributes.get("container.image.name") == Some(&image)).await;
    assert_eq!(pull.attr("rpc.grpc.status_code"), "0");
    assert_eq!(pull.service_name, "e2e-node");
    assert!(names(&collector.children(&pull)).contains(&"image.pull"), "{:?}", collector.children(&pull));

    // RunPodSandbox in the kubelet's trace (its otelgrpc client sends traceparent).
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let config = pod("traced").build();
    let request = cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() };
    let request = with_traceparent(request, &format!("00-{trace_id}-{caller_span}-01"));
    let pod_id = client.runtime.run_pod_sandbox(request).await.expect("RunPodSandbox").into_inner().pod_sandbox_id;
    let run = collector.call("RunPodSandbox", |s| s.attributes.get("sandbox.id") == Some(&pod_id)).await;
    let metadata = config.metadata.as_ref().unwrap();
    assert_eq!(run.attr("k8s.pod.name"), metadata.name);
    assert_eq!(run.attr("k8s.pod.uid"), metadata.uid);
    assert_eq!(run.attr("k8s.namespace.name"), metadata.namespace);
    assert_eq!(run.attr("rpc.system"), "grpc");
    assert_eq!(run.attr("rpc.service"), "runtime.v1.RuntimeService");
    assert_eq!(run.attr("rpc.method"), "RunPodSandbox");
    assert_eq!(run.attr("rpc.grpc.status_code"), "0");
    assert_eq!((run.trace_id.as_str(), run.parent_span_id.as_str()), (trace_id, caller_span));
    let steps = collector.children(&run);
    for step in ["systemd.start_unit", "pod.namespaces", "cni.add"] {
        assert!(names(&steps).contains(&step), "RunPodSandbox's children lack {step}: {:?}", names(&steps));
    }
    let slice = steps.iter().find(|s| s.name == "systemd.start_unit").unwrap();
    assert!(slice.attr("systemd.unit").ends_with(".slice"), "{slice:?}");
    assert_eq!(steps.iter().find(|s| s.name == "cni.add").unwrap().attr("sandbox.id"), pod_id);

    // CreateContainer and StartContainer: the new container's id, its preparation, its unit.
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: pod_id.clone(),
        config: Some(container_config("app", &image, &["/bin/busybox", "sleep", "1000"])),
        sandbox_config: Some(config.clone()),
    };
    let container = client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id;
    let created = collector.call("CreateContainer", |s| s.attributes.get("container.id") == Some(&container)).await;
    assert_eq!(created.attr("sandbox.id"), pod_id);
    assert_eq!(created.attr("k8s.container.name"), "app");
    assert_eq!(created.attr("k8s.pod.uid"), metadata.uid);
    assert!(names(&collector.children(&created)).contains(&"container.prepare"));
    start(&mut client, &container).await.expect("StartContainer");
    let started = collector.call("StartContainer", |s| s.attributes.get("container.id") == Some(&container)).await;
    let unit = collector.children(&started).into_iter().find(|s| s.name == "systemd.start_unit").expect("unit start");
    assert_eq!(unit.attr("systemd.unit"), format!("cri-{container}.service"));
    // Without a traceparent, a trace of its own.
    assert_ne!(started.trace_id, trace_id);
    assert_eq!(started.parent_span_id, "");

    // A refused call: its gRPC code.
    let missing = "0".repeat(64);
    let status = client.runtime.start_container(cri::StartContainerRequest { container_id: missing.clone() }).await;
    assert_eq!(status.unwrap_err().code(), tonic::Code::NotFound);
    let refused = collector.call("StartContainer", |s| s.attributes.get("container.id") == Some(&missing)).await;
    assert_eq!(refused.attr("rpc.grpc.status_code"), (tonic::Code::NotFound as i32).to_string());

    // Spans still queued when the daemon stops are flushed on the way out.
    client
        .runtime
        .container_status(cri::ContainerStatusRequest { container_id: container.clone(), verbose: false })
        .await
        .expect("ContainerStatus");
    let stopping = Instant::now();
    node.sh("systemctl stop cri-systemd");
    let flushed = collector.spans().into_iter().any(|s| {
        s.name == "runtime.v1.RuntimeService/ContainerStatus" && s.attributes.get("container.id") == Some(&container)
    });
    assert!(flushed, "ContainerStatus's span was not flushed by the stop ({:?}):\n{}", stopping.elapsed(), node.logs());

    // The collector gone: calls answer as before, the journal says why nothing is exported.
    let _ = stop_collector.send(());
    node.sh("systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let timed = Instant::now();
    for _ in 0..5 {
        client
            .runtime
            .container_status(cri::ContainerStatusRequest { container_id: container.clone(), verbose: false })
            .await
            .expect("ContainerStatus without a collector");
    }
    assert!(timed.elapsed() < Duration::from_secs(2), "calls were slowed down: {:?}", timed.elapsed());
    eventually(EXPORT_TIMEOUT, "the export warning in the journal", || {
        let logs = node.logs();
        async move { logs.contains("cannot export traces").then_some(()) }
    })
    .await;
}
