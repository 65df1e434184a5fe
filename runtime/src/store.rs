//! Crash-safe records: every record is one JSON file replaced atomically (write a temp file,
//! fsync, rename over, fsync the directory), so a SIGKILL at any point leaves the old or the new
//! version, never a torn one.
//!
//! # Records, roll-back and quarantine
//!
//! `<state_root>/pods/<id>/pod.json` and `<state_root>/containers/<id>/container.json` are replaced
//! atomically. Each operation writes its intent first (state `Creating`/`Removing`); on start the
//! daemon rolls such records back or forward and notices containers that ended. A record that
//! exists but cannot be read (torn by a disk, edited by hand) is never deleted: its directory
//! moves, unchanged, to `<state_root>/quarantine/<pod|container>-<id>-<unix time>/` with a
//! `quarantine-reason.txt`, the reason goes to the journal (error level) and to Status' verbose
//! info (`quarantine`, every entry of that directory, until an operator removes it). The containers
//! of a quarantined pod are not stopped; they stay listed (a client may stop and remove them) and a
//! running one's user namespace range stays reserved (read from its main process's `uid_map`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let dir = path.parent().expect("records live in a directory");
    create_private_dir_all(dir)?;
    let temp = path.with_extension("json.tmp");
    {
        let mut file = create_private_file(&temp)?;
        serde_json::to_writer_pretty(&mut file, value)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates (truncates) a file only root can read: records carry the containers' env (Secrets).
pub(crate) fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    // An existing file keeps its mode through open(O_CREAT): set it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Creates `dir` and its missing parents with mode 0700: nothing of a pod or container is for
/// other users of the node (the CVE-2021-41091 class: a writable layer's setuid binaries, records).
pub(crate) fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// At daemon start: the modes of an install from before they were private (directories of pods,
/// containers and CNI results 0700, their records 0600). Failures are logged and skipped.
pub fn tighten_modes(state_root: &Path, run_root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &Path, mode: u32| match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_symlink() && meta.permissions().mode() & 0o7777 != mode => {
            if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
                tracing::warn!("cannot set mode {mode:o} on {}: {e}", path.display());
            }
        }
        _ => {}
    };
    for parent in [state_root.join("containers"), state_root.join("pods"), run_root.join("pods")] {
        set(&parent, 0o700);
        let Ok(entries) = std::fs::read_dir(&parent) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let dir = entry.path();
                set(&dir, 0o700);
                for record in ["container.json", "init.json", "pod.json", "exit.json"] {
                    set(&dir.join(record), 0o600);
                }
            }
        }
    }
    let cni = state_root.join("cni");
    set(&cni, 0o700);
    let results = cni.join("results");
    set(&results, 0o700);
    for entry in std::fs::read_dir(&results).into_iter().flatten().flatten() {
        set(&entry.path(), 0o600);
    }
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<T> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Where startup recovery sets aside a record it cannot read: `<state_root>/quarantine`.
pub(crate) const QUARANTINE_DIR: &str = "quarantine";
/// The file in a quarantined directory that says why it is there.
const QUARANTINE_REASON: &str = "quarantine-reason.txt";

/// A pod's or container's directory that startup recovery could not read and moved aside (never
/// deleted, its containers never stopped): an operator looks at it, then deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    /// `pod` or `container`.
    pub kind: String,
    pub id: String,
    /// Where it is now: `<state_root>/quarantine/<kind>-<id>-<unix seconds>`.
    pub path: PathBuf,
    pub reason: String,
}

/// Moves `dir` (the directory of a `kind` record `id`) to `<state_root>/quarantine/`, unchanged,
/// with a file beside the record that says why.
pub(crate) fn quarantine(
    state_root: &Path,
    kind: &str,
    id: &str,
    dir: &Path,
    reason: &str,
) -> std::io::Result<Quarantined> {
    let parent = state_root.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&parent)?;
    std::fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let path = parent.join(format!("{kind}-{id}-{seconds}"));
    std::fs::rename(dir, &path)?;
    std::fs::write(path.join(QUARANTINE_REASON), format!("{reason}\n"))?;
    std::fs::File::open(&parent)?.sync_all()?;
    if let Some(old_parent) = dir.parent() {
        std::fs::File::open(old_parent)?.sync_all()?;
    }
    Ok(Quarantined { kind: kind.into(), id: id.into(), path, reason: reason.into() })
}

/// Everything in `<state_root>/quarantine/`, oldest first: what earlier starts set aside stays
/// reported until an operator removes it.
pub(crate) fn list_quarantined(state_root: &Path) -> Vec<Quarantined> {
    let Ok(entries) = std::fs::read_dir(state_root.join(QUARANTINE_DIR)) else { return Vec::new() };
    let mut found: Vec<(String, Quarantined)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (kind, rest) = name.split_once('-')?;
            let (id, seconds) = rest.rsplit_once('-')?;
            let reason = std::fs::read_to_string(entry.path().join(QUARANTINE_REASON)).unwrap_or_default();
            let quarantined = Quarantined {
                kind: kind.into(),
                id: id.into(),
                path: entry.path(),
                reason: reason.trim_end().to_string(),
            };
            Some((format!("{seconds:0>20}"), quarantined))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found.into_iter().map(|(_, q)| q).collect()
}

/// A random 64-hex-digit id, as containerd and CRI-O make for pods and containers.
pub(crate) fn new_id() -> String {
    let mut bytes = [0u8; 32];
    // /dev/urandom never blocks once the kernel is booted and is always there on Linux.
    let mut urandom = std::fs::File::open("/dev/urandom").expect("/dev/urandom is readable");
    std::io::Read::read_exact(&mut urandom, &mut bytes).expect("/dev/urandom gives bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/record.json");
        write_json(&path, &vec![1, 2, 3]).unwrap();
        write_json(&path, &vec![4]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![4]);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn quarantine_moves_the_dir_unchanged_and_lists_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("pods/abc");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pod.json"), b"{\"id\": \"ab").unwrap();
        let moved = quarantine(root.path(), "pod", "abc", &dir, "pod.json: EOF").unwrap();
        assert!(!dir.exists());
        assert_eq!(std::fs::read(moved.path.join("pod.json")).unwrap(), b"{\"id\": \"ab");
        assert_eq!(list_quarantined(root.path()), vec![moved]);
        assert!(list_quarantined(&root.path().join("nothing")).is_empty());
    }

    #[test]
    fn ids_are_unique_hex() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
