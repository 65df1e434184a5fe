//! Library errors -> gRPC status codes, in one place for both CRI services. The libraries say
//! what kind of failure each error is (`kind()`); only this module knows gRPC.

use tonic::Status;

/// The status of a runtime error (pods, containers, systemd, CNI).
pub fn runtime_status(error: runtime::Error) -> Status {
    use runtime::ErrorKind as K;
    let message = error.to_string();
    match error.kind() {
        K::InvalidArgument => Status::invalid_argument(message),
        K::NotFound => Status::not_found(message),
        K::AlreadyExists => Status::already_exists(message),
        K::FailedPrecondition => Status::failed_precondition(message),
        K::ResourceExhausted => Status::resource_exhausted(message),
        // The kubelet reads DeadlineExceeded from ExecSync as a timed-out probe.
        K::DeadlineExceeded => Status::deadline_exceeded(message),
        K::Unavailable => Status::unavailable(message),
        // Another program's failure (a CNI plugin), as containerd reports it.
        K::External => Status::unknown(message),
        K::Internal => Status::internal(message),
    }
}

/// The status of an image store error.
pub fn image_status(error: imagestore::Error) -> Status {
    use imagestore::ErrorKind as K;
    let message = error.to_string();
    match error.kind() {
        K::NotFound => Status::not_found(message),
        K::InvalidArgument => Status::invalid_argument(message),
        K::Unauthenticated => Status::unauthenticated(message),
        K::PermissionDenied => Status::permission_denied(message),
        K::Unavailable => Status::unavailable(message),
        K::FailedPrecondition => Status::failed_precondition(message),
        K::ResourceExhausted => Status::resource_exhausted(message),
        K::Internal => Status::internal(message),
    }
}

/// Errors of the node layer (runtime and image store together): each library's own mapping.
pub fn node_status(error: crate::node::NodeError) -> Status {
    use crate::node::NodeError as N;
    match error {
        N::Runtime(e) => runtime_status(e),
        N::Images(e) => image_status(e),
        N::ImageNotFound(_) | N::ImageVolumeNotFound { .. } => Status::not_found(error.to_string()),
        N::Task(_) => Status::internal(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use runtime::{CniCommand, CniError, Error};
    use tonic::Code;

    use super::runtime_status;

    /// The codes clients rely on (critest and the kubelet check NotFound for removed containers,
    /// InvalidArgument for bad configs, DeadlineExceeded for a timed-out ExecSync probe).
    #[test]
    fn runtime_errors_keep_their_grpc_codes() {
        let io = || std::io::Error::other("disk");
        let plugin = |code| CniError::Plugin {
            plugin: "bridge".into(),
            command: CniCommand::Add,
            code,
            msg: "m".into(),
            details: String::new(),
        };
        let cases: Vec<(Error, Code)> = vec![
            (Error::InvalidSpec("container config has no metadata.name".into()), Code::InvalidArgument),
            (Error::AmbiguousId { what: "pod", prefix: "ab".into() }, Code::InvalidArgument),
            (Error::PodNotFound { id: "x".into() }, Code::NotFound),
            (Error::ContainerNotFound { id: "x".into() }, Code::NotFound),
            (Error::PodExists("p".into()), Code::AlreadyExists),
            (Error::ContainerExists("c".into()), Code::AlreadyExists),
            (Error::PodNotReady { id: "x".into() }, Code::FailedPrecondition),
            (Error::StartFailed { id: "x".into(), message: "no such file".into() }, Code::FailedPrecondition),
            (Error::ContainerState("container x is not running".into()), Code::FailedPrecondition),
            (Error::NotSealed, Code::FailedPrecondition),
            (Error::IdRangesExhausted("all 1 ranges".into()), Code::ResourceExhausted),
            (Error::ExecTimeout("timed out".into()), Code::DeadlineExceeded),
            (Error::SystemdUnreachable { address: "a".into(), reason: "r".into() }, Code::Unavailable),
            (Error::Network(CniError::NotReady("no config".into())), Code::FailedPrecondition),
            (Error::Network(plugin(11)), Code::Unavailable),
            (Error::Network(plugin(7)), Code::Unknown),
            (Error::Io { what: "cannot write pod record".into(), source: io() }, Code::Internal),
            (Error::Teardown { what: "cannot release pod x".into(), errors: vec![Error::NotSealed] }, Code::Internal),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let status = runtime_status(error);
            assert_eq!((status.code(), status.message()), (code, message.as_str()));
        }
    }

    #[test]
    fn teardown_names_every_failure() {
        let error = Error::Teardown {
            what: "cannot release pod x".into(),
            errors: vec![
                Error::Unit { unit: "a.slice".into(), action: "stop", reason: "job result \"failed\"".into() },
                Error::Io { what: "unmount /run/x/shm".into(), source: std::io::Error::other("busy") },
            ],
        };
        assert_eq!(
            error.to_string(),
            "cannot release pod x: systemd cannot stop unit a.slice: job result \"failed\"; unmount /run/x/shm: busy"
        );
    }
}
