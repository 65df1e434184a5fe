//! OpenTelemetry traces of CRI calls (the `[tracing]` table, off by default): one server span per
//! CRI call, exported over OTLP, with the daemon's `tracing` spans inside it as children.
//!
//! - **Spans.** [`CallSpans`], the one tower layer in front of both CRI services, opens a span per
//!   call named as otelgrpc (what containerd and the kubelet use) names it,
//!   `runtime.v1.RuntimeService/RunPodSandbox`, kind server, with `rpc.system`, `rpc.service`,
//!   `rpc.method` and `rpc.grpc.status_code` (from the response headers, or the trailers once the
//!   body has been sent). It reads the request's one message as it passes (nothing is held back
//!   or copied unless tracing is on) and adds the ids it names: `k8s.pod.name`, `k8s.pod.uid`,
//!   `k8s.namespace.name`, `k8s.container.name`, `container.image.name` (OpenTelemetry's semantic
//!   conventions), and `sandbox.id`, `container.id` (containerd's CRI span attributes; the sandbox
//!   has no semantic-convention name). The ids a call creates (RunPodSandbox's sandbox id,
//!   CreateContainer's container id) come from the answer. The steps inside a call are plain
//!   `tracing` spans where they happen (`systemd.start_unit`, `cni.add`, `container.prepare`,
//!   `image.pull`, ...): `runtime` and `imagestore` know nothing of OpenTelemetry;
//!   tracing-opentelemetry turns those spans into OTel spans below the call's span.
//! - **Parent.** A W3C `traceparent` in the call's metadata makes the call a child of the
//!   caller's span: the kubelet's CRI client (k8s.io/cri-client, remote_runtime.go and
//!   remote_image.go) installs otelgrpc's client handler with the TraceContext and Baggage
//!   propagators, so with the kubelet's tracing on its spans and ours form one trace.
//! - **Config.** As containerd 1.7's tracing plugins (`endpoint` of
//!   `io.containerd.tracing.processor.v1.otlp`, `sampling_ratio` and `service_name` of
//!   `io.containerd.internal.v1.tracing`; containerd 2 deprecates them for the OTEL_* variables),
//!   in one `[tracing]` table: `otlp_endpoint`, `sampling_ratio`, `service_name`.
//! - **Sampling.** Parent-based, then `sampling_ratio` of the trace ids, as containerd 1.7's
//!   `ParentBased(TraceIDRatioBased(sampling_ratio))`: a caller's sampled trace is always followed.
//! - **Export.** OTLP over gRPC with opentelemetry-otlp's tonic exporter: opentelemetry-otlp 0.33
//!   builds on tonic 0.14 and prost 0.14, this workspace's, so no second gRPC stack comes in (the
//!   OTLP/HTTP exporter would have added reqwest). The SDK's batch span processor exports from its
//!   own thread: a CRI call only queues its span (a full queue drops spans), an unreachable
//!   collector is a warning in the journal (once, then once when it answers again), never an
//!   error of a call. [`Tracing::shutdown`] flushes what is queued when the daemon stops.
//!
//! Why these crates: they are the OpenTelemetry project's own (opentelemetry, opentelemetry_sdk,
//! opentelemetry-otlp) and tokio's bridge from `tracing` (tracing-opentelemetry); writing OTLP
//! encoding, batching and W3C parsing by hand would only add bugs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::codegen::http;
use tracing::field::Empty;
use tracing::{Instrument, Span, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;

use proto::cri;

/// The `[tracing]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/gRPC endpoint of a collector, e.g. `http://127.0.0.1:4317`. None: no tracing.
    pub otlp_endpoint: Option<String>,
    /// The share of traces to record, 0.0 to 1.0, for calls whose caller sent no sampled trace.
    pub sampling_ratio: f64,
    /// `service.name` of the spans' resource.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self { otlp_endpoint: None, sampling_ratio: 1.0, service_name: "cri-systemd".into() }
    }
}

