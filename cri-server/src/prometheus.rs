//! The Prometheus metrics endpoint (`[metrics] address`, off by default): `GET /metrics` on a
//! listener of its own, in the Prometheus text exposition format (0.0.4), or OpenMetrics text
//! when the scraper asks for it (`Accept: application/openmetrics-text`). `/v1/metrics`, the path
//! of containerd's endpoint, answers the same, so that scrape configs written for containerd work.
//!
//! Not to be confused with `metrics.rs`: that is the CRI's own metrics RPCs (cadvisor's container
//! metrics for the kubelet); this is about the daemon itself.
//!
//! # What is exposed (every name prefixed `cri_systemd_`)
//!
//! - gRPC calls: `grpc_server_handled_total` and the histogram `grpc_server_handling_seconds`, by
//!   `grpc_service`, `grpc_method` and `grpc_code` (the labels and names of go-grpc-middleware's
//!   Prometheus provider, which containerd serves, prefixed). Counted by [`GrpcMetricsLayer`], a
//!   tower layer around both CRI services: the code is the `grpc-status` of the answer's headers
//!   (a refused call) or trailers (the end of a stream), `Canceled` when the client goes away
//!   first; the time runs from the request to that status.
//! - image pulls: `image_pulls_success_total`, `image_pulls_failure_total{reason}` (the store
//!   error's [`imagestore::Error::reason`], `deadline_exceeded`, or `canceled`: CRI-O's metric
//!   names), `image_pull_duration_seconds{result}`, `image_pulls_in_progress`,
//!   `image_pulls_bytes_total` (bytes received from registries), `image_layers_unpacked_total`,
//!   `image_layer_reuse_total` (layers a pull found unpacked already).
//! - image garbage collection: `image_gc_runs_total`, `image_gc_freed_bytes_total`,
//!   `image_gc_removed_total{kind=image|layer|blob}`.
//! - `pods{state}` and `containers{state}`: counted from the runtime's records at each scrape.
//! - exec: `exec_sessions_total{kind=exec_sync|exec|attach|portforward}` (ExecSync calls that ran
//!   a command, streaming sessions that started on the streaming server) and
//!   `streaming_sessions_active{kind}`.
//! - CNI: `cni_operation_duration_seconds{operation=add|del, result}` (ADDs, and DELs that had an
//!   ADD to undo).
//! - start-up: `recovered_records{kind=pod|container}` (what the daemon found at its last start and
//!   kept), `quarantined_records{kind}` (records set aside, now or at an earlier start),
//!   `start_time_seconds`, `build_info{version}`.
//!
//! # Why prometheus-client, and why global
//!
//! prometheus-client is the Prometheus project's own Rust client (github.com/prometheus/client_rust):
//! its types follow the OpenMetrics data model, its encoders write both text formats, and it has
//! only small dependencies (itoa, dtoa, parking_lot and its derive macro). The older `prometheus`
//! crate (tikv) pulls protobuf and keeps a process-wide default registry of its own; the `metrics`
//! facade needs an exporter crate that brings its own HTTP server. Serving is hyper's (already the
//! daemon's HTTP server for streaming), so no web framework comes in.
//!
//! The counters live in one process-wide [`Metrics`] ([`metrics()`]), as Go daemons use the default
//! registry: the places that count (pulls, GC, exec, streaming sessions, CNI) are reached without
//! threading a handle through every constructor, and counting is an atomic add whether or not the
//! endpoint is on. The libraries stay free of it: `imagestore` exposes [`imagestore::StoreCounters`]
//! and `runtime` a [`runtime::CniObserver`] callback; this module turns them into metrics. Gauges of
//! pods and containers are computed at scrape time from the runtime's tables (a clone of the
//! records, no systemd call).
//!
//! Labels are bounded: gRPC services other than the two CRI ones count as `unknown`, and at most
//! [`MAX_GRPC_METHODS`] method names are labelled (the CRI has about 50), so a client cannot grow
//! the registry by calling made-up methods.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::config::MetricsConfig;
use crate::node::Node;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {address} for metrics: {source}; set `metrics.address` in the config")]
    Listen { address: SocketAddr, source: std::io::Error },
}

