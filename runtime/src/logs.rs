//! Container output: the pipes of a container's stdout and stderr, read by the daemon into the
//! kubelet's CRI log file and to attached clients.
//!
//! A container without a terminal gets two pipes, as runc gives them: their write ends are the
//! unit's stdout and stderr (`StandardOutputFileDescriptor`, `StandardErrorFileDescriptor`, fds
//! passed over D-Bus), so `/dev/stdout`, `/dev/stderr` and `/proc/self/fd/1` open again by path
//! (the upstream nginx and httpd images link their log files there; a journald stream socket
//! refused that with ENXIO). init reopens each through `/proc/self/fd` read-write, so a pipe never
//! lacks a reader and a writer is never killed by SIGPIPE. The daemon keeps the read ends across
//! its restarts (crate::output_vault: a queue in its fd store) before the unit starts, moves what
//! they hold into a spool that a kill of the daemon cannot lose (crate::log_spool; one task per
//! pipe, at most 256 KiB per turn so that a flooding container does not starve the others) and
//! writes the kubelet's format (`<RFC3339Nano> <stream> <F|P> <text>`, 16 KiB pieces, a last
//! unfinished line as P, as containerd writes it) from there to the container's log path;
//! ReopenContainerLog swaps the file; Attach subscribes to the same reader.
//!
//! **While the daemon is down** (crashed, killed, restarting) a writer fills its pipe (raised to 1
//! MiB with `F_SETPIPE_SZ`, capped by `/proc/sys/fs/pipe-max-size`) and then blocks until the
//! restarted daemon reads again: nothing written meanwhile is lost or repeated, as with
//! containerd's shim, but a container that logs a lot stalls while the daemon is away. Nor is
//! anything lost that the daemon had taken and not yet written when it was killed, an unfinished
//! line included: it is in the spool (containerd's reader loses it). A terminal's output
//! (crate::stdio) is read, not spliced, as a pty is not a pipe: a kill can lose one read of it.
//! The order of stdout lines against stderr lines is the order they were read in, as with any two
//! pipes. The inode numbers of the two pipes are noted in `output-pipes` next to the container's
//! record: if systemd dropped the stored read ends (an explicit `systemctl stop` before systemd
//! 254), the restarted daemon opens the pipes again through `/proc/<pid>/fd/<n>` of the unit's
//! processes.
//!
//! **End of a container**: its processes are gone once `record-exit` ran (`ExecStopPost` runs after
//! the unit's cgroup is empty), so when the exit record is seen the pipes are drained into the log
//! *before* the status says exited: the kubelet finds every line of a short-lived container. End of
//! file comes when systemd drops its own copy of the write ends, with the unit; the read ends are
//! then no longer kept.
//!
//! **The journal is not in the path**: `journalctl -u cri-<id>.service` shows systemd's messages
//! about the unit (and init's for tty containers; for the others a failed start's message goes to
//! the CRI log and ContainerStatus), not the container's output, so a container printing without
//! pause (`yes`) fills only its own log file, which the kubelet rotates, and cannot evict the
//! node's journal (e2e `logs.rs` measures it: ~450 MB of CRI log in 10 s from `yes`, while another
//! container's log keeps flowing within a second, ContainerStatus answers within 25 ms and a
//! `logger` line of the node stays in the journal; as with containerd, such a log grows that fast
//! between the kubelet's rotation checks). Containers started by versions that wrote output to the
//! journal keep doing so after an upgrade; their CRI log is no longer written (the daemon says so
//! at start; Attach and ReopenContainerLog refuse them with that reason) until they are recreated;
//! containers created but not started before the upgrade get pipes (checked by hand with main's
//! build at 70f5bb0).

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::Error;
use crate::log_spool::{LogWrite, Spool};

/// The kubelet splits lines longer than this into partial (P) lines.
const MAX_LINE: usize = 16 * 1024;
/// The size asked for each output pipe (capped by `/proc/sys/fs/pipe-max-size`): how much a
/// container may write while the daemon is not reading before its writes block.
const PIPE_SIZE: usize = 1024 * 1024;
/// How much one read pass takes from a pipe before it lets other containers' pipes be read.
const READ_BUDGET: usize = 256 * 1024;
/// How much one move from a pipe to its spool takes at most.
const READ_CHUNK: usize = 64 * 1024;
/// How many chunks of output an attached client may fall behind before it loses some.
const ATTACH_BACKLOG: usize = 1024;
/// The streams, in the order of the pipes.
const STREAMS: [&str; 2] = ["stdout", "stderr"];

