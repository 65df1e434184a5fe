//! Exec and attach sessions, over either transport: the client's stdin and terminal sizes in,
//! the command's stdout and stderr out, and its end as a status on the error channel. What the
//! session does in the container is the backend's (runtime::streaming).

use std::sync::Arc;
use std::time::Duration;

use runtime::{Streams, TerminalSize};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::debug;

use super::spdy;
use super::transport::{CLOSE_SIGNAL, ERROR, RESIZE, STDERR, STDIN, STDOUT, SpdyConnection, WsChannels};
use super::{StreamRequest, StreamingServer};

/// After the backend's session ended, how long what it wrote may take to be queued on the
/// transport (the backend has let go of the output streams, so this is a bound, not a wait).
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// How the end of the command is reported on the error channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusFormat {
    /// v4 and v5: a JSON metav1.Status, written on success too.
    Status,
    /// Before v4: a failure's message, nothing on success.
    Message,
}

/// How the command ended, for the error channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Success,
    ExitCode { command: Vec<String>, code: i32 },
    Error(String),
}

impl Outcome {
    /// The metav1.Status as the kubelet writes it, which client-go's remotecommand parses.
    pub(super) fn status_json(&self) -> String {
        match self {
            Outcome::Success => serde_json::json!({"metadata": {}, "status": "Success"}).to_string(),
            Outcome::ExitCode { command, code } => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: error executing command [{}], exit code {code}", command.join(" ")),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
            .to_string(),
            Outcome::Error(message) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("Internal error occurred: {message}"),
                "reason": "InternalError",
                "details": {"causes": [{"message": message}]},
                "code": 500,
            })
            .to_string(),
        }
    }

    fn message(&self) -> Option<String> {
        match self {
            Outcome::Success => None,
            Outcome::ExitCode { command, code } => Some(format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            )),
            Outcome::Error(message) => Some(message.clone()),
        }
    }
}

/// The session's side of a transport.
struct Channels {
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    resize: Option<mpsc::Receiver<Vec<u8>>>,
    stdout: bool,
    stderr: bool,
    /// `(channel, Some(bytes))` to send, `(channel, None)` to end that channel.
    out: mpsc::Sender<(u8, Option<Vec<u8>>)>,
    closed: watch::Receiver<bool>,
    format: StatusFormat,
}

impl Channels {
    async fn finish(&self, outcome: &Outcome) {
        let bytes = match self.format {
            StatusFormat::Status => Some(outcome.status_json().into_bytes()),
            StatusFormat::Message => outcome.message().map(String::into_bytes),
        };
        if let Some(bytes) = bytes {
            let _ = self.out.send((ERROR, Some(bytes))).await;
        }
        let _ = self.out.send((ERROR, None)).await;
    }
}

/// The streams exec and attach want, from the request.
fn wanted(request: &StreamRequest) -> (bool, bool, bool, bool) {
    match request {
        StreamRequest::Exec { stdin, stdout, stderr, tty, .. }
        | StreamRequest::Attach { stdin, stdout, stderr, tty, .. } => (*stdin, *stdout, *stderr && !*tty, *tty),
        StreamRequest::PortForward { .. } => (false, false, false, false),
    }
}

/// Over SPDY: waits for the client's streams (error, and stdin, stdout, stderr, resize as the
/// request has them), then runs the session.
pub(super) async fn serve_spdy(
    server: Arc<StreamingServer>,
    request: StreamRequest,
    protocol: &str,
    mut connection: SpdyConnection,
) {
    let (stdin, stdout, stderr, tty) = wanted(&request);
    let resize_supported = matches!(protocol, "v4.channel.k8s.io" | "v3.channel.k8s.io");
    let expected =
        1 + usize::from(stdin) + usize::from(stdout) + usize::from(stderr) + usize::from(tty && resize_supported);
    let mut ids = [None::<u32>; 5];
    let mut stdin_rx = None;
    let mut resize_rx = None;
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + server.stream_creation_timeout;
    while received < expected {
        let stream = match tokio::time::timeout_at(deadline, connection.streams.recv()).await {
            Ok(Some(stream)) => stream,
            Ok(None) => return connection.finish().await,
            Err(_) => {
                debug!("client did not create its streams within {:?}", server.stream_creation_timeout);
                return connection.finish().await;
            }
        };
        let channel = match spdy::header(&stream.headers, "streamtype") {
            Some("error") => ERROR,
            Some("stdin") => STDIN,
            Some("stdout") => STDOUT,
            Some("stderr") => STDERR,
            Some("resize") => RESIZE,
            other => {
                debug!("unexpected stream type {other:?}");
                connection.writer.reset(stream.id, spdy::RST_REFUSED_STREAM).await;
                continue;
            }
        };
        ids[channel as usize] = Some(stream.id);
        match channel {
            STDIN => stdin_rx = Some(stream.data),
            RESIZE => resize_rx = Some(stream.data),
            _ => {}
        }
        received += 1;
    }
    // v1 closes stdin right away (as the kubelet does).
    if protocol == "channel.k8s.io" {
        stdin_rx = None;
    }
    let (out, mut out_rx) = mpsc::channel::<(u8, Option<Vec<u8>>)>(16);
    let writer = connection.writer.clone();
    let pump = tokio::spawn(async move {
        while let Some((channel, bytes)) = out_rx.recv().await {
            let Some(id) = ids[channel as usize] else { continue };
            match bytes {
                Some(bytes) => {
                    if !writer.data(id, &bytes).await {
                        return;
                    }
                }
                None => writer.fin(id).await,
            }
        }
    });
    let channels = Channels {
        stdin: stdin_rx,
        resize: resize_rx,
        stdout: ids[STDOUT as usize].is_some(),
        stderr: ids[STDERR as usize].is_some(),
        out,
        closed: connection.closed.clone(),
        format: if protocol == "v4.channel.k8s.io" { StatusFormat::Status } else { StatusFormat::Message },
    };
    run(&server, request, channels).await;
    let _ = pump.await;
    connection.finish().await;
}

