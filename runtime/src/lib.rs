//! The runtime of cri-systemd: pods as systemd slices and containers as transient systemd services,
//! created over D-Bus. It owns the connection to systemd, pod namespaces, container mounts, user
//! namespaces and networking, and the runtime state under `<state_root>/pods` and `<run_root>`.
//!
//! Concurrency: every pod has a lock of its own held across its slow work (systemd jobs, mounts);
//! the table of pods is locked only to look up or insert an entry, never across slow work.

pub mod apparmor;
pub mod cgroup_detail;
mod cgroup_v1;
pub mod checkpoint;
mod cni;
mod container;
mod containers;
mod error;
mod events;
mod exec;
pub mod exit_record;
#[cfg(test)]
mod fake_systemd;
mod hugetlb;
mod image_volume;
#[cfg(test)]
mod lifecycle_tests;
mod log_spool;
mod logs;
pub mod memory_qos;
mod namespaces;
mod output_vault;
mod passwd;
mod pod;
pub mod pod_mounts;
mod podfiles;
mod pods;
pub mod sealed_exe;
mod seccomp_profile;
pub mod selinux;
mod spawner;
pub mod stats;
mod stdio;
mod store;
pub mod streaming;
mod systemd;
mod userns;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

pub use cni::{CniCommand, CniConfig, CniError, CniObserver, NetworkReadiness};
pub use container::{
    BindMount, Container, ContainerImage, ContainerSpec, ContainerState, Device, DeviceNode, EXTRA_MOUNT_OPTIONS, Hook,
    HugepageLimit, Propagation, Resources, RootfsLayers, Seccomp, SupplementalGroupsPolicy, cgroup_unified,
    parse_cpu_list, signal_name, stop_signal,
};
pub use containers::ContainerFilter;
pub use error::{Error, ErrorKind};
pub use events::{ContainerEvent, ContainerEventKind, EVENT_BUFFER};
pub use exec::ExecSyncOutput;
pub use image_volume::ImageVolume;
pub use passwd::Identity;
// The daemon's ends of containers' stdio: reached from outside only through StreamingRuntime.
pub(crate) use logs::{ContainerOutput, OutputChunk};
pub use namespaces::PodNamespaces;
pub use pod::{DnsConfig, NamespaceMode, Pod, PodResources, PodSpec, PodState, PortMapping};
pub use pods::PodFilter;
pub(crate) use stdio::ContainerStdio;
pub use store::Quarantined;
pub use store::tighten_modes;
pub use streaming::{StreamError, StreamingRuntime, Streams, TerminalSize};
pub use systemd::{ManagerInfo, Systemd, UnitManager, UnitProperties};
pub use userns::{FOREIGN_BASE, IdMapping, IdRange, PodUserns, RANGE_SIZE, UsernsConfig, UsernsMode, known_to_nss};

/// Where the runtime keeps its state.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Persistent records (`pods/<id>/pod.json`).
    pub state_root: PathBuf,
    /// Volatile pod files and namespace pins (`pods/<id>/`).
    pub run_root: PathBuf,
    pub cni: CniConfig,
    /// The pool of host id ranges for pods in user namespaces.
    pub userns: UsernsConfig,
    /// The image store's `layer_uid_shift`: layer files owned by id `n` are stored as
    /// `layer_uid_shift + n`. Containers see them unshifted (or in their pod's range) through
    /// idmapped mounts of the layers.
    pub layer_uid_shift: u32,
    /// Every container unit's TasksMax; 0 for none.
    pub tasks_max: u64,
}

/// The pods and containers of this node.
#[derive(Debug)]
pub struct Runtime {
    config: RuntimeConfig,
    /// systemd's unit manager ([`Systemd`] in the daemon; a fake in unit tests).
    systemd: Arc<dyn UnitManager>,
    /// Pod networking: the CNI plugins, the result cache, the pod CIDRs.
    cni: cni::Cni,
    pods: Mutex<BTreeMap<String, Arc<Entry<Pod>>>>,
    containers: Mutex<BTreeMap<String, Arc<Entry<Container>>>>,
    /// The user namespace id ranges of all pods (rebuilt from the pod records on open).
    userns_ranges: Arc<Mutex<userns::IdRanges>>,
    /// The daemon's ends of running containers' stdin and terminals.
    stdio: stdio::Table,
    /// The read ends of containers' output pipes (containers without a terminal).
    outputs: logs::Table,
    /// Records that startup recovery could not read and moved aside.
    quarantined: Mutex<Vec<store::Quarantined>>,
    /// Container events to every subscriber (GetContainerEvents).
    events: tokio::sync::broadcast::Sender<ContainerEvent>,
    /// Running containers' directories, watched for their exit record (None: inotify failed).
    exit_watch: Option<Arc<events::ExitWatch>>,
    /// Running containers whose main process is to be followed (crate::events), queued until the
    /// exit watcher starts.
    main_process_watch:
        (tokio::sync::mpsc::UnboundedSender<String>, Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>),
    /// What StartContainer asks before a container's unit starts (the daemon's measured starts).
    start_gate: std::sync::OnceLock<Arc<dyn StartGate>>,
    /// Where the pods' pins (but the network's) and /dev/shm mounts are.
    pod_mounts: Arc<pod_mounts::PodMountNamespace>,
}

/// A container about to start: what a [`StartGate`] sees.
#[derive(Debug, Clone)]
pub struct StartingContainer {
    pub container: Container,
    pub pod: Pod,
    /// The container's init spec (`init.json`): the effective command, environment, mounts,
    /// user, capabilities and seccomp filter.
    pub init_spec: std::path::PathBuf,
}

/// Asked by StartContainer once the container can start (it is Created, its pod Ready), before
/// its unit starts: an error refuses the start, which leaves the container Created. The daemon's
/// measured starts (cri-server's `measurements`) record each start here; it runs on a blocking
/// thread, so it may write, fsync and talk to a TPM.
pub trait StartGate: Send + Sync + std::fmt::Debug {
    fn before_start(&self, starting: &StartingContainer) -> Result<(), String>;
}

/// One pod or container: `operation` serialises its lifecycle calls; `record` can be read at any
/// time and always matches what is on disk.
#[derive(Debug)]
struct Entry<T> {
    operation: Arc<tokio::sync::Mutex<()>>,
    record: RwLock<T>,
}

impl<T: Clone> Entry<T> {
    fn new(record: T) -> Arc<Entry<T>> {
        Arc::new(Entry { operation: Default::default(), record: RwLock::new(record) })
    }

    fn get(&self) -> T {
        self.record.read().expect("record lock").clone()
    }

    /// `f` of the record, without cloning it: scans of the tables test each record this way and
    /// clone only those they keep (a clone is the whole spec: labels, env, mounts).
    fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.record.read().expect("record lock"))
    }

    fn set(&self, record: T) {
        *self.record.write().expect("record lock") = record;
    }
}

impl Runtime {
    pub fn systemd(&self) -> &Arc<dyn UnitManager> {
        &self.systemd
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Tells `observer` of every CNI ADD and DEL from now on (the daemon's metrics). Set once.
    pub fn set_cni_observer(&self, observer: Arc<dyn CniObserver>) {
        self.cni.set_observer(observer);
    }

    /// Installs the gate every StartContainer passes (once; a second gate is refused).
    pub fn set_start_gate(&self, gate: Arc<dyn StartGate>) -> Result<(), Error> {
        self.start_gate.set(gate).map_err(|_| Error::StartRefused("a start gate is installed already".into()))
    }
}
