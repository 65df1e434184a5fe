//! What the daemon has taken from a container's output pipes and not yet written to its log, kept
//! where a kill of the daemon cannot lose it.
//!
//! A pipe gives each byte once: a reader killed after a `read` and before its write to the log
//! loses what it read, and with it the unfinished line it was holding for the next read
//! (containerd's CRI plugin reads its FIFOs through a `bufio.Reader` in the daemon,
//! `internal/cri/io/logger.go`: a kill loses what that holds). So the daemon never reads a pipe
//! into its memory: `splice(2)` moves the bytes into a spool file (`<run_root>/output/<id>/stdout`,
//! `stderr`), one call that takes from the pipe exactly what it wrote to the file, and the log is
//! written from the spool. The file `state` says how far each spool is in the log and, while a
//! write to the log is under way, which spool bytes it covers, the log's inode and sizes before
//! and after, and the lines' timestamp. A restarted daemon finds such a write done (the log reached the size after),
//! cut (the rest of the same lines is written) or not begun (the bytes are written again, with a
//! new timestamp): a kill at any point loses and repeats nothing. (Only a write to a log the kubelet
//! rotated away just then cannot be checked; it is written again, to the new log.)
//!
//! Nothing here needs to outlive the node: the pipes die with it. The files are in the page cache
//! (the run root is a tmpfs on most nodes) and are never synced; the state is one small write at
//! offset 0, which a killed process cannot tear. Spool bytes already in the log are freed with
//! `FALLOC_FL_PUNCH_HOLE`: the offsets only grow, the space does not. A spool without room (a full
//! run root) has its reader drop what does not fit, as a log that cannot be written does, rather
//! than leave it in the pipe, where it would stop the container's writes (crate::logs).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, SpliceFFlags};

/// The spool files, in the order of the streams.
const FILES: [&str; 2] = ["stdout", "stderr"];
const STATE: &str = "state";
/// How much of a spool may be in the log before its space is given back.
const PUNCH_EVERY: u64 = 256 * 1024;
/// The state record's layout version (its first field).
const VERSION: u64 = 1;
const STATE_LEN: usize = 12 * 8;

/// A write to the log that a spool records before it begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogWrite {
    pub stream: usize,
    /// The spool bytes it writes: from the stream's `done` offset, this many.
    pub len: u64,
    /// Whether an unfinished last line is written too (the stream's end, or a drain).
    pub flush: bool,
    /// The lines' timestamp, nanoseconds since the epoch.
    pub timestamp: i64,
    /// The log file: its inode number and its size before and after the write.
    pub log_inode: u64,
    pub log_before: u64,
    pub log_after: u64,
}

/// A container's spool: one file per stream and the state.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    files: [File; 2],
    state: File,
    /// Per stream: the offset up to which the spool is in the log, and the spool's end.
    done: [u64; 2],
    end: [u64; 2],
    /// Per stream: the offset up to which the space is given back.
    punched: [u64; 2],
}

