//! Commands in running containers (ExecSync, Exec): the daemon's side of `cri-systemd exec-in`
//! (see `init::exec_in` for the steps and why a helper process does the namespace work).
//!
//! The daemon spawns exec-in with the session's stdio (pipes) and a SOCK_SEQPACKET control
//! socket as fd 3, on which exec-in reports the pty, the start and the end of the command.
//! Dropping an [`ExecSession`] closes the control socket, which kills the command.
//!
//! exec-in is started with `posix_spawn(3)` (glibc clones with CLONE_VM|CLONE_VFORK and applies
//! the stdio and fd 3 as file actions) by crate::spawner's thread, not forked: a fork copies the
//! daemon's page tables and the child then tears them down at exec, which made every ExecSync
//! (the kubelet's exec probes) pay for the daemon's size. Measured outside the daemon (a Rust
//! program with 40 MiB touched and 8 threads, `/bin/true`, 2-CPU AMD VM): 5.6 ms per fork+exec
//! against 0.9 ms per posix_spawn. (std's Command forks whenever a `pre_exec` closure is set,
//! which the dup onto fd 3 needed.) The helper is reaped through a pidfd by a task of its own,
//! so a session dropped without a wait leaves no zombie.
//!
//! # How exec-in enters a container
//!
//! ExecSync and Exec spawn `cri-systemd exec-in` (single-threaded, as `setns` into a mount
//! namespace needs): it checks that the unit's main PID is still the container's, writes itself
//! into that process's cgroup in every mounted hierarchy (systemd's `AttachProcessesToUnit` refuses
//! units without `Delegate=yes`), joins the PID namespace, forks a child that joins
//! ipc/uts/net/mnt, chroots to the main process's root, and runs init's process setup (rlimits,
//! then the container's user namespace if it has its own, user, capabilities, no_new_privs, cwd,
//! env from `init.json`) before `execve`. The end of the command comes back on a SOCK_SEQPACKET
//! control socket; closing it kills the command's process group (`runtime/src/exec.rs`,
//! `init/src/exec_in.rs`).

use std::ffi::CString;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, socketpair};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tracing::debug;

use crate::container::ContainerState;
use crate::{Error, Runtime};
use init::exec_in::{self, MSG_KILL, Report};

/// What to run and which stdio the caller wants.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    /// Ignored with a tty (one stream carries both).
    pub stderr: bool,
}

/// ExecSync's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSyncOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// Largest command line accepted (the kernel's limit for one argument is 128 KiB).
const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// After the command ended, how long its output may still take to reach EOF: a background
/// process that keeps the pipes open must not hold the call.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);
/// How long a killed command may take to be reported as ended.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// A command started in a container. Dropping it kills the command (and its process group).
#[derive(Debug)]
pub struct ExecSession {
    helper: Helper,
    control: Control,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    /// The pty master (`tty` sessions): the command's stdin, stdout and stderr.
    pub pty: Option<Arc<Pty>>,
    /// Why the command could not be started, with the shell-like exit code reported for it.
    start_error: Option<String>,
    exit_code: Option<i32>,
}

impl ExecSession {
    /// The message of a command that could not be started (its exit code is 126 or 127).
    pub fn start_error(&self) -> Option<&str> {
        self.start_error.as_deref()
    }

    /// Waits for the command to end: its exit code, 128 + the signal that killed it.
    pub async fn wait(&mut self) -> Result<i32, Error> {
        if let Some(code) = self.exit_code {
            return Ok(code);
        }
        loop {
            let code = match self.control.receive().await? {
                Some((Report::Exited { code }, _)) => code,
                Some((Report::Killed { signal }, _)) => 128 + signal,
                Some((Report::Failed { message, .. }, _)) => return Err(Error::Exec(format!("exec-in: {message}"))),
                Some(_) => continue,
                None => {
                    let status = self.helper.wait().await;
                    return Err(Error::Exec(format!(
                        "exec-in ended ({status}) without reporting the command's end: did the container stop?"
                    )));
                }
            };
            self.exit_code = Some(code);
            let _ = self.helper.wait().await;
            return Ok(code);
        }
    }

    /// Kills the command's process group; [`wait`](Self::wait) then reports how it ended.
    pub fn kill(&self) {
        self.control.send(MSG_KILL);
    }
}

