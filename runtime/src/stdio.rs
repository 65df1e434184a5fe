//! Containers with stdin or a tty: the daemon's ends of their stdio, kept across restarts in the
//! daemon's systemd file descriptor store.
//!
//! A container with `stdin` and no `tty` gets a pipe as the unit's stdin
//! (`StandardInputFileDescriptor`, an fd passed over D-Bus); the daemon keeps the write end, Attach
//! writes into it, and its stdout and stderr are the output pipes of crate::logs. With
//! `stdin_once`, the end of the first attach session that carried stdin closes the write end: the
//! container sees end of file. A `tty` container's unit stdin is instead one end of a socketpair,
//! the "console socket" (runc's way): init, once it is root of the pod's user namespace, opens a
//! pty in the container's own devpts (so the terminal is `/dev/pts/0`, owned by the container's
//! root, in user-namespaced pods too; a pty of the node would show as nobody's and be invisible to
//! `tty`), makes the slave its controlling terminal (setsid + TIOCSCTTY) and stdin/stdout/stderr,
//! and sends the master back with SCM_RIGHTS before exec. The daemon reads the master: each line
//! goes to the CRI log file as stream `stdout` (as containerd does) and to attached clients; Attach
//! writes input and sets sizes (TIOCSWINSZ) on it; `stdin_once` sends VEOF (^D) when the first
//! session ends.
//!
//! No process stays per container: write ends and masters are kept in the daemon's systemd fd
//! store (`FDSTORE=1`, `FDNAME=<id>-stdin|<id>-tty`; the unit has `FileDescriptorStoreMax=`),
//! handed back on restart through `LISTEN_FDS`/`LISTEN_FDNAMES` and removed with `FDSTOREREMOVE=1`
//! with the container; stored fds no running container claims are closed at start. The output
//! pipes' read ends are kept in one queue whose two ends are stored under one name
//! (crate::output_vault).
//!
//! Trade-offs: while the daemon is down, a terminal's output waits in the kernel's pty buffer (a
//! few KiB) and the container blocks on write once it is full (as it does on its output pipes,
//! after 1 MiB); and the fd store survives a crash or kill (systemd restarts the daemon) and
//! `systemctl restart` (both checked on systemd 252), but, before systemd 254's
//! `FileDescriptorStorePreserve=yes` (set in the unit, ignored by older versions), not an explicit
//! `systemctl stop`: systemd then closes the last write end or master, so a stdin container sees
//! end of file and a tty container's terminal hangs up (SIGHUP to its session, which ends a shell).
//! A daemon killed between the start of a tty container's unit and receiving the master loses it
//! the same way. Without systemd (no `NOTIFY_SOCKET`) all of this works but does not survive a
//! restart, which the daemon logs once.

use std::collections::HashMap;
use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::Error;
use crate::exec::Pty;
use crate::output_vault::{FdStore, OutputVault};

/// The control character a terminal's line discipline turns into end of file (VEOF, ^D).
const VEOF: u8 = 0x04;
/// How much tty output an attached client may fall behind before it loses some.
const OUTPUT_BACKLOG: usize = 1024;

/// The daemon's ends of a running container's stdin or terminal.
#[derive(Debug)]
pub struct ContainerStdio {
    id: String,
    stdin_once: bool,
    /// The write end of the stdin pipe (no tty); `None` once closed.
    pipe: tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>,
    /// The pty master (tty).
    pty: Option<Arc<Pty>>,
    /// The terminal's output, for attached clients: the copier of the terminal holds the only
    /// sender, so that attached clients see the channel close when the terminal does.
    output: Option<broadcast::WeakSender<Vec<u8>>>,
    /// stdin_once: the first session with stdin has ended.
    stdin_closed: AtomicBool,
}

impl ContainerStdio {
    /// Whether the container has a terminal.
    pub fn tty(&self) -> bool {
        self.pty.is_some()
    }

    /// Whether the container still accepts input.
    pub fn stdin_open(&self) -> bool {
        !self.stdin_closed.load(Ordering::SeqCst)
    }

