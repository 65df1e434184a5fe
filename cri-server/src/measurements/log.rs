//! The measurement log: one JSON line per record, appended and fsync'd, each record naming the
//! digest of the one before it; and its replay (`verify`).
//!
//! A line is `{"record":{...},"pcr_after":"<hex>"}`. The record's digest is the SHA-256 of the
//! bytes of its `record` object exactly as they stand in the file (no re-serialisation, so any
//! edit changes it); it is what the next record's `prev` names and what is extended into the
//! PCR. `pcr_after` (with a TPM only) is what the PCR holds after the extend if the replay is
//! right: outside the record, since it depends on the record's digest, and checked by replay.
//!
//! The first record of a log has `prev` = 64 zeros, or, after a torn log was set aside, the
//! digest of that log's last intact record with `previous_log` naming the file. With a TPM, the
//! first record, and any record after which the daemon found the PCR other than the log expects
//! (a reboot resets it; another program may extend it), carries `pcr_base`: the PCR value the
//! replay continues from.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Digest as _;

use super::tpm::extended;

/// What every record of this log says happened: the daemon was about to start the container's
/// unit (the start itself may still fail, or the daemon may die before it).
pub const EVENT_START_INTENDED: &str = "container-start-intended";

/// One container start, as recorded before its unit starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Its position in the log, from 1.
    pub seq: u64,
    /// `sha256:<hex>` of the previous record.
    pub prev: String,
    /// [`EVENT_START_INTENDED`].
    pub event: String,
    /// When it was recorded, nanoseconds since the Unix epoch.
    pub time_unix_ns: i64,
    pub pod_id: String,
    pub pod_uid: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub container_id: String,
    pub container_name: String,
    pub container_attempt: u32,
    /// The image as the kubelet named it.
    pub image: String,
    /// A repo digest of the image (`registry/repo@sha256:...`).
    pub image_ref: String,
    /// The manifest pulled (None for an image that came without one).
    pub manifest_digest: Option<String>,
    /// The image id: its config's digest.
    pub config_digest: String,
    /// The chain ids of the layers mounted as the root's lower directories, bottom first.
    pub layer_chain_ids: Vec<String>,
    /// `sha256:<hex>` of the effective spec: command, environment names, mounts, user,
    /// capabilities, seccomp filter and the other security settings (`super::spec_digest`).
    pub spec_digest: String,
    /// The PCR extended with this record's digest (None: no TPM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr: Option<u8>,
    /// The PCR's value before this record's extend, where the replay cannot take it from the
    /// record before (first record, reboot, foreign extends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr_base: Option<String>,
    /// The log set aside before this one (torn by a crash), whose last intact record `prev` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_log: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    #[serde(borrow)]
    record: &'a RawValue,
    #[serde(default)]
    pcr_after: Option<String>,
}

/// Why the log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("measurement log {path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
    #[error("measurement log {path}: record {position}: {message}")]
    Record { path: PathBuf, position: usize, message: String },
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(bytes).into()
}

pub fn digest_name(digest: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(digest))
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// The last intact record of a log, where appending continues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tail {
    pub seq: u64,
    pub digest: [u8; 32],
    pub pcr: Option<u8>,
    /// What the PCR holds after the last record, and before it.
    pub pcr_after: Option<[u8; 32]>,
    pub pcr_before: Option<[u8; 32]>,
}

/// An append-only log open for writing.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: File,
    tail: Option<Tail>,
    /// For the first record of a log that replaced a torn one: its file name and last digest.
    previous: Option<(String, [u8; 32])>,
}

/// A problem found by [`verify`], at a record's position (its line, from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub position: usize,
    pub message: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    pub records: usize,
    pub problems: Vec<Problem>,
    /// The PCR and the value the replay says it holds now (None: no TPM records).
    pub pcr: Option<(u8, [u8; 32])>,
    /// Records that start a new PCR base (beyond the first), with the reason to look at them.
    pub rebases: Vec<usize>,
    pub previous_log: Option<String>,
}