/// Most method names labelled; calls of others count as method `unknown`.
pub const MAX_GRPC_METHODS: usize = 128;
/// Scrapes served at once; more connections wait for a slot.
const MAX_CONNECTIONS: usize = 16;
/// How long a scraper has to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// gRPC call latency: 1 ms to 2 min (pulls and long ExecSyncs at the top).
const CALL_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Image pulls: 50 ms to 20 min.
const PULL_BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1200.0];
/// CNI plugin chains: 1 ms to 1 min.
const CNI_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    grpc_service: &'static str,
    grpc_method: String,
    grpc_code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    operation: &'static str,
    result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn call_histogram() -> Histogram {
    Histogram::new(CALL_BUCKETS)
}

fn pull_histogram() -> Histogram {
    Histogram::new(PULL_BUCKETS)
}

fn cni_histogram() -> Histogram {
    Histogram::new(CNI_BUCKETS)
}

fn result(ok: bool) -> &'static str {
    if ok { "success" } else { "failure" }
}

/// The daemon's counters and histograms (see the module doc for what each is).
#[derive(Debug)]
pub struct Metrics {
    grpc_handled: Family<GrpcLabels, Counter>,
    grpc_seconds: Histograms<GrpcLabels>,
    grpc_methods: Mutex<HashSet<String>>,
    pulls_success: Counter,
    pull_failures: Family<ReasonLabel, Counter>,
    pull_seconds: Histograms<ResultLabel>,
    pulls_in_progress: Gauge,
    gc_runs: Counter,
    gc_freed_bytes: Counter,
    gc_removed: Family<KindLabel, Counter>,
    exec_sessions: Family<KindLabel, Counter>,
    streaming_active: Family<KindLabel, Gauge>,
    cni_seconds: Histograms<CniLabels>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The daemon's metrics (one per process).
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            grpc_handled: Family::default(),
            grpc_seconds: Family::new_with_constructor(call_histogram),
            grpc_methods: Mutex::new(HashSet::new()),
            pulls_success: Counter::default(),
            pull_failures: Family::default(),
            pull_seconds: Family::new_with_constructor(pull_histogram),
            pulls_in_progress: Gauge::default(),
            gc_runs: Counter::default(),
            gc_freed_bytes: Counter::default(),
            gc_removed: Family::default(),
            exec_sessions: Family::default(),
            streaming_active: Family::default(),
            cni_seconds: Family::new_with_constructor(cni_histogram),
        }
    }

    /// A pull begins: it counts as in progress until [`Pull::finished`] or its drop (a canceled
    /// pull, its client gone).
    pub fn pull_started(&'static self) -> Pull {
        self.pulls_in_progress.inc();
        Pull { metrics: self, started: Instant::now(), done: false }
    }

    /// A garbage collection ran (whether or not it found garbage).
    pub fn gc_finished(&self, report: &imagestore::GcReport) {
        self.gc_runs.inc();
        self.gc_freed_bytes.inc_by(report.bytes_freed);
        for (kind, n) in
            [("image", report.images_removed.len()), ("layer", report.layers_removed), ("blob", report.blobs_removed)]
        {
            self.gc_removed.get_or_create(&KindLabel { kind }).inc_by(n as u64);
        }
    }

    /// An ExecSync ran a command (after its request was checked).
    pub fn exec_sync_started(&self) {
        self.exec_sessions.get_or_create(&KindLabel { kind: "exec_sync" }).inc();
    }

    /// A streaming session (`exec`, `attach` or `portforward`) starts; it is active until the
    /// returned guard drops.
    pub fn streaming_session(&'static self, kind: &'static str) -> StreamingSession {
        self.exec_sessions.get_or_create(&KindLabel { kind }).inc();
        self.streaming_active.get_or_create(&KindLabel { kind }).inc();
        StreamingSession { metrics: self, kind }
    }

    /// The label of a call's method: its name if it belongs to a CRI service and the set of names
    /// is not full yet.
    fn grpc_labels(&self, path: &str) -> (&'static str, String) {
        use proto::cri::{image_service_server, runtime_service_server};
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
        let service = match service {
            s if s == runtime_service_server::SERVICE_NAME => runtime_service_server::SERVICE_NAME,
            s if s == image_service_server::SERVICE_NAME => image_service_server::SERVICE_NAME,
            _ => return ("unknown", "unknown".into()),
        };
        let plausible = !method.is_empty() && method.len() <= 64 && method.bytes().all(|b| b.is_ascii_alphanumeric());
        let mut methods = self.grpc_methods.lock().expect("method set lock");
        let known = plausible
            && (methods.contains(method) || (methods.len() < MAX_GRPC_METHODS && methods.insert(method.to_owned())));
        (service, if known { method.to_owned() } else { "unknown".into() })
    }
}