impl Runtime {
    /// Starts `request.command` in running container `id`, in all its namespaces, its cgroup,
    /// with its user, environment, working dir, capabilities and no_new_privs.
    pub(crate) async fn exec(&self, id: &str, request: ExecRequest) -> Result<ExecSession, Error> {
        if request.command.is_empty() {
            return Err(Error::InvalidSpec("exec needs a command".into()));
        }
        if request.command.iter().any(|a| a.contains('\0')) {
            return Err(Error::InvalidSpec("exec command contains a NUL byte".into()));
        }
        if request.command.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_COMMAND_BYTES {
            return Err(Error::InvalidSpec(format!("exec command is longer than {MAX_COMMAND_BYTES} bytes")));
        }
        let container = self.container(id)?;
        if container.state != ContainerState::Running {
            return Err(Error::ContainerState(format!(
                "container {} is {:?}, not running: cannot exec in it",
                container.id, container.state
            )));
        }
        let main_pid = self.systemd.main_pid(&container.unit).await?;
        if main_pid == 0 {
            return Err(Error::ContainerState(format!(
                "container {} is not running: its unit has no main process",
                container.id
            )));
        }
        let init_spec = self.container_dir(&container.id).join("init.json");

        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| Error::Io { what: "cannot create the exec control socket".into(), source: e.into() })?;
        let exe = crate::sealed_exe::init_path()?;
        let mut args: Vec<std::ffi::OsString> = vec![exe.as_os_str().to_owned(), exec_in::SUBCOMMAND.into()];
        if request.tty {
            args.push("--tty".into());
        }
        args.extend([
            init_spec.into_os_string(),
            container.unit.clone().into(),
            main_pid.to_string().into(),
            "--".into(),
        ]);
        args.extend(request.command.iter().map(Into::into));
        let pipe_error = |e: Errno| Error::Io { what: "cannot create the exec stdio pipes".into(), source: e.into() };
        let piped = |wanted: bool| -> Result<Option<(OwnedFd, OwnedFd)>, Error> {
            match wanted && !request.tty {
                true => nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map(Some).map_err(pipe_error),
                false => Ok(None),
            }
        };
        // (read, write) pairs: exec-in gets stdin's read end and the outputs' write ends.
        let (stdin, stdout, stderr) = (piped(request.stdin)?, piped(request.stdout)?, piped(request.stderr)?);
        let child_ends = [
            stdin.as_ref().map(|(read, _)| read.as_fd()),
            stdout.as_ref().map(|(_, write)| write.as_fd()),
            stderr.as_ref().map(|(_, write)| write.as_fd()),
        ];
        let helper = Helper::spawn(exe, &args, child_ends, theirs.as_fd())?;
        drop(theirs);
        let ours_of =
            |what: &str, e: std::io::Error| Error::Io { what: format!("cannot watch the exec {what}"), source: e };
        let stdin =
            stdin.map(|(_, write)| pipe::Sender::from_owned_fd(write)).transpose().map_err(|e| ours_of("stdin", e))?;
        let stdout = stdout
            .map(|(read, _)| pipe::Receiver::from_owned_fd(read))
            .transpose()
            .map_err(|e| ours_of("stdout", e))?;
        let stderr = stderr
            .map(|(read, _)| pipe::Receiver::from_owned_fd(read))
            .transpose()
            .map_err(|e| ours_of("stderr", e))?;
        let control = Control::new(ours)?;
        let mut session =
            ExecSession { stdin, stdout, stderr, helper, control, pty: None, start_error: None, exit_code: None };
        loop {
            match session.control.receive().await? {
                Some((Report::Tty, Some(master))) => session.pty = Some(Arc::new(Pty::new(master)?)),
                Some((Report::Tty, None)) => return Err(Error::Exec("exec-in sent no pty".into())),
                Some((Report::Started { pid }, _)) => {
                    debug!(container = %container.id, pid, command = ?request.command, "exec started");
                    return Ok(session);
                }
                Some((Report::Failed { message, exit_code: Some(code) }, _)) => {
                    session.start_error = Some(message);
                    session.exit_code = Some(code);
                    let _ = session.helper.wait().await;
                    return Ok(session);
                }
                Some((Report::Failed { message, exit_code: None }, _)) => {
                    let _ = session.helper.wait().await;
                    return Err(match self.systemd.main_pid(&container.unit).await {
                        Ok(0) => Error::ContainerState(format!("container {} stopped: {message}", container.id)),
                        _ => Error::Exec(format!("cannot exec in container {}: {message}", container.id)),
                    });
                }
                Some((other, _)) => {
                    return Err(Error::Exec(format!("exec-in reported {other:?} before the command started")));
                }
                None => {
                    let status = session.helper.wait().await;
                    return Err(Error::Exec(format!("exec-in ended ({status}) before the command started")));
                }
            }
        }
    }

    /// ExecSync: runs `command` and returns its output, stdout and stderr together capped at
    /// `max_output` bytes, whichever stream comes first (the rest is read and discarded, so the
    /// command never blocks on a full pipe; CVE-2022-1708 class). On
    /// `timeout` the command's process group is killed and the call fails with DeadlineExceeded.
    pub async fn exec_sync(
        &self,
        id: &str,
        command: Vec<String>,
        timeout: Option<Duration>,
        max_output: usize,
    ) -> Result<ExecSyncOutput, Error> {
        let request = ExecRequest { command: command.clone(), stdout: true, stderr: true, ..Default::default() };
        let mut session = self.exec(id, request).await?;
        if let Some(message) = session.start_error.clone() {
            let exit_code = session.wait().await?;
            return Ok(ExecSyncOutput { stdout: Vec::new(), stderr: format!("{message}\n").into_bytes(), exit_code });
        }
        let room = Arc::new(AtomicUsize::new(max_output));
        let stdout = Captured::spawn(session.stdout.take(), room.clone());
        let stderr = Captured::spawn(session.stderr.take(), room);
        let ended = match timeout {
            Some(limit) => tokio::time::timeout(limit, session.wait()).await.ok(),
            None => Some(session.wait().await),
        };
        let Some(ended) = ended else {
            session.kill();
            let _ = tokio::time::timeout(KILL_WAIT, session.wait()).await;
            let (out, err) = (stdout.finish(OUTPUT_DRAIN).await, stderr.finish(OUTPUT_DRAIN).await);
            return Err(Error::ExecTimeout(format!(
                "command {command:?} in container {id} timed out after {}s and was killed; output so far: stdout {:?}, stderr {:?}",
                timeout.unwrap_or_default().as_secs(),
                excerpt(&out),
                excerpt(&err)
            )));
        };
        let exit_code = ended?;
        Ok(ExecSyncOutput {
            stdout: stdout.finish(OUTPUT_DRAIN).await,
            stderr: stderr.finish(OUTPUT_DRAIN).await,
            exit_code,
        })
    }
}