/// A piece of a container's output, for attached clients.
#[derive(Debug, Clone)]
pub struct OutputChunk {
    pub stderr: bool,
    pub bytes: Vec<u8>,
}

/// The read ends of a container's stdout and stderr pipes (in that order).
pub(crate) type ReadEnds = [OwnedFd; 2];

/// Makes a container's output pipes: returns the read ends (the daemon's) and the write ends
/// (the unit's stdout and stderr). Both ends are close-on-exec in the daemon.
pub(crate) fn output_pipes() -> Result<(ReadEnds, [OwnedFd; 2]), Error> {
    let size = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(PIPE_SIZE)
        .min(PIPE_SIZE);
    let pipe = || -> Result<(OwnedFd, OwnedFd), Error> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io("cannot create an output pipe".to_string())(e.into()))?;
        // A smaller pipe only means a writer blocks sooner while the daemon is away.
        if let Err(e) = nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size as i32)) {
            debug!("cannot make an output pipe {size} bytes: {e}");
        }
        Ok((read, write))
    };
    let (out_read, out_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    Ok(([out_read, err_read], [out_write, err_write]))
}

/// The pipe's inode number: what finds it again among a container's descriptors.
pub(crate) fn pipe_inode(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|st| st.st_ino)
}

/// The daemon's side of a running container's output.
pub struct ContainerOutput {
    id: String,
    state: Mutex<OutputState>,
    /// The output as it is read, for attached clients.
    attached: Mutex<Attached>,
}

impl std::fmt::Debug for ContainerOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerOutput").field("id", &self.id).finish()
    }
}

/// Attach's channel: made at the first subscription (its buffer is not small), dropped at the
/// end of both pipes, which ends every subscription once it has had what came before.
#[derive(Default)]
struct Attached {
    sender: Option<broadcast::Sender<OutputChunk>>,
    ended: bool,
}

struct OutputState {
    /// stdout and stderr; `None` once at end of file.
    pipes: [Option<Arc<AsyncFd<OwnedFd>>>; 2],
    /// What was taken from the pipes and is not in the log yet.
    spool: Spool,
    log: LogFile,
    /// The spool has no room (a full run root): output is being dropped; said once.
    dropping: bool,
}

/// What one read pass found.
enum Pass {
    /// The pipe is empty for now.
    Empty,
    /// The budget is spent: more may be waiting.
    More,
    /// End of file: every writer is gone (or the pipe is closed).
    Ended,
}

impl ContainerOutput {
    /// Takes over the read ends and starts reading them, through the spool in `spool_dir`, into
    /// the log at `log_path` (if any); first, what the spool holds from an earlier daemon goes to
    /// the log. (A missing read end is a pipe that already ended.)
    pub(crate) fn start(
        id: &str,
        read_ends: [Option<OwnedFd>; 2],
        log_path: Option<PathBuf>,
        spool_dir: &Path,
    ) -> Result<Arc<ContainerOutput>, Error> {
        let (spool, under_way) = open_spool(id, spool_dir)?;
        let mut pipes = Vec::with_capacity(2);
        for fd in read_ends {
            let Some(fd) = fd else {
                pipes.push(None);
                continue;
            };
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
                .map_err(|e| Error::io(format!("cannot read the output of container {id}"))(e.into()))?;
            // SAFETY: the AsyncFd owns `fd`, an open pipe end that nothing else closes or replaces.
            let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(|e| {
                Error::Io { what: format!("cannot watch the output of container {id}"), source: e.into_parts().1 }
            })?;
            pipes.push(Some(Arc::new(fd)));
        }
        let pipes: [Option<Arc<AsyncFd<OwnedFd>>>; 2] = pipes.try_into().unwrap_or_else(|_| unreachable!("two pipes"));
        let fds = pipes.clone();
        let output = Arc::new(ContainerOutput {
            id: id.to_string(),
            state: Mutex::new(OutputState { pipes, spool, log: LogFile::new(log_path), dropping: false }),
            attached: Mutex::new(Attached { sender: None, ended: fds.iter().all(Option::is_none) }),
        });
        {
            let mut state = output.state.lock().expect("output lock");
            let OutputState { pipes, spool, log, .. } = &mut *state;
            if let Some(write) = under_way {
                output.finish_write(spool, log, write);
            }
            for (index, pipe) in pipes.iter().enumerate() {
                output.log_pending(spool, log, index, pipe.is_none(), 0);
            }
        }
        for (index, fd) in fds.into_iter().enumerate() {
            if let Some(fd) = fd {
                tokio::spawn(pump(Arc::downgrade(&output), index, fd));
            }
        }
        Ok(output)
    }