/// An image pull under way (see [`Metrics::pull_started`]).
#[derive(Debug)]
pub struct Pull {
    metrics: &'static Metrics,
    started: Instant,
    done: bool,
}

impl Pull {
    /// The pull ended: `failure` is none for a pulled image, else why it failed.
    pub fn finished(mut self, failure: Option<&'static str>) {
        self.record(failure);
    }

    fn record(&mut self, failure: Option<&'static str>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let metrics = self.metrics;
        metrics.pulls_in_progress.dec();
        match failure {
            None => metrics.pulls_success.inc(),
            Some(reason) => metrics.pull_failures.get_or_create(&ReasonLabel { reason }).inc(),
        };
        let seconds = self.started.elapsed().as_secs_f64();
        metrics.pull_seconds.get_or_create(&ResultLabel { result: result(failure.is_none()) }).observe(seconds);
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        self.record(Some("canceled"));
    }
}

/// An active streaming session (see [`Metrics::streaming_session`]).
#[derive(Debug)]
pub struct StreamingSession {
    metrics: &'static Metrics,
    kind: &'static str,
}

impl Drop for StreamingSession {
    fn drop(&mut self) {
        self.metrics.streaming_active.get_or_create(&KindLabel { kind: self.kind }).dec();
    }
}

/// CNI ADDs and DELs, as the runtime reports them.
#[derive(Debug)]
struct CniMetrics;

impl runtime::CniObserver for CniMetrics {
    fn observe(&self, command: runtime::CniCommand, elapsed: Duration, ok: bool) {
        let operation = match command {
            runtime::CniCommand::Add => "add",
            runtime::CniCommand::Del => "del",
        };
        metrics()
            .cni_seconds
            .get_or_create(&CniLabels { operation, result: result(ok) })
            .observe(elapsed.as_secs_f64());
    }
}

/// Starts the endpoint if `[metrics] address` is set, and returns the layer that counts gRPC calls
/// (counting nothing when the endpoint is off). Call it once the runtime has recovered its
/// records: what it found is what `recovered_records` reports.
pub async fn start(config: &MetricsConfig, node: Arc<Node>) -> Result<GrpcMetricsLayer, MetricsError> {
    let Some(address) = config.address else {
        return Ok(GrpcMetricsLayer { enabled: false });
    };
    let listener = TcpListener::bind(address).await.map_err(|source| MetricsError::Listen { address, source })?;
    let runtime = node.runtime();
    runtime.set_cni_observer(Arc::new(CniMetrics));
    let recovered = Recovered {
        pods: runtime.pods(&Default::default()).len() as i64,
        containers: runtime.containers(&Default::default()).len() as i64,
    };
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let registry = Arc::new(registry(metrics(), NodeCollector { node, recovered, started }));
    info!(%address, "serving Prometheus metrics at /metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| {
                    let registry = registry.clone();
                    async move { Ok::<_, Infallible>(answer(&registry, &request)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    debug!(%peer, "metrics connection: {e}");
                }
            });
        }
    });
    Ok(GrpcMetricsLayer { enabled: true })
}

/// Every metric of this module, and those read from the node at each scrape.
fn registry(metrics: &Metrics, node: NodeCollector) -> Registry {
    let mut registry = Registry::with_prefix("cri_systemd");
    registry.register(
        "grpc_server_handled",
        "CRI calls completed, by service, method and gRPC code",
        metrics.grpc_handled.clone(),
    );
    registry.register(
        "grpc_server_handling_seconds",
        "Time from a CRI call's request to its gRPC status, by service, method and code",
        metrics.grpc_seconds.clone(),
    );
    registry.register("image_pulls_success", "Image pulls that succeeded", metrics.pulls_success.clone());
    registry.register("image_pulls_failure", "Image pulls that failed, by reason", metrics.pull_failures.clone());
    registry.register(
        "image_pull_duration_seconds",
        "Duration of image pulls, by result",
        metrics.pull_seconds.clone(),
    );
    registry.register("image_pulls_in_progress", "Image pulls under way", metrics.pulls_in_progress.clone());
    registry.register("image_gc_runs", "Image garbage collections run", metrics.gc_runs.clone());
    registry.register(
        "image_gc_freed_bytes",
        "Disk space freed by image garbage collection",
        metrics.gc_freed_bytes.clone(),
    );
    registry.register(
        "image_gc_removed",
        "Images, layers and blobs removed by garbage collection",
        metrics.gc_removed.clone(),
    );
    registry.register(
        "exec_sessions",
        "ExecSync commands run and streaming sessions (exec, attach, portforward) started",
        metrics.exec_sessions.clone(),
    );
    registry.register(
        "streaming_sessions_active",
        "Streaming sessions (exec, attach, portforward) open now",
        metrics.streaming_active.clone(),
    );
    registry.register(
        "cni_operation_duration_seconds",
        "Duration of CNI ADDs and DELs (the network's whole plugin chain), by result",
        metrics.cni_seconds.clone(),
    );
    registry.register_collector(Box::new(node));
    registry
}

