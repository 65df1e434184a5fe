//! Port forwarding over either transport: the client's streams (SPDY) or channels (WebSocket)
//! paired with connections that the backend makes to ports in the pod (runtime::streaming).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::debug;

use super::spdy;
use super::transport::{SpdyConnection, SpdyWriter, WsChannels};
use super::{StreamRequest, StreamingServer};

/// Forwards (by request id) that have one of their two streams and wait for the other; a client
/// opening streams that never pair is refused beyond this (kubectl opens the pair back to back).
const MAX_PENDING_FORWARDS: usize = 16;
/// Pieces of a port's data queued between the backend and the transport.
const FORWARD_QUEUE: usize = 8;

fn forward_error(port: u16, pod: &str, error: impl std::fmt::Display) -> String {
    format!("error forwarding port {port} to pod {pod}, uid : {error}")
}

/// Over SPDY: the client opens an error and a data stream per connection, with the same
/// `requestID` and the `port`.
/// A forward's streams as they arrive, by request id: its error stream, and its data stream with
/// the data's receiver.
type PendingForward = (Option<u32>, Option<(u32, mpsc::Receiver<Vec<u8>>)>);

pub(super) async fn serve_spdy(server: Arc<StreamingServer>, request: StreamRequest, mut connection: SpdyConnection) {
    let StreamRequest::PortForward { pod_id, ports: allowed } = request else {
        return connection.finish().await;
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
            let backend = server.backend.clone();
            let pod_id = pod_id.clone();
            let port = match port.parse::<u16>() {
                Ok(port) if port > 0 && (allowed.is_empty() || allowed.contains(&port)) => Ok(port),
                Ok(port) if port > 0 => Err(format!("port {port} was not asked for in the PortForward request")),
                _ => Err(format!("invalid port {port:?}")),
            };
            forwards.spawn(async move {
                let result = match port {
                    Ok(port) => {
                        let (output, from_pod) = mpsc::channel(FORWARD_QUEUE);
                        let (forwarded, ()) = tokio::join!(
                            backend.port_forward(&pod_id, port, data, output),
                            to_spdy(from_pod, data_id, &writer)
                        );
                        forwarded.map_err(|e| forward_error(port, &pod_id, e))
                    }
                    Err(e) => Err(e),
                };
                if let Err(message) = &result {
                    debug!("{message}");
                    writer.data(error_id, message.as_bytes()).await;
                }
                writer.fin(data_id).await;
                writer.fin(error_id).await;
            });
        }
    }
    forwards.abort_all();
    connection.finish().await;
}

/// What comes from the pod, onto the data stream (its FIN follows, from the caller).
async fn to_spdy(mut from_pod: mpsc::Receiver<Vec<u8>>, data_id: u32, writer: &SpdyWriter) {
    while let Some(bytes) = from_pod.recv().await {
        if !writer.data(data_id, &bytes).await {
            return;
        }
    }
}

/// Over WebSocket: the request's ports, data on channel 2n and errors on 2n+1; the first
/// message on each is the port (16-bit little endian).
pub(super) async fn serve_websocket(server: Arc<StreamingServer>, request: StreamRequest, mut ws: WsChannels) {
    let StreamRequest::PortForward { pod_id, ports } = request else {
        return ws.finish().await;
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
        let (tx, rx) = mpsc::channel::<Vec<u8>>(FORWARD_QUEUE);
        inputs.push(tx);
        let out = ws.outgoing.clone();
        let backend = server.backend.clone();
        let pod_id = pod_id.clone();
        forwards.spawn(async move {
            let (output, mut from_pod) = mpsc::channel::<Vec<u8>>(FORWARD_QUEUE);
            let downstream = async {
                while let Some(bytes) = from_pod.recv().await {
                    if out.send((data_channel, bytes)).await.is_err() {
                        return;
                    }
                }
            };
            let forward = backend.port_forward(&pod_id, port, rx, output);
            tokio::pin!(downstream, forward);
            // Either side ending ends this port's forward (a WebSocket cannot half-close): the
            // pod's side has ended when the backend lets go of the output.
            tokio::select! {
                biased;
                forwarded = &mut forward => match forwarded {
                    Ok(()) => downstream.await,
                    Err(e) => {
                        let _ = out.send((error_channel, forward_error(port, &pod_id, e).into_bytes())).await;
                    }
                },
                () = &mut downstream => {}
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
