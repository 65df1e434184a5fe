/// Errors of the runtime. The daemon maps each variant to a gRPC code in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("systemd is unreachable over the system bus at {address}: {reason}")]
    SystemdUnreachable { address: String, reason: String },
}