/// Over WebSocket: the channels the request has; v5 lets the client close stdin.
pub(super) async fn serve_websocket(
    server: Arc<StreamingServer>,
    request: StreamRequest,
    protocol: &str,
    ws: WsChannels,
) {
    let (stdin, stdout, stderr, tty) = wanted(&request);
    let mut ws = ws;
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(8);
    let (resize_tx, resize_rx) = mpsc::channel::<Vec<u8>>(8);
    let mut incoming = std::mem::replace(&mut ws.incoming, mpsc::channel(1).1);
    let demux = tokio::spawn(async move {
        let mut stdin_tx = Some(stdin_tx);
        while let Some((channel, bytes)) = incoming.recv().await {
            match channel {
                STDIN => {
                    if let Some(tx) = &stdin_tx
                        && tx.send(bytes).await.is_err()
                    {
                        stdin_tx = None;
                    }
                }
                RESIZE => {
                    let _ = resize_tx.send(bytes).await;
                }
                CLOSE_SIGNAL if bytes.first() == Some(&STDIN) => stdin_tx = None,
                _ => {}
            }
        }
    });
    let (out, mut out_rx) = mpsc::channel::<(u8, Option<Vec<u8>>)>(16);
    let outgoing = ws.outgoing.clone();
    let pump = tokio::spawn(async move {
        while let Some((channel, bytes)) = out_rx.recv().await {
            if let Some(bytes) = bytes
                && outgoing.send((channel, bytes)).await.is_err()
            {
                return;
            }
        }
    });
    // As the kubelet: an empty message on the lowest writable channel says the session is up.
    let first = if stdout {
        STDOUT
    } else if stderr {
        STDERR
    } else {
        ERROR
    };
    let _ = ws.outgoing.send((first, Vec::new())).await;
    let channels = Channels {
        stdin: stdin.then_some(stdin_rx),
        resize: tty.then_some(resize_rx),
        stdout,
        stderr,
        out,
        closed: ws.closed.clone(),
        format: if protocol == "channel.k8s.io" || protocol.is_empty() {
            StatusFormat::Message
        } else {
            StatusFormat::Status
        },
    };
    run(&server, request, channels).await;
    let _ = pump.await;
    demux.abort();
    ws.finish().await;
}