    /// The output from now on, until both pipes end; `None` if they already have.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<OutputChunk>> {
        let mut attached = self.attached.lock().expect("attach lock");
        if attached.ended {
            return None;
        }
        Some(attached.sender.get_or_insert_with(|| broadcast::channel(ATTACH_BACKLOG).0).subscribe())
    }

    /// Reads everything the pipes hold now into the log, with an unfinished last line: called
    /// once the container has ended (its processes are gone, so nothing more comes).
    pub(crate) fn drain(&self) {
        for index in 0..STREAMS.len() {
            while let Pass::More = self.read_pass(index, usize::MAX, true) {}
        }
    }

    /// ReopenContainerLog: the next line goes to a freshly opened file at `path` (the kubelet
    /// has rotated the old one away). Fails if the file cannot be opened.
    pub fn reopen(&self, path: &Path) -> std::io::Result<()> {
        let file = open_log(path)?;
        let mut state = self.state.lock().expect("output lock");
        state.log = LogFile { path: Some(path.to_path_buf()), file: Some(file), failing: false };
        Ok(())
    }

    /// Reads what pipe `index` holds, up to `budget` bytes, into the log and to attached clients.
    fn read_pass(&self, index: usize, budget: usize, flush: bool) -> Pass {
        let mut state = self.state.lock().expect("output lock");
        let OutputState { pipes, spool, log, dropping } = &mut *state;
        let Some(pipe) = pipes[index].as_ref() else { return Pass::Ended };
        let stream = STREAMS[index];
        let mut taken = 0;
        let pass = loop {
            if taken >= budget {
                break Pass::More;
            }
            match spool.take(index, pipe.get_ref().as_fd(), READ_CHUNK) {
                Ok(0) => break Pass::Ended,
                Ok(n) => {
                    taken += n;
                    if std::mem::take(dropping) {
                        info!(container = %self.id, "spooling the container's output again");
                    }
                    self.log_pending(spool, log, index, false, n);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break Pass::Empty,
                // No room for the spool: the output is dropped, as when the log cannot be
                // written, rather than left in the pipe, where it would stop the container's
                // writes once the pipe is full.
                Err(e @ (Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG)) => {
                    if !std::mem::replace(dropping, true) {
                        warn!(container = %self.id, "cannot spool the container's {stream}: {e} (output is dropped until it can)");
                    }
                    let mut dropped = [0u8; 16 * 1024];
                    match nix::unistd::read(pipe.get_ref().as_fd(), &mut dropped) {
                        Ok(0) => break Pass::Ended,
                        Ok(n) => taken += n,
                        Err(Errno::EINTR) => continue,
                        Err(Errno::EAGAIN) => break Pass::Empty,
                        Err(e) => {
                            warn!(container = %self.id, "cannot read the container's {stream}: {e}");
                            break Pass::Ended;
                        }
                    }
                }
                Err(e) => {
                    warn!(container = %self.id, "cannot read the container's {stream}: {e}");
                    break Pass::Ended;
                }
            }
        };
        // An unfinished last line, as containerd writes it: a partial (P) line.
        if matches!(pass, Pass::Ended) || (flush && matches!(pass, Pass::Empty)) {
            self.log_pending(spool, log, index, true, 0);
        }
        if matches!(pass, Pass::Ended) {
            pipes[index] = None;
            crate::stdio::forget_output_pipe(&self.id, stream);
            debug!(container = %self.id, "end of the container's {stream}");
            if pipes.iter().all(Option::is_none) {
                let mut attached = self.attached.lock().expect("attach lock");
                attached.ended = true;
                attached.sender = None;
                drop(attached);
                // Everything is in the log.
                if let Err(e) = std::fs::remove_dir_all(spool.dir()) {
                    warn!(container = %self.id, "cannot remove {}: {e}", spool.dir().display());
                }
            }
        }
        pass
    }

    /// Writes the complete lines spooled for stream `index` to the log (with `flush`, the
    /// unfinished rest too, as a partial line); the last `fresh` of those bytes are new output,
    /// sent to attached clients.
    fn log_pending(&self, spool: &mut Spool, log: &mut LogFile, index: usize, flush: bool, fresh: usize) {
        let bytes = match spool.pending(index) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(container = %self.id, "cannot read the spooled {}: {e}", STREAMS[index]);
                return;
            }
        };
        if fresh > 0 {
            self.send(index, &bytes[bytes.len().saturating_sub(fresh)..]);
        }
        let timestamp = now_nanos();
        let (text, used) = lines_of(&bytes, STREAMS[index], flush.then_some("P"), timestamp);
        if used == 0 {
            return;
        }
        // Inode 0: no log to write (none asked for, or it cannot be opened).
        let (log_inode, log_before) = log.end(&self.id).unwrap_or((0, 0));
        let log_after = if log_inode == 0 { 0 } else { log_before + text.len() as u64 };
        let write = LogWrite { stream: index, len: used as u64, flush, timestamp, log_inode, log_before, log_after };
        if let Err(e) = spool.begin(&write) {
            warn!(container = %self.id, "cannot write {}/state: {e}", spool.dir().display());
        }
        log.write(&self.id, &text);
        spool.written(index, used as u64);
    }

    /// A write to the log that a killed daemon left under way: done, finished, or (not begun)
    /// left for the spooled bytes to be written again.
    fn finish_write(&self, spool: &mut Spool, log: &mut LogFile, write: LogWrite) {
        if write.log_inode == 0 {
            // Output dropped: there was no log to write.
            spool.written(write.stream, write.len);
            return;
        }
        let Some((inode, size)) = log.end(&self.id) else { return };
        if inode != write.log_inode || size <= write.log_before {
            return;
        }
        if size < write.log_after {
            let bytes = match spool.pending(write.stream) {
                Ok(bytes) => bytes,
                Err(e) => {
                    warn!(container = %self.id, "cannot read the spooled {}: {e}", STREAMS[write.stream]);
                    return;
                }
            };
            let bytes = &bytes[..(write.len as usize).min(bytes.len())];
            let (text, _) = lines_of(bytes, STREAMS[write.stream], write.flush.then_some("P"), write.timestamp);
            let cut = (size - write.log_before) as usize;
            if text.len() as u64 == write.log_after - write.log_before {
                log.write(&self.id, &text[cut..]);
                info!(container = %self.id, "finished a write to the log that a killed daemon had begun");
            }
        }
        spool.written(write.stream, write.len);
    }

    fn send(&self, index: usize, bytes: &[u8]) {
        if let Some(sender) = self.attached.lock().expect("attach lock").sender.as_ref()
            && sender.receiver_count() > 0
        {
            let _ = sender.send(OutputChunk { stderr: index == 1, bytes: bytes.to_vec() });
        }
    }
}

