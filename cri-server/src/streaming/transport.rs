//! The two transports under the sessions: a SPDY connection (streams opened by the client, a
//! writer task that owns the socket's write half and the header compression context) and a
//! WebSocket (binary messages prefixed with their channel). Every queue is bounded, so a slow
//! client slows the command down instead of filling the daemon's memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, frame::coding::CloseCode};
use tracing::debug;

use super::spdy::{self, Frame, Headers};

pub const HEADER_PROTOCOL_VERSION: &str = "x-stream-protocol-version";
/// Server preference order, as the kubelet's.
pub const SPDY_REMOTE_PROTOCOLS: &[&str] =
    &["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"];
pub const SPDY_PORTFORWARD_PROTOCOLS: &[&str] = &["portforward.k8s.io"];
pub const WS_REMOTE_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"];
pub const WS_PORTFORWARD_PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "portforward.k8s.io"];

/// Channel numbers of the remote command protocols (WebSocket numbering; SPDY names them).
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5.channel.k8s.io: `[255, channel]` closes that channel (stdin's end of file).
pub const CLOSE_SIGNAL: u8 = 255;

/// Data from the client queued per stream before the connection's reader waits, in pieces of at
/// most [`QUEUED_PIECE`] bytes (a frame may be up to 1 MiB): at most 512 KiB per stream.
const STREAM_QUEUE: usize = 8;
const QUEUED_PIECE: usize = 64 * 1024;
/// Streams open at once on one SPDY connection; a SYN_STREAM beyond is refused (RST_STREAM
/// REFUSED_STREAM). An exec or attach uses up to 5, a port forward 2 per forwarded connection.
/// With the queue above, a connection holds at most 32 MiB of the client's data.
pub const MAX_OPEN_STREAMS: usize = 64;
/// The largest WebSocket message (and frame) a client may send: tungstenite would assemble up to
/// 64 MiB per connection; clients send stdin and port-forward data in pieces of 32 KiB or less.
const MAX_WS_MESSAGE: usize = 1 << 20;
/// Frames queued for the writer.
const WRITE_QUEUE: usize = 32;

/// A stream the client opened, with its headers and the data it sends (closed at its FIN).
#[derive(Debug)]
pub struct IncomingStream {
    pub id: u32,
    pub headers: Headers,
    pub data: mpsc::Receiver<Vec<u8>>,
}

/// Writes frames on the connection, in order (SYN_REPLY before a stream's first data).
#[derive(Debug, Clone)]
pub struct SpdyWriter {
    frames: mpsc::Sender<Frame>,
}

impl SpdyWriter {
    /// Sends `bytes` on stream `id`; false once the connection is gone.
    pub async fn data(&self, id: u32, bytes: &[u8]) -> bool {
        for chunk in bytes.chunks(spdy::MAX_DATA_CHUNK) {
            if self.frames.send(Frame::Data { stream_id: id, flags: 0, data: chunk.to_vec() }).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Half-closes stream `id` (our side is done).
    pub async fn fin(&self, id: u32) {
        let _ = self.frames.send(Frame::Data { stream_id: id, flags: spdy::FLAG_FIN, data: Vec::new() }).await;
    }

    pub async fn reset(&self, id: u32, status: u32) {
        let _ = self.frames.send(Frame::RstStream { stream_id: id, status }).await;
    }
}

/// A SPDY connection being served.
#[derive(Debug)]
pub struct SpdyConnection {
    pub streams: mpsc::Receiver<IncomingStream>,
    pub writer: SpdyWriter,
    /// Becomes true when the client's side ends (EOF, error, GOAWAY, idle timeout).
    pub closed: watch::Receiver<bool>,
    reader: tokio::task::JoinHandle<()>,
    writer_task: tokio::task::JoinHandle<()>,
    last_stream: Arc<AtomicU64>,
}

impl SpdyConnection {
    pub fn start<IO>(io: IO, idle_timeout: Option<Duration>) -> SpdyConnection
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut read, mut write) = tokio::io::split(io);
        let activity = Arc::new(Activity::new());
        let (frames_tx, mut frames_rx) = mpsc::channel::<Frame>(WRITE_QUEUE);
        let writer_activity = activity.clone();
        let writer_task = tokio::spawn(async move {
            let mut encoder = spdy::HeaderEncoder::new();
            while let Some(frame) = frames_rx.recv().await {
                let bytes = spdy::encode_frame(&frame, &mut encoder);
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
                writer_activity.touch();
            }
            let _ = write.flush().await;
            let _ = write.shutdown().await;
        });
        let writer = SpdyWriter { frames: frames_tx };
        let (streams_tx, streams) = mpsc::channel(16);
        let (closed_tx, closed) = watch::channel(false);
        let last_stream = Arc::new(AtomicU64::new(0));
        let reader_writer = writer.clone();
        let reader_last = last_stream.clone();
        let reader = tokio::spawn(async move {
            let mut decoder = spdy::HeaderDecoder::new();
            let mut open: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
            loop {
                let frame = match idle_timeout {
                    Some(idle) => {
                        let next = spdy::read_frame(&mut read, &mut decoder);
                        tokio::pin!(next);
                        loop {
                            match tokio::time::timeout(Duration::from_secs(1).min(idle), &mut next).await {
                                Ok(frame) => break Some(frame),
                                Err(_) if activity.idle_for() >= idle => break None,
                                Err(_) => continue,
                            }
                        }
                    }
                    None => Some(spdy::read_frame(&mut read, &mut decoder).await),
                };
                let Some(frame) = frame else {
                    debug!("spdy connection idle for too long");
                    break;
                };
                let frame = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => {
                        debug!("spdy connection: {e}");
                        break;
                    }
                };
                activity.touch();
                match frame {
                    Frame::SynStream { stream_id, flags, headers, .. } => {
                        if stream_id % 2 == 0 || open.contains_key(&stream_id) {
                            reader_writer.reset(stream_id, spdy::RST_PROTOCOL_ERROR).await;
                            continue;
                        }
                        // Streams whose receiver is gone no longer count.
                        open.retain(|_, tx| !tx.is_closed());
                        if open.len() >= MAX_OPEN_STREAMS {
                            debug!(stream_id, "spdy connection: {MAX_OPEN_STREAMS} streams open, refusing one more");
                            reader_writer.reset(stream_id, spdy::RST_REFUSED_STREAM).await;
                            continue;
                        }
                        reader_last.store(stream_id as u64, Ordering::Relaxed);
                        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
                        if flags & spdy::FLAG_FIN == 0 {
                            open.insert(stream_id, tx);
                        }
                        let _ = reader_writer
                            .frames
                            .send(Frame::SynReply { stream_id, flags: 0, headers: Vec::new() })
                            .await;
                        if streams_tx.send(IncomingStream { id: stream_id, headers, data: rx }).await.is_err() {
                            open.remove(&stream_id);
                            reader_writer.reset(stream_id, spdy::RST_REFUSED_STREAM).await;
                        }
                    }
                    Frame::Data { stream_id, flags, data } => {
                        if let Some(tx) = open.get(&stream_id) {
                            // A receiver that is gone no longer wants the data.
                            for piece in data.chunks(QUEUED_PIECE) {
                                if tx.send(piece.to_vec()).await.is_err() {
                                    open.remove(&stream_id);
                                    break;
                                }
                            }
                        }
                        if flags & spdy::FLAG_FIN != 0 {
                            open.remove(&stream_id);
                        }
                    }
                    Frame::RstStream { stream_id, .. } => {
                        open.remove(&stream_id);
                    }
                    Frame::Ping { id } => {
                        let _ = reader_writer.frames.send(Frame::Ping { id }).await;
                    }
                    Frame::GoAway { .. } => break,
                    Frame::SynReply { .. }
                    | Frame::Headers { .. }
                    | Frame::Settings
                    | Frame::WindowUpdate { .. }
                    | Frame::Unknown { .. } => {}
                }
            }
            let _ = closed_tx.send(true);
        });
        SpdyConnection { streams, writer, closed, reader, writer_task, last_stream }
    }

    /// Ends the connection: GOAWAY, the queued frames written, the socket closed.
    pub async fn finish(self) {
        let last = self.last_stream.load(Ordering::Relaxed) as u32;
        let _ = self.writer.frames.send(Frame::GoAway { last_good_stream_id: last, status: 0 }).await;
        drop(self.writer);
        drop(self.streams);
        let mut writer_task = self.writer_task;
        if tokio::time::timeout(Duration::from_secs(5), &mut writer_task).await.is_err() {
            writer_task.abort();
        }
        self.reader.abort();
    }
}