/// Runs the session on the backend with the transport's channels; its outcome goes on the error
/// channel once its output has. A client that goes away ends it (the backend's future is dropped:
/// an exec's command is killed) without a status.
async fn run(server: &StreamingServer, request: StreamRequest, mut channels: Channels) {
    let mut forwarders = JoinSet::new();
    let stdout = output_stream(channels.stdout, STDOUT, &channels.out, &mut forwarders);
    let stderr = output_stream(channels.stderr, STDERR, &channels.out, &mut forwarders);
    let mut inputs = JoinSet::new();
    let resize = channels.resize.take().map(|raw| {
        let (sizes, receiver) = mpsc::channel(8);
        inputs.spawn(terminal_sizes(raw, sizes));
        receiver
    });
    let tty = matches!(request, StreamRequest::Exec { tty: true, .. } | StreamRequest::Attach { tty: true, .. });
    let streams = Streams { stdin: channels.stdin.take(), stdout, stderr, tty, resize };
    let backend = &server.backend;
    let session = async {
        match request {
            StreamRequest::Exec { container_id, command, .. } => {
                match backend.exec(&container_id, command.clone(), streams).await {
                    Ok(0) => Outcome::Success,
                    Ok(code) => Outcome::ExitCode { command, code },
                    Err(e) => Outcome::Error(e.to_string()),
                }
            }
            StreamRequest::Attach { container_id, .. } => match backend.attach(&container_id, streams).await {
                Ok(()) => Outcome::Success,
                Err(e) => Outcome::Error(e.to_string()),
            },
            StreamRequest::PortForward { .. } => Outcome::Error("not an exec or attach request".into()),
        }
    };
    let mut closed = channels.closed.clone();
    let outcome = tokio::select! {
        outcome = session => outcome,
        _ = super::transport::until_closed(&mut closed) => {
            debug!("streaming client disconnected; the session ends");
            return;
        }
    };
    inputs.abort_all();
    // The output streams end once the backend has let go of them (it returned).
    let drained = tokio::time::timeout(OUTPUT_DRAIN, async { while forwarders.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        forwarders.abort_all();
        for channel in [STDOUT, STDERR] {
            let _ = channels.out.send((channel, None)).await;
        }
    }
    channels.finish(&outcome).await;
}

/// A sender for one output stream of the session (if the client wants it), and the task that
/// puts what comes through on `channel` of the transport, then ends that channel.
fn output_stream(
    wanted: bool,
    channel: u8,
    out: &mpsc::Sender<(u8, Option<Vec<u8>>)>,
    forwarders: &mut JoinSet<()>,
) -> Option<mpsc::Sender<Vec<u8>>> {
    if !wanted {
        return None;
    }
    let (sender, mut receiver) = mpsc::channel::<Vec<u8>>(16);
    let out = out.clone();
    forwarders.spawn(async move {
        while let Some(bytes) = receiver.recv().await {
            if out.send((channel, Some(bytes))).await.is_err() {
                return;
            }
        }
        let _ = out.send((channel, None)).await;
    });
    Some(sender)
}

/// Terminal sizes as client-go sends them, one JSON object per change.
#[derive(Debug, Deserialize)]
struct JsonTerminalSize {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

/// At most this many bytes of an unfinished size object are kept: one is about 30 bytes, so a
/// client that never finishes one (or pads it with whitespace) cannot grow the buffer.
const MAX_PENDING_RESIZE: usize = 4096;

/// The terminal sizes in the bytes of the resize stream (objects may be split across messages).
async fn terminal_sizes(mut input: mpsc::Receiver<Vec<u8>>, sizes: mpsc::Sender<TerminalSize>) {
    let mut decoder = ResizeDecoder::default();
    while let Some(bytes) = input.recv().await {
        for size in decoder.push(&bytes) {
            if sizes.send(size).await.is_err() {
                return;
            }
        }
    }
}

/// Splits the resize stream into terminal sizes, keeping an unfinished object for the next bytes.
#[derive(Debug, Default)]
struct ResizeDecoder {
    pending: Vec<u8>,
}

impl ResizeDecoder {
    fn push(&mut self, bytes: &[u8]) -> Vec<TerminalSize> {
        self.pending.extend_from_slice(bytes);
        let mut found = Vec::new();
        let mut stream = serde_json::Deserializer::from_slice(&self.pending).into_iter::<JsonTerminalSize>();
        let mut consumed = 0;
        loop {
            match stream.next() {
                Some(Ok(size)) => {
                    consumed = stream.byte_offset();
                    found.push(TerminalSize { width: size.width, height: size.height });
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Not a size: drop what we have and start over.
                    consumed = self.pending.len();
                    break;
                }
                None => break,
            }
        }
        // Whitespace between objects means nothing: only an unfinished object is kept.
        let blank = self.pending[consumed..].iter().take_while(|b| b.is_ascii_whitespace()).count();
        self.pending.drain(..consumed + blank);
        if self.pending.len() > MAX_PENDING_RESIZE {
            debug!("dropping {} bytes of an unfinished terminal size", self.pending.len());
            self.pending.clear();
        }
        found
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unfinished_terminal_size_cannot_grow_without_bound() {
        let mut decoder = super::ResizeDecoder::default();
        assert!(decoder.push(br#"{"Width": 1"#).is_empty());
        for _ in 0..256 {
            assert!(decoder.push(&[b' '; 4096]).is_empty());
            assert!(decoder.pending.len() <= super::MAX_PENDING_RESIZE, "kept {} bytes", decoder.pending.len());
        }
        // Sizes split across messages still arrive, after the dropped bytes as before them.
        assert!(decoder.push(br#"{"Width": 80, "He"#).is_empty());
        let sizes = decoder.push(br#"ight": 24}{"Width": 100, "Height": 30}"#);
        let sizes: Vec<_> = sizes.iter().map(|s| (s.width, s.height)).collect();
        assert_eq!(sizes, [(80, 24), (100, 30)]);
    }

    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use futures_util::future::BoxFuture;
    use runtime::{StreamError, StreamingRuntime};

    use super::*;

    /// A backend that echoes one piece of stdin to stdout, writes to stderr and exits 3 (exec),
    /// refuses attach, and never ends a port forward (noting when its future is dropped).
    #[derive(Debug, Default)]
    struct Scripted {
        dropped: Arc<AtomicBool>,
    }

    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl StreamingRuntime for Scripted {
        fn exec<'a>(&'a self, _: &'a str, _: Vec<String>, streams: Streams) -> BoxFuture<'a, Result<i32, StreamError>> {
            Box::pin(async move {
                let mut stdin = streams.stdin.expect("stdin");
                let input = stdin.recv().await.expect("input");
                streams.stdout.as_ref().expect("stdout").send(input).await.unwrap();
                streams.stderr.as_ref().expect("stderr").send(b"err".to_vec()).await.unwrap();
                Ok(3)
            })
        }

        fn attach<'a>(&'a self, _: &'a str, streams: Streams) -> BoxFuture<'a, Result<(), StreamError>> {
            let flag = DropFlag(self.dropped.clone());
            Box::pin(async move {
                let _flag = flag;
                let _streams = streams;
                std::future::pending().await
            })
        }

        fn port_forward<'a>(
            &'a self,
            _: &'a str,
            _: u16,
            _: mpsc::Receiver<Vec<u8>>,
            _: mpsc::Sender<Vec<u8>>,
        ) -> BoxFuture<'a, Result<(), StreamError>> {
            Box::pin(async { Err(StreamError::Session("no".into())) })
        }
    }

    fn server(backend: Arc<Scripted>) -> StreamingServer {
        StreamingServer {
            base_url: "http://127.0.0.1:1".into(),
            stream_creation_timeout: Duration::from_secs(1),
            idle_timeout: None,
            tokens: super::super::Tokens { ttl: Duration::from_secs(1), live: Mutex::new(HashMap::new()) },
            backend,
        }
    }

    type Sent = mpsc::Receiver<(u8, Option<Vec<u8>>)>;

    fn channels(stdin: Option<mpsc::Receiver<Vec<u8>>>) -> (Channels, Sent, watch::Sender<bool>) {
        let (out, sent) = mpsc::channel(16);
        let (closing, closed) = watch::channel(false);
        let channels =
            Channels { stdin, resize: None, stdout: true, stderr: true, out, closed, format: StatusFormat::Status };
        (channels, sent, closing)
    }

    #[tokio::test]
    async fn a_session_carries_the_backends_streams_then_its_exit_code_last() {
        let server = server(Arc::default());
        let (stdin_tx, stdin_rx) = mpsc::channel(1);
        let (channels, mut sent, _closing) = channels(Some(stdin_rx));
        stdin_tx.send(b"hello".to_vec()).await.unwrap();
        let command = vec!["sh".to_string()];
        let request = StreamRequest::Exec {
            container_id: "c".into(),
            command,
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        };
        run(&server, request, channels).await;
        let mut messages = Vec::new();
        while let Some(message) = sent.recv().await {
            messages.push(message);
        }
        // The status, then the end of the error channel, come after all of the output.
        assert_eq!(messages.pop(), Some((ERROR, None)), "{messages:?}");
        let Some((ERROR, Some(status))) = messages.pop() else { panic!("no status last: {messages:?}") };
        let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
        assert_eq!(status["details"]["causes"][0]["message"], "3", "{status}");
        messages.sort();
        assert_eq!(
            messages,
            [(STDOUT, None), (STDOUT, Some(b"hello".to_vec())), (STDERR, None), (STDERR, Some(b"err".to_vec()))]
        );
    }

    #[tokio::test]
    async fn a_client_that_goes_ends_the_backends_session_without_a_status() {
        let backend = Arc::new(Scripted::default());
        let server = server(backend.clone());
        let (channels, mut sent, closing) = channels(None);
        let request =
            StreamRequest::Attach { container_id: "c".into(), stdin: false, tty: false, stdout: true, stderr: true };
        let session = tokio::spawn(async move { run(&server, request, channels).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!backend.dropped.load(Ordering::SeqCst));
        closing.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), session).await.expect("the session ends").unwrap();
        assert!(backend.dropped.load(Ordering::SeqCst), "the backend's session was dropped");
        while let Ok(message) = sent.try_recv() {
            assert_ne!(message.0, ERROR, "no status for a client that is gone: {message:?}");
        }
    }

    #[test]
    fn statuses_are_what_client_go_parses() {
        assert_eq!(Outcome::Success.status_json(), r#"{"metadata":{},"status":"Success"}"#);
        let failed: serde_json::Value = serde_json::from_str(
            &Outcome::ExitCode { command: vec!["sh".into(), "-c".into(), "exit 3".into()], code: 3 }.status_json(),
        )
        .unwrap();
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        assert_eq!(
            failed["message"],
            "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3"
        );
        assert_eq!(Outcome::Success.message(), None);
    }
}
