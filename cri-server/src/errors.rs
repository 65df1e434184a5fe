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
        E::ResourceExhausted(_) => Status::resource_exhausted(message),
        E::SystemdUnreachable { .. } => Status::unavailable(message),
        E::Network(cni) => cni_status(cni, message),
        // The kubelet reads DeadlineExceeded from ExecSync as a timed-out probe.
        E::DeadlineExceeded(_) => Status::deadline_exceeded(message),
        E::Unit { .. } | E::Bus(_) | E::Io { .. } | E::Teardown { .. } | E::Exec(_) => Status::internal(message),
    }
}

fn cni_status(error: runtime::CniError, message: String) -> Status {
    use runtime::CniError as C;
    match error {
        // The node's network is not set up (yet): the kubelet waits for NetworkReady.
        C::NotReady(_) | C::PluginNotFound { .. } => Status::failed_precondition(message),
        // CNI error code 11: "try again later".
        C::Plugin { code: 11, .. } => Status::unavailable(message),
        // Failures of another program (the plugin), not of this daemon.
        C::Plugin { .. } | C::Failed { .. } | C::Timeout { .. } | C::BadResult { .. } => Status::unknown(message),
        C::Spawn { .. } | C::Cache { .. } | C::BadCacheEntry { .. } => Status::internal(message),
    }
}

/// Errors of the node layer (runtime and image store together): each library's own mapping.
pub fn node_status(error: crate::node::NodeError) -> Status {
    use crate::node::NodeError as N;
    match error {
        N::Runtime(e) => runtime_status(e),
        N::Images(e) => crate::image_service::image_status(e),
        N::ImageNotFound(_) => Status::not_found(error.to_string()),
        N::Task(_) => Status::internal(error.to_string()),
    }
}
