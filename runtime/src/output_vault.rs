//! The output pipes' read ends across restarts of the daemon, kept in one unix socket pair's
//! queue whose two ends are their only entries in systemd's fd store.
//!
//! Why not an fd-store entry per pipe: systemd compares every descriptor it is asked to store
//! with each one it already holds (`same_fd`, one `kcmp` each), so two entries per container
//! cost PID 1 about 1.6 ms per container start at 1000 pods (4000 comparisons), and PID 1 held
//! two more descriptors per container. Here each read end travels as an SCM_RIGHTS message (its
//! name, `<id>-stdout|stderr`, as payload) into a SOCK_SEQPACKET socketpair; a descriptor in
//! flight keeps its pipe open as a stored one does. Both ends are stored, under one name
//! (`FDNAME=output-vault-<generation>`, so that one FDSTOREREMOVE drops both): systemd drops a
//! stored descriptor that reports EPOLLHUP (`on_fd_store_io` in its service.c), which the
//! receiving end would as soon as the daemon's sending end closed with it (`FDPOLL=0` would turn
//! that off, on the systemd versions that know it).
//!
//! A queued message cannot be taken back, so a removed container's or an ended pipe's entry
//! stays, dead, until the queue is rebuilt: a new generation gets the live read ends (the vault
//! keeps a duplicate of each), is stored, and only then is the old one removed from the store.
//! A kill at any point leaves a stored generation that holds every live pipe. At start the
//! stored generations are read with MSG_PEEK, `SO_PEEK_OFF` walking the queue, which leaves them
//! whole until recovery has stored the next one. Rebuilt at every start and when dead entries
//! outnumber live ones (at least [`REBUILD_AT_DEAD`]).
//!
//! Room: a message costs about 770 bytes of the sender's buffer, raised with `SO_SNDBUFFORCE` to
//! [`QUEUE_BYTES`] (about 87,000 entries; without CAP_NET_ADMIN the node's `wmem_max`). A send
//! that finds no room rebuilds first; still none, and that read end is stored in the fd store
//! itself, as before this module (`FDNAME=<id>-stdout`), which start also reads.
//!
//! Stdin write ends and terminals stay in the fd store (crate::stdio): closing stdin for
//! `stdin_once` must close the pipe's last write end, which a queued copy would keep open.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, setsockopt,
    socketpair, sockopt,
};
use tracing::{info, warn};

/// The fd store's name of a generation's two ends: `output-vault-<generation>`.
pub(crate) const STORE_PREFIX: &str = "output-vault-";
/// The queue's room (the sender's buffer).
const QUEUE_BYTES: usize = 64 << 20;
/// Dead entries that make a rebuild worth it once they also outnumber the live ones.
const REBUILD_AT_DEAD: usize = 64;
/// The longest name a message carries (a container id and a stream).
const NAME_MAX: usize = 256;

/// Where a read end is kept, as seen by the fd store.
pub(crate) trait FdStore {
    fn add(&self, name: &str, fd: BorrowedFd<'_>);
    fn remove(&self, name: &str);
}

/// The queue of read ends and what the daemon knows of it.
pub(crate) struct OutputVault {
    generation: u64,
    /// The current generation's ends; `None` if no socketpair could be made (every read end
    /// then goes to the fd store itself).
    queue: Option<Queue>,
    /// The room asked for each generation's queue, in bytes.
    room: usize,
    /// Whether the current generation is in the fd store (from the end of recovery on).
    stored: bool,
    /// Stored generations' names, to remove once the current one is stored.
    retired: Vec<String>,
    /// A duplicate of each live entry's read end: what a rebuild sends.
    live: HashMap<String, OwnedFd>,
    /// Entries in the queue whose pipe is no longer kept.
    dead: usize,
    /// Read ends kept in the fd store itself (no room in the queue).
    in_fd_store: std::collections::HashSet<String>,
}

struct Queue {
    sender: OwnedFd,
    receiver: OwnedFd,
}

impl Queue {
    fn new(room: usize) -> std::io::Result<Queue> {
        let (sender, receiver) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        // Room for the node's containers; without CAP_NET_ADMIN, as much as the node allows.
        if setsockopt(&sender, sockopt::SndBufForce, &room).is_err() {
            let _ = setsockopt(&sender, sockopt::SndBuf, &room);
        }
        Ok(Queue { sender, receiver })
    }

    /// Puts both ends in the fd store under `name`.
    fn store(&self, name: &str, store: &dyn FdStore) {
        store.add(name, self.receiver.as_fd());
        store.add(name, self.sender.as_fd());
    }