impl TracingConfig {
    /// What serde cannot check: the key at fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(endpoint) = &self.otlp_endpoint {
            check_endpoint(endpoint).map_err(|message| ("tracing.otlp_endpoint", message))?;
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(("tracing.sampling_ratio", format!("{} is not between 0.0 and 1.0", self.sampling_ratio)));
        }
        if self.service_name.trim().is_empty() {
            return Err(("tracing.service_name", "must not be empty".into()));
        }
        Ok(())
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{endpoint:?}: https is not supported yet; send to a collector on the node or the pod network \
                 over http://"
            ));
        }
        _ => return Err(format!("{endpoint:?} is not an http:// URL (e.g. http://127.0.0.1:4317)")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?} names no host (e.g. http://127.0.0.1:4317)"));
    }
    Ok(())
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("cannot set up the OTLP exporter to {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// The exporting pipeline: none when tracing is off.
#[derive(Debug)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
    /// The endpoint and ratio, for the log.
    description: String,
}

/// How long an export may take (the OTLP exporter's default is 10 s); the batch thread waits.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

impl Tracing {
    /// Sets up the exporter and batch processor; nothing is sent yet. Must run inside the tokio
    /// runtime that serves (tonic's channel lives there); the connection is made on first export.
    pub fn start(config: &TracingConfig) -> Result<Tracing, OtelError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(Tracing { provider: None, description: String::new() });
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| OtelError::Exporter { endpoint: endpoint.clone(), reason: e.to_string() })?;
        let exporter = Logged { inner: exporter, endpoint: endpoint.clone(), failing: AtomicBool::new(false) };
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio)));
        let resource = Resource::builder().with_service_name(config.service_name.clone()).build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let description = format!("{endpoint} (sampling ratio {})", config.sampling_ratio);
        Ok(Tracing { provider: Some(provider), description })
    }

    /// Logs where traces go (once logging is up).
    pub fn announce(&self) {
        if self.enabled() {
            info!("exporting traces of CRI calls over OTLP to {}", self.description);
        }
    }

    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// The `tracing` layer that turns the daemon's spans into OTel spans (none when off). Only
    /// this workspace's spans are exported: a CRI call and its steps, not the libraries' own.
    pub fn layer<S>(&self) -> Option<Box<dyn Layer<S> + Send + Sync>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let provider = self.provider.as_ref()?;
        let ours = Targets::new()
            .with_target("cri_server", LevelFilter::INFO)
            .with_target("runtime", LevelFilter::INFO)
            .with_target("imagestore", LevelFilter::INFO);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("cri-systemd"))
            .with_location(false)
            .with_threads(false)
            .with_filter(ours);
        Some(Box::new(layer))
    }

    /// Exports what is queued and stops the batch thread (at most the export timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            match provider.shutdown() {
                Ok(()) => info!("traces flushed"),
                Err(e) => warn!("cannot flush traces: {e}"),
            }
        }
    }
}

/// The exporter, with failures logged when they start and when they end rather than at every
/// batch (an unreachable collector would otherwise log every 5 s).
#[derive(Debug)]
struct Logged<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for Logged<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                warn!(endpoint = %self.endpoint, spans, "cannot export traces (they are dropped until the collector answers): {e}")
            }
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                info!(endpoint = %self.endpoint, "the trace collector answers again")
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

// ---- The call span ---------------------------------------------------------------------------

/// The tower layer that gives every CRI call its span (does nothing when tracing is off).
#[derive(Debug, Clone, Copy)]
pub struct CallSpans {
    enabled: bool,
}

impl CallSpans {
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }
}

impl<S> tower::Layer<S> for CallSpans {
    type Service = CallSpanService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallSpanService { inner, enabled: self.enabled }
    }
}