/// Reads pipe `index` of `output` whenever it has something, until its end (or the output is
/// forgotten with its container).
async fn pump(output: std::sync::Weak<ContainerOutput>, index: usize, fd: Arc<AsyncFd<OwnedFd>>) {
    loop {
        let mut ready = match fd.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                warn!("cannot wait for container output: {e}");
                return;
            }
        };
        let Some(output) = output.upgrade() else { return };
        match output.read_pass(index, READ_BUDGET, false) {
            Pass::Empty => ready.clear_ready(),
            Pass::More => {
                drop(ready);
                drop(output);
                tokio::task::yield_now().await;
            }
            Pass::Ended => return,
        }
    }
}

/// The container's log file, opened at the first line.
struct LogFile {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    /// A write failed: said once until one succeeds again.
    failing: bool,
}

impl LogFile {
    fn new(path: Option<PathBuf>) -> LogFile {
        LogFile { path, file: None, failing: false }
    }

    /// The log file's inode number and size (it is opened if it is not), `None` without a log or
    /// if it cannot be opened.
    fn end(&mut self, id: &str) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path.as_ref()?;
        if self.file.is_none() {
            match open_log(path) {
                Ok(file) => self.file = Some(file),
                Err(e) => {
                    self.fail(id, &e);
                    return None;
                }
            }
        }
        let meta = self.file.as_ref()?.metadata().ok()?;
        Some((meta.ino(), meta.size()))
    }

    fn write(&mut self, id: &str, text: &[u8]) {
        let Some(path) = &self.path else { return };
        if text.is_empty() {
            return;
        }
        let written = match &mut self.file {
            Some(file) => file.write_all(text),
            None => open_log(path).and_then(|mut file| {
                let written = file.write_all(text);
                self.file = Some(file);
                written
            }),
        };
        match written {
            Ok(()) if self.failing => {
                info!(container = id, "writing log {} again", path.display());
                self.failing = false;
            }
            Ok(()) => {}
            Err(e) => self.fail(id, &e),
        }
    }

    fn fail(&mut self, id: &str, e: &std::io::Error) {
        if !self.failing {
            let path = self.path.as_deref().unwrap_or(Path::new(""));
            warn!(container = id, "cannot write log {}: {e} (output is dropped until it can)", path.display());
            self.failing = true;
        }
    }
}