/// Replays a log's text: numbering, chain, PCR values. Every problem is reported with the
/// position of the record at which it shows; the replay goes on past it.
pub fn verify(text: &[u8]) -> Replay {
    let mut replay = Replay::default();
    if text.is_empty() {
        return replay;
    }
    let torn = !text.ends_with(b"\n");
    let lines: Vec<&[u8]> = text.strip_suffix(b"\n").unwrap_or(text).split(|&b| b == b'\n').collect();
    let count = lines.len();
    let mut prev: Option<[u8; 32]> = None;
    let mut pcr: Option<(u8, [u8; 32])> = None;
    for (index, line) in lines.into_iter().enumerate() {
        let position = index + 1;
        let mut problem = |message: String| replay.problems.push(Problem { position, message });
        if torn && position == count {
            problem("torn: the line has no end (a write cut short by a crash, or a truncation)".into());
            break;
        }
        let parsed: Line<'_> = match serde_json::from_slice(line) {
            Ok(line) => line,
            Err(e) => {
                problem(format!("not a record: {e}"));
                prev = None;
                continue;
            }
        };
        let record: Record = match serde_json::from_str(parsed.record.get()) {
            Ok(record) => record,
            Err(e) => {
                problem(format!("not a record: {e}"));
                prev = None;
                continue;
            }
        };
        replay.records += 1;
        let digest = sha256(parsed.record.get().as_bytes());
        if record.seq != position as u64 {
            problem(format!(
                "numbered {} at position {position}: records were deleted, inserted or reordered",
                record.seq
            ));
        }
        if position == 1 {
            replay.previous_log = record.previous_log.clone();
            if record.previous_log.is_none() && record.prev != digest_name(&[0; 32]) {
                problem(format!("the first record names a previous record {} but no previous log", record.prev));
            }
        } else if let Some(prev) = prev
            && record.prev != digest_name(&prev)
        {
            problem(format!(
                "prev {} is not the digest of record {} ({}): record {} was changed, or records were deleted or \
                 reordered",
                record.prev,
                position - 1,
                digest_name(&prev),
                position - 1
            ));
        }
        if record.event != EVENT_START_INTENDED {
            problem(format!("unknown event {:?}", record.event));
        }
        if let Some(index) = record.pcr {
            let base = match &record.pcr_base {
                Some(base) => {
                    if position > 1 {
                        replay.rebases.push(position);
                    }
                    match parse_hex32(base) {
                        Some(base) => Some(base),
                        None => {
                            problem(format!("pcr_base {base:?} is not a sha256 value"));
                            None
                        }
                    }
                }
                None => match pcr {
                    Some((previous, value)) if previous == index => Some(value),
                    _ => {
                        problem(format!("pcr {index} without a pcr_base to start the replay from"));
                        None
                    }
                },
            };
            if let Some(base) = base {
                let after = extended(&base, &digest);
                let stated = parsed.pcr_after.as_deref().and_then(parse_hex32);
                if stated != Some(after) {
                    problem(format!(
                        "pcr_after {:?} is not the replay's {}: this record was changed",
                        parsed.pcr_after.as_deref().unwrap_or(""),
                        hex::encode(after)
                    ));
                }
                // Past a changed record, from what it states: one problem per change, not a cascade.
                pcr = Some((index, stated.unwrap_or(after)));
            } else {
                pcr = None;
            }
        }
        prev = Some(digest);
    }
    replay.pcr = pcr;
    replay
}

/// The last intact record of `text`, or the position of a last line that is torn or unreadable.
fn tail_of(text: &[u8]) -> Result<Option<Tail>, (usize, String)> {
    if text.is_empty() {
        return Ok(None);
    }
    let lines: Vec<&[u8]> = text.strip_suffix(b"\n").unwrap_or(text).split(|&b| b == b'\n').collect();
    let position = lines.len();
    if !text.ends_with(b"\n") {
        return Err((position, "torn: the line has no end (a write cut short by a crash?)".into()));
    }
    /// A line's record, its digest, and its `pcr_after`.
    type Parsed = (Record, [u8; 32], Option<[u8; 32]>);
    let parse = |line: &[u8]| -> Result<Parsed, String> {
        let parsed: Line<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        let record: Record = serde_json::from_str(parsed.record.get()).map_err(|e| e.to_string())?;
        let after = parsed.pcr_after.as_deref().and_then(parse_hex32);
        Ok((record, sha256(parsed.record.get().as_bytes()), after))
    };
    let (record, digest, pcr_after) =
        parse(lines[position - 1]).map_err(|e| (position, format!("not a record: {e}")))?;
    let pcr_before = match record.pcr_base.as_deref() {
        Some(base) => parse_hex32(base),
        None if position > 1 => parse(lines[position - 2]).ok().and_then(|(_, _, after)| after),
        None => None,
    };
    Ok(Some(Tail { seq: record.seq, digest, pcr: record.pcr, pcr_after, pcr_before }))
}