/// See [`CallSpans`].
#[derive(Debug, Clone)]
pub struct CallSpanService<S> {
    inner: S,
    enabled: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for CallSpanService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if !self.enabled {
            let call = self.inner.call(request);
            return Box::pin(async move { Ok(call.await?.map(tonic::body::Body::new)) });
        }
        let path = request.uri().path().trim_start_matches('/').to_string();
        let span = call_span(&path);
        let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
        // Before anything starts the span: its parent cannot change afterwards.
        let _ = span.set_parent(parent);
        let method: Arc<str> = path.rsplit('/').next().unwrap_or_default().into();
        let request = request
            .map(|body| tonic::body::Body::new(Observed::new(body, span.clone(), method.clone(), Side::Request)));
        let call = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let response = call.await?;
            // A call refused at once answers "trailers-only": the status is in the headers.
            if let Some(code) = grpc_status(response.headers()) {
                record_status(&span, code);
            }
            Ok(response.map(|body| tonic::body::Body::new(Observed::new(body, span, method, Side::Response))))
        })
    }
}

/// The span of call `path` (`runtime.v1.RuntimeService/RunPodSandbox`), its attributes still empty.
fn call_span(path: &str) -> Span {
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    tracing::info_span!(
        "cri call",
        otel.name = %path,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = Empty,
        k8s.pod.name = Empty,
        k8s.pod.uid = Empty,
        k8s.namespace.name = Empty,
        k8s.container.name = Empty,
        sandbox.id = Empty,
        container.id = Empty,
        container.image.name = Empty,
    )
}