    /// Writes `bytes` to the container's stdin (or terminal).
    pub async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(pty) = &self.pty {
            return pty.write_all(bytes).await;
        }
        let mut pipe = self.pipe.lock().await;
        match pipe.as_mut() {
            Some(pipe) => pipe.write_all(bytes).await,
            None => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin is closed")),
        }
    }

    /// The terminal's output from now on, until every process of the container has closed the
    /// terminal (tty containers; `None` once they have).
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Vec<u8>>> {
        self.output.as_ref().and_then(broadcast::WeakSender::upgrade).map(|sender| sender.subscribe())
    }

    /// Sets the terminal's size (tty containers; the container gets SIGWINCH).
    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<()> {
        match &self.pty {
            Some(pty) => pty.resize(width, height),
            None => Ok(()),
        }
    }

    /// An attach session that carried stdin ended: with `stdin_once`, the container sees end of
    /// file (the pipe closes; a terminal gets VEOF, which ends a shell's input at a line start).
    pub async fn session_ended(&self) {
        if !self.stdin_once || self.stdin_closed.swap(true, Ordering::SeqCst) {
            return;
        }
        info!(container = %self.id, "stdin_once: closing the container's stdin");
        if let Some(pty) = &self.pty {
            if let Err(e) = pty.write_all(&[VEOF]).await {
                debug!(container = %self.id, "cannot send end of file to the terminal: {e}");
            }
            return;
        }
        self.pipe.lock().await.take();
        fdstore_remove(&fd_name(&self.id, STDIN));
    }
}

const STDIN: &str = "stdin";
const TTY: &str = "tty";
/// The output pipes' read ends, named by their stream.
const OUTPUT: [&str; 2] = ["stdout", "stderr"];

fn fd_name(id: &str, kind: &str) -> String {
    format!("{id}-{kind}")
}

/// What start_container made for a container with stdin or a tty.
#[derive(Debug)]
pub(crate) enum Prepared {
    /// The pipe's write end.
    Pipe(OwnedFd),
    /// The daemon's end of the console socket.
    Console(OwnedFd),
}

/// Makes the unit's stdin for a container: returns the daemon's end and the unit's.
pub(crate) fn prepare(tty: bool) -> Result<(Prepared, OwnedFd), Error> {
    let io = |what: &str| Error::io(what.to_string());
    if tty {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| io("cannot create the console socket")(e.into()))?;
        Ok((Prepared::Console(ours), theirs))
    } else {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io("cannot create the stdin pipe")(e.into()))?;
        Ok((Prepared::Pipe(write), read))
    }
}

/// After the unit started: the master init sent (tty), stored, and the copier of its output
/// started; or the pipe's write end, stored.
pub(crate) fn finish(
    id: &str,
    stdin_once: bool,
    prepared: Prepared,
    log_path: Option<PathBuf>,
) -> Result<Arc<ContainerStdio>, Error> {
    match prepared {
        Prepared::Pipe(write) => {
            fdstore_add(&fd_name(id, STDIN), write.as_fd());
            adopt_pipe(id, stdin_once, write)
        }
        Prepared::Console(socket) => {
            let master = receive_master(&socket)?;
            fdstore_add(&fd_name(id, TTY), master.as_fd());
            adopt_pty(id, stdin_once, master, log_path)
        }
    }
}

fn adopt_pipe(id: &str, stdin_once: bool, write: OwnedFd) -> Result<Arc<ContainerStdio>, Error> {
    let sender = tokio::net::unix::pipe::Sender::from_owned_fd(write)
        .map_err(Error::io(format!("cannot watch the stdin pipe of container {id}")))?;
    Ok(Arc::new(ContainerStdio {
        id: id.to_string(),
        stdin_once,
        pipe: tokio::sync::Mutex::new(Some(sender)),
        pty: None,
        output: None,
        stdin_closed: AtomicBool::new(false),
    }))
}

fn adopt_pty(
    id: &str,
    stdin_once: bool,
    master: OwnedFd,
    log_path: Option<PathBuf>,
) -> Result<Arc<ContainerStdio>, Error> {
    let pty = Arc::new(Pty::new(master)?);
    let (output, _) = broadcast::channel(OUTPUT_BACKLOG);
    let weak = output.downgrade();
    tokio::spawn(copy_terminal(id.to_string(), pty.clone(), output, log_path));
    Ok(Arc::new(ContainerStdio {
        id: id.to_string(),
        stdin_once,
        pipe: tokio::sync::Mutex::new(None),
        pty: Some(pty),
        output: Some(weak),
        stdin_closed: AtomicBool::new(false),
    }))
}

/// The master init sent on the console socket. init sends it before exec and READY=1, so once
/// the start job is done it is already there.
fn receive_master(socket: &OwnedFd) -> Result<OwnedFd, Error> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let message = nix::sys::socket::recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| Error::io("init sent no terminal".to_string())(e.into()))?;
    for cmsg in message.cmsgs().map_err(|e| Error::io("init sent no terminal".to_string())(e.into()))? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(Error::ContainerState("init sent no terminal on the console socket".into()))
}