/// The body of a scrape: OpenMetrics text if the scraper asks for it, else Prometheus text 0.0.4.
fn answer(registry: &Registry, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != "/metrics" && path != "/v1/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let openmetrics = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|value| value.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    let mut text = String::new();
    let (encoded, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut text, registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut text, registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    if let Err(e) = encoded {
        warn!("metrics encoding: {e}");
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n");
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// What the runtime held after its start-up recovery.
#[derive(Debug, Clone, Copy)]
struct Recovered {
    pods: i64,
    containers: i64,
}

/// The metrics read at scrape time: from the runtime's tables and the image store's counters.
#[derive(Debug)]
struct NodeCollector {
    node: Arc<Node>,
    recovered: Recovered,
    /// The daemon's start, seconds since the epoch.
    started: f64,
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use runtime::{ContainerState, PodState};
        let runtime = self.node.runtime();
        let mut pods = [("creating", 0), ("ready", 0), ("not_ready", 0), ("removing", 0)];
        for pod in runtime.pods(&Default::default()) {
            let index = match pod.state {
                PodState::Creating => 0,
                PodState::Ready => 1,
                PodState::NotReady => 2,
                PodState::Removing => 3,
            };
            pods[index].1 += 1;
        }
        gauges(&mut encoder, "pods", "Pods by state, from the runtime's records", "state", &pods)?;
        let mut containers = [("creating", 0), ("created", 0), ("running", 0), ("exited", 0), ("removing", 0)];
        for container in runtime.containers(&Default::default()) {
            let index = match container.state {
                ContainerState::Creating => 0,
                ContainerState::Created => 1,
                ContainerState::Running => 2,
                ContainerState::Exited => 3,
                ContainerState::Removing => 4,
            };
            containers[index].1 += 1;
        }
        gauges(&mut encoder, "containers", "Containers by state, from the runtime's records", "state", &containers)?;
        let recovered = [("pod", self.recovered.pods), ("container", self.recovered.containers)];
        gauges(
            &mut encoder,
            "recovered_records",
            "Pod and container records the daemon recovered at its start",
            "kind",
            &recovered,
        )?;
        let mut quarantined = [("pod", 0), ("container", 0)];
        for record in runtime.quarantined() {
            match quarantined.iter_mut().find(|(kind, _)| *kind == record.kind) {
                Some(entry) => entry.1 += 1,
                None => warn!(kind = %record.kind, "quarantined record of an unknown kind"),
            }
        }
        gauges(
            &mut encoder,
            "quarantined_records",
            "Records that could not be read and were set aside (now or at an earlier start)",
            "kind",
            &quarantined,
        )?;
        let store = self.node.images().counters();
        counter(
            &mut encoder,
            "image_pulls_bytes",
            "Bytes of layers and configs received from registries",
            store.bytes_fetched,
        )?;
        counter(&mut encoder, "image_layers_unpacked", "Image layers unpacked", store.layers_unpacked)?;
        counter(&mut encoder, "image_layer_reuse", "Layers a pull found unpacked already", store.layers_reused)?;
        let metric = encoder.encode_descriptor(
            "start_time_seconds",
            "When the daemon started, seconds since the Unix epoch",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.started).encode(metric)?;
        let mut metric =
            encoder.encode_descriptor("build_info", "The daemon's version (always 1)", None, MetricType::Gauge)?;
        ConstGauge::new(1).encode(metric.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)?;
        Ok(())
    }
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&'static str, i64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for &(value_label, value) in values {
        ConstGauge::new(value).encode(metric.encode_family(&[(label, value_label)])?)?;
    }
    Ok(())
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

// ---- the gRPC layer ----

/// Counts every call of the services it wraps (`grpc_server_handled_total`, with its time in
/// `grpc_server_handling_seconds`). Does nothing when the endpoint is off.
#[derive(Debug, Clone, Copy)]
pub struct GrpcMetricsLayer {
    enabled: bool,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner, enabled: self.enabled }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    enabled: bool,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let call = self.enabled.then(|| Call::start(metrics(), request.uri().path()));
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut call = call;
            let response = answer.await?;
            // A call refused or failed at once has its status in the headers (trailers-only).
            if let Some(code) = response.headers().get("grpc-status")
                && let Some(mut call) = call.take()
            {
                call.finish(code);
            }
            Ok(response.map(|body| MeteredBody { body, call }))
        })
    }
}