    /// Queues `fd` under `name`. EAGAIN: no room.
    fn send(&self, name: &str, fd: BorrowedFd<'_>) -> nix::Result<()> {
        let fds = [fd.as_raw_fd()];
        let cmsgs = [ControlMessage::ScmRights(&fds)];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        sendmsg::<()>(self.sender.as_raw_fd(), &[IoSlice::new(name.as_bytes())], &cmsgs, flags, None).map(drop)
    }
}

impl OutputVault {
    /// A vault of generation 1 with nothing stored before it.
    pub(crate) fn new() -> OutputVault {
        OutputVault::after(0, Vec::new())
    }

    fn after(last_generation: u64, retired: Vec<String>) -> OutputVault {
        let queue = Queue::new(QUEUE_BYTES)
            .inspect_err(|e| warn!("cannot make the queue of output pipes ({e}): they go to the fd store one by one"))
            .ok();
        OutputVault {
            generation: last_generation + 1,
            queue,
            room: QUEUE_BYTES,
            stored: false,
            retired,
            live: HashMap::new(),
            dead: 0,
            in_fd_store: Default::default(),
        }
    }

    /// Whether an fd-store entry named `name` is a generation's end.
    pub(crate) fn is_stored_queue(name: &str) -> bool {
        name.starts_with(STORE_PREFIX)
    }

    /// Reads the stored generations' ends (`stored`, by fd-store name) without consuming their
    /// queues: returns a vault of the next generation, not stored yet, and the read ends found,
    /// by name (the first one of a name wins: a kill during a rebuild leaves two generations
    /// holding the same pipes).
    pub(crate) fn recover(stored: Vec<(String, OwnedFd)>) -> (OutputVault, HashMap<String, OwnedFd>) {
        let mut ends: Vec<(u64, OwnedFd)> = Vec::new();
        let mut retired = Vec::new();
        for (name, fd) in stored {
            // Whatever the name, it leaves the store once the next generation is in it.
            if !retired.contains(&name) {
                retired.push(name.clone());
            }
            match name[STORE_PREFIX.len()..].parse::<u64>() {
                Ok(generation) => ends.push((generation, fd)),
                Err(_) => warn!(name, "an fd-store entry of an unknown form: dropped"),
            }
        }
        // Newest first; a generation's two ends are alike (the sending end's queue is empty).
        ends.sort_by_key(|(generation, _)| std::cmp::Reverse(*generation));
        let mut found = HashMap::new();
        for (generation, end) in &ends {
            match peek_all(end) {
                Ok(entries) => {
                    if !entries.is_empty() {
                        info!(generation, entries = entries.len(), "read the stored queue of output pipes");
                    }
                    for (name, fd) in entries {
                        found.entry(name).or_insert(fd);
                    }
                }
                Err(e) => warn!(generation, "cannot read the stored queue of output pipes: {e}"),
            }
        }
        let last = ends.first().map_or(0, |(generation, _)| *generation);
        (OutputVault::after(last, retired), found)
    }

    /// Keeps `fd`, the read end named `name`, across restarts: queued, or stored in the fd store
    /// if the queue has no room even after a rebuild.
    pub(crate) fn keep(&mut self, name: &str, fd: BorrowedFd<'_>, store: &dyn FdStore) {
        let copy = match fd.try_clone_to_owned() {
            Ok(copy) => copy,
            Err(e) => {
                warn!(name, "cannot duplicate an output pipe ({e}): it goes to the fd store");
                self.store_directly(name, fd, store);
                return;
            }
        };
        let mut sent = self.queue.as_ref().map(|queue| queue.send(name, fd));
        if matches!(sent, Some(Err(nix::errno::Errno::EAGAIN))) && self.dead > 0 && self.rebuild(store) {
            sent = self.queue.as_ref().map(|queue| queue.send(name, fd));
        }
        match sent {
            // Kept again under a name already queued: the earlier entry is dead.
            Some(Ok(())) if self.live.insert(name.to_string(), copy).is_some() => self.dead += 1,
            Some(Ok(())) => {}
            Some(Err(e)) => {
                warn!(name, "no room for an output pipe in the queue ({e}): it goes to the fd store");
                self.store_directly(name, fd, store);
            }
            None => self.store_directly(name, fd, store),
        }
    }

    fn store_directly(&mut self, name: &str, fd: BorrowedFd<'_>, store: &dyn FdStore) {
        store.add(name, fd);
        self.in_fd_store.insert(name.to_string());
    }

    /// No longer keeps the read end named `name` (its pipe ended or its container is gone).
    pub(crate) fn forget(&mut self, name: &str, store: &dyn FdStore) {
        if self.live.remove(name).is_some() {
            self.dead += 1;
        }
        if self.in_fd_store.remove(name) {
            store.remove(name);
        }
        if self.dead >= REBUILD_AT_DEAD && self.dead > self.live.len() {
            self.rebuild(store);
        }
    }

