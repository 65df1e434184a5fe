//! The daemon's frequent helper processes (exec-in, at every ExecSync and exec session) are
//! started by one thread that has a file descriptor table of its own, nearly empty.
//!
//! Why: a new process gets a copy of its creator's descriptor table, which exec then closes one
//! descriptor at a time. The daemon holds about 8 descriptors per running container (output
//! pipes, spool files, a pidfd), so at 1000 pods every ExecSync copied and closed some 8000 of
//! them: measured in isolation on a 2-CPU VM, `posix_spawn` of `/bin/true` took 3.5 ms with
//! 8000 descriptors open against 0.9 ms with a few. The spawner thread leaves the shared table
//! at start (`unshare(CLONE_FILES)`), closes its copies of everything but its socket, and
//! receives with each request the four descriptors the child needs (SCM_RIGHTS): the child is
//! then a copy of a table of eight. The child is still the daemon's (threads share their
//! children), so the caller waits for it as for any other.
//!
//! A request is the program's path and its arguments, NUL-terminated, and exactly four
//! descriptors: the child's fds 0, 1, 2 and 3; the answer is the child's pid, or an errno. The
//! spawn itself is `posix_spawn(3)`: no fork of the daemon's memory, the signal mask empty and
//! SIGPIPE at its default (the daemon ignores it), the daemon's environment.
//! Spawns go through the thread one at a time (a posix_spawn returns once the child has exec'd,
//! about 1 ms). If the thread cannot be made, or is gone, the caller's own thread spawns (the
//! same call, a bigger table).

use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, socketpair,
};
use nix::unistd::Pid;
use tracing::warn;

/// The descriptors a child gets, as its fds 0 to 3.
pub(crate) const CHILD_FDS: usize = 4;
/// The largest request (a path and arguments; exec commands are capped at 64 KiB).
const MAX_REQUEST: usize = 192 * 1024;

/// The daemon's end of the spawner thread's socket; `None` if the thread could not be made.
static SPAWNER: OnceLock<Option<Mutex<OwnedFd>>> = OnceLock::new();

/// Starts `path` with `args` (argv, the program first) and `fds` as its fds 0 to 3: through
/// the spawner thread, or from this thread if there is none (or it is gone).
pub(crate) fn spawn(path: &CString, args: &[CString], fds: [BorrowedFd<'_>; CHILD_FDS]) -> Result<Pid, Errno> {
    if let Some(socket) = SPAWNER.get_or_init(start_thread) {
        let socket = socket.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match ask(&socket, path, args, fds) {
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN | Errno::EPROTO) => {
                warn!("the spawner thread is gone: spawning from the caller's thread");
            }
            answer => return answer,
        }
    }
    spawn_here(path, args, &fds.map(|fd| fd.as_raw_fd()))
}

/// Makes the spawner thread; `None` (said) if it cannot be.
fn start_thread() -> Option<Mutex<OwnedFd>> {
    let made = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(std::io::Error::from)
        .and_then(|(ours, theirs)| {
            std::thread::Builder::new().name("spawner".into()).spawn(move || serve(theirs))?;
            Ok(ours)
        });
    match made {
        Ok(ours) => Some(Mutex::new(ours)),
        Err(e) => {
            warn!("no spawner thread ({e}): helpers are spawned with the daemon's whole descriptor table");
            None
        }
    }
}

