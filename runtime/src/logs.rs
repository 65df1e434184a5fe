//! Container logs in the kubelet's CRI format, through the journal.
//!
//! A container's stdout and stderr are two journald stream connections, opened by
//! `cri-systemd init` with identifier [`STDIO_IDENTIFIER`] and priority 6 (stdout) or 3 (stderr).
//! journald is always running and never waits for cri-systemd, so a container's output is
//! neither lost nor blocked while the daemon is down or restarting. The daemon follows the
//! journal (one `journalctl --follow` for all containers, matched on the identifier), writes each
//! entry to its container's CRI log file as `<RFC3339Nano> <stdout|stderr> <F|P> <text>`, and
//! saves the journal cursor so that a restarted daemon resumes where it stopped.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncBufReadExt;
use tracing::{debug, warn};

/// The SYSLOG_IDENTIFIER of every container stdio stream.
pub const STDIO_IDENTIFIER: &str = "cri-stdio";
/// journald's stream socket.
const JOURNAL_STDOUT_SOCKET: &str = "/run/systemd/journal/stdout";
/// The kubelet splits lines longer than this into partial (P) lines.
const MAX_LINE: usize = 16 * 1024;
const STDOUT_PRIORITY: u8 = 6;
const STDERR_PRIORITY: u8 = 3;

/// Opens a journald stream for a container's stdout (`stderr == false`) or stderr, as
/// sd_journal_stream_fd() does. Called by init before it enters the container's root.
pub fn journal_stream(stderr: bool) -> std::io::Result<OwnedFd> {
    let stream = UnixStream::connect(JOURNAL_STDOUT_SOCKET)?;
    stream.shutdown(std::net::Shutdown::Read)?;
    let priority = if stderr { STDERR_PRIORITY } else { STDOUT_PRIORITY };
    // identifier, unit id (journald finds the unit from our cgroup), priority, level prefix,
    // forward to syslog, kmsg, console.
    let header = format!("{STDIO_IDENTIFIER}\n\n{priority}\n0\n0\n0\n0\n");
    (&stream).write_all(header.as_bytes())?;
    Ok(OwnedFd::from(stream))
}

/// Where a container's log goes; the follower asks this for each container it sees.
pub type LogPathOf = Arc<dyn Fn(&str) -> Option<PathBuf> + Send + Sync>;

/// The daemon's side: follows the journal and writes CRI log files.
pub struct LogWriter {
    cursor_file: PathBuf,
    path_of: LogPathOf,
    open: Mutex<HashMap<String, (PathBuf, std::fs::File)>>,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter").field("cursor_file", &self.cursor_file).finish()
    }
}

impl LogWriter {
    pub fn new(cursor_file: PathBuf, path_of: LogPathOf) -> Arc<LogWriter> {
        Arc::new(LogWriter { cursor_file, path_of, open: Mutex::new(HashMap::new()) })
    }