/// A call under way: counted once, when its status is known, or as `Canceled` if it is dropped
/// before (the client reset the stream, or the connection closed).
#[derive(Debug)]
struct Call {
    metrics: &'static Metrics,
    service: &'static str,
    method: String,
    started: Instant,
    done: bool,
}

impl Call {
    fn start(metrics: &'static Metrics, path: &str) -> Call {
        let (service, method) = metrics.grpc_labels(path);
        Call { metrics, service, method, started: Instant::now(), done: false }
    }

    fn finish(&mut self, status: &HeaderValue) {
        let code = status.to_str().ok().and_then(|s| s.parse::<i32>().ok()).unwrap_or(2);
        self.record(code_name(code));
    }

    fn record(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let labels =
            GrpcLabels { grpc_service: self.service, grpc_method: std::mem::take(&mut self.method), grpc_code: code };
        self.metrics.grpc_seconds.get_or_create(&labels).observe(self.started.elapsed().as_secs_f64());
        self.metrics.grpc_handled.get_or_create(&labels).inc();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record("Canceled");
    }
}

/// A gRPC code as go-grpc (and so containerd's metrics) spells it.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

/// A response body that counts its call when the trailers carry the status (or when it ends or is
/// dropped without one).
#[derive(Debug)]
pub struct MeteredBody<B> {
    body: B,
    call: Option<Call>,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(status) = frame.trailers_ref().and_then(|trailers| trailers.get("grpc-status"))
                    && let Some(mut call) = this.call.take()
                {
                    call.finish(status);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut call) = this.call.take() {
                    call.record("Internal");
                }
            }
            // The end without trailers: no status was sent.
            Poll::Ready(None) => {
                if let Some(mut call) = this.call.take() {
                    call.record("Unknown");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        assert_eq!(
            metrics.grpc_labels("/runtime.v1.RuntimeService/RunPodSandbox"),
            ("runtime.v1.RuntimeService", "RunPodSandbox".to_string())
        );
        assert_eq!(
            metrics.grpc_labels("/runtime.v1.ImageService/PullImage"),
            ("runtime.v1.ImageService", "PullImage".to_string())
        );
        assert_eq!(metrics.grpc_labels("/grpc.health.v1.Health/Check"), ("unknown", "unknown".to_string()));
        assert_eq!(
            metrics.grpc_labels("/runtime.v1.RuntimeService/a\"b"),
            ("runtime.v1.RuntimeService", "unknown".into())
        );
        for n in 0..MAX_GRPC_METHODS * 2 {
            metrics.grpc_labels(&format!("/runtime.v1.RuntimeService/Made{n}"));
        }
        assert_eq!(metrics.grpc_methods.lock().unwrap().len(), MAX_GRPC_METHODS);
        // Names seen before the set filled up keep their label; new ones do not get one.
        assert_eq!(metrics.grpc_labels("/runtime.v1.RuntimeService/RunPodSandbox").1, "RunPodSandbox");
        assert_eq!(metrics.grpc_labels("/runtime.v1.RuntimeService/Version").1, "unknown");
    }

    #[test]
    fn codes_are_spelled_as_go_grpc_does() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(1), "Canceled");
        assert_eq!(code_name(5), "NotFound");
        assert_eq!(code_name(16), "Unauthenticated");
        assert_eq!(code_name(2), "Unknown");
        assert_eq!(code_name(99), "Unknown");
    }
}
