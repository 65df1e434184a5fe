//! Library errors -> gRPC status codes, in one place per library.

use tonic::Status;

pub fn runtime_status(error: runtime::Error) -> Status {
    use runtime::Error as E;
    let message = error.to_string();
    match error {
        E::InvalidArgument(_) => Status::invalid_argument(message),
        E::NotFound(_) => Status::not_found(message),
        E::AlreadyExists(_) => Status::already_exists(message),
        E::FailedPrecondition(_) => Status::failed_precondition(message),
        E::SystemdUnreachable { .. } => Status::unavailable(message),
        // The kubelet reads DeadlineExceeded from ExecSync as a timed-out probe.
        E::DeadlineExceeded(_) => Status::deadline_exceeded(message),
        E::Unit { .. } | E::Bus(_) | E::Io { .. } | E::Teardown { .. } | E::Exec(_) => Status::internal(message),
    }
}