impl LogWriter {
    /// Opens (or creates) the log at `path`. A log whose last line is torn or unreadable is set
    /// aside as `<path>.torn-<unix seconds>` (never rewritten or deleted; `verify` on it reports
    /// the line) and a new log continues the chain from its last intact record.
    pub fn open(path: &Path) -> Result<LogWriter, LogError> {
        let io = |what: &'static str| move |source| LogError::Io { path: path.to_path_buf(), what, source };
        let dir = path.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir).map_err(io("cannot create its directory"))?;
        let text = match fs::read(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("cannot read it")(e)),
        };
        let mut previous = None;
        let tail = match text.as_deref().map(tail_of) {
            None => None,
            Some(Ok(tail)) => tail,
            Some(Err((position, message))) => {
                let text = text.as_deref().unwrap_or_default();
                let aside = set_aside(path).map_err(io("cannot set the torn log aside"))?;
                tracing::error!(
                    log = %path.display(), set_aside = %aside.display(), position,
                    "measurement log: record {position}: {message}; the log is set aside and a new one continues \
                     its chain (`cri-systemd measurements verify --log {}` shows it)", aside.display()
                );
                // The chain continues from the last record that can be read.
                let cut = text[..text.len().saturating_sub(1)].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                let last_digest = tail_of(&text[..cut]).ok().flatten().map_or([0; 32], |tail| tail.digest);
                let name = aside.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                previous = Some((name, last_digest));
                None
            }
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io("cannot open it for appending"))?;
        if !existed {
            file.sync_all().map_err(io("cannot fsync it"))?;
            File::open(dir).and_then(|d| d.sync_all()).map_err(io("cannot fsync its directory"))?;
        }
        Ok(LogWriter { path: path.to_path_buf(), file, tail, previous })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tail(&self) -> Option<&Tail> {
        self.tail.as_ref()
    }

    /// Appends `record` (its `seq`, `prev` and `previous_log` are filled in here) as one line with
    /// one write, then fsyncs. `pcr_base`: the PCR's value before this record (None: the
    /// previous record's `pcr_after`). Returns the record's digest.
    pub fn append(&mut self, mut record: Record, pcr_base: Option<[u8; 32]>) -> Result<AppendedRecord, LogError> {
        record.seq = self.tail.as_ref().map_or(1, |t| t.seq + 1);
        record.prev = match (&self.tail, &self.previous) {
            (Some(tail), _) => digest_name(&tail.digest),
            (None, Some((name, digest))) => {
                record.previous_log = Some(name.clone());
                digest_name(digest)
            }
            (None, None) => digest_name(&[0; 32]),
        };
        let before = match (record.pcr, pcr_base) {
            (None, _) => None,
            (Some(_), Some(base)) => {
                record.pcr_base = Some(hex::encode(base));
                Some(base)
            }
            (Some(index), None) => match &self.tail {
                Some(Tail { pcr: Some(previous), pcr_after: Some(after), .. }) if *previous == index => Some(*after),
                _ => {
                    return Err(LogError::Record {
                        path: self.path.clone(),
                        position: record.seq as usize,
                        message: "no pcr value to extend from".into(),
                    });
                }
            },
        };
        let json = serde_json::to_string(&record).expect("a record serialises");
        let digest = sha256(json.as_bytes());
        let pcr_after = before.map(|before| extended(&before, &digest));
        let mut line = format!("{{\"record\":{json}");
        if let Some(after) = pcr_after {
            line.push_str(&format!(",\"pcr_after\":\"{}\"", hex::encode(after)));
        }
        line.push_str("}\n");
        let io = |what: &'static str| {
            let path = self.path.clone();
            move |source| LogError::Io { path, what, source }
        };
        // One write: the line is whole or (after a power loss) torn, never interleaved.
        self.file.write_all(line.as_bytes()).map_err(io("cannot append"))?;
        self.file.sync_data().map_err(io("cannot fsync"))?;
        self.tail = Some(Tail { seq: record.seq, digest, pcr: record.pcr, pcr_after, pcr_before: before });
        Ok(AppendedRecord { record, digest, pcr_after })
    }
}

/// A record as appended.
#[derive(Debug, Clone)]
pub struct AppendedRecord {
    pub record: Record,
    pub digest: [u8; 32],
    pub pcr_after: Option<[u8; 32]>,
}

fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut n = 0;
    loop {
        let suffix = if n == 0 { format!("torn-{seconds}") } else { format!("torn-{seconds}-{n}") };
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{suffix}"));
        let aside = PathBuf::from(name);
        if !aside.exists() {
            fs::rename(path, &aside)?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
            return Ok(aside);
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> Record {
        Record { event: EVENT_START_INTENDED.into(), container_name: name.into(), pcr: Some(23), ..Default::default() }
    }

    fn write_log(dir: &Path, names: &[&str]) -> PathBuf {
        let path = dir.join("starts.log");
        let mut log = LogWriter::open(&path).unwrap();
        for (i, name) in names.iter().enumerate() {
            log.append(record(name), (i == 0).then_some([0; 32])).unwrap();
        }
        path
    }

    fn positions(replay: &Replay) -> Vec<usize> {
        replay.problems.iter().map(|p| p.position).collect()
    }

    #[test]
    fn an_intact_log_replays_to_the_pcr_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), &["a", "b", "c"]);
        let text = fs::read(&path).unwrap();
        let replay = verify(&text);
        assert!(replay.problems.is_empty(), "{:?}", replay.problems);
        assert_eq!(replay.records, 3);
        // The replay by hand: the digests of the three record objects extended into zeros.
        let mut value = [0u8; 32];
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let line: Line<'_> = serde_json::from_slice(line).unwrap();
            value = extended(&value, &sha256(line.record.get().as_bytes()));
        }
        assert_eq!(replay.pcr, Some((23, value)));
        // Reopened, it continues the chain.
        let mut log = LogWriter::open(&path).unwrap();
        assert_eq!(log.tail().unwrap().seq, 3);
        log.append(record("d"), None).unwrap();
        let replay = verify(&fs::read(&path).unwrap());
        assert!(replay.problems.is_empty() && replay.records == 4, "{:?}", replay.problems);
    }

    #[test]
    fn edits_deletions_and_reorderings_are_reported_with_their_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), &["a", "b", "c", "d"]);
        let text = String::from_utf8(fs::read(&path).unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let join = |lines: &[&str]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();

        let edited = join(&[lines[0], &lines[1].replace("\"b\"", "\"x\""), lines[2], lines[3]]);
        let replay = verify(edited.as_bytes());
        assert_eq!(positions(&replay), [2, 3], "{:?}", replay.problems);
        assert!(replay.problems[0].message.contains("pcr_after"), "{:?}", replay.problems);
        assert!(replay.problems[1].message.contains("record 2 was changed"), "{:?}", replay.problems);

        let deleted = join(&[lines[0], lines[2], lines[3]]);
        let replay = verify(deleted.as_bytes());
        assert!(positions(&replay).starts_with(&[2]), "{:?}", replay.problems);
        assert!(replay.problems[0].message.contains("numbered 3 at position 2"), "{:?}", replay.problems);

        let reordered = join(&[lines[0], lines[2], lines[1], lines[3]]);
        let replay = verify(reordered.as_bytes());
        assert!(positions(&replay).starts_with(&[2]), "{:?}", replay.problems);

        // Without a TPM the chain alone finds the same edit (at the record after it).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("starts.log");
        let mut log = LogWriter::open(&path).unwrap();
        for name in ["a", "b", "c"] {
            log.append(Record { pcr: None, ..record(name) }, None).unwrap();
        }
        let text = fs::read_to_string(&path).unwrap().replacen("\"b\"", "\"x\"", 1);
        assert_eq!(positions(&verify(text.as_bytes())), [3]);
    }

    #[test]
    fn a_torn_last_line_is_reported_and_set_aside_never_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), &["a", "b"]);
        let whole = fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"record\":{\"seq\":3,");
        fs::write(&path, &torn).unwrap();
        let replay = verify(&torn);
        assert_eq!(positions(&replay), [3]);
        assert!(replay.problems[0].message.contains("torn"), "{:?}", replay.problems);

        let mut log = LogWriter::open(&path).unwrap();
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".torn-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(fs::read(&aside[0]).unwrap(), torn, "the torn log is kept as it was");
        log.append(record("c"), Some([7; 32])).unwrap();
        let text = fs::read(&path).unwrap();
        let replay = verify(&text);
        assert!(replay.problems.is_empty(), "{:?}", replay.problems);
        let last_intact = tail_of(&whole).unwrap().unwrap().digest;
        let first: Line<'_> = serde_json::from_slice(text.split(|&b| b == b'\n').next().unwrap()).unwrap();
        let first: Record = serde_json::from_str(first.record.get()).unwrap();
        assert_eq!(first.prev, digest_name(&last_intact));
        assert!(first.previous_log.unwrap().starts_with("starts.log.torn-"));
    }
}