/// The start of some output, for an error message.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 512;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX { format!("{text}...") } else { text }
}

/// One output stream read to EOF in a task of its own, kept while `room` (the bytes left of a
/// cap the streams share) lasts.
struct Captured {
    data: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Captured {
    fn spawn<R: AsyncRead + Unpin + Send + 'static>(reader: Option<R>, room: Arc<AtomicUsize>) -> Captured {
        let data = Arc::new(Mutex::new(Vec::new()));
        let sink = data.clone();
        let task = tokio::spawn(async move {
            let Some(mut reader) = reader else { return };
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                match reader.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let taken = room
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| Some(left - n.min(left)))
                            .map(|left| n.min(left))
                            .unwrap_or(0);
                        if taken > 0 {
                            sink.lock().expect("output lock").extend_from_slice(&buffer[..taken]);
                        }
                    }
                }
            }
        });
        Captured { data, task }
    }

    /// What was read once the stream reached EOF, or after `grace`, whichever comes first.
    async fn finish(self, grace: Duration) -> Vec<u8> {
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
        std::mem::take(&mut *self.data.lock().expect("output lock"))
    }
}

/// The exec-in process: spawned without a fork of the daemon, reaped by a task of its own.
#[derive(Debug)]
struct Helper {
    /// How it ended, once it has (from the reaper).
    ended: Option<tokio::sync::oneshot::Receiver<String>>,
    status: Option<String>,
}