/// When bytes last moved on a connection, for its idle timeout.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_millis: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { start: Instant::now(), last_millis: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_millis.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_millis.load(Ordering::Relaxed)))
    }
}

/// A WebSocket connection cut into channels: the client's messages by channel number, and a
/// queue of `(channel, bytes)` to send (the writer prefixes the channel byte).
#[derive(Debug)]
pub struct WsChannels {
    pub incoming: mpsc::Receiver<(u8, Vec<u8>)>,
    pub outgoing: mpsc::Sender<(u8, Vec<u8>)>,
    pub closed: watch::Receiver<bool>,
    reader: tokio::task::JoinHandle<()>,
    writer_task: tokio::task::JoinHandle<()>,
    done: mpsc::Sender<()>,
}

impl WsChannels {
    pub async fn start<IO>(io: IO, idle_timeout: Option<Duration>) -> WsChannels
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_WS_MESSAGE))
            .max_frame_size(Some(MAX_WS_MESSAGE));
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let (mut sink, mut stream) = socket.split();
        let activity = Arc::new(Activity::new());
        let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(WRITE_QUEUE);
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let (pong_tx, mut pong_rx) = mpsc::channel::<Vec<u8>>(4);
        let writer_activity = activity.clone();
        let writer_task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = out_rx.recv() => {
                        let Some((channel, bytes)) = message else { break };
                        let mut frame = Vec::with_capacity(bytes.len() + 1);
                        frame.push(channel);
                        frame.extend_from_slice(&bytes);
                        if sink.send(Message::Binary(frame.into())).await.is_err() {
                            return;
                        }
                        writer_activity.touch();
                    }
                    ping = pong_rx.recv() => {
                        if let Some(payload) = ping {
                            let _ = sink.send(Message::Pong(payload.into())).await;
                        }
                    }
                    _ = done_rx.recv() => break,
                }
            }
            // Whatever was queued before the end goes out first.
            while let Ok((channel, bytes)) = out_rx.try_recv() {
                let mut frame = vec![channel];
                frame.extend_from_slice(&bytes);
                let _ = sink.send(Message::Binary(frame.into())).await;
            }
            let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await;
            let _ = sink.close().await;
        });
        let (in_tx, incoming) = mpsc::channel(STREAM_QUEUE);
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(async move {
            loop {
                let next = match idle_timeout {
                    Some(idle) => loop {
                        match tokio::time::timeout(Duration::from_secs(1).min(idle), stream.next()).await {
                            Ok(next) => break Some(next),
                            Err(_) if activity.idle_for() >= idle => break None,
                            Err(_) => continue,
                        }
                    },
                    None => Some(stream.next().await),
                };
                let message = match next {
                    Some(Some(Ok(message))) => message,
                    _ => break,
                };
                activity.touch();
                match message {
                    Message::Binary(bytes)
                        if !bytes.is_empty() && in_tx.send((bytes[0], bytes[1..].to_vec())).await.is_err() =>
                    {
                        // Nobody reads the client's input any more; keep watching for the close.
                    }
                    Message::Ping(payload) => {
                        let _ = pong_tx.try_send(payload.to_vec());
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = closed_tx.send(true);
        });
        WsChannels { incoming, outgoing: out_tx, closed, reader, writer_task, done: done_tx }
    }

    /// Sends what is queued, then a normal close.
    pub async fn finish(self) {
        drop(self.outgoing);
        let _ = self.done.send(()).await;
        let mut writer_task = self.writer_task;
        if tokio::time::timeout(Duration::from_secs(5), &mut writer_task).await.is_err() {
            writer_task.abort();
        }
        // Give the client a moment to answer the close before the socket goes.
        let mut reader = self.reader;
        if tokio::time::timeout(Duration::from_secs(1), &mut reader).await.is_err() {
            reader.abort();
        }
    }
}

/// A TLS acceptor from PEM files (certificate chain, private key).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not make a TLS config: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Resolves once the client's side has ended (also when the reader is gone without saying);
/// the watch's guard is not held across awaits.
pub async fn until_closed(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|closed| *closed).await.map(|_| ());
}
