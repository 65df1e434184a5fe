//! The streaming server: Exec, Attach and PortForward answer with a URL on it, carrying a
//! single-use token that expires (`[streaming] token_ttl_secs`) and stands for that request only.
//! The kubelet proxies clients (kubectl, crictl) to it; they speak the Kubernetes protocols:
//!
//! - exec and attach over SPDY/3.1 (`X-Stream-Protocol-Version` v4.channel.k8s.io, v3, v2,
//!   channel.k8s.io): one SPDY stream per stdio stream, named by its `streamType` header, plus
//!   `error` (the end status) and `resize` (terminal sizes as JSON); or over WebSocket
//!   (`Sec-WebSocket-Protocol` v5.channel.k8s.io, v4.channel.k8s.io, channel.k8s.io): binary
//!   messages whose first byte is the channel (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize;
//!   v5's 255 closes a channel).
//! - port forwarding over SPDY (`portforward.k8s.io`): a data and an error stream per request,
//!   with `port` and `requestID` headers; or over WebSocket (the ports of the CRI request, data
//!   channel 2n and error channel 2n+1, each opened with the port as 16-bit little endian).
//!
//! With v4 and v5 the error channel carries a metav1.Status (Success, or Failure with reason
//! NonZeroExitCode and the exit code as the message of its ExitCode cause); before v4, only the
//! message of a failure.
//!
//! This module holds only the protocols: what a session does in a container or a pod is the
//! backend's, [`runtime::StreamingRuntime`] (the kubelet's `streaming.Runtime` shape: exec,
//! attach, port_forward), which the daemon's runtime implements. A session hands the backend
//! channels of bytes and terminal sizes and reports how the backend's call ended.
//!
//! # Sessions and bounds
//!
//! Exec, Attach and PortForward return a URL with a single-use token on the daemon's streaming
//! server (`cri-server/src/streaming/`): the Kubernetes remote command protocols over SPDY/3.1
//! (framing and zlib header compression in `spdy.rs`) and WebSocket (v4/v5 channels), and port
//! forwarding over both. The server holds only the protocols; what a session does is the runtime's,
//! behind `runtime::StreamingRuntime` (`runtime/src/streaming.rs`, the kubelet's
//! `streaming.Runtime` shape: exec, attach, port_forward over channels of bytes and terminal sizes;
//! its module doc says why the trait lives in `runtime`). Port forwarding connects from a thread
//! inside the pod's pinned network namespace (`runtime::namespaces::connect_loopback`). Attach
//! streams the container's output pipes as the daemon reads them, or its terminal, and carries
//! stdin and terminal sizes to containers created with `stdin`/`tty` (`runtime/src/stdio.rs`); it
//! ends when the output or the terminal ends or the container's Stopped event comes (the exit
//! watch, `runtime/src/events.rs`), at once.
//!
//! Bounds against hostile clients: 128 connections at once (more are closed at accept), 10 s to
//! send a request head or finish a TLS handshake (slowloris), SPDY frames and WebSocket messages of
//! at most 1 MiB, SPDY header blocks of 256 KiB, 64 open streams per connection, each queuing at
//! most 512 KiB of the client's data, and 16 port forwards waiting for their second stream (e2e
//! `hostile::streaming_server_*`, `hostile::port_forward_*`, `hostile::websocket_*`).

mod portforward;
mod remote;
pub mod spdy;
pub mod transport;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use runtime::StreamingRuntime;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::config::StreamingConfig;

/// What a token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRequest {
    Exec { container_id: String, command: Vec<String>, tty: bool, stdin: bool, stdout: bool, stderr: bool },
    Attach { container_id: String, stdin: bool, tty: bool, stdout: bool, stderr: bool },
    PortForward { pod_id: String, ports: Vec<u16> },
}

impl StreamRequest {
    fn kind(&self) -> &'static str {
        match self {
            StreamRequest::Exec { .. } => "exec",
            StreamRequest::Attach { .. } => "attach",
            StreamRequest::PortForward { .. } => "portforward",
        }
    }
}

/// The server: its address, its tokens, and the backend that runs its sessions.
#[derive(Debug)]
pub struct StreamingServer {
    base_url: String,
    stream_creation_timeout: Duration,
    idle_timeout: Option<Duration>,
    tokens: Tokens,
    backend: Arc<dyn StreamingRuntime>,
}

/// Single-use tokens, each standing for one request until it is used or expires.
#[derive(Debug)]
struct Tokens {
    ttl: Duration,
    live: Mutex<HashMap<String, (StreamRequest, Instant)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("cannot listen on {address}: {source}; set `streaming.address`/`streaming.port` in the config")]
    Listen { address: SocketAddr, source: std::io::Error },
    #[error("streaming TLS: {0}")]
    Tls(String),
}

