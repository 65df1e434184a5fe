//! Port forwarding: TCP connections to ports inside the pod's network namespace, opened from a
//! short-lived thread that joined the pod's pinned namespace, then proxied on the daemon's
//! runtime.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

use super::spdy;
use super::transport::{SpdyConnection, SpdyWriter, WsChannels};
use super::{StreamRequest, StreamingServer};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Forwards (by request id) that have one of their two streams and wait for the other; a client
/// opening streams that never pair is refused beyond this (kubectl opens the pair back to back).
const MAX_PENDING_FORWARDS: usize = 16;

/// Connects to `port` on the loopback of the pod's network namespace (the host's for
/// hostNetwork pods), IPv4 first, then IPv6, as containerd does.
async fn connect(netns: Option<PathBuf>, port: u16) -> std::io::Result<TcpStream> {
    let stream = tokio::task::spawn_blocking(move || {
        // A thread of our own: setns moves only the calling thread, and this one ends right
        // after (a blocking-pool thread would be reused in the pod's namespace).
        std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
            if let Some(netns) = &netns {
                let file = std::fs::File::open(netns)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            }
            let v4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
            std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|_| {
                std::net::TcpStream::connect_timeout(
                    &SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
                    CONNECT_TIMEOUT,
                )
            })
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the connecting thread panicked")))
    })
    .await
    .map_err(std::io::Error::other)??;
    stream.set_nonblocking(true)?;
    let _ = stream.set_nodelay(true);
    TcpStream::from_std(stream)
}

fn target(server: &StreamingServer, request: &StreamRequest) -> Result<(String, Option<PathBuf>, Vec<u16>), String> {
    let StreamRequest::PortForward { pod_id, ports } = request else { return Err("not a port forward".into()) };
    let pod = server.runtime.pod(pod_id).map_err(|e| e.to_string())?;
    if pod.state != runtime::PodState::Ready {
        return Err(format!("pod sandbox {pod_id} is not ready"));
    }
    Ok((pod.id, pod.namespaces.network.clone(), ports.clone()))
}

fn forward_error(port: u16, pod: &str, error: impl std::fmt::Display) -> String {
    format!("error forwarding port {port} to pod {pod}, uid : {error}")
}

/// Over SPDY: the client opens an error and a data stream per connection, with the same
/// `requestID` and the `port`.
/// A forward's streams as they arrive, by request id: its error stream, and its data stream with
/// the data's receiver.
type PendingForward = (Option<u32>, Option<(u32, mpsc::Receiver<Vec<u8>>)>);

pub(super) async fn serve_spdy(server: Arc<StreamingServer>, request: StreamRequest, mut connection: SpdyConnection) {
    let (pod_id, netns, allowed) = match target(&server, &request) {
        Ok(target) => target,
        Err(e) => {
            debug!("port forward: {e}");
            return connection.finish().await;
        }
    };
    let mut pending: HashMap<String, PendingForward> = HashMap::new();
    let mut forwards = tokio::task::JoinSet::new();
    let mut closed = connection.closed.clone();
    loop {
        let stream = tokio::select! {
            stream = connection.streams.recv() => match stream { Some(stream) => stream, None => break },
            _ = super::transport::until_closed(&mut closed) => break,
        };
        let kind = spdy::header(&stream.headers, "streamtype").unwrap_or_default().to_string();
        let request_id = spdy::header(&stream.headers, "requestid").unwrap_or_default().to_string();
        let port = spdy::header(&stream.headers, "port").unwrap_or_default().to_string();
        if !pending.contains_key(&request_id) && pending.len() >= MAX_PENDING_FORWARDS {
            debug!("port forward: {MAX_PENDING_FORWARDS} forwards wait for their second stream, refusing one more");
            connection.writer.reset(stream.id, spdy::RST_REFUSED_STREAM).await;
            continue;
        }
        let entry = pending.entry(request_id.clone()).or_default();
        match kind.as_str() {
            "error" => entry.0 = Some(stream.id),
            "data" => entry.1 = Some((stream.id, stream.data)),
            _ => {
                connection.writer.reset(stream.id, spdy::RST_PROTOCOL_ERROR).await;
                continue;
            }
        }
        if let (Some(_), Some(_)) = (&entry.0, &entry.1) {
            let (Some(error_id), Some((data_id, data))) = pending.remove(&request_id).unwrap_or_default() else {
                continue;
            };
            let writer = connection.writer.clone();
            let netns = netns.clone();
            let pod_id = pod_id.clone();
            let port = match port.parse::<u16>() {
                Ok(port) if port > 0 && (allowed.is_empty() || allowed.contains(&port)) => Ok(port),
                Ok(port) if port > 0 => Err(format!("port {port} was not asked for in the PortForward request")),
                _ => Err(format!("invalid port {port:?}")),
            };
            forwards.spawn(async move {
                let result = match port {
                    Ok(port) => forward_spdy(netns, port, data_id, data, &writer)
                        .await
                        .map_err(|e| forward_error(port, &pod_id, e)),
                    Err(e) => Err(e),
                };
                if let Err(message) = result {
                    debug!("{message}");
                    writer.data(error_id, message.as_bytes()).await;
                    writer.fin(data_id).await;
                }
                writer.fin(error_id).await;
            });
        }
    }
    forwards.abort_all();
    connection.finish().await;
}