/// The daemon's side of a request.
fn ask(socket: &OwnedFd, path: &CString, args: &[CString], fds: [BorrowedFd<'_>; CHILD_FDS]) -> Result<Pid, Errno> {
    let mut request =
        Vec::with_capacity(path.as_bytes().len() + args.iter().map(|a| a.as_bytes().len() + 1).sum::<usize>() + 1);
    for part in std::iter::once(path).chain(args) {
        request.extend_from_slice(part.as_bytes_with_nul());
    }
    if request.len() > MAX_REQUEST {
        return Err(Errno::E2BIG);
    }
    let raw = fds.map(|fd| fd.as_raw_fd());
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(socket.as_raw_fd(), &[IoSlice::new(&request)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    let mut answer = [0u8; 8];
    loop {
        match nix::sys::socket::recv(socket.as_raw_fd(), &mut answer, MsgFlags::empty()) {
            Ok(8) => break,
            Ok(_) => return Err(Errno::EPROTO),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    let value = i64::from_le_bytes(answer);
    if value > 0 { Ok(Pid::from_raw(value as i32)) } else { Err(Errno::from_raw(-value as i32)) }
}

/// The thread: leaves the daemon's descriptor table, keeps only stdio and its socket (as fd 3),
/// then answers requests until the daemon's end closes.
fn serve(socket: OwnedFd) {
    use std::os::fd::IntoRawFd;
    let mut socket_fd = socket.into_raw_fd();
    match nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES) {
        // Still correct, only as costly as spawning from any other thread.
        Err(e) => warn!("spawner: cannot have a descriptor table of its own: {e}"),
        Ok(()) => {
            // SAFETY: this thread's table is its own now, so these calls change no other
            // thread's descriptors: the socket becomes fd 3 (close-on-exec), and every
            // descriptor above 3 (the daemon's, copied by unshare) is closed.
            unsafe {
                if socket_fd != 3 && libc::dup3(socket_fd, 3, libc::O_CLOEXEC) == 3 {
                    libc::close(socket_fd);
                    socket_fd = 3;
                }
                libc::syscall(libc::SYS_close_range, socket_fd as u32 + 1, u32::MAX, 0u32);
            }
        }
    }
    let mut request = vec![0u8; MAX_REQUEST];
    loop {
        let mut space = nix::cmsg_space!([RawFd; CHILD_FDS]);
        let mut iov = [IoSliceMut::new(&mut request)];
        let (length, fds) = match recvmsg::<()>(socket_fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(message) => {
                let mut fds = Vec::new();
                for cmsg in message.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: the kernel just installed these in this thread's table.
                        fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                (message.bytes, fds)
            }
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        if length == 0 && fds.is_empty() {
            return; // the daemon's end is gone
        }
        let answer = match (parse(&request[..length]), <[OwnedFd; CHILD_FDS]>::try_from(fds)) {
            (Some((path, args)), Ok(fds)) => match spawn_here(&path, &args, &fds.each_ref().map(AsRawFd::as_raw_fd)) {
                Ok(pid) => i64::from(pid.as_raw()),
                Err(e) => -(e as i64),
            },
            _ => -(Errno::EINVAL as i64),
        };
        if nix::sys::socket::send(socket_fd, &answer.to_le_bytes(), MsgFlags::MSG_NOSIGNAL).is_err() {
            return;
        }
    }
}

/// A request's path and arguments.
fn parse(request: &[u8]) -> Option<(CString, Vec<CString>)> {
    let mut parts = request.strip_suffix(b"\0")?.split(|&b| b == 0).map(|part| CString::new(part).ok());
    let path = parts.next()??;
    let args = parts.collect::<Option<Vec<_>>>()?;
    Some((path, args))
}

/// `posix_spawn` of `path` with `fds` as the child's fds 0 to 3.
fn spawn_here(path: &CString, args: &[CString], fds: &[RawFd; CHILD_FDS]) -> Result<Pid, Errno> {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
    use nix::sys::signal::{SigSet, Signal};
    use std::os::unix::ffi::OsStrExt;
    let envp: Vec<CString> = std::env::vars_os()
        .filter_map(|(key, value)| CString::new([key.as_bytes(), b"=", value.as_bytes()].concat()).ok())
        .collect();
    let mut actions = PosixSpawnFileActions::init()?;
    // In order 0 to 3: sources are never 0-2 (the daemon's stdio), so the only source a dup can
    // replace is fd 3, which is copied to 0-2 before the last dup replaces it.
    for (target, &fd) in fds.iter().enumerate() {
        actions.add_dup2(fd, target as RawFd)?;
    }
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_flags(PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF)?;
    attr.set_sigmask(&SigSet::empty())?;
    let mut defaults = SigSet::empty();
    defaults.add(Signal::SIGPIPE);
    attr.set_sigdefault(&defaults)?;
    posix_spawn(path.as_c_str(), &actions, &attr, args, &envp)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn children_come_from_a_thread_whose_table_holds_only_stdio_and_its_socket() {
        // Many open descriptors, as in a daemon with many containers.
        let held: Vec<(OwnedFd, OwnedFd)> = (0..500).map(|_| nix::unistd::pipe().unwrap()).collect();
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let path = CString::new("/bin/sh").unwrap();
        let args = ["sh", "-c", "echo spawned >&3"].map(|a| CString::new(a).unwrap());
        let pid = spawn(&path, &args, [null.as_fd(), null.as_fd(), null.as_fd(), write.as_fd()]).unwrap();
        drop(write);
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 0));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut text).unwrap();
        assert_eq!(text, "spawned\n", "the fourth descriptor is the child's fd 3");
        let spawner = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .find(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == "spawner"))
            .expect("the spawner thread");
        let fds: Vec<String> = std::fs::read_dir(spawner.path().join("fd"))
            .unwrap()
            .flatten()
            .map(|fd| fd.file_name().to_string_lossy().into_owned())
            .collect();
        let shown = &fds[..fds.len().min(8)];
        assert!(
            fds.len() <= 4,
            "{} in the spawner's table ({shown:?}...) while this process holds {}",
            fds.len(),
            held.len() * 2
        );
    }

    #[test]
    fn concurrent_spawns_each_get_their_own_descriptors() {
        let threads: Vec<_> = (0..8)
            .map(|thread| {
                std::thread::spawn(move || {
                    for round in 0..10 {
                        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
                        let null = std::fs::File::open("/dev/null").unwrap();
                        let path = CString::new("/bin/sh").unwrap();
                        let script = format!("echo {thread}-{round}");
                        let args =
                            [CString::new("sh").unwrap(), CString::new("-c").unwrap(), CString::new(script).unwrap()];
                        let pid =
                            spawn(&path, &args, [null.as_fd(), write.as_fd(), null.as_fd(), null.as_fd()]).unwrap();
                        drop(write);
                        nix::sys::wait::waitpid(pid, None).unwrap();
                        let mut text = String::new();
                        std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut text).unwrap();
                        assert_eq!(text, format!("{thread}-{round}\n"));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn requests_are_parsed_or_refused() {
        let (path, args) = parse(b"/bin/x\0a\0b\0").unwrap();
        assert_eq!((path.as_bytes(), args.len()), (&b"/bin/x"[..], 2));
        assert!(parse(b"/bin/x\0a").is_none(), "not NUL-terminated");
    }
}
