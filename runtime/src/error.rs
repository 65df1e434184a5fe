//! The runtime's error type: one variant per thing that went wrong, with lowercase messages that
//! name it, and a [`ErrorKind`] for the daemon to map to a gRPC code in one place.

/// How an [`Error`] is reported to a client; the daemon maps each kind to one gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong: a bad config, an ambiguous id.
    InvalidArgument,
    /// The pod or container does not exist.
    NotFound,
    /// The pod or container the request would create exists already.
    AlreadyExists,
    /// The request is fine but the pod, the container or the node is not in a state to do it.
    FailedPrecondition,
    /// A pool (of user namespace id ranges) has nothing left.
    ResourceExhausted,
    /// A deadline of the request passed (ExecSync's timeout).
    DeadlineExceeded,
    /// systemd (or the system bus) cannot be reached; or another program asks to be tried again.
    Unavailable,
    /// Another program (a CNI plugin) failed: not this daemon's fault, nor the request's.
    External,
    /// A bug or a local system failure (disk, mounts, systemd refusing a job).
    Internal,
}

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("systemd is unreachable over the system bus at {address}: {reason}")]
    SystemdUnreachable { address: String, reason: String },
    #[error("systemd cannot {action} unit {unit}: {reason}")]
    Unit { unit: String, action: &'static str, reason: String },
    #[error("systemd: {0}")]
    Bus(#[from] zbus::Error),
    /// A pod or container config that cannot be run as given (the message names the field).
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{what} id prefix {prefix:?} is ambiguous")]
    AmbiguousId { what: &'static str, prefix: String },
    #[error("pod sandbox {id:?} not found")]
    PodNotFound { id: String },
    #[error("container {id:?} not found")]
    ContainerNotFound { id: String },
    /// The same pod attempt exists (not ready: a retry cannot be given it).
    #[error("{0}")]
    PodExists(String),
    /// The same container name and attempt exist in the pod.
    #[error("{0}")]
    ContainerExists(String),
    #[error("pod sandbox {id} is not ready")]
    PodNotReady { id: String },
    /// The pod's init process (shared PID namespace) is gone, or its namespaces are.
    #[error("{0}")]
    PodInit(String),
    /// The container is not in a state for the call (not running, not created, no log path).
    #[error("{0}")]
    ContainerState(String),
    /// StartContainer failed; the message is init's (or systemd's).
    #[error("cannot start container {id}: {message}")]
    StartFailed { id: String, message: String },
    /// The node cannot do what the request asks (no AppArmor, no hugetlb, a CPU it lacks).
    #[error("{0}")]
    NodeUnsupported(String),
    /// Host ids a pod's user namespace would use are another pod's.
    #[error("{0}")]
    IdRangeInUse(String),
    #[error("no free user namespace id range: {0}")]
    IdRangesExhausted(String),
    #[error("the daemon's binary is not sealed (sealed_exe::seal was not called at start)")]
    NotSealed,
    /// ExecSync's timeout passed (the command was killed).
    #[error("{0}")]
    ExecTimeout(String),
    /// A command could not be run in a container for a reason other than the request's.
    #[error("{0}")]
    Exec(String),
    /// A container init's files (init spec) cannot be used.
    #[error("{0}")]
    InitSpec(String),
    /// The start gate (measured starts) refused the start: nothing was started.
    #[error("start refused: {0}")]
    StartRefused(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// Attaching a pod to its network or detaching it (a CNI plugin's own message included).
    #[error(transparent)]
    Network(#[from] crate::cni::CniError),
    /// Teardown that kept going past failures reports them all at once.
    #[error("{what}: {}", join(.errors))]
    Teardown { what: String, errors: Vec<Error> },
}

fn join(errors: &[Error]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl Error {
    /// The class of this error, for the daemon to map to a gRPC status code in one place.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidSpec(_) | Error::AmbiguousId { .. } => ErrorKind::InvalidArgument,
            Error::PodNotFound { .. } | Error::ContainerNotFound { .. } => ErrorKind::NotFound,
            Error::PodExists(_) | Error::ContainerExists(_) => ErrorKind::AlreadyExists,
            Error::PodNotReady { .. }
            | Error::PodInit(_)
            | Error::ContainerState(_)
            | Error::StartFailed { .. }
            | Error::NodeUnsupported(_)
            | Error::IdRangeInUse(_)
            | Error::NotSealed
            | Error::InitSpec(_)
            | Error::StartRefused(_) => ErrorKind::FailedPrecondition,
            Error::IdRangesExhausted(_) => ErrorKind::ResourceExhausted,
            Error::ExecTimeout(_) => ErrorKind::DeadlineExceeded,
            Error::SystemdUnreachable { .. } => ErrorKind::Unavailable,
            Error::Network(cni) => cni.kind(),
            Error::Unit { .. } | Error::Bus(_) | Error::Io { .. } | Error::Teardown { .. } | Error::Exec(_) => {
                ErrorKind::Internal
            }
        }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
