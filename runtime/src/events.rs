//! Container events (the CRI's GetContainerEvents, the kubelet's evented PLEG): every lifecycle
//! change of a container is broadcast to all subscribers with a snapshot of its pod and the
//! pod's containers taken when it happened, like containerd's.
//!
//! Pods have events too, as with containerd (whose kubelet counterpart expects them): CREATED and
//! STARTED at RunPodSandbox, STOPPED at StopPodSandbox, DELETED at RemovePodSandbox, with the
//! pod's id as the container id.
//!
//! Created, Started and Deleted come from the calls that make them. Stopped comes from whatever
//! first notices that the container's unit ended: StopContainer, StopPodSandbox, a status call,
//! or the exit watch, an inotify watch on each running container's directory that sees the exit
//! record that `record-exit` (the unit's ExecStopPost) writes when the container exits by itself
//! or is OOM-killed. Events of the time the daemon is down are lost (the kubelet relists); a
//! container that ended meanwhile is marked exited on start, before anyone subscribes.
//!
//! The record is systemd's word on how the container ended, but it only comes if systemd runs
//! ExecStopPost and `record-exit` can write: the main process watch follows each running
//! container's main process itself (a pidfd: readable once the process has ended, child of ours
//! or not), and a container whose main process ended without a record after [`RECORD_GRACE`] is
//! marked exited with an unknown status (or OOMKilled, if its cgroup counted an OOM kill), rather
//! than reported Running for ever.
//!
//! An event's `created_at` is taken before its snapshot, as PodSandboxStatus's `timestamp` is
//! (cri-server): the kubelet's evented PLEG keeps a pod's status by that time (Unix nanoseconds)
//! and drops older ones, so a snapshot must never be older than its time says.
//!
//! The channel is bounded and never blocks the runtime: a subscriber that falls behind by more
//! than [`EVENT_BUFFER`] events loses the oldest ones (and its stream logs how many).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::{Container, ContainerState, Pod, Runtime};

/// How many events a subscriber may be behind before it loses some.
pub const EVENT_BUFFER: usize = 1024;

/// The name of the exit record in a container's directory (see crate::exit_record).
const EXIT_FILE: &str = "exit.json";

/// How long the exit record may take to appear once a container's main process has ended:
/// systemd first notices the end, then runs ExecStopPost, which on a busy node takes a while.
pub(crate) const RECORD_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerEventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

/// One change of one container.
#[derive(Debug, Clone)]
pub struct ContainerEvent {
    pub container_id: String,
    pub kind: ContainerEventKind,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    /// The container's pod when the event happened (None if it is gone).
    pub pod: Option<Pod>,
    /// The pod's containers when the event happened (a deleted one no longer among them).
    pub containers: Vec<Container>,
}

impl Runtime {
    /// A new subscription to container events, from now on.
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<ContainerEvent> {
        self.events.subscribe()
    }

    /// Broadcasts `kind` for container `id` of pod `pod_id`; nothing to do without subscribers.
    pub(crate) fn emit(&self, id: &str, pod_id: &str, kind: ContainerEventKind) {
        if self.events.receiver_count() == 0 {
            return;
        }
        // Before the snapshot: the kubelet keeps the newest status by this time, so the
        // snapshot must not be older than it says.
        let created_at = now_nanos();
        let entries: Vec<_> = self.containers.lock().expect("container table lock").values().cloned().collect();
        let mut containers: Vec<Container> = entries
            .iter()
            .filter_map(|entry| {
                entry.read(|c| {
                    (c.pod_id == pod_id && !matches!(c.state, ContainerState::Creating | ContainerState::Removing))
                        .then(|| c.clone())
                })
            })
            .collect();
        containers.sort_by_key(|c| c.created_at);
        let event =
            ContainerEvent { container_id: id.to_string(), kind, created_at, pod: self.pod(pod_id).ok(), containers };
        debug!(container = %id, ?kind, "container event");
        // Fails only when the last subscriber left meanwhile.
        let _ = self.events.send(event);
    }

    /// Watches container `id`'s directory for its exit record (a running container's).
    pub(crate) fn watch_exit(&self, id: &str) {
        let Some(watch) = &self.exit_watch else { return };
        if let Err(e) = watch.watch(&self.container_dir(id), id) {
            warn!(container = %id, "cannot watch for the container's exit; its stop is noticed on the next status call: {e}");
        }
    }

    /// Follows the main process of running container `id` (from its start, or from the daemon's
    /// start), once the exit watcher runs.
    pub(crate) fn watch_main_process(&self, id: &str) {
        // Fails only once the receiving task is gone (the runtime is shutting down).
        let _ = self.main_process_watch.0.send(id.to_string());
    }

