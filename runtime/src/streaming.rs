//! The runtime's side of the streaming calls (Exec, Attach, PortForward): what a session does in
//! the container or the pod, behind [`StreamingRuntime`], in the shape of the kubelet's
//! `streaming.Runtime` interface (k8s.io/kubelet/pkg/cri/streaming):
//!
//! ```text
//! Exec(ctx, containerID, cmd, in, out, err, tty, resize) error
//! Attach(ctx, containerID, in, out, err, tty, resize) error
//! PortForward(ctx, podSandboxID, port, stream) error
//! ```
//!
//! The daemon's streaming server (cri-server/src/streaming) speaks the protocols (HTTP upgrade,
//! SPDY, WebSocket, tokens) and calls these; it holds no container logic.
//!
//! Why the trait is defined here, beside its implementation, and not in the server that consumes
//! it (where Go's kubelet puts it): the server's crate depends on this one, so this crate cannot
//! name a trait of the server's, and a trait in the server implemented for [`Runtime`] there
//! would keep the container logic in the server. Its types are neither gRPC nor HTTP: channels of
//! bytes (the Go interface's readers and writers), terminal sizes, exit codes and this module's
//! error; the server turns them into streams and channels of its protocols. With the trait the
//! server can be tested against another backend and the runtime knows nothing of the protocols.
//!
//! Mapping of the Go interface: `in` is a receiver of bytes (closed: end of input), `out` and `err`
//! senders (dropped: that stream is closed); an absent stream is `None`. `resize` is a receiver of
//! [`TerminalSize`]. The context is the future itself: the server drops it when the client goes,
//! which kills an exec's command and ends an attach session (closing a `stdin_once` container's
//! stdin all the same). Exec returns the command's exit code instead of Go's `ExitError`.
//!
//! Attach takes the container's output from the daemon's own readers of it (crate::logs for the
//! output pipes, crate::stdio for a terminal), which also write the CRI log, and learns of the
//! container's exit from the runtime's events (crate::events: the exit record's inotify watch),
//! so that a session ends as soon as the exit is known, with the output drained before it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tracing::debug;

use crate::exec::{ExecRequest, Pty};
use crate::{ContainerEventKind, ContainerState, ContainerStdio, Runtime};

/// A terminal's size in characters, as the client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub width: u16,
    pub height: u16,
}

/// A session's streams: what the client asked for, each `None` if not.
#[derive(Debug, Default)]
pub struct Streams {
    /// The client's input; the channel's end is the input's end.
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    /// Dropping a sender ends that stream for the client.
    pub stdout: Option<mpsc::Sender<Vec<u8>>>,
    /// Ignored with a terminal (its one stream is stdout).
    pub stderr: Option<mpsc::Sender<Vec<u8>>>,
    pub tty: bool,
    /// Terminal sizes (tty sessions).
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
}

/// Why a session could not run or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Runtime(#[from] crate::Error),
    /// The session cannot go on, for the reason given.
    #[error("{0}")]
    Session(String),
    /// The connection to a forwarded port.
    #[error(transparent)]
    Connect(std::io::Error),
}

/// The runtime's side of Exec, Attach and PortForward sessions (see the module doc).
pub trait StreamingRuntime: Send + Sync + std::fmt::Debug {
    /// Runs `command` in running container `container_id` with `streams`: its exit code (128 +
    /// the signal that killed it; 126 or 127 for a command that could not start, whose message
    /// is then written to stderr, or stdout without stderr).
    fn exec<'a>(
        &'a self,
        container_id: &'a str,
        command: Vec<String>,
        streams: Streams,
    ) -> BoxFuture<'a, Result<i32, StreamError>>;

    /// Attaches `streams` to running container `container_id`'s stdin and output (or terminal)
    /// until the container exits or the future is dropped.
    fn attach<'a>(&'a self, container_id: &'a str, streams: Streams) -> BoxFuture<'a, Result<(), StreamError>>;

    /// Connects to `port` on the loopback of pod `pod_id`'s network namespace and copies `input`
    /// there and what comes back to `output`, until both directions end (the input's end
    /// half-closes the connection). An error is a connection that could not be made.
    fn port_forward<'a>(
        &'a self,
        pod_id: &'a str,
        port: u16,
        input: mpsc::Receiver<Vec<u8>>,
        output: mpsc::Sender<Vec<u8>>,
    ) -> BoxFuture<'a, Result<(), StreamError>>;
}

