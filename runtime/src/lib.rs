//! The runtime of cri-systemd: pods as systemd slices and containers as transient systemd services,
//! created over D-Bus. It owns the connection to systemd, pod namespaces, container mounts, user
//! namespaces and networking, and the runtime state under `<state_root>/pods` and `<run_root>`.

mod error;
pub mod init;
mod network;
mod systemd;

pub use error::Error;
pub use network::{CniConfig, NetworkReadiness};
pub use systemd::{ManagerInfo, Systemd};