    /// Starts the thread that turns exit records into Stopped events, and the task that follows
    /// main processes (once, at start).
    pub fn spawn_exit_watcher(self: &Arc<Self>) {
        let ids = self.main_process_watch.1.lock().expect("main process watch lock").take();
        if let Some(mut ids) = ids {
            let runtime = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some(id) = ids.recv().await {
                    tokio::spawn(follow_main_process(runtime.clone(), id));
                }
            });
        }
        let Some(watch) = self.exit_watch.clone() else { return };
        let runtime = Arc::downgrade(self);
        let handle = tokio::runtime::Handle::current();
        let spawned = std::thread::Builder::new().name("exit-watch".into()).spawn(move || {
            loop {
                let changes = match watch.read() {
                    Ok(changes) => changes,
                    Err(e) => {
                        warn!("the exit watch failed, container stops are noticed on status calls only: {e}");
                        return;
                    }
                };
                let Some(runtime) = runtime.upgrade() else { return };
                for change in changes {
                    let runtime = runtime.clone();
                    // A task each: the container's lock may be held by a long StopContainer.
                    handle.spawn(async move {
                        match change {
                            Some(id) => runtime.notice_exit(&id).await,
                            None => {
                                let ids: Vec<String> =
                                    runtime.containers.lock().expect("container table lock").keys().cloned().collect();
                                for id in ids {
                                    runtime.notice_exit(&id).await;
                                }
                            }
                        }
                    });
                }
            }
        });
        if let Err(e) = spawned {
            warn!("cannot start the exit watch thread: {e}");
        }
    }

    /// Picks up the exit record of container `id`, under its lock so that a StopContainer under
    /// way completes the record first.
    async fn notice_exit(&self, id: &str) {
        let Some(entry) = self.containers.lock().expect("container table lock").get(id).cloned() else { return };
        let _guard = entry.operation.clone().lock_owned().await;
        self.refresh(&entry);
    }
}

/// Waits for the end of container `id`'s main process; then, if no exit record came within
/// [`RECORD_GRACE`], marks the container exited without one.
async fn follow_main_process(runtime: Weak<Runtime>, id: String) {
    // The record as saved, not refreshed: refreshing is for the lock holders and status calls.
    let Some(unit) = runtime.upgrade().and_then(|r| r.saved_container(&id)).map(|c| c.unit) else { return };
    let main_pid = match runtime.upgrade() {
        // What init wrote before handing the process to systemd; systemd's word otherwise.
        Some(r) => {
            let written = std::fs::read_to_string(r.container_dir(&id).join(init::MAIN_PID_FILE)).ok();
            match written.and_then(|text| text.trim().parse::<u32>().ok()) {
                Some(pid) => Ok(pid),
                None => r.systemd.main_pid(&unit).await,
            }
        }
        None => return,
    };
    match main_pid.map(|pid| open_main_process(pid, &unit)) {
        // Readable once the process has ended.
        Ok(Some(process)) => {
            // SAFETY: the pidfd is ours alone and stays open while registered: AsyncFd owns it
            // and deregisters before closing it.
            let registered =
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(process, tokio::io::Interest::READABLE) };
            match registered.map_err(|e| e.into_parts().1) {
                Ok(process) => drop(process.readable().await),
                Err(e) => {
                    warn!(container = %id, "cannot follow the container's main process: {e}");
                    return;
                }
            }
        }
        // Gone already (or never seen): the record, or its absence, tells.
        Ok(None) => {}
        Err(e) => {
            warn!(container = %id, "cannot look up the container's main process: {e}");
            return;
        }
    }
    // Counted now: systemd removes the cgroup soon after.
    let oom_killed = runtime.upgrade().is_some_and(|r| r.container_saw_oom_kill(&id));
    tokio::time::sleep(RECORD_GRACE).await;
    if let Some(runtime) = runtime.upgrade() {
        runtime.exit_without_record(&id, oom_killed).await;
    }
}

/// A pidfd of process `pid` (Linux 5.3+), readable once the process has ended.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a fresh descriptor owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd of `pid` if it is (still) a process of `unit`: the pidfd pins the process, and the
/// cgroup check after opening it rules out a recycled pid.
fn open_main_process(pid: u32, unit: &str) -> Option<OwnedFd> {
    if pid == 0 {
        return None;
    }
    let fd = pidfd_open(pid as libc::pid_t)?;
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cgroups.lines().any(|line| line.ends_with(&format!("/{unit}"))).then_some(fd)
}

impl Runtime {
    /// Whether the cgroup of container `id` counted an OOM kill (v1 or v2).
    fn container_saw_oom_kill(&self, id: &str) -> bool {
        let Some(container) = self.saved_container(id) else { return false };
        let path = crate::stats::cgroup_path(&container.slice, Some(&container.unit));
        crate::cgroup_detail::sample(&path).oom_kills.unwrap_or(0) > 0
    }

    /// Container `id`'s record as last saved.
    fn saved_container(&self, id: &str) -> Option<Container> {
        self.containers.lock().expect("container table lock").get(id).map(|entry| entry.get())
    }