/// Copies the terminal's output to the CRI log file (stream stdout, one log line per line of
/// output) and to attached clients, until every slave is closed.
async fn copy_terminal(id: String, pty: Arc<Pty>, output: broadcast::Sender<Vec<u8>>, log_path: Option<PathBuf>) {
    let mut buffer = vec![0u8; 32 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match pty.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = output.send(buffer[..n].to_vec());
        pending.extend_from_slice(&buffer[..n]);
        let text = crate::logs::terminal_lines(&mut pending, false);
        write_log(&id, log_path.as_ref(), &text);
    }
    let text = crate::logs::terminal_lines(&mut pending, true);
    write_log(&id, log_path.as_ref(), &text);
    debug!(container = %id, "terminal closed");
}

/// Appends to the log file, opened each time so that a rotated file is left alone (the kubelet
/// renames it, then asks ReopenContainerLog).
fn write_log(id: &str, path: Option<&PathBuf>, text: &[u8]) {
    let Some(path) = path else { return };
    if text.is_empty() {
        return;
    }
    use std::os::unix::fs::OpenOptionsExt;
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .and_then(|mut f| f.write_all(text));
    if let Err(e) = written {
        warn!(container = %id, "cannot write log {}: {e}", path.display());
    }
}

/// The daemon's stored descriptors, as systemd handed them back at start.
pub(crate) struct Stored {
    /// The fd store's entries, by name.
    fds: HashMap<String, OwnedFd>,
    /// The output pipes' read ends found in the stored queue, by name.
    queued: HashMap<String, OwnedFd>,
    /// Output read ends taken from the fd store's own entries (an older daemon's, or no room in
    /// the queue): removed from it once the queue that now holds them is stored.
    moved_to_queue: Vec<String>,
}

impl Stored {
    /// Takes what systemd passed (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`) and reads the
    /// stored queue of output pipes; once per process.
    pub(crate) fn take() -> Stored {
        static TAKEN: Once = Once::new();
        let mut fds = HashMap::new();
        let mut queued = HashMap::new();
        let mut queues = Vec::new();
        TAKEN.call_once(|| {
            let pid_matches =
                std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
            let count: i32 = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
            if pid_matches && count > 0 {
                let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
                let names: Vec<&str> = names.split(':').collect();
                for (index, fd) in (3..3 + count).enumerate() {
                    // SAFETY: systemd passed descriptors 3..3+LISTEN_FDS to this process, which has
                    // not used them before (taken once); each is owned from here on.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
                    let name = names.get(index).copied().unwrap_or("unknown").to_string();
                    if OutputVault::is_stored_queue(&name) {
                        queues.push((name, fd));
                    } else {
                        fds.insert(name, fd);
                    }
                }
            }
            let (vault, found) = OutputVault::recover(std::mem::take(&mut queues));
            queued = found;
            *VAULT.lock().expect("output vault lock") = Some(vault);
        });
        if !fds.is_empty() || !queued.is_empty() {
            info!(stored = fds.len(), queued = queued.len(), "got container stdio descriptors back from systemd");
        }
        Stored { fds, queued, moved_to_queue: Vec::new() }
    }

    /// The stdin or terminal of a running container, from the store.
    pub(crate) fn adopt(
        &mut self,
        id: &str,
        tty: bool,
        stdin_once: bool,
        log_path: Option<PathBuf>,
    ) -> Option<Result<Arc<ContainerStdio>, Error>> {
        if tty {
            let master = self.fds.remove(&fd_name(id, TTY))?;
            Some(adopt_pty(id, stdin_once, master, log_path))
        } else {
            let write = self.fds.remove(&fd_name(id, STDIN))?;
            Some(adopt_pipe(id, stdin_once, write))
        }
    }

    /// The read ends of a container's output pipes that were kept (one may have reached its end
    /// already). The caller keeps them again ([`store_output_pipes`]).
    pub(crate) fn take_output(&mut self, id: &str) -> [Option<OwnedFd>; 2] {
        OUTPUT.map(|stream| {
            let name = fd_name(id, stream);
            self.queued.remove(&name).or_else(|| {
                let fd = self.fds.remove(&name)?;
                self.moved_to_queue.push(name);
                Some(fd)
            })
        })
    }

    /// The end of recovery: stores the new queue of output pipes, and closes and unstores what
    /// no running container claimed.
    pub(crate) fn close_rest(self) {
        with_vault(|vault| {
            vault.commit(&SystemdFdStore);
            for name in &self.moved_to_queue {
                if !vault.in_fd_store(name) {
                    fdstore_remove(name);
                }
            }
        });
        for (name, fd) in self.fds {
            info!(name = %name, "closing a stored descriptor no running container claims");
            fdstore_remove(&name);
            drop(fd);
        }
        // Entries of the old queue: it leaves the store with the commit.
        drop(self.queued);
    }
}