    /// After recovery: stores the current generation, then removes the older ones.
    pub(crate) fn commit(&mut self, store: &dyn FdStore) {
        if self.stored {
            return;
        }
        if let Some(queue) = &self.queue {
            queue.store(&self.store_name(), store);
        }
        self.stored = true;
        for name in std::mem::take(&mut self.retired) {
            store.remove(&name);
        }
    }

    /// A new generation with the live entries only, stored before the current one is removed.
    /// False (and nothing changed) if it cannot be made.
    fn rebuild(&mut self, store: &dyn FdStore) -> bool {
        let queue = match Queue::new(self.room) {
            Ok(queue) => queue,
            Err(e) => {
                warn!("cannot rebuild the queue of output pipes: {e}");
                return false;
            }
        };
        for (name, fd) in &self.live {
            if let Err(e) = queue.send(name, fd.as_fd()) {
                warn!("cannot rebuild the queue of output pipes ({e} at {name}): the old one stays");
                return false;
            }
        }
        let old = self.store_name();
        self.generation += 1;
        self.queue = Some(queue);
        self.dead = 0;
        if self.stored {
            self.queue.as_ref().expect("just made").store(&self.store_name(), store);
            store.remove(&old);
        }
        info!(generation = self.generation, live = self.live.len(), "rebuilt the queue of output pipes");
        true
    }

    fn store_name(&self) -> String {
        format!("{STORE_PREFIX}{}", self.generation)
    }