impl Helper {
    /// Spawns `exe` with `args` (argv, the program first) and the daemon's environment: `stdio`
    /// (None: /dev/null) as fds 0-2 and `control` as fd 3 (crate::spawner).
    fn spawn(
        exe: &std::path::Path,
        args: &[std::ffi::OsString],
        stdio: [Option<std::os::fd::BorrowedFd<'_>>; 3],
        control: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Helper, Error> {
        let c_string = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| Error::InvalidSpec("exec: a NUL byte in an argument".into()))
        };
        let path = c_string(exe.as_os_str().as_bytes())?;
        let argv = args.iter().map(|arg| c_string(arg.as_bytes())).collect::<Result<Vec<_>, _>>()?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| Error::Io { what: "cannot open /dev/null".into(), source: e })?;
        let fds = [
            stdio[0].unwrap_or(null.as_fd()),
            stdio[1].unwrap_or(null.as_fd()),
            stdio[2].unwrap_or(null.as_fd()),
            control,
        ];
        let pid = crate::spawner::spawn(&path, &argv, fds)
            .map_err(|e| Error::Io { what: "cannot start cri-systemd exec-in".into(), source: e.into() })?;
        let (sender, ended) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = sender.send(reap(pid).await);
        });
        Ok(Helper { ended: Some(ended), status: None })
    }

    /// Waits for the process to end: how it ended, for messages.
    async fn wait(&mut self) -> String {
        if let Some(ended) = self.ended.take() {
            self.status = Some(ended.await.unwrap_or_else(|_| "status unknown".into()));
        }
        self.status.clone().unwrap_or_default()
    }
}

/// Waits for child `pid` to end and reaps it: through a pidfd (Linux 5.3+), else on a blocking
/// thread.
async fn reap(pid: nix::unistd::Pid) -> String {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
    let describe = |status: nix::Result<WaitStatus>| match status {
        Ok(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
        Ok(WaitStatus::Signaled(_, signal, _)) => format!("killed by {signal}"),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("status unknown: {e}"),
    };
    // The child is not reaped before this (only this task waits for it): the pid is its own.
    if let Some(pidfd) = crate::events::pidfd_open(pid.as_raw()) {
        // SAFETY: the AsyncFd owns the pidfd, which nothing else closes or replaces.
        if let Ok(watched) = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
            loop {
                let Ok(mut ready) = watched.readable().await else { break };
                match waitid(Id::PIDFd(watched.get_ref().as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
                    Ok(WaitStatus::StillAlive) => ready.clear_ready(),
                    status => return describe(status),
                }
            }
        }
    }
    tokio::task::spawn_blocking(move || describe(waitpid(pid, None)))
        .await
        .unwrap_or_else(|e| format!("status unknown: {e}"))
}

/// The daemon's end of the control socket.
#[derive(Debug)]
struct Control {
    socket: AsyncFd<OwnedFd>,
}

/// The largest report exec-in sends (a message of init's and some JSON).
const MAX_REPORT: usize = 64 * 1024;

impl Control {
    fn new(socket: OwnedFd) -> Result<Control, Error> {
        set_nonblocking(&socket)?;
        // SAFETY: the descriptor is ours alone (a fresh socketpair end) and stays open while
        // registered: AsyncFd owns it and deregisters before closing it.
        let socket = unsafe { AsyncFd::register(socket) }
            .map_err(|e| Error::Io { what: "cannot watch the exec control socket".into(), source: e.into_parts().1 })?;
        Ok(Control { socket })
    }

    /// One byte to exec-in. The socket's buffer holds far more than the two bytes ever sent.
    fn send(&self, byte: u8) {
        let _ = nix::sys::socket::send(
            self.socket.get_ref().as_raw_fd(),
            &[byte],
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        );
    }

    /// The next report, with the descriptor it carried; `None` once exec-in is gone.
    async fn receive(&self) -> Result<Option<(Report, Option<OwnedFd>)>, Error> {
        let mut buffer = vec![0u8; MAX_REPORT];
        loop {
            let mut guard =
                self.socket.readable().await.map_err(Error::io("cannot wait on the exec control socket"))?;
            let result = guard.try_io(|socket| {
                let mut space = nix::cmsg_space!([RawFd; 1]);
                let mut iov = [IoSliceMut::new(&mut buffer)];
                let message = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(std::io::Error::from)?;
                let mut fd = None;
                for cmsg in message.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(fds) = cmsg {
                        for raw in fds {
                            // SAFETY: SCM_RIGHTS gave us this new descriptor; we own it now.
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            fd.get_or_insert(owned);
                        }
                    }
                }
                Ok((message.bytes, message.flags.contains(MsgFlags::MSG_TRUNC), fd))
            });
            let (length, truncated, fd) = match result {
                Ok(Ok(received)) => received,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => return Ok(None),
                Ok(Err(e)) => return Err(Error::Io { what: "cannot read the exec control socket".into(), source: e }),
                Err(_would_block) => continue,
            };
            if length == 0 && !truncated {
                return Ok(None);
            }
            if truncated {
                return Err(Error::Exec("exec-in sent an over-long report".into()));
            }
            let report: Report = serde_json::from_slice(&buffer[..length])
                .map_err(|e| Error::Exec(format!("exec-in sent a bad report: {e}")))?;
            return Ok(Some((report, fd)));
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), Error> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| Error::Io { what: "fcntl".into(), source: e.into() })?;
    fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK))
        .map_err(|e| Error::Io { what: "fcntl".into(), source: e.into() })?;
    Ok(())
}