/// `grpc-status` of a header or trailer map.
fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn record_status(span: &Span, code: i64) {
    span.record("rpc.grpc.status_code", code);
    // OpenTelemetry's gRPC conventions: on the server, only these codes are the server's fault.
    const SERVER_ERRORS: [i64; 6] = [2, 4, 12, 13, 14, 15];
    if SERVER_ERRORS.contains(&code) {
        span.record("otel.status_code", "error");
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// A body passed on untouched while its first gRPC message is read for the span's attributes
/// (and, for an answer, its trailers for the status). Holds the span open until it is done.
struct Observed {
    inner: tonic::body::Body,
    first: FirstMessage,
    span: Span,
    method: Arc<str>,
    side: Side,
}

impl Observed {
    fn new<B>(body: B, span: Span, method: Arc<str>, side: Side) -> Self
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Only the messages that name something are read: no copy of a large List or ExecSync answer.
        let read = match side {
            Side::Request => REQUESTS_READ.contains(&&*method),
            Side::Response => RESPONSES_READ.contains(&&*method),
        };
        let first = FirstMessage { done: !read, ..Default::default() };
        Self { inner: tonic::body::Body::new(body), first, span, method, side }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                if let Some(message) = this.first.feed(data) {
                    match this.side {
                        Side::Request => record_request(&this.span, &this.method, &message),
                        Side::Response => record_response(&this.span, &this.method, &message),
                    }
                }
            } else if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                record_status(&this.span, code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The largest message read for attributes: tonic's default receive limit, which the CRI
/// services keep. A larger one passes unread.
const MAX_MESSAGE: usize = 4 << 20;

/// Collects the first gRPC message of a body (5-byte prefix: compressed flag, big-endian length).
#[derive(Debug, Default)]
struct FirstMessage {
    buffer: Vec<u8>,
    done: bool,
}

impl FirstMessage {
    /// Takes the next bytes of the body; returns the first message once it is whole. Compressed
    /// or oversized messages are given up on.
    fn feed(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        self.buffer.extend_from_slice(data);
        if self.buffer.len() < 5 {
            return None;
        }
        let length = u32::from_be_bytes([self.buffer[1], self.buffer[2], self.buffer[3], self.buffer[4]]) as usize;
        if self.buffer[0] != 0 || length > MAX_MESSAGE {
            self.done = true;
            self.buffer = Vec::new();
            return None;
        }
        if self.buffer.len() < 5 + length {
            return None;
        }
        self.done = true;
        let mut message = std::mem::take(&mut self.buffer);
        message.truncate(5 + length);
        message.drain(..5);
        Some(message)
    }
}

/// What a span says about a pod, a container and an image, as far as a message names them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Attributes {
    pod_name: Option<String>,
    pod_uid: Option<String>,
    namespace: Option<String>,
    container_name: Option<String>,
    sandbox_id: Option<String>,
    container_id: Option<String>,
    image: Option<String>,
}

impl Attributes {
    fn pod(&mut self, config: Option<&cri::PodSandboxConfig>) {
        if let Some(metadata) = config.and_then(|c| c.metadata.as_ref()) {
            self.pod_name = Some(metadata.name.clone());
            self.pod_uid = Some(metadata.uid.clone());
            self.namespace = Some(metadata.namespace.clone());
        }
    }

    fn image(&mut self, image: Option<&cri::ImageSpec>) {
        self.image = image.map(|i| i.image.clone());
    }

    fn record(self, span: &Span) {
        let fields = [
            ("k8s.pod.name", self.pod_name),
            ("k8s.pod.uid", self.pod_uid),
            ("k8s.namespace.name", self.namespace),
            ("k8s.container.name", self.container_name),
            ("sandbox.id", self.sandbox_id),
            ("container.id", self.container_id),
            ("container.image.name", self.image),
        ];
        for (field, value) in fields {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                span.record(field, value);
            }
        }
    }
}

fn decode<M: Message + Default>(message: &[u8]) -> Option<M> {
    M::decode(message).ok()
}

/// The methods whose request [`request_attributes`] reads.
const REQUESTS_READ: &[&str] = &[
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "PortForward",
    "PodSandboxStats",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ContainerStatus",
    "ContainerStats",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "CheckpointContainer",
    "PullImage",
    "ImageStatus",
    "RemoveImage",
];

/// The methods whose answer [`response_attributes`] reads.
const RESPONSES_READ: &[&str] = &["RunPodSandbox", "CreateContainer"];

/// The ids a request of `method` names.
fn request_attributes(method: &str, message: &[u8]) -> Attributes {
    let mut a = Attributes::default();
    match method {
        "RunPodSandbox" => {
            if let Some(r) = decode::<cri::RunPodSandboxRequest>(message) {
                a.pod(r.config.as_ref());
            }
        }
        "StopPodSandbox" => a.sandbox_id = decode::<cri::StopPodSandboxRequest>(message).map(|r| r.pod_sandbox_id),
        "RemovePodSandbox" => a.sandbox_id = decode::<cri::RemovePodSandboxRequest>(message).map(|r| r.pod_sandbox_id),
        "PodSandboxStatus" => a.sandbox_id = decode::<cri::PodSandboxStatusRequest>(message).map(|r| r.pod_sandbox_id),
        "PortForward" => a.sandbox_id = decode::<cri::PortForwardRequest>(message).map(|r| r.pod_sandbox_id),
        "PodSandboxStats" => a.sandbox_id = decode::<cri::PodSandboxStatsRequest>(message).map(|r| r.pod_sandbox_id),
        "CreateContainer" => {
            if let Some(r) = decode::<cri::CreateContainerRequest>(message) {
                a.sandbox_id = Some(r.pod_sandbox_id);
                a.pod(r.sandbox_config.as_ref());
                if let Some(config) = &r.config {
                    a.container_name = config.metadata.as_ref().map(|m| m.name.clone());
                    a.image(config.image.as_ref());
                }
            }
        }
        "StartContainer" => a.container_id = decode::<cri::StartContainerRequest>(message).map(|r| r.container_id),
        "StopContainer" => a.container_id = decode::<cri::StopContainerRequest>(message).map(|r| r.container_id),
        "RemoveContainer" => a.container_id = decode::<cri::RemoveContainerRequest>(message).map(|r| r.container_id),
        "ContainerStatus" => a.container_id = decode::<cri::ContainerStatusRequest>(message).map(|r| r.container_id),
        "ContainerStats" => a.container_id = decode::<cri::ContainerStatsRequest>(message).map(|r| r.container_id),
        "UpdateContainerResources" => {
            a.container_id = decode::<cri::UpdateContainerResourcesRequest>(message).map(|r| r.container_id)
        }
        "ReopenContainerLog" => {
            a.container_id = decode::<cri::ReopenContainerLogRequest>(message).map(|r| r.container_id)
        }
        "ExecSync" => a.container_id = decode::<cri::ExecSyncRequest>(message).map(|r| r.container_id),
        "Exec" => a.container_id = decode::<cri::ExecRequest>(message).map(|r| r.container_id),
        "Attach" => a.container_id = decode::<cri::AttachRequest>(message).map(|r| r.container_id),
        "CheckpointContainer" => {
            a.container_id = decode::<cri::CheckpointContainerRequest>(message).map(|r| r.container_id)
        }
        "PullImage" => {
            if let Some(r) = decode::<cri::PullImageRequest>(message) {
                a.image(r.image.as_ref());
                a.pod(r.sandbox_config.as_ref());
            }
        }
        "ImageStatus" => {
            if let Some(r) = decode::<cri::ImageStatusRequest>(message) {
                a.image(r.image.as_ref());
            }
        }
        "RemoveImage" => {
            if let Some(r) = decode::<cri::RemoveImageRequest>(message) {
                a.image(r.image.as_ref());
            }
        }
        _ => {}
    }
    a
}

/// The ids an answer of `method` adds: those the call created.
fn response_attributes(method: &str, message: &[u8]) -> Attributes {
    let mut a = Attributes::default();
    match method {
        "RunPodSandbox" => a.sandbox_id = decode::<cri::RunPodSandboxResponse>(message).map(|r| r.pod_sandbox_id),
        "CreateContainer" => a.container_id = decode::<cri::CreateContainerResponse>(message).map(|r| r.container_id),
        _ => {}
    }
    a
}

fn record_request(span: &Span, method: &str, message: &[u8]) {
    request_attributes(method, message).record(span);
}

fn record_response(span: &Span, method: &str, message: &[u8]) {
    response_attributes(method, message).record(span);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(message);
        framed
    }

    #[test]
    fn first_message_is_found_across_frames_and_only_once() {
        let message = b"hello world".to_vec();
        let body = framed(&message);
        let mut first = FirstMessage::default();
        assert_eq!(first.feed(&body[..3]), None);
        assert_eq!(first.feed(&body[3..8]), None);
        let mut rest = body[8..].to_vec();
        rest.extend_from_slice(&framed(b"second"));
        assert_eq!(first.feed(&rest), Some(message));
        assert_eq!(first.feed(&framed(b"third")), None);
    }

    #[test]
    fn compressed_or_oversized_messages_are_given_up() {
        let mut compressed = framed(b"x");
        compressed[0] = 1;
        let mut first = FirstMessage::default();
        assert_eq!(first.feed(&compressed), None);
        assert_eq!(first.feed(&framed(b"y")), None);
        let mut huge = vec![0];
        huge.extend_from_slice(&((MAX_MESSAGE + 1) as u32).to_be_bytes());
        let mut first = FirstMessage::default();
        assert_eq!(first.feed(&huge), None);
        assert!(first.buffer.is_empty());
    }

    fn pod_config() -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                uid: "uid-1".into(),
                namespace: "ns".into(),
                attempt: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn requests_name_their_pod_container_and_image() {
        let run = cri::RunPodSandboxRequest { config: Some(pod_config()), runtime_handler: String::new() };
        let a = request_attributes("RunPodSandbox", &run.encode_to_vec());
        assert_eq!(
            (a.pod_name.as_deref(), a.pod_uid.as_deref(), a.namespace.as_deref()),
            (Some("web"), Some("uid-1"), Some("ns"))
        );
        let create = cri::CreateContainerRequest {
            pod_sandbox_id: "pod1".into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata { name: "app".into(), attempt: 0 }),
                image: Some(cri::ImageSpec { image: "busybox:1".into(), ..Default::default() }),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config()),
        };
        let a = request_attributes("CreateContainer", &create.encode_to_vec());
        assert_eq!(a.sandbox_id.as_deref(), Some("pod1"));
        assert_eq!(a.container_name.as_deref(), Some("app"));
        assert_eq!(a.image.as_deref(), Some("busybox:1"));
        assert_eq!(a.pod_uid.as_deref(), Some("uid-1"));
        let start = cri::StartContainerRequest { container_id: "c1".into() };
        assert_eq!(request_attributes("StartContainer", &start.encode_to_vec()).container_id.as_deref(), Some("c1"));
        let stop = cri::StopPodSandboxRequest { pod_sandbox_id: "pod1".into() };
        assert_eq!(request_attributes("StopPodSandbox", &stop.encode_to_vec()).sandbox_id.as_deref(), Some("pod1"));
        // Another method, or bytes that are no such message: nothing.
        assert_eq!(request_attributes("Version", &run.encode_to_vec()), Attributes::default());
        assert_eq!(request_attributes("StartContainer", &[0xff, 0xff]), Attributes::default());
    }

    #[test]
    fn the_methods_read_are_the_methods_decoded() {
        // A message of the right shape for each: every listed method yields something, so no
        // method is read for nothing and no decoded method is left unread.
        let id = cri::StartContainerRequest { container_id: "x".into() }.encode_to_vec();
        let image = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec { image: "x".into(), ..Default::default() }),
            verbose: false,
        }
        .encode_to_vec();
        let pod = cri::RunPodSandboxRequest { config: Some(pod_config()), runtime_handler: String::new() };
        for method in REQUESTS_READ {
            let message = match *method {
                "RunPodSandbox" => pod.encode_to_vec(),
                "PullImage" | "ImageStatus" | "RemoveImage" => image.clone(),
                _ => id.clone(),
            };
            assert_ne!(request_attributes(method, &message), Attributes::default(), "{method}");
        }
        for method in RESPONSES_READ {
            assert_ne!(response_attributes(method, &id), Attributes::default(), "{method}");
        }
    }

    #[test]
    fn answers_name_what_the_call_created() {
        let run = cri::RunPodSandboxResponse { pod_sandbox_id: "pod1".into() };
        assert_eq!(response_attributes("RunPodSandbox", &run.encode_to_vec()).sandbox_id.as_deref(), Some("pod1"));
        let create = cri::CreateContainerResponse { container_id: "c1".into() };
        assert_eq!(response_attributes("CreateContainer", &create.encode_to_vec()).container_id.as_deref(), Some("c1"));
    }

    #[test]
    fn config_is_checked() {
        let ok = TracingConfig { otlp_endpoint: Some("http://127.0.0.1:4317".into()), ..Default::default() };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(TracingConfig::default().validate(), Ok(()));
        let bad = |config: TracingConfig| config.validate().unwrap_err().0;
        for endpoint in ["127.0.0.1:4317", "not a url", "https://collector:4317", "http://"] {
            let config = TracingConfig { otlp_endpoint: Some(endpoint.into()), ..Default::default() };
            assert_eq!(bad(config), "tracing.otlp_endpoint", "{endpoint}");
        }
        assert_eq!(bad(TracingConfig { sampling_ratio: 1.5, ..Default::default() }), "tracing.sampling_ratio");
        assert_eq!(bad(TracingConfig { sampling_ratio: f64::NAN, ..Default::default() }), "tracing.sampling_ratio");
        assert_eq!(bad(TracingConfig { service_name: " ".into(), ..Default::default() }), "tracing.service_name");
    }
}