    /// Follows the journal until the daemon stops; restarts journalctl if it dies.
    pub fn spawn(self: &Arc<Self>) {
        let writer = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = writer.follow().await {
                    warn!("following the journal for container logs: {e}");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    async fn follow(&self) -> std::io::Result<()> {
        let mut command = tokio::process::Command::new("journalctl");
        command.args(["--follow", "--output=json", "--all", "--no-pager", "--lines=all"]);
        if let Ok(cursor) = std::fs::read_to_string(&self.cursor_file) {
            command.arg(format!("--after-cursor={}", cursor.trim()));
        }
        command.arg(format!("SYSLOG_IDENTIFIER={STDIO_IDENTIFIER}"));
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).kill_on_drop(true);
        // The unit's KillMode=process spares the daemon's children when it is killed: journalctl
        // must die with the daemon, or every restart would leave one behind.
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut last_saved = std::time::Instant::now();
        let mut pending_cursor: Option<String> = None;
        loop {
            // Save the cursor when the journal goes quiet or every second under load: a crash
            // then repeats at most a second of lines, and never loses one.
            let next = tokio::time::timeout(std::time::Duration::from_millis(200), lines.next_line()).await;
            let line = match next {
                Ok(line) => line?,
                Err(_) => {
                    if let Some(cursor) = pending_cursor.take() {
                        self.save_cursor(&cursor);
                    }
                    continue;
                }
            };
            let Some(line) = line else { break };
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if let Some(cursor) = entry.get("__CURSOR").and_then(|c| c.as_str()) {
                pending_cursor = Some(cursor.to_string());
            }
            self.write_entry(&entry);
            if last_saved.elapsed() > std::time::Duration::from_secs(1) {
                if let Some(cursor) = pending_cursor.take() {
                    self.save_cursor(&cursor);
                }
                last_saved = std::time::Instant::now();
            }
        }
        let _ = child.wait().await;
        Ok(())
    }

    fn save_cursor(&self, cursor: &str) {
        let temp = self.cursor_file.with_extension("tmp");
        if let Err(e) = std::fs::write(&temp, cursor).and_then(|()| std::fs::rename(&temp, &self.cursor_file)) {
            warn!("cannot save the journal cursor: {e}");
        }
    }

    fn write_entry(&self, entry: &serde_json::Value) {
        let field = |name: &str| entry.get(name).and_then(|v| v.as_str());
        let Some(unit) = field("_SYSTEMD_UNIT") else { return };
        let Some(id) = unit.strip_prefix("cri-").and_then(|u| u.strip_suffix(".service")) else { return };
        let stream = if field("PRIORITY") == Some("3") { "stderr" } else { "stdout" };
        let message: Vec<u8> = match entry.get("MESSAGE") {
            Some(serde_json::Value::String(text)) => text.as_bytes().to_vec(),
            // journald gives non-UTF-8 messages as arrays of bytes.
            Some(serde_json::Value::Array(bytes)) => bytes.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect(),
            _ => Vec::new(),
        };
        // journald marks a line it had to cut (over its LineMax, or at EOF without a newline).
        let complete = field("_LINE_BREAK").is_none_or(|reason| reason == "eof" || reason == "pid-change");
        let micros: i64 = field("__REALTIME_TIMESTAMP").and_then(|t| t.parse().ok()).unwrap_or(0);
        let text = format_lines(&rfc3339_nanos(micros * 1000), stream, &message, complete);
        let mut open = self.open.lock().expect("log files lock");
        if !open.contains_key(id) {
            let Some(path) = (self.path_of)(id) else { return };
            match open_log(&path) {
                Ok(file) => {
                    open.insert(id.to_string(), (path, file));
                }
                Err(e) => {
                    debug!(container = id, "cannot open log {}: {e}", path.display());
                    return;
                }
            }
        }
        if let Some((path, file)) = open.get_mut(id)
            && let Err(e) = file.write_all(&text)
        {
            warn!(container = id, "cannot write log {}: {e}", path.display());
        }
    }

    /// ReopenContainerLog: the next line goes to a freshly opened file at the log path (the
    /// kubelet has rotated the old one away). Fails if the file cannot be opened.
    pub fn reopen(&self, container_id: &str, path: &Path) -> std::io::Result<()> {
        let file = open_log(path)?;
        self.open.lock().expect("log files lock").insert(container_id.to_string(), (path.to_path_buf(), file));
        Ok(())
    }

    /// Forgets a removed container's open log file.
    pub fn forget(&self, container_id: &str) {
        self.open.lock().expect("log files lock").remove(container_id);
    }
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// One journal entry as CRI log lines: pieces of at most 16 KiB, all but the last tagged P, and
/// the last tagged F unless journald itself cut the line.
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

/// A terminal's output as CRI log lines (stream `stdout`, as containerd writes tty output): each
/// complete line taken from `pending` (its `\r\n` or `\n` dropped), a line longer than 16 KiB in
/// partial pieces; with `flush`, the rest too.
pub(crate) fn terminal_lines(pending: &mut Vec<u8>, flush: bool) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64);
    let timestamp = rfc3339_nanos(now.unwrap_or(0));
    let mut out = Vec::new();
    while let Some(end) = pending.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = pending.drain(..=end).collect();
        let line = &line[..line.len() - 1];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.extend(format_lines(&timestamp, "stdout", line, true));
    }
    if pending.len() >= MAX_LINE {
        let cut = pending.len() - pending.len() % MAX_LINE;
        let piece: Vec<u8> = pending.drain(..cut).collect();
        out.extend(format_lines(&timestamp, "stdout", &piece, false));
    }
    if flush && !pending.is_empty() {
        out.extend(format_lines(&timestamp, "stdout", pending, true));
        pending.clear();
    }
    out
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