async fn forward_spdy(
    netns: Option<PathBuf>,
    port: u16,
    data_id: u32,
    mut data: mpsc::Receiver<Vec<u8>>,
    writer: &SpdyWriter,
) -> std::io::Result<()> {
    let tcp = connect(netns, port).await?;
    let (mut from_pod, mut to_pod) = tcp.into_split();
    let upstream = async {
        while let Some(bytes) = data.recv().await {
            if to_pod.write_all(&bytes).await.is_err() {
                break;
            }
        }
        // The client finished sending: so do we, towards the pod.
        let _ = to_pod.shutdown().await;
    };
    let downstream = async {
        let mut buffer = vec![0u8; spdy::MAX_DATA_CHUNK];
        loop {
            match from_pod.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !writer.data(data_id, &buffer[..n]).await {
                        break;
                    }
                }
            }
        }
        writer.fin(data_id).await;
    };
    tokio::join!(upstream, downstream);
    Ok(())
}

/// Over WebSocket: the request's ports, data on channel 2n and errors on 2n+1; the first
/// message on each is the port (16-bit little endian).
pub(super) async fn serve_websocket(server: Arc<StreamingServer>, request: StreamRequest, mut ws: WsChannels) {
    let (pod_id, netns, ports) = match target(&server, &request) {
        Ok(target) => target,
        Err(e) => {
            let _ = ws.outgoing.send((1, e.into_bytes())).await;
            return ws.finish().await;
        }
    };
    if ports.is_empty() {
        let _ = ws.outgoing.send((1, b"the PortForward request names no port".to_vec())).await;
        return ws.finish().await;
    }
    let mut inputs = Vec::new();
    let mut forwards = tokio::task::JoinSet::new();
    for (index, port) in ports.iter().copied().enumerate() {
        let (data_channel, error_channel) = ((2 * index) as u8, (2 * index + 1) as u8);
        let _ = ws.outgoing.send((data_channel, port.to_le_bytes().to_vec())).await;
        let _ = ws.outgoing.send((error_channel, port.to_le_bytes().to_vec())).await;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        inputs.push(tx);
        let out = ws.outgoing.clone();
        let netns = netns.clone();
        let pod_id = pod_id.clone();
        forwards.spawn(async move {
            let tcp = match connect(netns, port).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    let _ = out.send((error_channel, forward_error(port, &pod_id, e).into_bytes())).await;
                    return;
                }
            };
            let (mut from_pod, mut to_pod) = tcp.into_split();
            let upstream = async {
                while let Some(bytes) = rx.recv().await {
                    if to_pod.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                let _ = to_pod.shutdown().await;
            };
            let downstream = async {
                let mut buffer = vec![0u8; 32 * 1024];
                loop {
                    match from_pod.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if out.send((data_channel, buffer[..n].to_vec())).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            };
            // Either side ending ends this port's forward (a WebSocket cannot half-close).
            tokio::select! {
                _ = upstream => {}
                _ = downstream => {}
            }
        });
    }
    let mut incoming = std::mem::replace(&mut ws.incoming, mpsc::channel(1).1);
    let demux = async {
        while let Some((channel, bytes)) = incoming.recv().await {
            if channel % 2 == 0
                && let Some(tx) = inputs.get((channel / 2) as usize)
            {
                let _ = tx.send(bytes).await;
            }
        }
    };
    let mut closed = ws.closed.clone();
    tokio::select! {
        _ = demux => {}
        _ = super::transport::until_closed(&mut closed) => {}
        _ = async { while forwards.join_next().await.is_some() {} } => {}
    }
    forwards.abort_all();
    ws.finish().await;
}