/// Opens the spool in `dir`; one whose state does not parse is set aside (renamed
/// `<dir>.unreadable-<nanos>`) for a fresh one.
fn open_spool(id: &str, dir: &Path) -> Result<(Spool, Option<LogWrite>), Error> {
    match Spool::open(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            let aside = dir.with_file_name(format!(
                "{}.unreadable-{}",
                dir.file_name().unwrap_or_default().to_string_lossy(),
                now_nanos()
            ));
            warn!(container = id, "{e}: its spool is set aside as {}", aside.display());
            std::fs::rename(dir, &aside).map_err(Error::io(format!("cannot set {} aside", dir.display())))?;
            Spool::open(dir)
        }
        opened => opened,
    }
    .map_err(Error::io(format!("cannot open the output spool of container {id}")))
}

fn now_nanos() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// The running containers' outputs, by container id.
pub(crate) type Table = Mutex<HashMap<String, Arc<ContainerOutput>>>;

/// Finds the pipe with inode `inode` among the descriptors of processes `pids` and opens a read
/// end of it through `/proc/<pid>/fd/<n>`: how a restarted daemon gets a container's output back
/// when systemd's fd store lost it (`systemctl stop` of the daemon before systemd 254).
pub(crate) fn reopen_pipe(pids: &[u32], inode: u64) -> Option<OwnedFd> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(meta) = std::fs::metadata(fd.path()) else { continue };
            if !meta.file_type().is_fifo() || meta.ino() != inode {
                continue;
            }
            let flags = nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC;
            match nix::fcntl::open(&fd.path(), flags, nix::sys::stat::Mode::empty()) {
                Ok(opened) if pipe_inode(&opened) == Some(inode) => return Some(opened),
                Ok(_) => continue,
                Err(e) => debug!("cannot open {}: {e}", fd.path().display()),
            }
        }
    }
    None
}

/// One line of output as CRI log lines: pieces of at most 16 KiB, all but the last tagged P, and
/// the last tagged F if the line is complete.
fn format_lines(timestamp: &str, stream: &str, message: &[u8], complete: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let chunks: Vec<&[u8]> = if message.is_empty() { vec![&[][..]] } else { message.chunks(MAX_LINE).collect() };
    let last = chunks.len() - 1;
    for (index, chunk) in chunks.into_iter().enumerate() {
        let tag = if index == last && complete { "F" } else { "P" };
        out.extend_from_slice(format!("{timestamp} {stream} {tag} ").as_bytes());
        out.extend_from_slice(chunk);
        out.push(b'\n');
    }
    out
}

