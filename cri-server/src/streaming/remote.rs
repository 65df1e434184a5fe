//! Exec and attach sessions, over either transport: the client's stdin and terminal sizes in,
//! the command's stdout and stderr out, and its end as a status on the error channel.

use std::sync::Arc;
use std::time::Duration;

use runtime::{ContainerState, ContainerStdio, ExecRequest, Pty};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::spdy;
use super::transport::{CLOSE_SIGNAL, ERROR, RESIZE, STDERR, STDIN, STDOUT, SpdyConnection, WsChannels};
use super::{StreamRequest, StreamingServer};

/// After the command ended, how long its output may take to reach EOF (a background process
/// holding the pipes or the pty must not hold the session).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How often attach checks whether the container still runs.
const ATTACH_POLL: Duration = Duration::from_millis(500);

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

async fn run(server: &StreamingServer, request: StreamRequest, channels: Channels) {
    match request {
        StreamRequest::Exec { container_id, command, tty, .. } => {
            exec(server, container_id, command, tty, channels).await
        }
        StreamRequest::Attach { container_id, .. } => attach(server, container_id, channels).await,
        StreamRequest::PortForward { .. } => {}
    }
}

/// Terminal sizes as client-go sends them, one JSON object per change.
#[derive(Debug, Deserialize)]
struct TerminalSize {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

async fn exec(server: &StreamingServer, container_id: String, command: Vec<String>, tty: bool, mut channels: Channels) {
    let request = ExecRequest {
        command: command.clone(),
        tty,
        stdin: channels.stdin.is_some(),
        stdout: channels.stdout,
        stderr: channels.stderr,
    };
    let mut session = match server.runtime.exec(&container_id, request).await {
        Ok(session) => session,
        Err(e) => return channels.finish(&Outcome::Error(e.to_string())).await,
    };
    if let Some(message) = session.start_error().map(str::to_string) {
        let channel = if channels.stderr { STDERR } else { STDOUT };
        let _ = channels.out.send((channel, Some(format!("{message}\n").into_bytes()))).await;
        let code = session.wait().await.unwrap_or(126);
        return channels.finish(&Outcome::ExitCode { command, code }).await;
    }
    let mut outputs = tokio::task::JoinSet::new();
    let pty = session.pty.clone();
    if let Some(pty) = &pty {
        if let Some(stdin) = channels.stdin.take() {
            tokio::spawn(pty_input(pty.clone(), stdin));
        }
        if let Some(resize) = channels.resize.take() {
            let pty = pty.clone();
            tokio::spawn(resizes(resize, move |width, height| pty.resize(width, height)));
        }
        if channels.stdout {
            outputs.spawn(pty_output(pty.clone(), channels.out.clone()));
        }
    } else {
        if let (Some(stdin), Some(pipe)) = (channels.stdin.take(), session.stdin.take()) {
            tokio::spawn(pipe_input(pipe, stdin));
        }
        if let Some(pipe) = session.stdout.take() {
            outputs.spawn(pipe_output(pipe, STDOUT, channels.out.clone()));
        }
        if let Some(pipe) = session.stderr.take() {
            outputs.spawn(pipe_output(pipe, STDERR, channels.out.clone()));
        }
    }
    let mut closed = channels.closed.clone();
    let ended = tokio::select! {
        ended = session.wait() => ended,
        _ = super::transport::until_closed(&mut closed) => {
            // The client went away: the command goes too (dropping the session kills it).
            debug!(container = %container_id, "exec client disconnected; killing the command");
            session.kill();
            return;
        }
    };
    drop(pty);
    let drained = tokio::time::timeout(OUTPUT_DRAIN, async { while outputs.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        outputs.abort_all();
        for channel in [STDOUT, STDERR] {
            let _ = channels.out.send((channel, None)).await;
        }
    }
    let outcome = match ended {
        Ok(0) => Outcome::Success,
        Ok(code) => Outcome::ExitCode { command, code },
        Err(e) => Outcome::Error(e.to_string()),
    };
    channels.finish(&outcome).await;
    drop(session);
}

async fn pipe_input(mut pipe: tokio::process::ChildStdin, mut input: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = input.recv().await {
        if pipe.write_all(&bytes).await.is_err() {
            return;
        }
    }
    // The client closed stdin: the command sees end of file (the pipe closes on drop).
}

async fn pty_input(pty: Arc<Pty>, mut input: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = input.recv().await {
        if pty.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

async fn resizes(mut input: mpsc::Receiver<Vec<u8>>, resize: impl Fn(u16, u16) -> std::io::Result<()>) {
    let mut pending = Vec::new();
    while let Some(bytes) = input.recv().await {
        pending.extend_from_slice(&bytes);
        let mut stream = serde_json::Deserializer::from_slice(&pending).into_iter::<TerminalSize>();
        let mut consumed = 0;
        loop {
            match stream.next() {
                Some(Ok(size)) => {
                    consumed = stream.byte_offset();
                    if let Err(e) = resize(size.width, size.height) {
                        debug!("resize: {e}");
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Not a size: drop what we have and start over.
                    consumed = pending.len();
                    break;
                }
                None => break,
            }
        }
        pending.drain(..consumed);
    }
}

async fn pipe_output<R: AsyncRead + Unpin>(mut pipe: R, channel: u8, out: mpsc::Sender<(u8, Option<Vec<u8>>)>) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.send((channel, Some(buffer[..n].to_vec()))).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = out.send((channel, None)).await;
}

async fn pty_output(pty: Arc<Pty>, out: mpsc::Sender<(u8, Option<Vec<u8>>)>) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match pty.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.send((STDOUT, Some(buffer[..n].to_vec()))).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = out.send((STDOUT, None)).await;
}

/// The client's input into the container's stdin or terminal; with stdin_once, the container's
/// stdin closes when the client's does.
async fn stdin_into(stdio: Arc<ContainerStdio>, mut input: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = input.recv().await {
        if let Err(e) = stdio.write(&bytes).await {
            debug!("attach stdin: {e}");
            break;
        }
    }
    stdio.session_ended().await;
}

/// Attach: input into the container's stdin or terminal, and its output: the terminal's (tty
/// containers) or its stdout and stderr (its output pipes), until the container stops or the
/// client goes.
async fn attach(server: &StreamingServer, container_id: String, mut channels: Channels) {
    let container = match server.runtime.container(&container_id) {
        Ok(container) if container.state == ContainerState::Running => container,
        Ok(container) => {
            return channels.finish(&Outcome::Error(format!("container {} is not running", container.id))).await;
        }
        Err(e) => return channels.finish(&Outcome::Error(e.to_string())).await,
    };
    let stdio = server.runtime.stdio(&container.id);
    // Without its terminal a tty container's output is out of reach; a stdin container's output
    // is in its output pipes (its stdin was closed by stdin_once, or lost with the fd store).
    if container.spec.tty && stdio.is_none() {
        let message = format!("the terminal of container {} was lost (see the daemon's log)", container.id);
        return channels.finish(&Outcome::Error(message)).await;
    }
    let input = match (channels.stdin.take(), &stdio) {
        (Some(input), Some(stdio)) if stdio.stdin_open() => Some(tokio::spawn(stdin_into(stdio.clone(), input))),
        _ => None,
    };
    let outcome = match stdio.clone().filter(|s| s.tty()) {
        Some(stdio) => attach_terminal(server, &container_id, stdio, &mut channels).await,
        None => attach_output(server, &container, &channels).await,
    };
    if let (Some(input), Some(stdio)) = (input, stdio) {
        // The input ends with the session (stdin_once: the container's stdin closes).
        input.abort();
        stdio.session_ended().await;
    }
    let Some(outcome) = outcome else { return };
    for channel in [STDOUT, STDERR] {
        let _ = channels.out.send((channel, None)).await;
    }
    channels.finish(&outcome).await;
}

/// A tty container's output from the terminal, resizes to it. `None`: the client went away.
async fn attach_terminal(
    server: &StreamingServer,
    container_id: &str,
    stdio: Arc<ContainerStdio>,
    channels: &mut Channels,
) -> Option<Outcome> {
    let mut output = stdio.subscribe().expect("a terminal has output");
    let resize = channels.resize.take().map(|input| {
        let stdio = stdio.clone();
        tokio::spawn(resizes(input, move |width, height| stdio.resize(width, height)))
    });
    let mut closed = channels.closed.clone();
    let outcome = loop {
        tokio::select! {
            received = output.recv() => match received {
                Ok(bytes) => {
                    if channels.stdout && channels.out.send((STDOUT, Some(bytes))).await.is_err() {
                        break None;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(lost)) => {
                    debug!(container = %container_id, "attach fell behind the terminal by {lost} reads");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break Some(Outcome::Success),
            },
            _ = tokio::time::sleep(ATTACH_POLL) => {
                let running = server.runtime.container(container_id).map(|c| c.state == ContainerState::Running).unwrap_or(false);
                if !running {
                    break Some(Outcome::Success);
                }
            }
            _ = super::transport::until_closed(&mut closed) => break None,
        }
    };
    if let Some(resize) = resize {
        resize.abort();
    }
    outcome
}

/// The container's stdout and stderr as the daemon reads them from its output pipes, until they
/// end (the container is gone). `None`: the client went away.
async fn attach_output(
    server: &StreamingServer,
    container: &runtime::Container,
    channels: &Channels,
) -> Option<Outcome> {
    let Some(mut output) = server.runtime.output(&container.id).and_then(|o| o.subscribe()) else {
        if server.runtime.output(&container.id).is_none() {
            let message = format!(
                "the output of container {} is not read by this daemon (started by an older cri-systemd)",
                container.id
            );
            return Some(Outcome::Error(message));
        }
        // Its output has ended already.
        return Some(Outcome::Success);
    };
    let mut closed = channels.closed.clone();
    loop {
        tokio::select! {
            received = output.recv() => match received {
                Ok(chunk) => {
                    let Some(channel) = channel_of(&chunk, channels) else { continue };
                    if channels.out.send((channel, Some(chunk.bytes))).await.is_err() {
                        return None;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(lost)) => {
                    debug!(container = %container.id, "attach fell behind the output by {lost} reads");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Some(Outcome::Success),
            },
            _ = tokio::time::sleep(ATTACH_POLL) => {
                let running = server.runtime.container(&container.id).map(|c| c.state == ContainerState::Running).unwrap_or(false);
                if !running {
                    // Exited: its output was drained when that was noticed; what is still on its
                    // way to us comes before the end, unless systemd holds the pipes a while.
                    while let Ok(Ok(chunk)) = tokio::time::timeout(OUTPUT_DRAIN, output.recv()).await {
                        let Some(channel) = channel_of(&chunk, channels) else { continue };
                        if channels.out.send((channel, Some(chunk.bytes))).await.is_err() {
                            return None;
                        }
                    }
                    return Some(Outcome::Success);
                }
            }
            _ = super::transport::until_closed(&mut closed) => return None,
        }
    }
}

/// The channel a piece of output goes to: its own, or stdout for stderr when the client asked for
/// stdout only (as before, with the journal); `None` if the client wants neither.
fn channel_of(chunk: &runtime::OutputChunk, channels: &Channels) -> Option<u8> {
    match (chunk.stderr, channels.stdout, channels.stderr) {
        (true, _, true) => Some(STDERR),
        (true, true, false) | (false, true, _) => Some(STDOUT),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