/// After an exec's command ended, how long its output may take to reach its end (a background
/// process holding the pipes or the pty must not hold the session).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// After a terminal container's exit was announced, how long its terminal may take to give the
/// last of its output (the daemon reads it apart from the exit's handling).
const TERMINAL_DRAIN: Duration = Duration::from_millis(200);
/// A backstop for an exit the events do not report (the exit watch of a container could not be
/// set up: its exit is then noticed by the next status call, which this is).
const EXIT_BACKSTOP: Duration = Duration::from_secs(5);
/// Bytes read at once from a command's output or a forwarded connection.
const READ_SIZE: usize = 32 * 1024;

impl StreamingRuntime for Runtime {
    fn exec<'a>(
        &'a self,
        container_id: &'a str,
        command: Vec<String>,
        streams: Streams,
    ) -> BoxFuture<'a, Result<i32, StreamError>> {
        Box::pin(self.exec_session(container_id, command, streams))
    }

    fn attach<'a>(&'a self, container_id: &'a str, streams: Streams) -> BoxFuture<'a, Result<(), StreamError>> {
        Box::pin(self.attach_session(container_id, streams))
    }

    fn port_forward<'a>(
        &'a self,
        pod_id: &'a str,
        port: u16,
        input: mpsc::Receiver<Vec<u8>>,
        output: mpsc::Sender<Vec<u8>>,
    ) -> BoxFuture<'a, Result<(), StreamError>> {
        Box::pin(self.forward_port(pod_id, port, input, output))
    }
}