/// Most connections served at once; one more is closed as soon as it is accepted. The kubelet
/// makes one per Exec/Attach/PortForward session, so this is far above what a node runs, and it
/// bounds what slow or idle clients can hold (each connection's queues are bounded too, see
/// transport.rs).
const MAX_CONNECTIONS: usize = 128;
/// How long a client has to send a whole request head (and, with TLS, to finish its handshake):
/// a slowloris client that trickles its head is dropped then, freeing its slot.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most tokens outstanding at once; beyond, the oldest are dropped (each is one RPC's answer).
const MAX_TOKENS: usize = 10_000;

impl StreamingServer {
    /// Binds the listener and serves in the background.
    pub async fn start(
        config: &StreamingConfig,
        backend: Arc<dyn StreamingRuntime>,
    ) -> Result<Arc<StreamingServer>, StreamingError> {
        let address = SocketAddr::new(config.address, config.port);
        let listener = TcpListener::bind(address).await.map_err(|source| StreamingError::Listen { address, source })?;
        let local = listener.local_addr().map_err(|source| StreamingError::Listen { address, source })?;
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(transport::tls_acceptor(cert, key).map_err(StreamingError::Tls)?),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = match local {
            SocketAddr::V4(v4) => v4.to_string(),
            SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
        };
        let server = Arc::new(StreamingServer {
            base_url: format!("{scheme}://{host}"),
            stream_creation_timeout: Duration::from_secs(config.stream_creation_timeout_secs),
            idle_timeout: (config.idle_timeout_secs > 0).then(|| Duration::from_secs(config.idle_timeout_secs)),
            tokens: Tokens { ttl: Duration::from_secs(config.token_ttl_secs), live: Mutex::new(HashMap::new()) },
            backend,
        });
        info!(url = %server.base_url, "streaming server listening");
        let accepting = server.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            let mut refused: u64 = 0;
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!("streaming server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Logged once per 100, so that a flood does not flood the journal too.
                    if refused.is_multiple_of(100) {
                        warn!(%peer, refused = refused + 1, "streaming server: {MAX_CONNECTIONS} connections open, refusing more");
                    }
                    refused += 1;
                    drop(stream);
                    continue;
                };
                let server = accepting.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = stream.set_nodelay(true);
                    match tls {
                        Some(acceptor) => {
                            match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => server.serve_connection(stream).await,
                                Ok(Err(e)) => debug!(%peer, "streaming TLS handshake: {e}"),
                                Err(_) => debug!(%peer, "streaming TLS handshake: timed out"),
                            }
                        }
                        None => server.serve_connection(stream).await,
                    }
                });
            }
        });
        Ok(server)
    }

    /// The URL of a new single-use token for `request`.
    pub fn url_for(&self, request: StreamRequest) -> String {
        let kind = request.kind();
        let token = self.tokens.issue(request);
        format!("{}/{kind}/{token}", self.base_url)
    }

    async fn serve_connection<IO>(self: Arc<Self>, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |request| {
            let server = self.clone();
            async move { Ok::<_, Infallible>(server.handle(request)) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        if let Err(e) = connection.await {
            debug!("streaming connection: {e}");
        }
    }

    fn handle(self: &Arc<Self>, mut request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (Some(kind), Some(token)) = (parts.next(), parts.next()) else {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        };
        if !matches!(kind, "exec" | "attach" | "portforward") {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        let Some(stream_request) = self.tokens.take(kind, token) else {
            return plain(StatusCode::NOT_FOUND, "unknown, expired or already used token\n");
        };
        let headers = request.headers().clone();
        let header_values = |name: &str| -> Vec<String> {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(',').map(|p| p.trim().to_string()).collect::<Vec<_>>())
                .filter(|p| !p.is_empty())
                .collect()
        };
        let upgrade = header_values("upgrade").first().map(|u| u.to_ascii_lowercase()).unwrap_or_default();
        let on_upgrade = hyper::upgrade::on(&mut request);
        let server = self.clone();
        if upgrade == "websocket" {
            let offered = header_values("sec-websocket-protocol");
            let supported: &[&str] = match stream_request {
                StreamRequest::PortForward { .. } => transport::WS_PORTFORWARD_PROTOCOLS,
                _ => transport::WS_REMOTE_PROTOCOLS,
            };
            // The first protocol the client lists that we speak; none offered: plain channel.k8s.io.
            let protocol = if offered.is_empty() {
                String::new()
            } else {
                match offered.iter().find(|p| supported.contains(&p.as_str())) {
                    Some(p) => p.clone(),
                    None => {
                        return plain(
                            StatusCode::BAD_REQUEST,
                            &format!("no supported websocket protocol offered; supported: {}\n", supported.join(", ")),
                        );
                    }
                }
            };
            let Some(key) = headers.get("sec-websocket-key").cloned() else {
                return plain(StatusCode::BAD_REQUEST, "websocket upgrade without Sec-WebSocket-Key\n");
            };
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let mut response = switching("websocket");
            response
                .headers_mut()
                .insert("sec-websocket-accept", HeaderValue::from_str(&accept).expect("base64 is a header value"));
            if !protocol.is_empty() {
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_str(&protocol).expect("a known protocol"));
            }
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => server.run_websocket(stream_request, &protocol, TokioIo::new(upgraded)).await,
                    Err(e) => debug!("websocket upgrade: {e}"),
                }
            });
            return response;
        }
        if upgrade == "spdy/3.1" {
            let offered = header_values(transport::HEADER_PROTOCOL_VERSION);
            let supported: &[&str] = match stream_request {
                StreamRequest::PortForward { .. } => transport::SPDY_PORTFORWARD_PROTOCOLS,
                _ => transport::SPDY_REMOTE_PROTOCOLS,
            };
            let protocol = match offered.iter().find(|p| supported.contains(&p.as_str())) {
                Some(p) => p.clone(),
                // A client that offers nothing is a 1.0-era one: channel.k8s.io (as the kubelet).
                None if offered.is_empty() && !matches!(stream_request, StreamRequest::PortForward { .. }) => {
                    "channel.k8s.io".into()
                }
                None => {
                    let mut response = plain(
                        StatusCode::FORBIDDEN,
                        &format!(
                            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {supported:?}\n"
                        ),
                    );
                    response.headers_mut().insert(
                        "x-accepted-stream-protocol-versions",
                        HeaderValue::from_str(&supported.join(", ")).expect("known protocols"),
                    );
                    return response;
                }
            };
            let mut response = switching("SPDY/3.1");
            response.headers_mut().insert(
                transport::HEADER_PROTOCOL_VERSION,
                HeaderValue::from_str(&protocol).expect("a known protocol"),
            );
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => server.run_spdy(stream_request, &protocol, TokioIo::new(upgraded)).await,
                    Err(e) => debug!("spdy upgrade: {e}"),
                }
            });
            return response;
        }
        plain(StatusCode::BAD_REQUEST, "expected an upgrade to SPDY/3.1 or websocket\n")
    }
}