impl Spool {
    /// Opens the spool in `dir`, made if missing. Also returns the write to the log that a killed
    /// daemon left under way, if any: the caller checks it against the log and calls
    /// [`Spool::written`] if it was done (or finishes it first).
    pub(crate) fn open(dir: &Path) -> io::Result<(Spool, Option<LogWrite>)> {
        crate::store::create_private_dir_all(dir)?;
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(dir.join(name))
        };
        let files = [open(FILES[0])?, open(FILES[1])?];
        let state = open(STATE)?;
        let end = [files[0].metadata()?.len(), files[1].metadata()?.len()];
        let mut record = [0u8; STATE_LEN];
        let (done, under_way) = match state.read_at(&mut record, 0)? {
            0 => ([0, 0], None),
            n if n == STATE_LEN => decode(&record).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{} does not parse", dir.join(STATE).display()))
            })?,
            n => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is {n} bytes, not {STATE_LEN}", dir.join(STATE).display()),
                ));
            }
        };
        // A spool shorter than its recorded offset cannot be: a state of another spool.
        if done[0] > end[0] || done[1] > end[1] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is past the end of its spool", dir.join(STATE).display()),
            ));
        }
        let punched = done.map(|d| d - d % PUNCH_EVERY);
        let under_way = under_way.filter(|w| done[w.stream] + w.len <= end[w.stream]);
        Ok((Spool { dir: dir.to_path_buf(), files, state, done, end, punched }, under_way))
    }

    /// Moves what `pipe` holds, up to `max` bytes, to the end of spool `stream`: the count moved,
    /// 0 at the pipe's end (no writer left), EAGAIN if it is empty.
    pub(crate) fn take(&mut self, stream: usize, pipe: BorrowedFd<'_>, max: usize) -> nix::Result<usize> {
        let mut offset = self.end[stream] as libc::loff_t;
        let moved = nix::fcntl::splice(
            pipe,
            None,
            self.files[stream].as_fd(),
            Some(&mut offset),
            max,
            SpliceFFlags::SPLICE_F_NONBLOCK,
        )?;
        self.end[stream] += moved as u64;
        Ok(moved)
    }

    /// The bytes of spool `stream` not yet in the log.
    pub(crate) fn pending(&self, stream: usize) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; (self.end[stream] - self.done[stream]) as usize];
        self.files[stream].read_exact_at(&mut bytes, self.done[stream])?;
        Ok(bytes)
    }

    /// Records `write` as under way: called before the write to the log begins. Then the space
    /// of what the state now says is in the log is given back.
    pub(crate) fn begin(&mut self, write: &LogWrite) -> io::Result<()> {
        self.state.write_all_at(&encode(self.done, Some(write)), 0)?;
        for stream in 0..FILES.len() {
            self.punch(stream);
        }
        Ok(())
    }

    /// The first `len` pending bytes of `stream` are in the log (or were dropped with a log that
    /// could not be written). The state says so at the next [`Spool::begin`]; until then a
    /// restarted daemon checks the write against the log.
    pub(crate) fn written(&mut self, stream: usize, len: u64) {
        self.done[stream] = (self.done[stream] + len).min(self.end[stream]);
    }

    /// Frees the space of spool `stream` up to its recorded offset (in whole [`PUNCH_EVERY`]s).
    fn punch(&mut self, stream: usize) {
        let freeable = self.done[stream] - self.done[stream] % PUNCH_EVERY;
        if freeable <= self.punched[stream] {
            return;
        }
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let (from, len) = (self.punched[stream] as libc::off_t, (freeable - self.punched[stream]) as libc::off_t);
        match nix::fcntl::fallocate(self.files[stream].as_fd(), mode, from, len) {
            Ok(()) => self.punched[stream] = freeable,
            // A file system without holes: the spool keeps its space until it is removed.
            Err(Errno::EOPNOTSUPP) => self.punched[stream] = u64::MAX,
            Err(e) => tracing::debug!("cannot free the logged part of {}: {e}", self.dir.display()),
        }
    }

    /// Where the spool is.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The state record: version, the two `done` offsets, then the write under way (stream + 1, or 0
/// for none; len; flush; timestamp; log inode, before, after), then a checksum of all that.
fn encode(done: [u64; 2], write: Option<&LogWrite>) -> [u8; STATE_LEN] {
    let w = write.copied().unwrap_or(LogWrite {
        stream: 0,
        len: 0,
        flush: false,
        timestamp: 0,
        log_inode: 0,
        log_before: 0,
        log_after: 0,
    });
    let fields: [u64; 11] = [
        VERSION,
        done[0],
        done[1],
        write.map_or(0, |w| w.stream as u64 + 1),
        w.len,
        u64::from(w.flush),
        w.timestamp as u64,
        w.log_inode,
        w.log_before,
        w.log_after,
        0,
    ];
    let mut record = [0u8; STATE_LEN];
    for (slot, field) in record.chunks_exact_mut(8).zip(fields) {
        slot.copy_from_slice(&field.to_le_bytes());
    }
    let sum = checksum(&record[..STATE_LEN - 8]);
    record[STATE_LEN - 8..].copy_from_slice(&sum.to_le_bytes());
    record
}

fn decode(record: &[u8; STATE_LEN]) -> Option<([u64; 2], Option<LogWrite>)> {
    let field = |i: usize| u64::from_le_bytes(record[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if field(0) != VERSION || field(11) != checksum(&record[..STATE_LEN - 8]) {
        return None;
    }
    let write = match field(3) {
        0 => None,
        s @ (1 | 2) => Some(LogWrite {
            stream: s as usize - 1,
            len: field(4),
            flush: field(5) != 0,
            timestamp: field(6) as i64,
            log_inode: field(7),
            log_before: field(8),
            log_after: field(9),
        }),
        _ => return None,
    };
    Some(([field(1), field(2)], write))
}

/// FNV-1a: enough to tell a record from a torn or foreign one.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
