//! Pod lifecycle: RunPodSandbox, StopPodSandbox, RemovePodSandbox, status and listing, and the
//! recovery of pods from disk and systemd when the daemon starts.
//!
//! # The pod's slice
//!
//! The kubelet's systemd driver sends `cgroup_parent` as the slice's expanded path
//! (`/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice`; critest
//! `/test.slice`): the last component is the slice, and the path must be its parents' by systemd's
//! dash-prefix nesting (InvalidArgument otherwise). With `cgroupsPerQOS` the kubelet has started
//! that slice, with the pod's limits, before RunPodSandbox: the pod uses it and the runtime never
//! stops it. A slice the runtime started (none given: `kubepods-besteffort-pod<uid>.slice`; or one
//! that did not exist) is recorded as the pod's (`owns_slice`) and stopped with the last of the
//! runtime's pods in it (critest's pods share one); when the slice stays, teardown stops the pod's
//! init unit itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::mount::MsFlags;
use tracing::{Instrument, error, info, warn};
use zbus::zvariant::Value;

use crate::cni::{self, Cni, NetworkList};
use crate::events::ContainerEventKind;
use crate::namespaces::{self, NewNamespaces};
use crate::pod::{NamespaceMode, Pod, PodSpec, PodState, init_unit_name};
use crate::pod_mounts::PodMountNamespace;
use crate::store::{new_id, read_json, write_json};
use crate::userns::{self, IdRange, IdRanges, PodUserns, UsernsMode};
use crate::{Entry, Error, NetworkReadiness, Runtime, RuntimeConfig, UnitManager, podfiles};
use init::pod_init::{self, PodInitArgs};

/// The size of a pod's /dev/shm, the kubelet's default.
const SHM_SIZE: &str = "size=65536k";

/// Which pods ListPodSandbox wants.
#[derive(Debug, Clone, Default)]
pub struct PodFilter {
    /// A full id or a unique prefix of one.
    pub id: Option<String>,
    pub state: Option<PodState>,
    /// Every pair must be among the pod's labels.
    pub labels: BTreeMap<String, String>,
}