impl Tokens {
    fn issue(&self, request: StreamRequest) -> String {
        let token = new_token();
        let now = Instant::now();
        let mut live = self.live.lock().expect("token lock");
        live.retain(|_, (_, issued)| now.duration_since(*issued) < self.ttl);
        if live.len() >= MAX_TOKENS {
            let oldest = live.iter().min_by_key(|(_, (_, issued))| *issued).map(|(t, _)| t.clone());
            if let Some(oldest) = oldest {
                live.remove(&oldest);
            }
        }
        live.insert(token.clone(), (request, now));
        token
    }

    /// Takes the token's request if it is live and of this kind. Spent whatever follows.
    fn take(&self, kind: &str, token: &str) -> Option<StreamRequest> {
        let (request, issued) = self.live.lock().expect("token lock").remove(token)?;
        (issued.elapsed() < self.ttl && request.kind() == kind).then_some(request)
    }
}

impl StreamingServer {
    async fn run_spdy<IO>(self: Arc<Self>, request: StreamRequest, protocol: &str, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let _session = crate::prometheus::metrics().streaming_session(request.kind());
        let connection = transport::SpdyConnection::start(io, self.idle_timeout);
        match request {
            StreamRequest::PortForward { .. } => portforward::serve_spdy(self, request, connection).await,
            _ => remote::serve_spdy(self, request, protocol, connection).await,
        }
    }

    async fn run_websocket<IO>(self: Arc<Self>, request: StreamRequest, protocol: &str, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let _session = crate::prometheus::metrics().streaming_session(request.kind());
        let channels = transport::WsChannels::start(io, self.idle_timeout).await;
        match request {
            StreamRequest::PortForward { .. } => portforward::serve_websocket(self, request, channels).await,
            _ => remote::serve_websocket(self, request, protocol, channels).await,
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn switching(protocol: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(protocol));
    response
}

/// 128 random bits, URL-safe.
fn new_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("the kernel's random source is readable");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_bound_to_their_kind_and_expire() {
        let tokens = Tokens { ttl: Duration::from_millis(200), live: Mutex::new(HashMap::new()) };
        let request = StreamRequest::PortForward { pod_id: "p".into(), ports: vec![80] };
        let token = tokens.issue(request.clone());
        assert_eq!(token.len(), 32);
        assert_eq!(tokens.take("exec", &token), None, "a portforward token is no exec token (and is spent)");
        assert_eq!(tokens.take("portforward", &token), None);
        let token = tokens.issue(request.clone());
        assert_eq!(tokens.take("portforward", &token), Some(request.clone()));
        assert_eq!(tokens.take("portforward", &token), None, "used once");
        let token = tokens.issue(request);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(tokens.take("portforward", &token), None, "expired");
        assert_eq!(tokens.take("portforward", "nonsense"), None);
    }
}