/// A terminal's output as CRI log lines (stream `stdout`, as containerd writes tty output); with
/// `flush`, the unfinished rest too, as a full line.
pub(crate) fn terminal_lines(pending: &mut Vec<u8>, flush: bool) -> Vec<u8> {
    take_lines(pending, "stdout", flush.then_some("F"))
}

/// Output of `stream` as CRI log lines: each complete line taken from `pending` (its `\r\n` or
/// `\n` dropped, as containerd's reader does), an unfinished line of 16 KiB or more in partial
/// pieces; with `rest_tag`, what is left too, tagged so.
fn take_lines(pending: &mut Vec<u8>, stream: &str, rest_tag: Option<&str>) -> Vec<u8> {
    let (out, used) = lines_of(pending, stream, rest_tag, now_nanos());
    pending.drain(..used);
    out
}

/// [`take_lines`] of `bytes`, with lines stamped `timestamp` (nanoseconds since the epoch): the
/// log lines and how many of the bytes they hold.
fn lines_of(bytes: &[u8], stream: &str, rest_tag: Option<&str>, timestamp: i64) -> (Vec<u8>, usize) {
    let timestamp = rfc3339_nanos(timestamp);
    let mut out = Vec::new();
    let mut start = 0;
    while let Some(end) = bytes[start..].iter().position(|&b| b == b'\n') {
        let line = &bytes[start..start + end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.extend(format_lines(&timestamp, stream, line, true));
        start += end + 1;
    }
    let rest = &bytes[start..];
    if rest.len() >= MAX_LINE {
        let cut = rest.len() - rest.len() % MAX_LINE;
        out.extend(format_lines(&timestamp, stream, &rest[..cut], false));
        start += cut;
    }
    if let Some(tag) = rest_tag
        && start < bytes.len()
    {
        out.extend(format_lines(&timestamp, stream, &bytes[start..], tag == "F"));
        start = bytes.len();
    }
    (out, start)
}

/// `2016-10-06T00:17:09.669794202Z` for nanoseconds since the epoch.
pub fn rfc3339_nanos(nanos: i64) -> String {
    let seconds = nanos.div_euclid(1_000_000_000);
    let fraction = nanos.rem_euclid(1_000_000_000);
    let days = seconds.div_euclid(86_400);
    let time = seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction:09}Z", time / 3600, time % 3600 / 60, time % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_nano() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339_nanos(1_475_713_029_669_794_202), "2016-10-06T00:17:09.669794202Z");
        assert_eq!(rfc3339_nanos(951_782_400_000_000_001), "2000-02-29T00:00:00.000000001Z");
    }

    #[test]
    fn terminal_output_becomes_lines() {
        let mut pending = b"hi\r\nthere\npart".to_vec();
        let text = String::from_utf8(terminal_lines(&mut pending, false)).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(lines, ["stdout F hi", "stdout F there"]);
        assert_eq!(pending, b"part");
        let text = String::from_utf8(terminal_lines(&mut pending, true)).unwrap();
        assert!(text.ends_with(" stdout F part\n"), "{text}");
        assert!(pending.is_empty());
        let mut long = vec![b'x'; MAX_LINE + 5];
        let text = String::from_utf8(terminal_lines(&mut long, false)).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains(" stdout P "));
        assert_eq!(long.len(), 5);
    }

    #[test]
    fn pipe_output_ends_with_a_partial_line() {
        let mut pending = b"one\r\ntwo\nunfinished".to_vec();
        let text = String::from_utf8(take_lines(&mut pending, "stderr", None)).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(lines, ["stderr F one", "stderr F two"]);
        let text = String::from_utf8(take_lines(&mut pending, "stderr", Some("P"))).unwrap();
        assert!(text.ends_with(" stderr P unfinished\n"), "{text}");
        assert!(pending.is_empty());
    }

    #[test]
    fn a_pipe_is_found_again_through_proc() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let inode = pipe_inode(&read).unwrap();
        drop(read);
        // The only end left is the write end this process holds, as a container's process would.
        let found = reopen_pipe(&[std::process::id()], inode).expect("the pipe, through /proc/<pid>/fd");
        assert_eq!(pipe_inode(&found), Some(inode));
        nix::unistd::write(&write, b"x").unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(nix::unistd::read(&found, &mut byte).unwrap(), 1);
        assert!(reopen_pipe(&[std::process::id()], inode + 1_000_000).is_none());
    }

    #[tokio::test]
    async fn output_is_read_into_the_log_and_to_subscribers_until_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c/0.log");
        let (read_ends, [stdout, stderr]) = output_pipes().unwrap();
        let output =
            ContainerOutput::start("test", read_ends.map(Some), Some(log.clone()), &dir.path().join("spool")).unwrap();
        let mut attached = output.subscribe().unwrap();
        nix::unistd::write(&stdout, b"hello\nwor").unwrap();
        nix::unistd::write(&stderr, b"oops\n").unwrap();
        nix::unistd::write(&stdout, b"ld\nlast").unwrap();
        drop((stdout, stderr));
        let mut got = Vec::new();
        while let Ok(chunk) = attached.recv().await {
            got.push((chunk.stderr, chunk.bytes));
        }
        let stdout_bytes: Vec<u8> = got.iter().filter(|(e, _)| !e).flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(stdout_bytes, b"hello\nworld\nlast");
        let text = std::fs::read_to_string(&log).unwrap();
        let mut lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        lines.sort();
        assert_eq!(lines, ["stderr F oops", "stdout F hello", "stdout F world", "stdout P last"]);
        assert!(output.subscribe().is_none(), "ended");
    }

    /// The log's lines without their timestamps.
    fn log_texts(log: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines().map(|l| l.split_once(' ').unwrap().1.to_string()).collect()
    }

    #[tokio::test]
    async fn what_a_killed_reader_had_taken_and_an_unfinished_line_reach_the_log_once() {
        let dir = tempfile::tempdir().unwrap();
        let (log, spool_dir) = (dir.path().join("0.log"), dir.path().join("spool"));
        let (read_ends, [stdout, stderr]) = output_pipes().unwrap();
        nix::unistd::write(&stdout, b"one\ntw").unwrap();
        let first = ContainerOutput::start(
            "test",
            [0, 1].map(|i| read_ends[i].try_clone().ok()),
            Some(log.clone()),
            &spool_dir,
        )
        .unwrap();
        assert!(matches!(first.read_pass(0, usize::MAX, false), Pass::Empty));
        assert_eq!(log_texts(&log), ["stdout F one"]);
        // Killed between a take and its write: the bytes are in the spool only.
        nix::unistd::write(&stdout, b"o\nthree\n").unwrap();
        first.state.lock().unwrap().spool.take(0, read_ends[0].as_fd(), 1024).unwrap();
        std::mem::forget(first);
        drop((stdout, stderr));
        let second = ContainerOutput::start("test", read_ends.map(Some), Some(log.clone()), &spool_dir).unwrap();
        second.drain();
        assert_eq!(log_texts(&log), ["stdout F one", "stdout F two", "stdout F three"]);
        assert!(!spool_dir.exists(), "removed once both pipes ended");
    }

    /// A spool whose state says a write of `a\nb\n` to `log` was under way, with `logged` bytes of
    /// it in the log; returns the whole write.
    fn write_under_way(spool_dir: &Path, log: &Path, logged: usize) -> Vec<u8> {
        use std::os::unix::fs::MetadataExt;
        let (read, write) = nix::unistd::pipe().unwrap();
        let (mut spool, _) = Spool::open(spool_dir).unwrap();
        nix::unistd::write(&write, b"a\nb\n").unwrap();
        spool.take(0, read.as_fd(), 1024).unwrap();
        let timestamp = 1_700_000_000_123_456_789;
        let (text, used) = lines_of(b"a\nb\n", "stdout", None, timestamp);
        std::fs::write(log, &text[..logged]).unwrap();
        let log_inode = std::fs::metadata(log).unwrap().ino();
        let log_after = text.len() as u64;
        let write =
            LogWrite { stream: 0, len: used as u64, flush: false, timestamp, log_inode, log_before: 0, log_after };
        spool.begin(&write).unwrap();
        text
    }

    #[tokio::test]
    async fn a_write_to_the_log_under_way_at_a_kill_is_done_once() {
        let dir = tempfile::tempdir().unwrap();
        let (log, spool_dir) = (dir.path().join("0.log"), dir.path().join("spool"));
        // The lines' length does not depend on their time.
        let length = lines_of(b"a\nb\n", "stdout", None, 0).0.len();
        for logged in [0, 10, length] {
            let whole = write_under_way(&spool_dir, &log, logged);
            ContainerOutput::start("test", [None, None], Some(log.clone()), &spool_dir).unwrap();
            assert_eq!(log_texts(&log), ["stdout F a", "stdout F b"], "{logged} bytes were written");
            if logged > 0 {
                assert_eq!(std::fs::read(&log).unwrap(), whole, "the same lines, finished");
            }
            std::fs::remove_dir_all(&spool_dir).unwrap();
        }
    }

    /// A spool without room (a full run root; here a 64 KiB tmpfs, mounted in a mount namespace
    /// of a thread of the test's): what does not fit is dropped and the pipe read on, so that a
    /// writer never blocks on a full pipe; what fitted reaches the log.
    #[tokio::test]
    async fn output_that_finds_no_room_in_the_spool_is_dropped_and_reading_goes_on() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (log, spool_dir) = (dir.path().join("0.log"), dir.path().join("run"));
        std::fs::create_dir(&spool_dir).unwrap();
        let (read_ends, [stdout, stderr]) = output_pipes().unwrap();
        let read_end = read_ends[0].try_clone().unwrap();
        let (runtime, log_path) = (tokio::runtime::Handle::current(), log.clone());
        // The spool's files are opened on the tmpfs and stay usable from any thread.
        let output = std::thread::spawn(move || {
            use nix::mount::{MsFlags, mount};
            let _entered = runtime.enter();
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS | nix::sched::CloneFlags::CLONE_FS).unwrap();
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).unwrap();
            mount(Some("tmpfs"), &spool_dir, Some("tmpfs"), MsFlags::empty(), Some("size=64k")).unwrap();
            ContainerOutput::start("test", read_ends.map(Some), Some(log_path), &spool_dir.join("c")).unwrap()
        })
        .join()
        .unwrap();
        let line = [vec![b'x'; 999], vec![b'\n']].concat();
        for _ in 0..100 {
            nix::unistd::write(&stdout, &line).unwrap();
        }
        assert!(matches!(output.read_pass(0, usize::MAX, false), Pass::Empty), "read on");
        let mut byte = [0u8; 1];
        assert_eq!(nix::unistd::read(&read_end, &mut byte), Err(Errno::EAGAIN), "the pipe is empty");
        let logged = log_texts(&log);
        assert!((40..100).contains(&logged.len()), "{} lines logged", logged.len());
        assert!(logged.iter().all(|l| l.len() == "stdout F ".len() + 999));
        drop((stdout, stderr));
        output.drain();
        assert!(output.subscribe().is_none(), "ended");
    }

    #[test]
    fn a_spool_whose_state_does_not_parse_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        std::fs::create_dir(&spool_dir).unwrap();
        std::fs::write(spool_dir.join("state"), [7u8; 96]).unwrap();
        std::fs::write(spool_dir.join("stdout"), b"kept\n").unwrap();
        let (spool, under_way) = open_spool("test", &spool_dir).unwrap();
        assert!(under_way.is_none());
        assert!(spool.pending(0).unwrap().is_empty());
        let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        let aside = aside.iter().find(|n| n.to_string_lossy().starts_with("spool.unreadable-")).expect("set aside");
        assert_eq!(std::fs::read(dir.path().join(aside).join("stdout")).unwrap(), b"kept\n");
    }

    #[test]
    fn long_lines_become_partial_pieces() {
        let ts = "T";
        assert_eq!(format_lines(ts, "stdout", b"hello", true), b"T stdout F hello\n");
        assert_eq!(format_lines(ts, "stderr", b"", true), b"T stderr F \n");
        assert_eq!(format_lines(ts, "stdout", b"cut", false), b"T stdout P cut\n");
        let long = vec![b'x'; MAX_LINE + 3];
        let out = format_lines(ts, "stdout", &long, true);
        let lines: Vec<&[u8]> = out.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(b"T stdout P ") && lines[0].len() == 11 + MAX_LINE);
        assert_eq!(lines[1], b"T stdout F xxx");
    }
}
