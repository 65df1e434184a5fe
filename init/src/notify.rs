//! sd_notify to `$NOTIFY_SOCKET`, written with a plain unix datagram socket, each message
//! followed by a barrier so that systemd has processed it before init goes on.

use std::ffi::OsString;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket};

use crate::{Context, Error, Result, errno_desc};

/// How long systemd may take to process a message before init gives up waiting for it.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(25);

/// A socket to systemd's `$NOTIFY_SOCKET`, or nothing when init runs by hand. Created before
/// init enters the container's namespaces: an abstract address is looked up in the network
/// namespace of the socket.
#[derive(Debug)]
pub(crate) struct Notifier {
    target: Option<(OwnedFd, UnixAddr, OsString)>,
}

impl Notifier {
    pub(crate) fn open() -> Result<Notifier> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(Notifier { target: None }) };
        let bytes = path.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => UnixAddr::new_abstract(&bytes[1..]),
            Some(b'/') => UnixAddr::new(bytes),
            _ => return Err(Error::new(format!("NOTIFY_SOCKET {path:?} is neither a path nor an abstract name"))),
        }
        .ctx(|| format!("notify socket {path:?}"))?;
        let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .ctx(|| "create notify socket".into())?;
        Ok(Notifier { target: Some((sock, addr, path)) })
    }

    /// Sends `message` (e.g. "MAINPID=42" or "READY=1") and waits until systemd has processed it.
    pub(crate) fn notify(&self, message: &str) -> Result<()> {
        let Some((sock, addr, path)) = &self.target else { return Ok(()) };
        send(sock, addr, path, message)
    }
}

fn send(sock: &OwnedFd, addr: &UnixAddr, path: &OsString, message: &str) -> Result<()> {
    let addr = Some(addr);
    sendmsg(sock.as_raw_fd(), &[IoSlice::new(message.as_bytes())], &[], MsgFlags::empty(), addr)
        .ctx(|| format!("send {message:?} to systemd at {path:?}"))?;

    // The barrier (sd_notify_barrier): systemd closes the fd it receives once it has processed
    // every message before it.
    let (barrier_r, barrier_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "create barrier pipe".into())?;
    let fds = [barrier_w.as_raw_fd()];
    sendmsg(
        sock.as_raw_fd(),
        &[IoSlice::new(b"BARRIER=1")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        addr,
    )
    .ctx(|| format!("send BARRIER=1 to systemd at {path:?}"))?;
    drop(barrier_w);
    let mut pollfd = libc::pollfd { fd: barrier_r.as_fd().as_raw_fd(), events: 0, revents: 0 };
    let timeout = BARRIER_TIMEOUT.as_millis() as libc::c_int;
    loop {
        // SAFETY: one valid pollfd, owned by this frame, for the duration of the call.
        let n = unsafe { libc::poll(&mut pollfd, 1, timeout) };
        match n {
            1.. => return Ok(()),
            0 => return Err(Error::new(format!("systemd did not process {message:?} within {BARRIER_TIMEOUT:?}"))),
            _ => {
                let errno = nix::errno::Errno::last();
                if errno != nix::errno::Errno::EINTR {
                    return Err(Error::new(format!("wait for systemd to process {message:?}: {}", errno_desc(errno))));
                }
            }
        }
    }
}