/// The output pipes' read ends, kept across restarts (made at the first use in a process that
/// did not take its stored descriptors, as unit tests).
static VAULT: Mutex<Option<OutputVault>> = Mutex::new(None);

fn with_vault<R>(f: impl FnOnce(&mut OutputVault) -> R) -> R {
    let mut vault = VAULT.lock().expect("output vault lock");
    f(vault.get_or_insert_with(OutputVault::new))
}

/// systemd's fd store, through the notification socket.
struct SystemdFdStore;

impl FdStore for SystemdFdStore {
    fn add(&self, name: &str, fd: BorrowedFd<'_>) {
        fdstore_add(name, fd);
    }

    fn remove(&self, name: &str) {
        fdstore_remove(name);
    }
}

/// Forgets a removed container's stored descriptors.
pub(crate) fn forget(id: &str) {
    fdstore_remove(&fd_name(id, STDIN));
    fdstore_remove(&fd_name(id, TTY));
}

/// Keeps the read ends of a container's output pipes across restarts (before its unit starts: a
/// daemon killed during the start finds them on restart).
pub(crate) fn store_output_pipes(id: &str, read_ends: &[Option<&OwnedFd>; 2]) {
    with_vault(|vault| {
        for (fd, stream) in read_ends.iter().zip(OUTPUT) {
            if let Some(fd) = fd {
                vault.keep(&fd_name(id, stream), fd.as_fd(), &SystemdFdStore);
            }
        }
    });
}

/// Forgets the read end of a container's `stream` (`stdout`, `stderr`): it reached its end, or
/// the container is removed.
pub(crate) fn forget_output_pipe(id: &str, stream: &str) {
    with_vault(|vault| vault.forget(&fd_name(id, stream), &SystemdFdStore));
}

fn fdstore_add(name: &str, fd: BorrowedFd<'_>) {
    notify(&format!("FDSTORE=1\nFDNAME={name}\n"), Some(fd));
}

fn fdstore_remove(name: &str) {
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), None);
}

/// Sends `state` (and `fd`) to systemd's notification socket. Without one (not run by systemd)
/// stdin, terminals and output work but do not survive a restart of the daemon: said once.
fn notify(state: &str, fd: Option<BorrowedFd<'_>>) {
    static WARNED: Once = Once::new();
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        WARNED.call_once(|| {
            warn!("no NOTIFY_SOCKET: container stdin, terminals and output will not survive a restart of the daemon")
        });
        return;
    };
    if let Err(e) = notify_to(&path, state, fd) {
        warn!("cannot send {:?} to systemd: {e}", state.lines().next().unwrap_or_default());
    }
}

/// Sends `state` (and `fd`, SCM_RIGHTS) to the notification socket at `path` (`@name`: abstract).
fn notify_to(path: &std::ffi::OsStr, state: &str, fd: Option<BorrowedFd<'_>>) -> nix::Result<usize> {
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path);
    let address = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => UnixAddr::new_abstract(abstract_name),
        None => UnixAddr::new(bytes),
    };
    address.and_then(|address| {
        let socket = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let fds = fd.map(|fd| [fd.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage<'_>> =
            fds.as_ref().map(|f| vec![ControlMessage::ScmRights(f)]).unwrap_or_default();
        sendmsg(socket.as_raw_fd(), &[IoSlice::new(state.as_bytes())], &cmsgs, MsgFlags::empty(), Some(&address))
    })
}

/// The table of containers' stdio in the runtime.
pub(crate) type Table = Mutex<HashMap<String, Arc<ContainerStdio>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_store_messages_carry_the_name_and_the_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let (read, write) = nix::unistd::pipe().unwrap();
        let name = fd_name("abc", STDIN);
        notify_to(path.as_os_str(), &format!("FDSTORE=1\nFDNAME={name}\n"), Some(write.as_fd())).unwrap();
        drop(write);
        let mut buffer = [0u8; 256];
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let mut space = nix::cmsg_space!(RawFd);
        let message =
            nix::sys::socket::recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
        let fds: Vec<RawFd> = message
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            .collect();
        let length = message.bytes;
        assert_eq!(&buffer[..length], b"FDSTORE=1\nFDNAME=abc-stdin\n");
        assert_eq!(fds.len(), 1);
        // SAFETY: the descriptor the kernel installed for this test; owned here.
        let received = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // The received descriptor is the pipe's write end: what goes in comes out of the read end.
        nix::unistd::write(&received, b"x").unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(nix::unistd::read(&read, &mut byte).unwrap(), 1);
        assert_eq!(&byte, b"x");
    }
}
