/// Errors of the runtime. The daemon maps each variant to a gRPC code in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("systemd is unreachable over the system bus at {address}: {reason}")]
    SystemdUnreachable { address: String, reason: String },
    #[error("systemd cannot {action} unit {unit}: {reason}")]
    Unit { unit: String, action: &'static str, reason: String },
    #[error("systemd: {0}")]
    Bus(#[from] zbus::Error),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A deadline of the request passed (ExecSync's timeout).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A command could not be run in a container for a reason other than the request's.
    #[error("{0}")]
    Exec(String),
    /// A pool (of user namespace id ranges) has nothing left.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// Attaching a pod to its network or detaching it (a CNI plugin's own message included).
    #[error(transparent)]
    Network(#[from] crate::cni::CniError),
    /// Teardown that kept going past failures reports them all at once.
    #[error("{what}: {}", .errors.join("; "))]
    Teardown { what: String, errors: Vec<String> },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