/// The master side of an exec's pty, non-blocking, usable from several tasks at once.
#[derive(Debug)]
pub struct Pty {
    fd: AsyncFd<OwnedFd>,
}

impl Pty {
    pub(crate) fn new(master: OwnedFd) -> Result<Pty, Error> {
        set_nonblocking(&master)?;
        // SAFETY: the master came to us over SCM_RIGHTS and nothing else holds it; AsyncFd owns
        // it and deregisters before closing it.
        let fd = unsafe { AsyncFd::register(master) }
            .map_err(|e| Error::Io { what: "cannot watch the pty".into(), source: e.into_parts().1 })?;
        Ok(Pty { fd })
    }

    /// Reads what the command wrote; `Ok(0)` once every slave descriptor is closed (the kernel
    /// reports that as EIO on a pty master).
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `buf` as the command's input.
    pub async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref().as_fd(), buf).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Sets the terminal's size (the command gets SIGWINCH).
    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<()> {
        let size = libc::winsize { ws_row: height, ws_col: width, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize we own, on a pty master descriptor we own.
        Errno::result(unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &size) })
            .map(drop)
            .map_err(std::io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `script` printed on each of fd 1, 2 and 3, and how it ended, run as exec-in is.
    async fn spawned(script: &str) -> (String, String, String, String) {
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let (out_read, out_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let args: Vec<std::ffi::OsString> = vec!["/bin/sh".into(), "-c".into(), script.into()];
        let stdio = [None, Some(out_write.as_fd()), Some(err_write.as_fd())];
        let mut helper = Helper::spawn(std::path::Path::new("/bin/sh"), &args, stdio, theirs.as_fd()).unwrap();
        drop((theirs, out_write, err_write));
        let status = helper.wait().await;
        let read_all = |fd: OwnedFd| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).unwrap();
            text
        };
        (read_all(out_read), read_all(err_read), read_all(ours), status)
    }

    #[tokio::test]
    async fn the_helper_gets_its_stdio_and_the_control_socket_as_fd_3_and_is_reaped() {
        let (out, err, control, status) = spawned("echo out; echo err >&2; echo control >&3; exit 7").await;
        assert_eq!((out.as_str(), err.as_str(), control.as_str()), ("out\n", "err\n", "control\n"));
        assert_eq!(status, "exit status 7");
        // stdin is /dev/null; no signal is blocked and SIGPIPE is not ignored (the daemon's is).
        let script = "read -r line; echo \"read $?\"; grep -E '^Sig(Blk|Ign)' /proc/self/status";
        let (out, _, _, status) = spawned(script).await;
        assert_eq!(status, "exit status 0");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "read 1", "end of file on stdin");
        assert!(lines[1].ends_with("0000000000000000"), "no blocked signal: {}", lines[1]);
        let ignored = u64::from_str_radix(lines[2].split_whitespace().last().unwrap(), 16).unwrap();
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE at its default: {}", lines[2]);
    }
}
