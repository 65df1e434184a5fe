//! mount_setattr(2), the one call of the new mount API that rustix (and nix) do not wrap.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// Sets `attr_set` (`libc::MOUNT_ATTR_*`) on the mount at `path` relative to `dirfd` (flags
/// `AT_EMPTY_PATH`: the mount of `dirfd` itself; `AT_RECURSIVE`: its submounts too). `userns`:
/// the user namespace of `MOUNT_ATTR_IDMAP`.
pub(crate) fn mount_setattr(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_uint,
    attr_set: u64,
    userns: Option<BorrowedFd<'_>>,
) -> nix::Result<()> {
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |fd| fd.as_raw_fd() as u64),
    };
    // SAFETY: a valid fd (or AT_FDCWD), a NUL-terminated path and a mount_attr of the size
    // passed, all alive for the duration of the call; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd.as_raw_fd(),
            path.as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    Errno::result(rc).map(drop)
}
