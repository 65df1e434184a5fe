//! The error of init, exec-in and pod-init: what was being done, and why, in one line (it ends up
//! in the container's status message, so it reads as runc's do: lowercase, errno as Go spells it).

use std::path::PathBuf;

use nix::errno::Errno;

/// A failure of the init step, naming the step or path that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed while doing `what`: "mount proc on /proc: permission denied".
    #[error("{what}: {}", errno_desc(*source))]
    Sys {
        what: String,
        #[source]
        source: Errno,
    },
    /// A file operation failed while doing `what`, the cause as the kernel names it.
    #[error("{what}: {}", io_desc(source))]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A file (of a cgroup, of a process in /proc) could not be read or written, the cause as
    /// std words it.
    #[error("{what}: {source}")]
    File {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A system call failed in a step whose caller says what it was.
    #[error("{}", errno_desc(*.0))]
    Errno(#[source] Errno),
    /// The init spec file is not an init spec.
    #[error("parse init spec {}: {source}", path.display())]
    ParseSpec {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The spec asks for what init cannot or will not do (checked before anything is changed).
    #[error("{0}")]
    Invalid(String),
    /// A step failed for the reason it gives (or the container process reported).
    #[error("{0}")]
    Failed(String),
    /// `source`, with what was being done around it.
    #[error("{what}: {source}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    pub(crate) fn new(message: impl Into<String>) -> Error {
        Error::Failed(message.into())
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::Invalid(message.into())
    }

    /// This error, with what was being done when it happened: `"cgroup on /sys/fs/cgroup: ..."`.
    pub(crate) fn context(self, what: impl Into<String>) -> Error {
        Error::Context { what: what.into(), source: Box::new(self) }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An errno as Go (and so runc) spells it: "no such file or directory".
pub fn errno_desc(errno: Errno) -> String {
    let desc = errno.desc();
    let mut chars = desc.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("errno {}", errno as i32),
    }
}

pub(crate) fn io_desc(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => errno_desc(Errno::from_raw(code)),
        None => e.to_string(),
    }
}

/// Adds what was being done to a system error: `"mount proc on /proc: permission denied"`.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, Errno> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys { what: what(), source })
    }
}

impl<T> Context<T> for std::result::Result<T, rustix::io::Errno> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Sys { what: what(), source: Errno::from_raw(e.raw_os_error()) })
    }
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { what: what(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_runc_words_them() {
        let sys: Result<()> = Err(Errno::EACCES).ctx(|| "mount proc on /proc".into());
        assert_eq!(sys.unwrap_err().to_string(), "mount proc on /proc: permission denied");
        let io: Result<()> = Err(std::io::Error::from_raw_os_error(libc::ENOENT)).ctx(|| "read x".into());
        assert_eq!(io.unwrap_err().to_string(), "read x: no such file or directory");
        let nested =
            Error::Sys { what: "mount cgroup2".into(), source: Errno::EPERM }.context("cgroup on /sys/fs/cgroup");
        assert_eq!(nested.to_string(), "cgroup on /sys/fs/cgroup: mount cgroup2: operation not permitted");
    }
}