impl Runtime {
    /// Opens the runtime: reads every pod record, rolls half-done operations of a daemon that
    /// died forward or back, and marks pods whose namespaces are gone (after a reboot) NotReady.
    pub async fn open(config: RuntimeConfig, systemd: Arc<dyn UnitManager>) -> Result<Runtime, Error> {
        // Before anything is spawned (CNI plugins on recovery): the stored descriptors are not
        // close-on-exec until taken.
        let stored = crate::stdio::Stored::take();
        let pod_mounts = PodMountNamespace::new(&config.run_root);
        let runtime = Runtime {
            cni: Cni::open(config.cni.clone(), &config.state_root),
            userns_ranges: Arc::new(Mutex::new(IdRanges::new(config.userns.clone()))),
            config,
            systemd,
            pods: Mutex::new(BTreeMap::new()),
            containers: Mutex::new(BTreeMap::new()),
            stdio: Default::default(),
            outputs: Default::default(),
            quarantined: Mutex::new(Vec::new()),
            events: tokio::sync::broadcast::channel(crate::EVENT_BUFFER).0,
            main_process_watch: {
                let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
                (sender, Mutex::new(Some(receiver)))
            },
            exit_watch: match crate::events::ExitWatch::new() {
                Ok(watch) => Some(Arc::new(watch)),
                Err(e) => {
                    warn!("no inotify ({e}): containers that exit by themselves are noticed on status calls only");
                    None
                }
            },
            start_gate: std::sync::OnceLock::new(),
            pod_mounts: Arc::new(pod_mounts),
        };
        *runtime.quarantined.lock().expect("quarantine lock") =
            crate::store::list_quarantined(&runtime.config.state_root);
        let dir = runtime.pods_state_dir();
        crate::store::create_private_dir_all(&dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
        let entries = std::fs::read_dir(&dir).map_err(Error::io(format!("cannot read {}", dir.display())))?;
        let mut half_done = Vec::new();
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let record_path = entry.path().join("pod.json");
            let pod: Pod = match read_json(&record_path) {
                Ok(pod) => pod,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // A record-less dir is what a daemon killed before its first write leaves.
                    warn!("removing pod dir {} without a record", entry.path().display());
                    let _ = std::fs::remove_dir_all(entry.path());
                    continue;
                }
                Err(e) => {
                    let id = entry.file_name().to_string_lossy().into_owned();
                    runtime.quarantine(
                        "pod",
                        &id,
                        &entry.path(),
                        format!("cannot read {}: {e}", record_path.display()),
                    );
                    continue;
                }
            };
            records.push((record_path, pod));
        }
        let ready: Vec<&namespaces::PodNamespaces> =
            records.iter().filter(|(_, pod)| pod.state == PodState::Ready).map(|(_, pod)| &pod.namespaces).collect();
        let mut pinned = namespaces::all_pinned(&ready, &runtime.pod_mounts).into_iter();
        for (record_path, mut pod) in records {
            let lost_pins = pod.state == PodState::Ready && !pinned.next().unwrap_or(false);
            match pod.state {
                // Once every record is in the table: teardown looks for other pods in the slice.
                PodState::Creating | PodState::Removing => half_done.push(pod.id.clone()),
                PodState::Ready if lost_pins => {
                    info!(pod = %pod.id, "pod namespaces are gone (reboot?): pod is NotReady");
                    pod.state = PodState::NotReady;
                    write_json(&record_path, &pod).map_err(Error::io("cannot update pod record"))?;
                }
                _ => {}
            }
            if let Some(userns) = &pod.userns {
                // Two records claiming one range would be a bug; keep both pods and say so.
                let mut ranges = runtime.userns_ranges.lock().expect("userns range lock");
                if let Err(e) = ranges.reserve(&pod.id, userns.range) {
                    warn!(pod = %pod.id, "recorded user namespace range: {e}");
                }
            }
            runtime.insert_entry(pod);
        }
        for id in half_done {
            let Some(entry) = runtime.entry(&id)? else { continue };
            let mut pod = entry.get();
            info!(pod = %pod.id, state = ?pod.state, "finishing the removal of a pod left half-done");
            // Killed between the slice's start and the record of it: the slice's Description
            // names the pod that started it (a kubelet's slice is never stopped by the runtime).
            if pod.state == PodState::Creating && !pod.owns_slice {
                match runtime.systemd.unit_description(&pod.slice).await {
                    Ok(description) => {
                        pod.owns_slice = description.as_deref() == Some(slice_description(&pod).as_str())
                    }
                    Err(e) => warn!(pod = %pod.id, "cannot tell who started slice {}: {e}; it stays", pod.slice),
                }
            }
            match runtime.teardown(&pod, true).await {
                Ok(()) => {
                    runtime.pods.lock().expect("pod table lock").remove(&id);
                }
                // Kept (as Removing, unlisted) so that RemovePodSandbox or the next start can
                // finish the job.
                Err(e) => {
                    warn!(pod = %pod.id, "{e}; will try again");
                    pod.state = PodState::Removing;
                    entry.set(pod);
                }
            }
        }
        runtime.recover_containers(stored).await?;
        // A quarantined pod's init (shared PID namespace) runs in its user namespace, with or
        // without containers.
        let quarantined_pods: Vec<String> =
            runtime.quarantined().into_iter().filter(|q| q.kind == "pod").map(|q| q.id).collect();
        for id in quarantined_pods {
            runtime.reserve_quarantined_userns(&id, &init_unit_name(&id)).await;
        }
        runtime.check_next_userns_range();
        Ok(runtime)
    }

    /// Sets aside the directory of a record that cannot be read (never deletes it: the record may
    /// be the only trace of a pod whose containers still run) and says so in the journal and in
    /// [`Runtime::quarantined`]. If even the move fails, the directory stays where it is, unlisted.
    pub(crate) fn quarantine(&self, kind: &str, id: &str, dir: &Path, reason: String) {
        match crate::store::quarantine(&self.config.state_root, kind, id, dir, &reason) {
            Ok(moved) => {
                error!(kind, id, path = %moved.path.display(), "{reason}: record moved to quarantine, its containers left running");
                self.quarantined.lock().expect("quarantine lock").push(moved);
            }
            Err(e) => {
                error!(kind, id, "{reason}; cannot move {} to quarantine ({e}): left in place, ignored", dir.display());
                let path = dir.to_path_buf();
                let reason = format!("{reason}; not moved to quarantine: {e}");
                let kept = crate::store::Quarantined { kind: kind.into(), id: id.into(), path, reason };
                self.quarantined.lock().expect("quarantine lock").push(kept);
            }
        }
    }

    /// The records startup recovery could not read, now or at an earlier start, and set aside
    /// (Status' verbose info lists them).
    pub fn quarantined(&self) -> Vec<crate::store::Quarantined> {
        self.quarantined.lock().expect("quarantine lock").clone()
    }

    /// Whether pod `id`'s record was set aside: its containers are kept as they are.
    pub(crate) fn pod_quarantined(&self, id: &str) -> bool {
        self.quarantined.lock().expect("quarantine lock").iter().any(|q| q.kind == "pod" && q.id == id)
    }

    fn pods_state_dir(&self) -> PathBuf {
        self.config.state_root.join("pods")
    }

    fn pod_state_dir(&self, id: &str) -> PathBuf {
        self.pods_state_dir().join(id)
    }

    fn pod_run_dir(&self, id: &str) -> PathBuf {
        self.config.run_root.join("pods").join(id)
    }

    fn insert_entry(&self, pod: Pod) -> Arc<Entry<Pod>> {
        let entry = Entry::new(pod.clone());
        self.pods.lock().expect("pod table lock").insert(pod.id.clone(), entry.clone());
        entry
    }

    fn save(&self, entry: &Entry<Pod>, pod: Pod) -> Result<(), Error> {
        write_json(&self.pod_state_dir(&pod.id).join("pod.json"), &pod)
            .map_err(Error::io("cannot write pod record"))?;
        entry.set(pod);
        Ok(())
    }

    /// Finds a pod by full id or unique id prefix.
    fn entry(&self, id: &str) -> Result<Option<Arc<Entry<Pod>>>, Error> {
        let pods = self.pods.lock().expect("pod table lock");
        if let Some(entry) = pods.get(id) {
            return Ok(Some(entry.clone()));
        }
        if id.is_empty() {
            return Ok(None);
        }
        let mut matches = pods.range(id.to_string()..).take_while(|(key, _)| key.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some((_, entry)), None) => Ok(Some(entry.clone())),
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(Error::AmbiguousId { what: "pod", prefix: id.to_string() }),
        }
    }

    /// RunPodSandbox. A second call for the same pod attempt (name, namespace, uid, attempt)
    /// while the first pod is ready returns the same id, so that a kubelet retrying after a timeout
    /// gets the pod it asked for; if that pod is no longer ready, the call fails with AlreadyExists.
    pub async fn run_pod(&self, spec: PodSpec) -> Result<String, Error> {
        spec.validate()?;
        // Read before anything is created; its error only counts for a pod that is created.
        let network = match spec.network {
            NamespaceMode::Node => Ok(None),
            _ => self.cni.network(),
        };
        let (entry, guard, network) = {
            let mut pods = self.pods.lock().expect("pod table lock");
            let same_attempt = pods.values().find(|entry| {
                let pod = entry.record.read().expect("pod record lock");
                let s = &pod.spec;
                s.name == spec.name && s.namespace == spec.namespace && s.uid == spec.uid && s.attempt == spec.attempt
            });
            if let Some(existing) = same_attempt {
                let pod = existing.record.read().expect("pod record lock");
                return match pod.state {
                    PodState::Ready => Ok(pod.id.clone()),
                    state => Err(Error::PodExists(format!(
                        "pod {}/{} (uid {}, attempt {}) already exists as {} in state {state:?}; remove it first",
                        spec.namespace, spec.name, spec.uid, spec.attempt, pod.id
                    ))),
                };
            }
            let network = network?;
            let id = new_id();
            let run_dir = self.pod_run_dir(&id);
            let pod = Pod {
                id: id.clone(),
                slice: spec.slice_name(),
                spec,
                state: PodState::Creating,
                created_at: now_nanos(),
                namespaces: Default::default(),
                files_dir: run_dir,
                shm: None,
                ips: Vec::new(),
                userns: None,
                init_unit: None,
                owns_slice: false,
                resources: None,
            };
            let entry = Entry::new(pod.clone());
            // Locked before it is visible, so that no other call on this pod runs before it exists.
            let guard = entry.operation.clone().try_lock_owned().expect("a new lock is free");
            pods.insert(id, entry.clone());
            (entry, guard, network)
        };
        let _guard = guard;
        let mut pod = entry.record.read().expect("pod record lock").clone();
        // The range is taken before anything else: a pod that cannot have one leaves nothing.
        match self.assign_userns(&pod.id, &pod.spec.userns).await {
            Ok(userns) => {
                pod.userns = userns;
                entry.set(pod.clone());
            }
            Err(e) => {
                self.pods.lock().expect("pod table lock").remove(&pod.id);
                return Err(e);
            }
        }
        match self.create_pod(&entry, pod.clone(), network).await {
            Ok(()) => {
                info!(pod = %pod.id, name = %pod.spec.name, namespace = %pod.spec.namespace, slice = %pod.slice, "pod ready");
                // As containerd does: events of the sandbox carry its id as the container id.
                self.emit(&pod.id, &pod.id, ContainerEventKind::Created);
                self.emit(&pod.id, &pod.id, ContainerEventKind::Started);
                Ok(pod.id)
            }
            Err(e) => {
                let latest = entry.record.read().expect("pod record lock").clone();
                if let Err(teardown) = self.teardown(&latest, true).await {
                    warn!(pod = %pod.id, "rollback incomplete: {teardown}");
                }
                self.pods.lock().expect("pod table lock").remove(&pod.id);
                Err(e)
            }
        }
    }

    /// Creates what the pod is made of; `network` is the CNI network to attach it to (none: host
    /// network, or a node without CNI config).
    async fn create_pod(&self, entry: &Entry<Pod>, mut pod: Pod, network: Option<NetworkList>) -> Result<(), Error> {
        // The intent goes to disk first: a daemon killed from here on finds it and rolls back.
        self.save(entry, pod.clone())?;
        let wanted = NewNamespaces {
            network: pod.spec.network != NamespaceMode::Node,
            ipc: pod.spec.ipc != NamespaceMode::Node,
            // The pod's hostname lives in its UTS namespace; host-network pods use the node's.
            uts: pod.spec.network != NamespaceMode::Node,
        };
        let ns_dir = pod.files_dir.join("ns");
        let hostname = pod.spec.configured_hostname().map(str::to_string);
        let range = pod.userns.map(|u| u.range);
        // In a user namespace the pod's root is the first id of its range: it owns the pod's
        // files (a chown of three small files) and its /dev/shm, as root owns them elsewhere.
        let root = range.map(|r| r.host_id);
        // The /dev/shm tmpfs, like the IPC and UTS pins, is a mount of the pod mount namespace
        // (crate::pod_mounts): systemd, which re-reads the node's whole mountinfo at each change
        // it sees, never sees it.
        let shm = wanted.ipc.then(|| pod.files_dir.join("shm"));
        let shm_path = shm.clone();
        let pod_mounts = self.pod_mounts.clone();
        let namespaces = tokio::task::spawn_blocking(move || {
            // In the pod mount namespace, on the namespace thread. (A failure leaves the pins to
            // the caller's rollback, as any later step's.)
            let shm = || match &shm_path {
                Some(shm) => mount_shm(shm, root).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot mount the pod's /dev/shm at {}: {e}", shm.display()))
                }),
                None => Ok(()),
            };
            let pins = namespaces::create_pinned(&ns_dir, wanted, hostname.as_deref(), range, &pod_mounts, &shm)
                .map_err(Error::io("cannot create pod namespaces"))?;
            Ok::<_, Error>(pins)
        })
        .instrument(tracing::info_span!("pod.namespaces", sandbox.id = %pod.id));
        // With cgroupsPerQOS the kubelet has started the pod's slice (with the pod's limits)
        // before asking: that one is used as it is, and never stopped by the runtime.
        let slice = self.systemd.start_transient_unit_unless_loaded(
            &pod.slice,
            vec![("Description", Value::from(slice_description(&pod)))],
        );
        // The slice's start job (a round trip to systemd and its work) and the namespaces (a
        // thread's unshare and mounts) need nothing of each other: at the same time they cost
        // the longer of the two, not the sum. What either made is recorded before any error is
        // returned, so that the rollback releases it (an unrecorded pin is found in any case).
        let (started, namespaces) = tokio::join!(slice, namespaces);
        let namespaces = namespaces
            .map_err(|e| Error::Io { what: "namespace task".into(), source: std::io::Error::other(e) })
            .and_then(|made| made);
        let mut failure = None;
        match started {
            Ok(started) if started || self.slice_owned_by_another_pod(&pod) => pod.owns_slice = true,
            Ok(_) => {
                info!(pod = %pod.id, slice = %pod.slice, "the pod's slice exists already (the kubelet's): using it")
            }
            Err(e) => failure = Some(e),
        }
        match namespaces {
            Ok(pins) => {
                pod.namespaces = pins;
                pod.shm = shm;
            }
            Err(e) => failure = failure.or(Some(e)),
        }
        self.save(entry, pod.clone())?;
        if let Some(e) = failure {
            return Err(e);
        }
        if pod.spec.pid == NamespaceMode::Pod {
            self.start_pod_init(entry, &mut pod).await?;
        }
        match (&network, &pod.namespaces.network) {
            (Some(network), Some(netns)) => {
                // The record (state Creating, pins) is on disk: a daemon killed during the ADD
                // rolls the pod back on restart, DEL included (the CNI result cache has it).
                let attachment = cni::Attachment {
                    container_id: pod.id.clone(),
                    netns: netns.clone(),
                    cni_args: cni::k8s_args(&pod.spec.namespace, &pod.spec.name, &pod.id, &pod.spec.uid),
                    capability_args: cni::capability_args(
                        &pod.spec.port_mappings,
                        &pod.spec.annotations,
                        &self.cni.pod_cidrs(),
                    )?,
                };
                pod.ips = self.cni.add(network, &attachment).await?;
                self.save(entry, pod.clone())?;
            }
            (None, Some(_)) => {
                info!(pod = %pod.id, "no CNI network config: the pod's network namespace has loopback only");
            }
            _ => {}
        }
        // After the network is attached, as with containerd (sysctls of the pod's interfaces).
        if !pod.spec.sysctls.is_empty() {
            let (pins, sysctls, pod_mounts) =
                (pod.namespaces.clone(), pod.spec.sysctls.clone(), self.pod_mounts.clone());
            tokio::task::spawn_blocking(move || namespaces::apply_sysctls(&pins, &sysctls, &pod_mounts))
                .await
                .map_err(|e| Error::Io { what: "sysctl task".into(), source: std::io::Error::other(e) })??;
        }
        let host_network = pod.spec.network == NamespaceMode::Node;
        podfiles::write(
            &pod.files_dir,
            &pod.spec.effective_hostname(),
            pod.spec.dns.as_ref(),
            host_network,
            &pod.ips,
            root,
        )
        .map_err(Error::io("cannot write pod files"))?;
        pod.state = PodState::Ready;
        self.save(entry, pod)
    }

    /// Starts the pod's init process, PID 1 of the PID namespace its containers share, as unit
    /// `cri-pod-<id>.service` in the pod's slice, and pins its PID namespace for the containers.
    async fn start_pod_init(&self, entry: &Entry<Pod>, pod: &mut Pod) -> Result<(), Error> {
        let unit = init_unit_name(&pod.id);
        // Recorded first: a daemon killed from here on stops it with the slice on restart.
        pod.init_unit = Some(unit.clone());
        self.save(entry, pod.clone())?;
        let exe = crate::sealed_exe::path()?.to_string_lossy().into_owned();
        let args = PodInitArgs {
            net: pod.namespaces.network.clone(),
            ipc: pod.namespaces.ipc.clone(),
            uts: pod.namespaces.uts.clone(),
            user: pod.namespaces.user.clone(),
            pod_mounts: pod.namespaces.in_pod_mounts.then(|| self.pod_mounts.pin().to_path_buf()),
        };
        let mut argv = vec![exe.clone(), pod_init::SUBCOMMAND.to_string()];
        argv.extend(args.to_args());
        let properties: Vec<(&'static str, Value<'static>)> = vec![
            ("Description", Value::from(format!("init of pod {}/{} ({})", pod.spec.namespace, pod.spec.name, pod.id))),
            ("Slice", Value::from(pod.slice.clone())),
            ("Type", Value::from("notify")),
            // MAINPID= and READY=1 come from the process that forked PID 1, as with containers.
            ("NotifyAccess", Value::from("all")),
            ("ExecStart", Value::from(vec![(exe, argv, false)])),
            ("CollectMode", Value::from("inactive-or-failed")),
        ];
        if let Err(e) = self.systemd.start_transient_unit(&unit, properties).await {
            let _ = self.systemd.reset_failed_unit(&unit).await;
            return Err(e);
        }
        let pid = self.systemd.main_pid(&unit).await?;
        let pin = pod.files_dir.join("ns").join("pid");
        pod.namespaces.pid = Some(pin.clone());
        // Recorded before the pin is made, so that a rollback releases it.
        self.save(entry, pod.clone())?;
        if pid == 0 {
            return Err(Error::PodInit(format!("the init process of pod {} ended at once", pod.id)));
        }
        let pod_mounts = pod.namespaces.in_pod_mounts.then_some(&*self.pod_mounts);
        namespaces::pin_process_namespace(pid, "pid", &pin, pod_mounts)
            .map_err(Error::io("cannot pin the pod's PID namespace"))?;
        // The PID may have been reused if the process died meanwhile: then the pin is not the
        // pod's, and the pod fails.
        if self.systemd.main_pid(&unit).await? != pid {
            return Err(Error::PodInit(format!("the init process of pod {} ended at once", pod.id)));
        }
        info!(pod = %pod.id, unit = %unit, pid, "pod init process started");
        Ok(())
    }

    /// Whether the pod's init process (if it has one) runs: without it, its containers cannot.
    pub async fn pod_init_running(&self, pod: &Pod) -> Result<bool, Error> {
        match &pod.init_unit {
            Some(unit) => Ok(self.systemd.main_pid(unit).await? != 0),
            None => Ok(true),
        }
    }

    /// The user namespace range of a new pod: the kubelet's, checked against every range in use,
    /// or a free one of the pool. None for a pod without a user namespace.
    async fn assign_userns(&self, pod_id: &str, mode: &UsernsMode) -> Result<Option<PodUserns>, Error> {
        if *mode == UsernsMode::Node {
            return Ok(None);
        }
        let requested = mode.requested_range()?;
        if let Some(range) = requested {
            let layers = IdRange { host_id: self.config.layer_uid_shift, size: userns::RANGE_SIZE };
            if self.config.layer_uid_shift != 0 && range.overlaps(&layers) {
                return Err(Error::InvalidSpec(format!(
                    "user namespace mappings: host ids {}..+{} include the image layers' ids ({})",
                    range.host_id, range.size, layers.host_id
                )));
            }
        }
        let ranges = self.userns_ranges.clone();
        let pool = self.config.userns.clone();
        let owner = pod_id.to_string();
        let assigned = tokio::task::spawn_blocking(move || {
            let pod_id = owner;
            let mut ranges = ranges.lock().expect("userns range lock");
            match requested {
                Some(range) => ranges.reserve(&pod_id, range).map(|()| PodUserns { range, from_pool: false }),
                // NSS lookups may block (LDAP and such): hence the blocking thread.
                None => ranges.allocate(&pod_id, userns::known_to_nss).map(|range| PodUserns { range, from_pool: true }).ok_or_else(|| {
                    Error::IdRangesExhausted(format!(
                        "all {} ranges of the pool from host id {} are in use (or taken by users the node knows); remove pods or raise userns.pool_ranges",
                        pool.pool_ranges, pool.pool_start
                    ))
                }),
            }
        })
        .await
        .map_err(|e| Error::Io { what: "user namespace range task".into(), source: std::io::Error::other(e) })??;
        info!(pod = %pod_id, host_id = assigned.range.host_id, size = assigned.range.size, from_pool = assigned.from_pool, "user namespace range assigned");
        if assigned.from_pool {
            self.check_next_userns_range();
        }
        Ok(Some(assigned))
    }

    /// Asks NSS about the range the next userns pod will get, in the background, so that its
    /// RunPodSandbox need not (a lookup through NSS takes about 0.7 ms here, more with LDAP).
    pub(crate) fn check_next_userns_range(&self) {
        let ranges = self.userns_ranges.clone();
        tokio::task::spawn_blocking(move || {
            let Some(first_id) = ranges.lock().expect("userns range lock").next_candidate() else { return };
            if !userns::known_to_nss(first_id) {
                let mut ranges = ranges.lock().expect("userns range lock");
                // Only if nothing took it meanwhile.
                if ranges.next_candidate() == Some(first_id) {
                    ranges.set_nss_clear(first_id);
                }
            }
        });
    }

    /// StopPodSandbox: kills every running container through its own stop path (so that each
    /// records its exit), stops the slice (the pod's init, and anything left), detaches the pod
    /// from its network (CNI DEL) and releases its namespaces and /dev/shm. Unknown pods are
    /// already stopped.
    pub async fn stop_pod(&self, id: &str) -> Result<(), Error> {
        let Some(entry) = self.entry(id)? else { return Ok(()) };
        let _guard = entry.operation.clone().lock_owned().await;
        let mut pod = entry.record.read().expect("pod record lock").clone();
        if pod.state == PodState::Removing {
            return Ok(());
        }
        self.stop_pod_containers(&pod.id).await;
        self.teardown(&pod, false).await?;
        self.refresh_pod_containers(&pod.id);
        let was_ready = pod.state == PodState::Ready;
        pod.state = PodState::NotReady;
        pod.shm = None;
        // Released by the DEL: another pod may have them now.
        pod.ips.clear();
        self.save(&entry, pod.clone())?;
        if was_ready {
            self.emit(&pod.id, &pod.id, ContainerEventKind::Stopped);
        }
        Ok(())
    }

    /// RemovePodSandbox: everything StopPodSandbox does (again: a DEL that failed at stop is
    /// retried, one that succeeded is not repeated), and the pod's records. Unknown pods are
    /// already removed.
    pub async fn remove_pod(&self, id: &str) -> Result<(), Error> {
        let Some(entry) = self.entry(id)? else { return Ok(()) };
        let _guard = entry.operation.clone().lock_owned().await;
        let mut pod = entry.get();
        pod.state = PodState::Removing;
        self.save(&entry, pod.clone())?;
        self.stop_pod_containers(&pod.id).await;
        self.teardown(&pod, true).await?;
        self.remove_pod_containers(&pod.id).await?;
        // The last container's removal took the pod's v1 hugetlb cgroup with it; this finds one
        // left by anything else (its processes are dead: the slice stopped). Only for a slice
        // that teardown stopped: the kubelet's or a shared one is not the pod's to clean.
        if self.stops_slice(&pod)
            && let Err(e) = crate::hugetlb::remove(&pod.slice, None)
        {
            warn!(pod = %pod.id, "{e}");
        }
        if let Err(e) = crate::cgroup_v1::remove(&pod.slice, None) {
            warn!(pod = %pod.id, "{e}");
        }
        // While the record is still there, so that the event carries the pod's status.
        self.emit(&pod.id, &pod.id, ContainerEventKind::Deleted);
        self.pods.lock().expect("pod table lock").remove(&pod.id);
        info!(pod = %pod.id, "pod removed");
        Ok(())
    }

    /// Releases what the pod holds, continuing past failures and reporting them all. With
    /// `remove`, also deletes the pod's files and record.
    async fn teardown(&self, pod: &Pod, remove: bool) -> Result<(), Error> {
        let mut errors = Vec::new();
        // The pod's init unit is in the slice and stops with it, after the containers (their
        // units are ordered after it): its end kills whatever is left in its PID namespace. A
        // slice that is not the runtime's, or that another pod still uses, stays: the init unit
        // stops alone (the containers were stopped before).
        let stopped = if self.stops_slice(pod) {
            self.systemd.stop_unit(&pod.slice).await
        } else if let Some(unit) = &pod.init_unit {
            self.systemd.stop_unit(unit).await
        } else {
            Ok(())
        };
        if let Err(e) = stopped {
            errors.push(e);
        }
        if let Some(unit) = &pod.init_unit
            && let Err(e) = self.systemd.reset_failed_unit(unit).await
        {
            errors.push(e);
        }
        // While the namespace is still pinned, so that plugins can remove the pod's interface;
        // without it (after a reboot) they still release what lives outside (IPAM, iptables).
        let netns = pod.namespaces.network.as_deref().filter(|pin| namespaces::is_pinned(pin));
        if let Err(e) = self.cni.del(&pod.id, netns).await {
            errors.push(e.into());
        }
        // Every pin where pins are always made, recorded or not: a daemon killed between making
        // one and recording it leaves it unrecorded.
        errors.extend(namespaces::release(
            &namespaces::PodNamespaces::every_pin_in(&pod.files_dir.join("ns")),
            &[&pod.files_dir.join("shm")],
            &self.pod_mounts,
        ));
        if remove && errors.is_empty() {
            // The record last, and only once the files are gone: it is what lets a later
            // RemovePodSandbox or restart find what is left.
            for dir in [&pod.files_dir, &self.pod_state_dir(&pod.id)] {
                match std::fs::remove_dir_all(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        errors.push(Error::Io { what: format!("remove {}", dir.display()), source: e });
                        break;
                    }
                }
            }
            // The range goes back to the pool only once nothing of the pod is left, its record
            // included: until then a restart would find it in use again.
            if errors.is_empty()
                && let Some(userns) = &pod.userns
            {
                self.userns_ranges.lock().expect("userns range lock").release(&pod.id, &userns.range);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown { what: format!("cannot release pod {}", pod.id), errors })
        }
    }

    /// Whether another pod of the runtime in the same slice started it, or may have: a pod being
    /// created has not recorded that yet. A pod that finds its slice loaded then shares it.
    fn slice_owned_by_another_pod(&self, pod: &Pod) -> bool {
        self.other_pods_in_slice(pod).iter().any(|other| other.owns_slice || other.state == PodState::Creating)
    }

    /// Whether teardown stops the pod's slice: when the runtime started it and no other pod of
    /// its own (being created or ready) is in it.
    fn stops_slice(&self, pod: &Pod) -> bool {
        pod.owns_slice
            && !self
                .other_pods_in_slice(pod)
                .iter()
                .any(|other| matches!(other.state, PodState::Creating | PodState::Ready))
    }

    fn other_pods_in_slice(&self, pod: &Pod) -> Vec<Pod> {
        let entries: Vec<Arc<Entry<Pod>>> = self.pods.lock().expect("pod table lock").values().cloned().collect();
        entries
            .iter()
            .filter_map(|entry| {
                entry.read(|other| (other.id != pod.id && other.slice == pod.slice).then(|| other.clone()))
            })
            .collect()
    }

    /// UpdatePodSandboxResources: the pod-level resources the kubelet sends after resizing a pod,
    /// recorded in the pod's record. A slice of the pod's own (no `cgroup_parent`) gets their
    /// sum's limits from systemd at once; a slice the kubelet or another client named is theirs:
    /// the kubelet has resized it before this call (as containerd, the runtime only records).
    pub async fn update_pod_resources(
        &self,
        id: &str,
        resources: crate::container::Resources,
        overhead: crate::container::Resources,
    ) -> Result<(), Error> {
        let entry = self.entry(id)?.ok_or_else(|| Error::PodNotFound { id: id.to_string() })?;
        let _guard = entry.operation.clone().lock_owned().await;
        let mut pod = entry.get();
        for r in [&resources, &overhead] {
            crate::container::check_cpuset_on_node(r)?;
            crate::memory_qos::check(r)?;
            crate::memory_qos::check_on_node(r, crate::container::cgroup_unified())?;
        }
        if pod.state != PodState::Ready {
            return Err(Error::PodNotReady { id: pod.id.clone() });
        }
        if pod.spec.cgroup_parent.is_empty() && pod.owns_slice {
            let slice = crate::memory_qos::pod_slice_resources(&resources, &overhead);
            self.systemd.set_unit_properties(&pod.slice, crate::container::limit_properties(&slice)).await?;
        }
        pod.resources = Some(crate::pod::PodResources { resources, overhead });
        self.save(&entry, pod)
    }

    /// UpdateRuntimeConfig's pod CIDR (comma-separated for dual stack; empty clears it): passed to
    /// CNI plugins with the `ipRanges` capability from the next pod on. Kept across restarts.
    pub fn update_pod_cidr(&self, pod_cidr: &str) -> Result<Vec<String>, Error> {
        self.cni.set_pod_cidrs(pod_cidr)
    }

    /// Whether pods can get a network now (the CRI Status NetworkReady condition): a valid CNI
    /// config, and the pod CIDR if the config takes its ranges from it. Reads the config dir.
    pub fn network_readiness(&self) -> NetworkReadiness {
        self.cni.readiness()
    }

    /// The pod CIDRs last set by [`Runtime::update_pod_cidr`].
    pub fn pod_cidrs(&self) -> Vec<String> {
        self.cni.pod_cidrs()
    }

    /// The pod with this id (or unique id prefix).
    pub fn pod(&self, id: &str) -> Result<Pod, Error> {
        match self.entry(id)? {
            Some(entry) => Ok(entry.record.read().expect("pod record lock").clone()),
            None => Err(Error::PodNotFound { id: id.to_string() }),
        }
    }

    /// The pods matching `filter`, oldest first. Pods being created or removed are not listed.
    pub fn pods(&self, filter: &PodFilter) -> Vec<Pod> {
        let entries: Vec<Arc<Entry<Pod>>> = self.pods.lock().expect("pod table lock").values().cloned().collect();
        // Only the pods that match are cloned: the kubelet lists one pod by its uid label at each
        // of its status syncs.
        let mut pods: Vec<Pod> = entries
            .iter()
            .filter_map(|entry| {
                entry.read(|pod| {
                    (matches!(pod.state, PodState::Ready | PodState::NotReady)
                        && filter.id.as_ref().is_none_or(|id| pod.id.starts_with(id.as_str()))
                        && filter.state.is_none_or(|state| pod.state == state)
                        && filter.labels.iter().all(|(k, v)| pod.spec.labels.get(k) == Some(v)))
                    .then(|| pod.clone())
                })
            })
            .collect();
        pods.sort_by_key(|pod| pod.created_at);
        pods
    }
}

/// The pod's /dev/shm: a tmpfs, its root owned by `root` (the pod's root user's host id; the
/// node's root without a user namespace).
fn mount_shm(path: &Path, root: Option<u32>) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut options = format!("mode=1777,{SHM_SIZE}");
    if let Some(root) = root {
        options += &format!(",uid={root},gid={root}");
    }
    nix::mount::mount(Some("shm"), path, Some("tmpfs"), flags, Some(options.as_str()))?;
    Ok(())
}

/// The Description of a slice the runtime starts for `pod`: it names the pod, so that a restart
/// can tell that slice from one the kubelet started.
fn slice_description(pod: &Pod) -> String {
    format!("pod {}/{} ({})", pod.spec.namespace, pod.spec.name, pod.id)
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}