    /// Whether the read end named `name` is kept in the fd store itself (the queue had no room).
    pub(crate) fn in_fd_store(&self, name: &str) -> bool {
        self.in_fd_store.contains(name)
    }
}

/// Every entry of a queue, by name, read without taking any: each is a duplicate of the queued
/// descriptor, and the queue stays as it was.
fn peek_all(receiver: &OwnedFd) -> std::io::Result<Vec<(String, OwnedFd)>> {
    let offset: libc::c_int = 0;
    // SAFETY: `receiver` is an open socket, and `offset` a c_int that outlives the call, whose
    // size is passed with it.
    let set = unsafe {
        libc::setsockopt(
            receiver.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            std::ptr::from_ref(&offset).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut entries = Vec::new();
    loop {
        let mut name = [0u8; NAME_MAX];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let (length, fds, truncated) = match recvmsg::<()>(receiver.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Ok(message) => {
                let mut fds = Vec::new();
                for cmsg in message.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: the kernel just installed these descriptors for this process;
                        // nothing else owns them.
                        fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                let truncated = message.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                (message.bytes, fds, truncated)
            }
            // No more: EAGAIN while the sender lives, end of file (0, nothing) once it is gone.
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if length == 0 && fds.is_empty() {
            break;
        }
        let name = String::from_utf8_lossy(&name[..length]).into_owned();
        match fds.into_iter().next() {
            Some(fd) if !truncated => entries.push((name, fd)),
            _ => warn!(name, "a queued output pipe came back incomplete (too many open files?): skipped"),
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// What the vault asked of the fd store, in order, with a duplicate of each added descriptor.
    #[derive(Default)]
    struct RecordingStore(RefCell<Vec<(String, Option<OwnedFd>)>>);

    impl FdStore for RecordingStore {
        fn add(&self, name: &str, fd: BorrowedFd<'_>) {
            self.0.borrow_mut().push((format!("add {name}"), Some(fd.try_clone_to_owned().unwrap())));
        }

        fn remove(&self, name: &str) {
            self.0.borrow_mut().push((format!("remove {name}"), None));
        }
    }

    impl RecordingStore {
        fn ops(&self) -> Vec<String> {
            self.0.borrow().iter().map(|(op, _)| op.clone()).collect()
        }

        /// The fd store as systemd would hand it back: the added entries not removed since.
        fn handed_back(&self) -> Vec<(String, OwnedFd)> {
            let mut entries: Vec<(String, OwnedFd)> = Vec::new();
            for (op, fd) in self.0.borrow().iter() {
                match (op.split_once(' '), fd) {
                    (Some(("add", name)), Some(fd)) => entries.push((name.to_string(), fd.try_clone().unwrap())),
                    (Some(("remove", name)), None) => entries.retain(|(stored, _)| stored != name),
                    _ => unreachable!(),
                }
            }
            entries
        }

        /// The stored queues' ends, as the daemon passes them to recover.
        fn queues(&self) -> Vec<(String, OwnedFd)> {
            self.handed_back().into_iter().filter(|(name, _)| OutputVault::is_stored_queue(name)).collect()
        }
    }

    /// Pipes named `c<i>-stdout`: (name, read end, write end).
    fn pipes(count: usize) -> Vec<(String, OwnedFd, OwnedFd)> {
        (0..count)
            .map(|i| {
                let (read, write) = nix::unistd::pipe().unwrap();
                (format!("c{i}-stdout"), read, write)
            })
            .collect()
    }

    /// Whether `found` is the read end of the pipe whose write end is `write`.
    fn same_pipe(found: &OwnedFd, write: &OwnedFd) -> bool {
        nix::unistd::write(write, b"x").unwrap();
        let mut byte = [0u8; 1];
        nix::unistd::read(found, &mut byte).unwrap() == 1
    }

    #[test]
    fn read_ends_come_back_from_a_stored_queue_that_reading_leaves_whole() {
        let pipes = pipes(3);
        let store = RecordingStore::default();
        let mut vault = OutputVault::new();
        for (name, read, _) in &pipes {
            vault.keep(name, read.as_fd(), &store);
        }
        vault.commit(&store);
        assert_eq!(store.ops(), ["add output-vault-1", "add output-vault-1"], "the queue's two ends for all the pipes");
        // The daemon is killed: its ends (the sender, the duplicates, the read ends) are gone.
        drop(vault);
        let pipes: Vec<(String, OwnedFd)> = pipes.into_iter().map(|(name, _, write)| (name, write)).collect();
        for round in 0..2 {
            let (next, found) = OutputVault::recover(store.queues());
            assert_eq!(found.len(), 3, "round {round}: {:?}", found.keys());
            for (name, write) in &pipes {
                assert!(same_pipe(&found[name], write), "round {round}: {name} is its pipe");
            }
            assert_eq!((next.generation, &next.retired[..]), (2, &["output-vault-1".to_string()][..]));
        }
        // The next daemon keeps them in its own queue, stored before the old one is removed.
        let (mut next, found) = OutputVault::recover(store.queues());
        for (name, fd) in &found {
            next.keep(name, fd.as_fd(), &store);
        }
        next.commit(&store);
        assert_eq!(store.ops()[2..], ["add output-vault-2", "add output-vault-2", "remove output-vault-1"]);
        let (_, again) = OutputVault::recover(store.queues());
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn dead_entries_go_with_a_rebuild_stored_before_the_old_queue_leaves() {
        let pipes = pipes(REBUILD_AT_DEAD + 6);
        let store = RecordingStore::default();
        let mut vault = OutputVault::new();
        for (name, read, _) in &pipes {
            vault.keep(name, read.as_fd(), &store);
        }
        vault.commit(&store);
        let (gone, kept) = pipes.split_at(REBUILD_AT_DEAD);
        for (name, _, _) in gone {
            vault.forget(name, &store);
        }
        let expected = ["add output-vault-1", "add output-vault-1", "add output-vault-2", "add output-vault-2"];
        assert_eq!(store.ops(), [&expected[..], &["remove output-vault-1"]].concat());
        let (next, found) = OutputVault::recover(store.queues());
        assert_eq!(next.generation, 3);
        let mut names: Vec<&String> = found.keys().collect();
        names.sort();
        let mut expected: Vec<&String> = kept.iter().map(|(name, _, _)| name).collect();
        expected.sort();
        assert_eq!(names, expected, "the live entries only");
        for (name, _, write) in kept {
            assert!(same_pipe(&found[name], write), "{name} is its pipe");
        }
    }

    #[test]
    fn read_ends_the_queue_has_no_room_for_go_to_the_fd_store_itself() {
        let pipes = pipes(40);
        let store = RecordingStore::default();
        let mut vault = OutputVault::new();
        vault.room = 4096;
        vault.queue = Some(Queue::new(vault.room).unwrap());
        for (name, read, _) in &pipes {
            vault.keep(name, read.as_fd(), &store);
        }
        vault.commit(&store);
        let direct: Vec<String> =
            store.ops().into_iter().filter_map(|op| op.strip_prefix("add c").map(|n| format!("c{n}"))).collect();
        assert!(!direct.is_empty() && direct.len() < 40, "{} of 40 in the fd store itself", direct.len());
        assert!(vault.in_fd_store(&direct[0]));
        let (_, found) = OutputVault::recover(store.queues());
        assert_eq!(found.len() + direct.len(), 40, "every pipe kept once, queued or stored");
        vault.forget(&direct[0], &store);
        assert_eq!(store.ops().last().unwrap(), &format!("remove {}", direct[0]));
        assert!(!vault.in_fd_store(&direct[0]));
    }
}