    /// Marks container `id` exited if its main process ended and systemd recorded nothing.
    async fn exit_without_record(&self, id: &str, oom_killed: bool) {
        let Some(entry) = self.containers.lock().expect("container table lock").get(id).cloned() else { return };
        let _guard = entry.operation.clone().lock_owned().await;
        if self.refresh(&entry).state != ContainerState::Running {
            return;
        }
        let why = format!(
            "its main process ended, but systemd recorded no exit status within {} s (the unit's \
             ExecStopPost did not run or could not write the record: see the unit's journal)",
            RECORD_GRACE.as_secs()
        );
        info!(container = %id, oom_killed, "{why}");
        let exit = oom_killed.then(|| crate::exit_record::ExitRecord {
            result: "oom-kill".into(),
            exit_code: 128 + libc::SIGKILL,
            oom_killed: true,
            finished_at: now_nanos(),
            main_status_known: false,
        });
        self.mark_exited(&entry, exit, &why);
    }
}

/// An inotify instance watching the directories of running containers for their exit record.
#[derive(Debug)]
pub(crate) struct ExitWatch {
    fd: OwnedFd,
    /// Watch descriptor -> container id.
    watches: Mutex<HashMap<i32, String>>,
}

impl ExitWatch {
    pub(crate) fn new() -> std::io::Result<ExitWatch> {
        // SAFETY: inotify_init1 takes flags only; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        Ok(ExitWatch { fd: unsafe { OwnedFd::from_raw_fd(fd) }, watches: Mutex::new(HashMap::new()) })
    }

    fn watch(&self, dir: &Path, id: &str) -> std::io::Result<()> {
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // write_json renames the record into place; a plain write closes it.
        let mask = libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE | libc::IN_ONLYDIR;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path alive during the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.watches.lock().expect("exit watch lock").insert(wd, id.to_string());
        Ok(())
    }

    /// Blocks until something happens: the ids of containers whose exit record appeared, and
    /// None when the kernel's queue overflowed (every container must be looked at).
    fn read(&self) -> std::io::Result<Vec<Option<String>>> {
        let mut buffer = [0u8; 16 * 1024];
        let n = loop {
            // SAFETY: reads into a buffer owned by this frame, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if n >= 0 {
                break n as usize;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut changes = Vec::new();
        let mut watches = self.watches.lock().expect("exit watch lock");
        for (wd, mask, name) in parse_events(&buffer[..n]) {
            if mask & libc::IN_Q_OVERFLOW != 0 {
                changes.push(None);
            } else if mask & libc::IN_IGNORED != 0 {
                // The directory is gone (container removed): so is the watch.
                watches.remove(&wd);
            } else if name == EXIT_FILE.as_bytes()
                && let Some(id) = watches.get(&wd)
            {
                changes.push(Some(id.clone()));
            }
        }
        Ok(changes)
    }
}

/// The (watch descriptor, mask, name) of each `struct inotify_event` in `bytes`.
fn parse_events(bytes: &[u8]) -> Vec<(i32, u32, &[u8])> {
    const HEADER: usize = 16;
    let mut events = Vec::new();
    let mut offset = 0;
    while offset + HEADER <= bytes.len() {
        let field = |at: usize| {
            let mut word = [0u8; 4];
            word.copy_from_slice(&bytes[offset + at..offset + at + 4]);
            word
        };
        let wd = i32::from_ne_bytes(field(0));
        let mask = u32::from_ne_bytes(field(4));
        let len = u32::from_ne_bytes(field(12)) as usize;
        let end = (offset + HEADER + len).min(bytes.len());
        let name = &bytes[offset + HEADER..end];
        // The name is NUL-padded.
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        events.push((wd, mask, name));
        offset += HEADER + len;
    }
    events
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inotify_sees_a_record_renamed_into_a_watched_dir() {
        let dir = tempfile::tempdir().unwrap();
        let watch = ExitWatch::new().unwrap();
        watch.watch(dir.path(), "c1").unwrap();
        std::fs::write(dir.path().join("other.json"), "{}").unwrap();
        crate::store::write_json(&dir.path().join(EXIT_FILE), &serde_json::json!({"exit": 0})).unwrap();
        let mut seen = Vec::new();
        while !seen.contains(&Some("c1".to_string())) {
            seen.extend(watch.read().unwrap());
        }
        assert!(seen.iter().all(|c| c.as_deref() == Some("c1")), "{seen:?}");
        // Removing the directory drops the watch.
        drop(dir);
        while !watch.watches.lock().unwrap().is_empty() {
            watch.read().unwrap();
        }
    }

    #[test]
    fn events_are_parsed_with_their_padded_names() {
        let mut bytes = Vec::new();
        for (wd, mask, name) in [(1i32, libc::IN_MOVED_TO, &b"exit.json\0\0\0\0\0\0\0"[..]), (2, libc::IN_IGNORED, b"")]
        {
            bytes.extend(wd.to_ne_bytes());
            bytes.extend(mask.to_ne_bytes());
            bytes.extend(0u32.to_ne_bytes());
            bytes.extend((name.len() as u32).to_ne_bytes());
            bytes.extend(name);
        }
        let events = parse_events(&bytes);
        assert_eq!(events, vec![(1, libc::IN_MOVED_TO, &b"exit.json"[..]), (2, libc::IN_IGNORED, &b""[..])]);
    }
}