impl Runtime {
    async fn exec_session(
        &self,
        container_id: &str,
        command: Vec<String>,
        streams: Streams,
    ) -> Result<i32, StreamError> {
        let Streams { stdin, stdout, stderr, tty, resize } = streams;
        let request = ExecRequest {
            command,
            tty,
            stdin: stdin.is_some(),
            stdout: stdout.is_some(),
            stderr: stderr.is_some() && !tty,
        };
        let mut session = self.exec(container_id, request).await?;
        if let Some(message) = session.start_error().map(str::to_string) {
            if let Some(out) = stderr.as_ref().or(stdout.as_ref()) {
                let _ = out.send(format!("{message}\n").into_bytes()).await;
            }
            return Ok(session.wait().await.unwrap_or(126));
        }
        // Input tasks end with the session (dropped with this future); output tasks end at their
        // stream's end, or are cut after OUTPUT_DRAIN.
        let mut inputs = JoinSet::new();
        let mut outputs = JoinSet::new();
        let pty = session.pty.clone();
        if let Some(pty) = &pty {
            if let Some(stdin) = stdin {
                inputs.spawn(pty_input(pty.clone(), stdin));
            }
            if let Some(resize) = resize {
                let pty = pty.clone();
                inputs.spawn(resizes(resize, move |size| pty.resize(size.width, size.height)));
            }
            if let Some(stdout) = stdout {
                outputs.spawn(pty_output(pty.clone(), stdout));
            }
        } else {
            if let (Some(stdin), Some(pipe)) = (stdin, session.stdin.take()) {
                inputs.spawn(pipe_input(pipe, stdin));
            }
            if let (Some(stdout), Some(pipe)) = (stdout, session.stdout.take()) {
                outputs.spawn(pipe_output(pipe, stdout));
            }
            if let (Some(stderr), Some(pipe)) = (stderr, session.stderr.take()) {
                outputs.spawn(pipe_output(pipe, stderr));
            }
        }
        let ended = session.wait().await;
        drop(pty);
        let drained = tokio::time::timeout(OUTPUT_DRAIN, async { while outputs.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            debug!(container = %container_id, "the command's output did not end within {OUTPUT_DRAIN:?} of its exit");
        }
        Ok(ended?)
    }

    /// Attach: input into the container's stdin or terminal, and its output: the terminal's (tty
    /// containers) or its stdout and stderr (its output pipes), until the container stops.
    async fn attach_session(&self, container_id: &str, streams: Streams) -> Result<(), StreamError> {
        // Subscribed before the state is looked at: an exit after the look is an event.
        let mut events = self.subscribe_events();
        let container = self.container(container_id)?;
        if container.state != ContainerState::Running {
            return Err(StreamError::Session(format!("container {} is not running", container.id)));
        }
        let id = container.id;
        let stdio = self.stdio(&id);
        // Without its terminal a tty container's output is out of reach; a stdin container's output
        // is in its output pipes (its stdin was closed by stdin_once, or lost with the fd store).
        if container.spec.tty && stdio.is_none() {
            let message = format!("the terminal of container {id} was lost (see the daemon's log)");
            return Err(StreamError::Session(message));
        }
        let Streams { stdin, stdout, stderr, resize, .. } = streams;
        let mut tasks = JoinSet::new();
        let mut input_session = None;
        if let (Some(input), Some(stdio)) = (stdin, &stdio)
            && stdio.stdin_open()
        {
            input_session = Some(InputSession(Some(stdio.clone())));
            tasks.spawn(stdin_into(stdio.clone(), input));
        }
        let backstop = tokio::time::interval_at(tokio::time::Instant::now() + EXIT_BACKSTOP, EXIT_BACKSTOP);
        let exit = ExitWait { runtime: self, id: &id, events: &mut events, backstop };
        let result = match stdio.clone().filter(|s| s.tty()) {
            Some(stdio) => {
                if let Some(resize) = resize {
                    let stdio = stdio.clone();
                    tasks.spawn(resizes(resize, move |size| stdio.resize(size.width, size.height)));
                }
                attach_terminal(&stdio, stdout, exit).await
            }
            None => self.attach_output(&id, stdout, stderr, exit).await,
        };
        // The input ends with the session (stdin_once: the container's stdin closes).
        tasks.abort_all();
        if let Some(mut input_session) = input_session {
            input_session.end().await;
        }
        result
    }

    /// The container's stdout and stderr as the daemon reads them from its output pipes, until
    /// they end or the container's exit is announced.
    async fn attach_output(
        &self,
        id: &str,
        stdout: Option<mpsc::Sender<Vec<u8>>>,
        stderr: Option<mpsc::Sender<Vec<u8>>>,
        mut exit: ExitWait<'_>,
    ) -> Result<(), StreamError> {
        let Some(output) = self.output(id) else {
            return Err(StreamError::Session(format!(
                "the output of container {id} is not read by this daemon (started by an older cri-systemd)"
            )));
        };
        // Its output has ended already: so has the container.
        let Some(mut output) = output.subscribe() else { return Ok(()) };
        // stderr goes to stdout when the client asked for stdout only.
        let destination = |chunk: &crate::OutputChunk| match chunk.stderr {
            true => stderr.as_ref().or(stdout.as_ref()),
            false => stdout.as_ref(),
        };
        loop {
            tokio::select! {
                received = output.recv() => match received {
                    Ok(chunk) => {
                        if let Some(to) = destination(&chunk)
                            && to.send(chunk.bytes).await.is_err()
                        {
                            return Ok(());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(lost)) => {
                        debug!(container = %id, "attach fell behind the output by {lost} reads");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                () = exit.exited() => {
                    // The pipes were drained into the channel before the exit was announced.
                    while let Ok(chunk) = output.try_recv() {
                        if let Some(to) = destination(&chunk)
                            && to.send(chunk.bytes).await.is_err()
                        {
                            break;
                        }
                    }
                    return Ok(());
                }
            }
        }
    }

    async fn forward_port(
        &self,
        pod_id: &str,
        port: u16,
        mut input: mpsc::Receiver<Vec<u8>>,
        output: mpsc::Sender<Vec<u8>>,
    ) -> Result<(), StreamError> {
        let pod = self.pod(pod_id)?;
        if pod.state != crate::PodState::Ready {
            return Err(StreamError::Session(format!("pod sandbox {} is not ready", pod.id)));
        }
        let netns = pod.namespaces.network.clone();
        let tcp = connect(netns, port).await.map_err(StreamError::Connect)?;
        let (from_pod, mut to_pod) = tcp.into_split();
        let upstream = async {
            while let Some(bytes) = input.recv().await {
                if to_pod.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            // The client finished sending: so do we, towards the pod.
            let _ = to_pod.shutdown().await;
        };
        let downstream = pipe_output(from_pod, output);
        tokio::join!(upstream, downstream);
        Ok(())
    }
}

/// Connects to `port` on the loopback of network namespace `netns` (the daemon's own for None).
async fn connect(netns: Option<PathBuf>, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let stream = tokio::task::spawn_blocking(move || crate::namespaces::connect_loopback(netns.as_deref(), port))
        .await
        .map_err(std::io::Error::other)??;
    stream.set_nonblocking(true)?;
    let _ = stream.set_nodelay(true);
    tokio::net::TcpStream::from_std(stream)
}

/// The wait for one container's exit, from the runtime's events.
struct ExitWait<'a> {
    runtime: &'a Runtime,
    id: &'a str,
    events: &'a mut broadcast::Receiver<crate::ContainerEvent>,
    backstop: tokio::time::Interval,
}

impl ExitWait<'_> {
    /// Resolves once the container has stopped or is gone (cancel-safe: nothing is lost by
    /// dropping it in a select).
    async fn exited(&mut self) {
        loop {
            tokio::select! {
                event = self.events.recv() => match event {
                    Ok(event) if event.container_id == self.id
                        && matches!(event.kind, ContainerEventKind::Stopped | ContainerEventKind::Deleted) => return,
                    Ok(_) => {}
                    // Events were lost (the receiver fell behind): maybe this one.
                    Err(broadcast::error::RecvError::Lagged(_)) if !self.running() => return,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = self.backstop.tick() => if !self.running() { return },
            }
        }
    }

    fn running(&self) -> bool {
        self.runtime.container(self.id).map(|c| c.state == ContainerState::Running).unwrap_or(false)
    }
}

/// A tty container's output from the terminal, until the terminal closes or the container's exit
/// is announced.
async fn attach_terminal(
    stdio: &ContainerStdio,
    stdout: Option<mpsc::Sender<Vec<u8>>>,
    mut exit: ExitWait<'_>,
) -> Result<(), StreamError> {
    // No terminal output any more: every process of the container has let go of the terminal.
    let Some(mut output) = stdio.subscribe() else { return Ok(()) };
    let forward = |bytes: Vec<u8>| {
        let stdout = stdout.clone();
        async move {
            match &stdout {
                Some(stdout) => stdout.send(bytes).await.is_ok(),
                None => true,
            }
        }
    };
    loop {
        tokio::select! {
            received = output.recv() => match received {
                Ok(bytes) => {
                    if !forward(bytes).await {
                        return Ok(());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    debug!("attach fell behind the terminal by {lost} reads");
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            () = exit.exited() => {
                // What the terminal still holds comes before the end, briefly.
                while let Ok(Ok(bytes)) = tokio::time::timeout(TERMINAL_DRAIN, output.recv()).await {
                    if !forward(bytes).await {
                        break;
                    }
                }
                return Ok(());
            }
        }
    }
}

/// An attach session that carries input: when it ends, however it ends (also when its future is
/// dropped), a `stdin_once` container's stdin closes.
struct InputSession(Option<Arc<ContainerStdio>>);

impl InputSession {
    async fn end(&mut self) {
        if let Some(stdio) = self.0.take() {
            stdio.session_ended().await;
        }
    }
}

impl Drop for InputSession {
    fn drop(&mut self) {
        if let Some(stdio) = self.0.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move { stdio.session_ended().await });
        }
    }
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

async fn pipe_input(mut pipe: tokio::net::unix::pipe::Sender, mut input: mpsc::Receiver<Vec<u8>>) {
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

async fn resizes(mut sizes: mpsc::Receiver<TerminalSize>, resize: impl Fn(TerminalSize) -> std::io::Result<()>) {
    while let Some(size) = sizes.recv().await {
        if let Err(e) = resize(size) {
            debug!("resize: {e}");
        }
    }
}

async fn pipe_output<R: AsyncRead + Unpin>(mut pipe: R, out: mpsc::Sender<Vec<u8>>) {
    let mut buffer = vec![0u8; READ_SIZE];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.send(buffer[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn pty_output(pty: Arc<Pty>, out: mpsc::Sender<Vec<u8>>) {
    let mut buffer = vec![0u8; READ_SIZE];
    loop {
        match pty.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.send(buffer[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}
