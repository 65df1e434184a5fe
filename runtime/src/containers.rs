//! Container lifecycle: CreateContainer, StartContainer, StopContainer, RemoveContainer, status
//! and listing, and their recovery when the daemon starts.
//!
//! A container is the transient service `cri-<id>.service` in its pod's slice. Its `ExecStart`
//! is `cri-systemd init <init.json>`, which sets the container up and execs the entrypoint, so
//! the entrypoint is the service's main process; its `ExecStopPost` is `cri-systemd record-exit
//! <exit.json>`, so systemd itself records how it ended.
//!
//! # Stop
//!
//! The stop signal (the config's `stop_signal`, else the image's STOPSIGNAL, else SIGTERM) to the
//! main process, SIGKILL to the unit after the grace period, then
//! `StopUnit` (systemd's own stop timeout cannot be changed on a running unit). The kernel drops a
//! signal sent from outside to the PID 1 of a PID namespace that has no handler for it, so an
//! entrypoint stopped before it installed its handler (critest stops `top` the moment it started)
//! would lose the signal and be killed at the end of the grace period: when the main process is
//! such a PID 1 and `SigCgt` in its `/proc/<pid>/status` lacks the signal, the daemon waits
//! (polling every 50 ms, within the grace period) until the handler is there and sends it then.
//! runc and containerd send once and lose it.
//!
//! # PID namespace target (`kubectl debug --target`)
//!
//! A container with `pid_target` (CRI namespace mode TARGET, which the kubelet sends for an
//! ephemeral container with a target in a pod without a shared PID namespace) joins the PID
//! namespace of that container of the same pod, which must be running at CreateContainer (as
//! containerd checks) and again at StartContainer. Its init spec names `target-pid-ns` in the
//! container's directory, where StartContainer pins the target's `/proc/<main pid>/ns/pid` just
//! before the start and unpins it once init has joined (the start job is done): the main PID is
//! read again after the pin is made, so that a target that ended meanwhile, its PID perhaps
//! reused, is an error and not another process's namespace. In a pod user namespace the target's
//! PID namespace belongs to that user namespace, which the new container joins too. When the
//! target ends, the kernel ends its PID namespace and the debug container with it, as with
//! containerd and runc; the kubelet never restarts an ephemeral container.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};
use zbus::zvariant::Value;

use crate::container::{
    self, Container, ContainerSpec, ContainerState, HugepageLimit, Resources, RootfsLayers, SpecContext,
};
use crate::events::ContainerEventKind;
use crate::exit_record::{self, ExitRecord};
use crate::pod::PodState;
use crate::store::{new_id, read_json, write_json};
use crate::{Entry, Error, Runtime};
use init::{InitSpec, OverlayRootfs};

/// Next to a container's record, while StartContainer runs: the pin of the PID namespace of the
/// container's target (PID namespace mode TARGET).
const TARGET_PID_PIN: &str = "target-pid-ns";

/// Next to a container's record: the inode numbers of its output pipes (stdout, stderr), by
/// which a restarted daemon that lost their read ends finds them again.
const OUTPUT_PIPES_FILE: &str = "output-pipes";

/// Which containers ListContainers wants.
#[derive(Debug, Clone, Default)]
pub struct ContainerFilter {
    /// A full id or a prefix of one.
    pub id: Option<String>,
    pub state: Option<ContainerState>,
    pub pod_id: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl Runtime {
    fn containers_state_dir(&self) -> PathBuf {
        self.config.state_root.join("containers")
    }

    /// The directory of container `id`: records, init spec, exit record, rootfs mount point,
    /// and the writable layer (`upper/`, `work/`).
    pub(crate) fn container_dir(&self, id: &str) -> PathBuf {
        self.containers_state_dir().join(id)
    }

    /// Where container `id`'s output waits for its log (crate::log_spool): under the run root,
    /// as the pipes it comes from do not outlive the node.
    fn output_spool_dir(&self, id: &str) -> PathBuf {
        self.config.run_root.join("output").join(id)
    }

    fn save_container(&self, entry: &Entry<Container>, container: Container) -> Result<(), Error> {
        write_json(&self.container_dir(&container.id).join("container.json"), &container)
            .map_err(Error::io("cannot write container record"))?;
        entry.set(container);
        Ok(())
    }

    pub(crate) fn container_entry(&self, id: &str) -> Result<Arc<Entry<Container>>, Error> {
        let containers = self.containers.lock().expect("container table lock");
        if let Some(entry) = containers.get(id) {
            return Ok(entry.clone());
        }
        let mut matches =
            containers.range(id.to_string()..).take_while(|(key, _)| !id.is_empty() && key.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some((_, entry)), None) => Ok(entry.clone()),
            (Some(_), Some(_)) => Err(Error::AmbiguousId { what: "container", prefix: id.to_string() }),
            (None, _) => Err(Error::ContainerNotFound { id: id.to_string() }),
        }
    }

    /// CreateContainer: checks the config against its pod and image, makes the container's
    /// writable layer over `lowerdirs` (the image's layer directories, top first), writes the init
    /// spec, and records the container as Created. The container is in the table (and so in
    /// [`Runtime::layers_in_use`]) from before its first file until it is removed.
    pub async fn create_container(
        &self,
        pod_id: &str,
        spec: ContainerSpec,
        lowerdirs: Vec<PathBuf>,
    ) -> Result<String, Error> {
        let id = new_id();
        let rootfs = self.writable_layer(&id, lowerdirs);
        let result = self.create_container_inner(&id, pod_id, spec, rootfs).await;
        if result.is_err() {
            self.containers.lock().expect("container table lock").remove(&id);
            let _ = std::fs::remove_dir_all(self.container_dir(&id));
        }
        result.map(|()| id)
    }

    /// Its span (a step of a traced CreateContainer, cri-server's otel.rs): checks, the writable
    /// layer's directories, the init spec.
    #[tracing::instrument(name = "container.prepare", skip_all, fields(container.id = %id, sandbox.id = %pod_id))]
    async fn create_container_inner(
        &self,
        id: &str,
        pod_id: &str,
        spec: ContainerSpec,
        rootfs: RootfsLayers,
    ) -> Result<(), Error> {
        spec.validate()?;
        for volume in &spec.image_volumes {
            crate::image_volume::check_sub_path(volume)?;
        }
        container::check_cpuset_on_node(&spec.resources)?;
        crate::memory_qos::check(&spec.resources)?;
        crate::memory_qos::check_on_node(&spec.resources, container::cgroup_unified())?;
        crate::hugetlb::check(&spec.resources.hugepage_limits)?;
        let pod = self.pod(pod_id)?;
        if pod.state != PodState::Ready {
            return Err(Error::PodNotReady { id: pod.id });
        }
        let entry = {
            let mut containers = self.containers.lock().expect("container table lock");
            let taken = containers.values().find_map(|e| {
                e.read(|c| {
                    (c.pod_id == pod.id && c.spec.name == spec.name && c.spec.attempt == spec.attempt)
                        .then(|| c.id.clone())
                })
            });
            if let Some(existing) = taken {
                return Err(Error::ContainerExists(format!(
                    "container {:?} attempt {} already exists in pod {} as {existing}",
                    spec.name, spec.attempt, pod.id
                )));
            }
            let record = Container {
                id: id.to_string(),
                pod_id: pod.id.clone(),
                spec,
                rootfs,
                state: ContainerState::Creating,
                created_at: now_nanos(),
                started_at: 0,
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
                message: String::new(),
                unit: format!("cri-{id}.service"),
                slice: pod.slice.clone(),
                user: None,
            };
            let entry = Entry::new(record);
            containers.insert(id.to_string(), entry.clone());
            entry
        };
        let _guard = entry.operation.clone().lock_owned().await;
        let mut record = entry.get();
        let dir = self.container_dir(id);
        // 0700: the writable layer, with whatever setuid binaries the container writes there, is
        // no business of the node's other users. upper/ itself keeps 0755: it is the container's `/`.
        crate::store::create_private_dir_all(&dir.join("rootfs"))
            .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        for layer in [&record.rootfs.upperdir, &record.rootfs.workdir].into_iter().chain(&record.rootfs.lowerdirs) {
            if layer.starts_with(&dir) {
                std::fs::create_dir_all(layer).map_err(Error::io(format!("cannot create {}", layer.display())))?;
            }
        }
        if let Some(target) = &record.spec.pid_target {
            record.spec.pid_target = Some(self.check_pid_target(&pod.id, target)?.id);
            entry.set(record.clone());
        }
        let context = SpecContext {
            pod: &pod,
            rootfs_mountpoint: &dir.join("rootfs"),
            target_pid_pin: &dir.join(TARGET_PID_PIN),
        };
        let oci = container::oci_spec(&record.spec, &record.rootfs, &context)?;
        record.user = oci.process().as_ref().map(|p| crate::passwd::Identity {
            uid: p.user().uid(),
            gid: p.user().gid(),
            additional_gids: p.user().additional_gids().clone().unwrap_or_default(),
        });
        let lower_mappings: Vec<oci_spec::runtime::LinuxIdMapping> = serde_json::from_value(container::oci_mappings(
            &container::lower_mappings(&pod, self.config.layer_uid_shift),
        ))
        .map_err(|e| Error::InvalidSpec(format!("cannot build the layers' id mapping: {e}")))?;
        if let Some(userns) = &pod.userns {
            // The writable layer's root is the container's "/": its root user owns it. Only the
            // directory itself: the image layers below are idmapped, never chowned.
            let root = Some(userns.range.host_id);
            std::os::unix::fs::chown(&record.rootfs.upperdir, root, root)
                .map_err(Error::io(format!("cannot give {} to the pod's root", record.rootfs.upperdir.display())))?;
        }
        let image_volumes = record
            .spec
            .image_volumes
            .iter()
            .enumerate()
            .map(|(i, volume)| {
                crate::image_volume::prepare(
                    volume,
                    &dir.join("image-volumes").join(i.to_string()),
                    &pod,
                    &lower_mappings,
                )
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let init = InitSpec {
            oci,
            rootfs: Some(OverlayRootfs {
                lowerdirs: record.rootfs.lowerdirs.clone(),
                upperdir: record.rootfs.upperdir.clone(),
                workdir: record.rootfs.workdir.clone(),
                uid_mappings: lower_mappings.clone(),
                gid_mappings: lower_mappings,
            }),
            error_file: dir.join("start-error"),
            console_socket: record.spec.tty,
            hugepage_limits: record.spec.resources.hugepage_limits.clone(),
            image_volumes,
            container_id: record.id.clone(),
            bundle: Some(dir.clone()),
            cgroup_mounts: node_cgroup_mounts(),
            pod_mounts: pod.namespaces.in_pod_mounts.then(|| init::pod_mounts::PodMounts {
                namespace: self.pod_mounts.pin().to_path_buf(),
                pins: pod.namespaces.pins_in_pod_mounts().into_iter().map(Path::to_path_buf).collect(),
                trees: pod.shm.iter().cloned().collect(),
            }),
        };
        if !record.spec.hooks.is_empty() {
            // The bundle's config.json, which hooks read (root.path: the rootfs as they see it).
            write_bundle_config(&init.oci, &dir.join("config.json"))?;
        }
        init.save(&dir.join("init.json")).map_err(Error::io("cannot write the init spec"))?;
        record.state = ContainerState::Created;
        self.save_container(&entry, record.clone())?;
        info!(container = %id, pod = %pod.id, name = %record.spec.name, "container created");
        self.emit(id, &pod.id, ContainerEventKind::Created);
        Ok(())
    }

    /// StartContainer: starts the container's transient service and waits until its entrypoint
    /// runs (init sends READY=1 right after exec). A failed start leaves the container Exited
    /// with reason StartError and the message init gave.
    pub async fn start_container(&self, id: &str) -> Result<(), Error> {
        let entry = self.container_entry(id)?;
        let _guard = entry.operation.clone().lock_owned().await;
        let mut record = entry.get();
        if record.state != ContainerState::Created {
            return Err(Error::ContainerState(format!(
                "container {} is {:?}, not Created: it can be started once",
                record.id, record.state
            )));
        }
        let pod = self.pod(&record.pod_id)?;
        if pod.state != PodState::Ready {
            return Err(Error::PodNotReady { id: pod.id });
        }
        let dir = self.container_dir(&record.id);
        let exe = crate::sealed_exe::path()?.to_string_lossy().into_owned();
        let init_exe = crate::sealed_exe::init_path()?.to_string_lossy().into_owned();
        let init_args =
            vec![init_exe.clone(), init::SUBCOMMAND.to_string(), dir.join("init.json").to_string_lossy().into_owned()];
        let record_args = vec![
            exe.clone(),
            exit_record::SUBCOMMAND.to_string(),
            dir.join("exit.json").to_string_lossy().into_owned(),
        ];
        let mut properties: Vec<(&'static str, Value<'static>)> = vec![
            (
                "Description",
                Value::from(format!("container {} of pod {}/{}", record.spec.name, pod.spec.namespace, pod.spec.name)),
            ),
            ("Slice", Value::from(record.slice.clone())),
            ("Type", Value::from("notify")),
            // The READY and MAINPID messages come from init's forked child as well.
            ("NotifyAccess", Value::from("all")),
            ("ExecStart", Value::from(vec![(init_exe, init_args, false)])),
            ("ExecStopPost", Value::from(vec![(exe, record_args, false)])),
            // The exit record holds the status; the unit need not linger once inactive or failed.
            ("CollectMode", Value::from("inactive-or-failed")),
            ("SendSIGKILL", Value::from(true)),
            // An OOM kill ends the whole container, as the kubelet asks on cgroup v2
            // (memory.oom.group); systemd's default would SIGTERM the rest and wait.
            ("OOMPolicy", Value::from("kill")),
            // Per-container cgroups in every controller, for limits and for stats.
            ("CPUAccounting", Value::from(true)),
            ("MemoryAccounting", Value::from(true)),
            ("TasksAccounting", Value::from(true)),
        ];
        properties.extend(container::resource_properties(&record.spec, self.config.tasks_max)?);
        if let Some(restore) = crate::checkpoint::restore_dir(&dir) {
            crate::checkpoint::restore_properties(&mut properties, &dir, &restore)?;
        }
        // stdin (a pipe) or the console socket on which init sends back its terminal.
        let prepared = if record.spec.stdin || record.spec.tty {
            let (ours, theirs) = crate::stdio::prepare(record.spec.tty)?;
            properties.push(("StandardInputFileDescriptor", Value::Fd(theirs.into())));
            Some(ours)
        } else {
            None
        };
        if let Some(init_unit) = &pod.init_unit {
            // Its PID namespace dies with the pod's init: a stop of the slice stops the
            // containers first (stop order is the reverse of start order).
            if !self.pod_init_running(&pod).await? {
                return Err(Error::PodInit(format!(
                    "the init process of pod {} ({init_unit}) is not running: its PID namespace is gone",
                    pod.id
                )));
            }
            properties.push(("After", Value::from(vec![init_unit.clone()])));
        }
        // Last of the checks, before anything of the start is made: a refusal leaves it Created.
        if let Some(gate) = self.start_gate.get().cloned() {
            let starting = crate::StartingContainer {
                container: record.clone(),
                pod: pod.clone(),
                init_spec: dir.join("init.json"),
            };
            tokio::task::spawn_blocking(move || gate.before_start(&starting))
                .await
                .map_err(|e| Error::StartRefused(format!("the start gate failed: {e}")))?
                .map_err(|reason| Error::StartRefused(format!("container {}: {reason}", record.id)))?;
        }
        properties.extend(container::device_properties(&record.spec));
        properties.extend(container::cpuset_properties(&record.spec.resources, container::cgroup_unified())?);
        // The kubelet reads the log file from the start; create it before the first line.
        if let Some(log) = self.log_path(&record.id) {
            let created = log.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
                use std::os::unix::fs::OpenOptionsExt;
                // As containerd's: the node's root and group, not everyone (logs can hold secrets).
                std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(&log).map(drop)
            });
            created.map_err(Error::io(format!("cannot create log file {}", log.display())))?;
        }
        let target_pin = dir.join(TARGET_PID_PIN);
        let pinned = match &record.spec.pid_target {
            Some(target) if pod.spec.pid == crate::pod::NamespaceMode::Container => {
                self.pin_target_pid_namespace(&pod.id, target, &target_pin).await?;
                true
            }
            _ => false,
        };
        if record.spec.tty {
            // init's own messages before it has the terminal (the container's output is the pty's).
            properties.push(("StandardOutput", Value::from("journal")));
            properties.push(("StandardError", Value::from("journal")));
        } else {
            // stdout and stderr are pipes that the daemon reads into the CRI log (crate::logs).
            // Made last: nothing but the start itself can fail once they are stored.
            let write_ends = match self.start_output(&record.id) {
                Ok(write_ends) => write_ends,
                Err(e) => {
                    unpin_target_pid_namespace(&target_pin);
                    return Err(e);
                }
            };
            let [stdout, stderr] = write_ends.map(|fd| Value::Fd(fd.into()));
            properties.push(("StandardOutputFileDescriptor", stdout));
            properties.push(("StandardErrorFileDescriptor", stderr));
        }
        // Before the start: an entrypoint that exits at once must not be missed.
        self.watch_exit(&record.id);
        let started = self.systemd.start_transient_unit(&record.unit, properties).await;
        // init has joined the namespace (or failed) once the start job is done.
        if pinned {
            unpin_target_pid_namespace(&target_pin);
        }
        match started {
            Ok(()) => {
                record.state = ContainerState::Running;
                record.started_at = now_nanos();
                self.save_container(&entry, record.clone())?;
                info!(container = %record.id, unit = %record.unit, "container started");
                self.watch_main_process(&record.id);
                if let Some(prepared) = prepared {
                    let log = self.log_path(&record.id);
                    match crate::stdio::finish(&record.id, record.spec.stdin_once, prepared, log) {
                        Ok(stdio) => {
                            self.stdio.lock().expect("stdio table lock").insert(record.id.clone(), stdio);
                        }
                        // The container runs; attach will say that its stdin is not there.
                        Err(e) => warn!(container = %record.id, "cannot keep the container's stdin or terminal: {e}"),
                    }
                }
                self.emit(&record.id, &record.pod_id, ContainerEventKind::Started);
                // An exit before the record said Running was not picked up by the exit watch.
                self.refresh(&entry);
                Ok(())
            }
            Err(e) => {
                let start_error = std::fs::read_to_string(dir.join("start-error")).ok();
                // An entrypoint that ends at once can end before init's READY=1 reaches systemd,
                // which then fails the start job although the container did run: init reported
                // no error and systemd recorded the entrypoint's exit. That is a start followed
                // by an exit, as with containerd, not a start error.
                let exit_file = dir.join("exit.json");
                // (ExecStopPost may write the record a moment after the job result arrives.)
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
                while start_error.is_none() && !exit_file.exists() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                let ran = exit_record::read(&exit_file).filter(|exit| exit.main_status_known);
                if let (None, Some(exit)) = (&start_error, ran) {
                    record.state = ContainerState::Running;
                    record.started_at = now_nanos().min(exit.finished_at);
                    self.save_container(&entry, record.clone())?;
                    self.emit(&record.id, &record.pod_id, ContainerEventKind::Started);
                    let record = self.mark_exited(&entry, Some(exit), "");
                    let _ = self.systemd.reset_failed_unit(&record.unit).await;
                    info!(container = %record.id, exit_code = record.exit_code, "container started and ended at once");
                    return Ok(());
                }
                let message = start_error.map(|m| m.trim().to_string()).unwrap_or_else(|| e.to_string());
                record.state = ContainerState::Exited;
                record.exit_code = 128;
                record.reason = "StartError".into();
                record.message = message.clone();
                record.finished_at = now_nanos();
                self.save_container(&entry, record.clone())?;
                self.emit(&record.id, &record.pod_id, ContainerEventKind::Stopped);
                let _ = self.systemd.reset_failed_unit(&record.unit).await;
                Err(Error::StartFailed { id: record.id, message })
            }
        }
    }

    /// StopContainer: the stop signal, then SIGKILL after `timeout_seconds`. Stopping a stopped
    /// container succeeds, and so does stopping an unknown one (the CRI call is idempotent; the
    /// container may be gone already, as containerd answers).
    pub async fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<(), Error> {
        let entry = match self.container_entry(id) {
            Ok(entry) => entry,
            Err(Error::ContainerNotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _guard = entry.operation.clone().lock_owned().await;
        self.stop_locked(&entry, timeout_seconds).await
    }

    async fn stop_locked(&self, entry: &Entry<Container>, timeout_seconds: i64) -> Result<(), Error> {
        let record = self.refresh(entry);
        if record.state != ContainerState::Running {
            return Ok(());
        }
        // The stop signal to the main process, then SIGKILL to all after the grace period.
        // (systemd's own TimeoutStopSec cannot be changed on a running unit.)
        let exit_file = self.container_dir(&record.id).join("exit.json");
        let mut last_signal = libc::SIGKILL;
        if timeout_seconds > 0 {
            let signal = record.spec.stop_signal()?;
            last_signal = signal;
            let main_pid = self.systemd.main_pid(&record.unit).await.ok().filter(|&p| p != 0);
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout_seconds as u64);
            // The PID 1 of a PID namespace gets from outside only the signals it has a handler
            // for: the kernel drops the others. An entrypoint stopped right after its start (before
            // it installed its handler) would lose the stop signal and sit out the whole grace
            // period: it gets the signal once its handler is there (or never, if it has none,
            // when the kernel would have dropped it anyway).
            let mut sent = false;
            loop {
                if !sent && main_pid.is_none_or(|pid| stop_signal_reaches(pid, signal)) {
                    self.systemd.kill_unit(&record.unit, "main", signal).await?;
                    sent = true;
                }
                if exit_file.exists() || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        if !exit_file.exists() {
            last_signal = libc::SIGKILL;
            self.systemd.kill_unit(&record.unit, "all", libc::SIGKILL).await?;
        }
        self.systemd.stop_unit(&record.unit).await?;
        // ExecStopPost writes the exit record as the unit stops; on a loaded node the stop job
        // can be reported done a moment before the file is in place.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !exit_file.exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // systemd learns the exit of the entrypoint (handed to it with MAINPID=, not its own
        // child at the time) from SIGCHLD once the process is reparented to it; when the cgroup
        // empties first, ExecStopPost runs without $EXIT_CODE. The signal we sent last is then
        // what ended the container.
        if let Some(mut exit) = exit_record::read(&exit_file).filter(|e| !e.main_status_known) {
            exit.exit_code = 128 + last_signal;
            exit.main_status_known = true;
            if let Err(e) = write_json(&exit_file, &exit) {
                warn!(container = %record.id, "cannot complete the exit record: {e}");
            }
        }
        let record = self.refresh(entry);
        if record.state == ContainerState::Running {
            // The unit is gone but no exit record was written (ExecStopPost could not run).
            self.mark_exited(entry, None, "the container's unit stopped without an exit record");
        }
        Ok(())
    }

    /// UpdateContainerResources: new limits for a created or running container, applied by
    /// systemd to its unit at once and recorded for later starts.
    pub async fn update_resources(&self, id: &str, resources: container::Resources) -> Result<(), Error> {
        let entry = self.container_entry(id)?;
        let _guard = entry.operation.clone().lock_owned().await;
        let mut record = self.refresh(&entry);
        if !matches!(record.state, ContainerState::Created | ContainerState::Running) {
            return Err(Error::ContainerState(format!(
                "container {} is {:?}: nothing to update",
                record.id, record.state
            )));
        }
        // An empty cpuset keeps the current one, as with containerd: the kubelet's CPU manager
        // sends only the CPUs, its other callers no cpuset at all. For the same reason an update
        // with a cpuset or hugepage limits and no other limit at all keeps the limits (elsewhere
        // an unset limit lifts it; the kubelet's own updates always carry cpu_shares).
        let old = &record.spec.resources;
        let cpuset_only = (!resources.cpuset_cpus.is_empty()
            || !resources.cpuset_mems.is_empty()
            || !resources.hugepage_limits.is_empty())
            && resources.cpu_period == 0
            && resources.cpu_quota == 0
            && resources.cpu_shares == 0
            && resources.memory_limit_in_bytes == 0
            && resources.memory_swap_limit_in_bytes == 0
            && resources.unified.is_empty();
        let resources = if cpuset_only {
            Resources {
                cpuset_cpus: resources.cpuset_cpus,
                cpuset_mems: resources.cpuset_mems,
                hugepage_limits: resources.hugepage_limits,
                ..old.clone()
            }
        } else {
            resources
        };
        let resources = Resources {
            oom_score_adj: old.oom_score_adj,
            cpuset_cpus: if resources.cpuset_cpus.is_empty() { old.cpuset_cpus.clone() } else { resources.cpuset_cpus },
            cpuset_mems: if resources.cpuset_mems.is_empty() { old.cpuset_mems.clone() } else { resources.cpuset_mems },
            hugepage_limits: merge_hugepage_limits(&old.hugepage_limits, resources.hugepage_limits.clone()),
            ..resources
        };
        container::check_cpuset_on_node(&resources)?;
        crate::memory_qos::check(&resources)?;
        crate::memory_qos::check_on_node(&resources, container::cgroup_unified())?;
        crate::hugetlb::check(&resources.hugepage_limits)?;
        // Lowering every limit to 0 is enforced too once limits were set.
        let hugepages_changed = resources.hugepage_limits != old.hugepage_limits
            && (crate::hugetlb::wanted(&resources.hugepage_limits) || crate::hugetlb::wanted(&old.hugepage_limits));
        if record.state == ContainerState::Running {
            let unified = container::cgroup_unified();
            if !unified && resources.cpuset_mems != record.spec.resources.cpuset_mems {
                return Err(Error::NodeUnsupported(format!(
                    "container {}: cpuset_mems cannot change while it runs on cgroup v1 (a NUMA policy set at start)",
                    record.id
                )));
            }
            let mut properties = container::limit_properties(&resources);
            properties.extend(crate::memory_qos::properties(&resources, unified)?);
            if unified {
                properties.extend(container::cpuset_properties(&resources, true)?);
            }
            self.systemd.set_unit_properties(&record.unit, properties).await?;
            if !unified && resources.cpuset_cpus != record.spec.resources.cpuset_cpus {
                set_unit_affinity(&record, &resources.cpuset_cpus)?;
            }
            if hugepages_changed {
                crate::hugetlb::apply_to_unit(&resources.hugepage_limits, &record.slice, &record.unit)?;
            }
        } else if hugepages_changed {
            // Created: init applies what its spec says at the start.
            let path = self.container_dir(&record.id).join("init.json");
            let mut init = InitSpec::load(&path).map_err(|e| Error::InitSpec(e.to_string()))?;
            init.hugepage_limits = resources.hugepage_limits.clone();
            init.save(&path).map_err(Error::io("cannot write the init spec"))?;
        }
        record.spec.resources = resources;
        self.save_container(&entry, record)
    }

    /// RemoveContainer: kills it if running, removes its unit, writable layer and records.
    /// Removing an unknown container succeeds.
    pub async fn remove_container(&self, id: &str) -> Result<(), Error> {
        let entry = match self.container_entry(id) {
            Ok(entry) => entry,
            Err(Error::ContainerNotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _guard = entry.operation.clone().lock_owned().await;
        self.remove_locked(&entry).await
    }

    async fn remove_locked(&self, entry: &Entry<Container>) -> Result<(), Error> {
        let mut record = entry.get();
        if record.state == ContainerState::Running {
            self.stop_locked(entry, 0).await?;
            record = entry.get();
        }
        record.state = ContainerState::Removing;
        self.save_container(entry, record.clone())?;
        self.systemd.stop_unit(&record.unit).await?;
        self.systemd.reset_failed_unit(&record.unit).await?;
        crate::hugetlb::remove(&record.slice, Some(&record.unit))?;
        crate::cgroup_v1::remove(&record.slice, Some(&record.unit))?;
        if record.spec.stdin || record.spec.tty {
            self.stdio.lock().expect("stdio table lock").remove(&record.id);
            crate::stdio::forget(&record.id);
        }
        if self.outputs.lock().expect("output table lock").remove(&record.id).is_some() {
            crate::stdio::forget_output_pipe(&record.id, "stdout");
            crate::stdio::forget_output_pipe(&record.id, "stderr");
        }
        let dir = self.container_dir(&record.id);
        // A pin left by a daemon that died during StartContainer.
        unpin_target_pid_namespace(&dir.join(TARGET_PID_PIN));
        // The record's directory last: until it is gone, a restarted daemon finishes the removal.
        for dir in [self.output_spool_dir(&record.id), dir] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::Io { what: format!("cannot remove {}", dir.display()), source: e }),
            }
        }
        self.containers.lock().expect("container table lock").remove(&record.id);
        info!(container = %record.id, "container removed");
        self.emit(&record.id, &record.pod_id, ContainerEventKind::Deleted);
        Ok(())
    }

    /// Picks up an exit record written by systemd since the last look, for a caller without the
    /// container's operation lock (status and list calls): while an operation is under way (a stop
    /// completes the record it finds: ExecStopPost may not know the signal that ended the
    /// container), the record is that operation's to pick up, and the state is as last saved.
    fn refresh_unlocked(&self, entry: &Entry<Container>) -> Container {
        match entry.operation.try_lock() {
            Ok(_guard) => self.refresh(entry),
            Err(_) => entry.get(),
        }
    }

    /// Picks up an exit record written by systemd since the last look (the caller holds the
    /// container's operation lock, or nothing else runs yet).
    pub(crate) fn refresh(&self, entry: &Entry<Container>) -> Container {
        let record = entry.get();
        if record.state != ContainerState::Running {
            return record;
        }
        match exit_record::read(&self.container_dir(&record.id).join("exit.json")) {
            Some(exit) => self.mark_exited(entry, Some(exit), ""),
            None => record,
        }
    }

    pub(crate) fn mark_exited(&self, entry: &Entry<Container>, exit: Option<ExitRecord>, message: &str) -> Container {
        let mut record = entry.get();
        if record.state != ContainerState::Running {
            // Another caller noticed first.
            return record;
        }
        // Its processes are gone: what they wrote is all in the pipes, and goes to the log before
        // the status says exited (the kubelet reads an exited container's log at once).
        let output = self.outputs.lock().expect("output table lock").get(&record.id).cloned();
        if let Some(output) = output {
            output.drain();
        }
        record.state = ContainerState::Exited;
        match exit {
            Some(exit) => {
                record.exit_code = exit.exit_code;
                record.finished_at = exit.finished_at;
                record.reason = if exit.oom_killed {
                    "OOMKilled".into()
                } else if exit.exit_code == 0 {
                    "Completed".into()
                } else {
                    "Error".into()
                };
            }
            None => {
                record.exit_code = 255;
                record.finished_at = now_nanos();
                record.reason = "Unknown".into();
                record.message = message.into();
            }
        }
        if let Err(e) = self.save_container(entry, record.clone()) {
            warn!(container = %record.id, "{e}");
        }
        self.emit(&record.id, &record.pod_id, ContainerEventKind::Stopped);
        record
    }

    /// The container with this id (or unique prefix), with its latest state.
    pub fn container(&self, id: &str) -> Result<Container, Error> {
        let entry = self.container_entry(id)?;
        Ok(self.refresh_unlocked(&entry))
    }

    /// The containers matching `filter`, oldest first.
    pub fn containers(&self, filter: &ContainerFilter) -> Vec<Container> {
        let entries: Vec<Arc<Entry<Container>>> =
            self.containers.lock().expect("container table lock").values().cloned().collect();
        // What does not change when a container ends is tested on the record as it is: only the
        // containers that match it are refreshed (their exit record read). The kubelet lists one
        // pod's containers by its uid label at each of its status syncs.
        let mut list: Vec<Container> = entries
            .iter()
            .filter(|entry| {
                entry.read(|c| {
                    filter.id.as_ref().is_none_or(|id| c.id.starts_with(id.as_str()))
                        && filter.pod_id.as_ref().is_none_or(|pod| &c.pod_id == pod)
                        && filter.labels.iter().all(|(k, v)| c.spec.labels.get(k) == Some(v))
                })
            })
            .map(|entry| self.refresh_unlocked(entry))
            .filter(|c| !matches!(c.state, ContainerState::Creating | ContainerState::Removing))
            .filter(|c| filter.state.is_none_or(|state| c.state == state))
            .collect();
        list.sort_by_key(|c| c.created_at);
        list
    }

    /// The daemon's end of a running container's stdin or terminal, if it has one.
    pub(crate) fn stdio(&self, id: &str) -> Option<Arc<crate::ContainerStdio>> {
        let id = self.container_entry(id).ok()?.get().id;
        self.stdio.lock().expect("stdio table lock").get(&id).cloned()
    }

    /// The daemon's side of a container's output (containers without a terminal, started by
    /// this version of cri-systemd).
    pub(crate) fn output(&self, id: &str) -> Option<Arc<crate::ContainerOutput>> {
        let id = self.container_entry(id).ok()?.get().id;
        self.outputs.lock().expect("output table lock").get(&id).cloned()
    }

    /// ReopenContainerLog: the container's output goes to a newly opened file at its log path.
    pub fn reopen_container_log(&self, id: &str) -> Result<(), Error> {
        let container = self.container(id)?;
        if container.state != ContainerState::Running {
            return Err(Error::ContainerState(format!("container {} is not running", container.id)));
        }
        let path = self
            .log_path(&container.id)
            .ok_or_else(|| Error::ContainerState(format!("container {} has no log path", container.id)))?;
        match self.output(&container.id) {
            Some(output) => output.reopen(&path).map_err(Error::io(format!("cannot reopen log {}", path.display()))),
            // A terminal's copier opens the file at each write.
            None if container.spec.tty => Ok(()),
            None => Err(Error::ContainerState(format!(
                "the output of container {} is not read by this daemon (started by an older cri-systemd, \
                 whose journal-based output it keeps)",
                container.id
            ))),
        }
    }

    /// A new container's output pipes: the read ends stored and read from now on, the inode
    /// numbers noted next to its record; returns the write ends, the unit's stdout and stderr.
    fn start_output(&self, id: &str) -> Result<[std::os::fd::OwnedFd; 2], Error> {
        let (read_ends, write_ends) = crate::logs::output_pipes()?;
        let inodes: Vec<String> =
            read_ends.iter().map(|fd| crate::logs::pipe_inode(fd).unwrap_or(0).to_string()).collect();
        let file = self.container_dir(id).join(OUTPUT_PIPES_FILE);
        std::fs::write(&file, inodes.join(" ") + "\n")
            .map_err(Error::io(format!("cannot write {}", file.display())))?;
        crate::stdio::store_output_pipes(id, &read_ends.each_ref().map(Some));
        let output =
            crate::ContainerOutput::start(id, read_ends.map(Some), self.log_path(id), &self.output_spool_dir(id))?;
        self.outputs.lock().expect("output table lock").insert(id.to_string(), output);
        Ok(write_ends)
    }

    /// A running container's output after a restart of the daemon: its read ends from the fd
    /// store or, if systemd dropped them (a `systemctl stop` of the daemon before systemd 254),
    /// opened again from the container's processes' descriptors.
    async fn recover_output(&self, record: &Container, stored: &mut crate::stdio::Stored) {
        let inodes = std::fs::read_to_string(self.container_dir(&record.id).join(OUTPUT_PIPES_FILE));
        let Ok(inodes) = inodes else {
            info!(container = %record.id, "started by an older cri-systemd: its output goes to the journal, not to its CRI log");
            return;
        };
        let inodes: Vec<u64> = inodes.split_whitespace().filter_map(|i| i.parse().ok()).collect();
        let mut read_ends = stored.take_output(&record.id);
        if read_ends.iter().all(Option::is_none) {
            let pids = self.unit_pids(record).await;
            read_ends = [0, 1].map(|i| inodes.get(i).and_then(|&inode| crate::logs::reopen_pipe(&pids, inode)));
            match read_ends.iter().filter(|fd| fd.is_some()).count() {
                0 => warn!(container = %record.id, "the output pipes are lost: no more output reaches the log"),
                found => {
                    info!(container = %record.id, found, "took the output pipes back from the container's processes")
                }
            }
        }
        // Into this daemon's queue, which replaces the stored one at the end of recovery.
        crate::stdio::store_output_pipes(&record.id, &read_ends.each_ref().map(Option::as_ref));
        let spool = self.output_spool_dir(&record.id);
        match crate::ContainerOutput::start(&record.id, read_ends, self.log_path(&record.id), &spool) {
            Ok(output) => {
                self.outputs.lock().expect("output table lock").insert(record.id.clone(), output);
            }
            Err(e) => warn!(container = %record.id, "cannot read the container's output: {e}"),
        }
    }

    /// The processes of a container's unit: its main process first.
    async fn unit_pids(&self, record: &Container) -> Vec<u32> {
        let mut pids: Vec<u32> =
            self.systemd.main_pid(&record.unit).await.ok().filter(|&p| p != 0).into_iter().collect();
        let cgroup = crate::stats::cgroup_path(&record.slice, Some(&record.unit));
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"] {
            let procs = std::fs::read_to_string(format!("{root}{cgroup}/cgroup.procs"));
            if let Ok(procs) = procs {
                pids.extend(procs.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                break;
            }
        }
        pids
    }

    /// Where the kubelet wants container `id`'s log: the pod's log directory joined with the
    /// container's log path, when both are set.
    pub fn log_path(&self, id: &str) -> Option<PathBuf> {
        let container = self.container_entry(id).ok()?.get();
        let pod = self.pod(&container.pod_id).ok()?;
        if container.spec.log_path.is_empty() || pod.spec.log_directory.as_os_str().is_empty() {
            return None;
        }
        Some(pod.spec.log_directory.join(&container.spec.log_path))
    }

    /// The image ids that containers use (their own and their image volumes'): the image store
    /// must not collect them.
    pub fn images_in_use(&self) -> HashSet<String> {
        let containers = self.containers.lock().expect("container table lock");
        containers
            .values()
            .flat_map(|e| {
                e.read(|c| {
                    std::iter::once(c.spec.image.id.clone())
                        .chain(c.spec.image_volumes.iter().map(|v| v.image_id.clone()))
                        .collect::<Vec<_>>()
                })
            })
            .collect()
    }

    /// The layer directories that containers mount (their records' lower directories, and their
    /// image volumes'): the image store must not collect them, whatever their records say of
    /// their images.
    pub fn layers_in_use(&self) -> HashSet<PathBuf> {
        let containers = self.containers.lock().expect("container table lock");
        containers
            .values()
            .flat_map(|e| {
                e.read(|c| {
                    c.rootfs
                        .lowerdirs
                        .iter()
                        .chain(c.spec.image_volumes.iter().flat_map(|v| &v.lowerdirs))
                        .cloned()
                        .collect::<Vec<_>>()
                })
            })
            .collect()
    }

    /// Container `id`'s root file system: `lowerdirs` under a writable layer in its directory.
    /// overlayfs needs a lower directory; an image may have no layer: an empty one of the
    /// container's then stands in (it changes nothing in the merged view).
    fn writable_layer(&self, id: &str, mut lowerdirs: Vec<PathBuf>) -> RootfsLayers {
        let dir = self.container_dir(id);
        if lowerdirs.is_empty() {
            lowerdirs.push(dir.join("empty"));
        }
        RootfsLayers { lowerdirs, upperdir: dir.join("upper"), workdir: dir.join("work") }
    }

    /// After a pod's slice stopped: its containers' exit records are there now.
    pub(crate) fn refresh_pod_containers(&self, pod_id: &str) {
        let entries: Vec<Arc<Entry<Container>>> =
            self.containers.lock().expect("container table lock").values().cloned().collect();
        for entry in entries.iter().filter(|e| e.read(|c| c.pod_id == pod_id)) {
            let record = self.refresh(entry);
            if record.state == ContainerState::Running {
                self.mark_exited(entry, None, "stopped with its pod");
            }
        }
    }

    /// Kills every running container of a pod at once (StopPodSandbox; the kubelet stops each
    /// container with its grace period before), as containerd does, so that each records how it
    /// ended. Failures are logged: the stop of the pod's slice that follows ends them anyway.
    pub(crate) async fn stop_pod_containers(&self, pod_id: &str) {
        let entries: Vec<Arc<Entry<Container>>> =
            self.containers.lock().expect("container table lock").values().cloned().collect();
        let stops = entries
            .iter()
            .filter(|e| e.read(|c| c.pod_id == pod_id && c.state == ContainerState::Running))
            .map(|entry| async move {
                let _guard = entry.operation.clone().lock_owned().await;
                if let Err(e) = self.stop_locked(entry, 0).await {
                    warn!(container = %entry.get().id, "stop with its pod: {e}");
                }
            });
        futures_util::future::join_all(stops).await;
    }

    /// Removes every container of a pod (RemovePodSandbox), reporting all failures together.
    pub(crate) async fn remove_pod_containers(&self, pod_id: &str) -> Result<(), Error> {
        let entries: Vec<Arc<Entry<Container>>> =
            self.containers.lock().expect("container table lock").values().cloned().collect();
        let mut errors = Vec::new();
        for entry in entries.iter().filter(|e| e.read(|c| c.pod_id == pod_id)) {
            let _guard = entry.operation.clone().lock_owned().await;
            if let Err(e) = self.remove_locked(entry).await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown { what: format!("cannot remove the containers of pod {pod_id}"), errors })
        }
    }

    /// Reads every container record: finishes removals and rolls back creations that a dead
    /// daemon left half-done, and notices containers that ended (or vanished) meanwhile.
    pub(crate) async fn recover_containers(&self, mut stored: crate::stdio::Stored) -> Result<(), Error> {
        let dir = self.containers_state_dir();
        crate::store::create_private_dir_all(&dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
        let entries = std::fs::read_dir(&dir).map_err(Error::io(format!("cannot read {}", dir.display())))?;
        for dir_entry in entries.flatten() {
            let record_path = dir_entry.path().join("container.json");
            let record: Container = match read_json(&record_path) {
                Ok(record) => record,
                // What a daemon killed between preparing the rootfs and the first write leaves.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    warn!("removing container dir {} without a record", dir_entry.path().display());
                    let _ = std::fs::remove_dir_all(dir_entry.path());
                    continue;
                }
                Err(e) => {
                    let id = dir_entry.file_name().to_string_lossy().into_owned();
                    let reason = format!("cannot read {}: {e}", record_path.display());
                    self.quarantine("container", &id, &dir_entry.path(), reason);
                    continue;
                }
            };
            // The containers of a pod whose record was set aside are kept as they are: stopping
            // them would act on a guess. They stay listed, so a client can stop and remove them.
            let pod_quarantined = self.pod_quarantined(&record.pod_id);
            let pod_gone = !pod_quarantined && self.pod(&record.pod_id).is_err();
            let entry = Entry::new(record.clone());
            self.containers.lock().expect("container table lock").insert(record.id.clone(), entry.clone());
            if pod_quarantined && record.state == ContainerState::Running {
                self.reserve_quarantined_userns(&record.pod_id, &record.unit).await;
            }
            if pod_gone || matches!(record.state, ContainerState::Creating | ContainerState::Removing) {
                info!(container = %record.id, state = ?record.state, pod_gone, "removing a container left half-done");
                if let Err(e) = self.remove_locked(&entry).await {
                    warn!(container = %record.id, "{e}; will try again");
                }
                continue;
            }
            if record.state == ContainerState::Running {
                self.watch_exit(&record.id);
                self.watch_main_process(&record.id);
                if !record.spec.tty {
                    // Before refresh: a container that ended meanwhile has its output drained.
                    self.recover_output(&record, &mut stored).await;
                }
            }
            let record = self.refresh(&entry);
            if record.state == ContainerState::Running && !self.systemd.unit_exists(&record.unit).await.unwrap_or(true)
            {
                self.mark_exited(&entry, None, "the container's unit is gone (node rebooted?)");
            }
            let record = entry.get();
            if record.state == ContainerState::Running && (record.spec.stdin || record.spec.tty) {
                let log = self.log_path(&record.id);
                match stored.adopt(&record.id, record.spec.tty, record.spec.stdin_once, log) {
                    Some(Ok(stdio)) => {
                        self.stdio.lock().expect("stdio table lock").insert(record.id.clone(), stdio);
                    }
                    Some(Err(e)) => warn!(container = %record.id, "cannot take back the container's stdin: {e}"),
                    None => {
                        let why = "closed by stdin_once, or lost when the daemon was stopped";
                        info!(container = %record.id, "no stored stdin or terminal ({why})")
                    }
                }
            }
        }
        stored.close_rest();
        self.remove_orphan_spools();
        Ok(())
    }

    /// Removes the output spools of containers without a record (removed by a daemon killed
    /// before it got to their spool; a spool set aside as unreadable is kept).
    fn remove_orphan_spools(&self) {
        let Ok(spools) = std::fs::read_dir(self.config.run_root.join("output")) else { return };
        for spool in spools.flatten() {
            let name = spool.file_name().to_string_lossy().into_owned();
            if name.contains(".unreadable-")
                || self.containers.lock().expect("container table lock").contains_key(&name)
            {
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(spool.path()) {
                warn!("cannot remove the output spool {}: {e}", spool.path().display());
            }
        }
    }
}

impl Runtime {
    /// A running container of a pod whose record was set aside may be in that pod's user
    /// namespace, and so is the init of such a pod that shares one PID namespace: the range (read
    /// from the unit's main process's uid_map) stays reserved, so that no new pod gets the same
    /// host ids.
    pub(crate) async fn reserve_quarantined_userns(&self, pod_id: &str, unit: &str) {
        let Ok(pid) = self.systemd.main_pid(unit).await else { return };
        let Ok(map) = std::fs::read_to_string(format!("/proc/{pid}/uid_map")) else { return };
        let Some(range) = crate::userns::pod_range_of_uid_map(&map) else { return };
        let mut ranges = self.userns_ranges.lock().expect("userns range lock");
        if ranges.user_of(&range).is_none()
            && let Err(e) = ranges.reserve(pod_id, range)
        {
            warn!(pod = %pod_id, "user namespace range of a quarantined pod: {e}");
        }
    }
}

impl Runtime {
    /// PID namespace mode TARGET: the target must be a running container of the same pod (as
    /// containerd checks at CreateContainer).
    fn check_pid_target(&self, pod_id: &str, target: &str) -> Result<Container, Error> {
        let target = match self.container(target) {
            Ok(target) => target,
            Err(Error::ContainerNotFound { id }) => {
                return Err(Error::InvalidSpec(format!(
                    "namespace_options.target_id {id:?}: no such container (PID namespace mode TARGET)"
                )));
            }
            Err(e) => return Err(e),
        };
        if target.pod_id != pod_id {
            return Err(Error::InvalidSpec(format!(
                "namespace_options.target_id {}: the container belongs to pod {}, not to pod {pod_id}",
                target.id, target.pod_id
            )));
        }
        if target.state != ContainerState::Running {
            return Err(Error::ContainerState(format!(
                "namespace_options.target_id {}: the target container is {:?}, not running: its PID namespace is gone",
                target.id, target.state
            )));
        }
        Ok(target)
    }

    /// Pins the PID namespace of `target`'s main process at `pin` for init to join. The main
    /// PID is read again once the pin is made: had the target ended in between (its PID perhaps
    /// reused), the pin could hold another process's namespace, and is undone.
    async fn pin_target_pid_namespace(&self, pod_id: &str, target: &str, pin: &Path) -> Result<(), Error> {
        let target = self.check_pid_target(pod_id, target)?;
        let not_running = || {
            Error::ContainerState(format!(
                "namespace_options.target_id {}: the target container is not running: its PID namespace is gone",
                target.id
            ))
        };
        let pid = self.systemd.main_pid(&target.unit).await.ok().filter(|&p| p != 0).ok_or_else(not_running)?;
        unpin_target_pid_namespace(pin);
        crate::namespaces::pin_process_namespace(pid, "pid", pin, None)
            .map_err(Error::io(format!("cannot pin the PID namespace of container {}", target.id)))?;
        if self.systemd.main_pid(&target.unit).await.ok() != Some(pid) {
            unpin_target_pid_namespace(pin);
            return Err(not_running());
        }
        Ok(())
    }
}

/// Undoes [`Runtime::pin_target_pid_namespace`]; nothing there is no error.
fn unpin_target_pid_namespace(pin: &Path) {
    let _ = nix::mount::umount2(pin, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(pin);
}

/// An update's hugepage limits: per page size, the new limit where the update names the size,
/// the old one elsewhere (the kubelet sends every size of the node, other callers maybe one).
fn merge_hugepage_limits(old: &[HugepageLimit], new: Vec<HugepageLimit>) -> Vec<HugepageLimit> {
    let mut merged: Vec<HugepageLimit> =
        old.iter().filter(|o| !new.iter().any(|n| n.page_size == o.page_size)).cloned().collect();
    merged.extend(new);
    merged
}

/// cgroup v1: systemd applies `CPUAffinity=` at exec only, so a new CPU set for a running
/// container is the affinity of each of its tasks (threads), set here. Tasks started meanwhile
/// inherit it from an updated parent, or are found by the next pass.
fn set_unit_affinity(record: &Container, cpus: &str) -> Result<(), Error> {
    let ids = container::parse_cpu_list(cpus)?;
    let mut set = nix::sched::CpuSet::new();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let ids = if ids.is_empty() { container::parse_cpu_list(online.trim())? } else { ids };
    for id in ids {
        set.set(id as usize).map_err(|e| Error::InvalidSpec(format!("cpuset_cpus {cpus:?}: cpu {id}: {e}")))?;
    }
    let tasks_file = Path::new("/sys/fs/cgroup/systemd")
        .join(crate::stats::cgroup_path(&record.slice, Some(&record.unit)).trim_start_matches('/'))
        .join("tasks");
    let mut done: HashSet<i32> = HashSet::new();
    for _ in 0..3 {
        let tasks = std::fs::read_to_string(&tasks_file)
            .map_err(Error::io(format!("cannot list the tasks of {}", record.unit)))?;
        let new: Vec<i32> =
            tasks.split_whitespace().filter_map(|t| t.parse().ok()).filter(|t| !done.contains(t)).collect();
        if new.is_empty() {
            break;
        }
        for tid in new {
            match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(Error::Io {
                        what: format!("cannot set the CPU affinity of task {tid} of {}", record.unit),
                        source: e.into(),
                    });
                }
            }
            done.insert(tid);
        }
    }
    Ok(())
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Whether `signal`, sent from the node, reaches process `pid` now: always, unless the process is
/// the PID 1 of its PID namespace (the last `NSpid` field is 1) and has no handler for it
/// (`SigCgt`), in which case the kernel drops it. Unknown (the process is gone, the file is
/// unreadable): yes, so the signal is sent as it always was.
fn stop_signal_reaches(pid: u32, signal: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => signal_reaches(&status, signal),
        Err(_) => true,
    }
}

fn signal_reaches(status: &str, signal: i32) -> bool {
    if signal == libc::SIGKILL || signal == libc::SIGSTOP || !(1..=64).contains(&signal) {
        return true;
    }
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let namespace_init = field("NSpid:").and_then(|v| v.split_whitespace().last()) == Some("1");
    if !namespace_init {
        return true;
    }
    match field("SigCgt:").and_then(|v| u64::from_str_radix(v, 16).ok()) {
        Some(caught) => caught & (1 << (signal - 1)) != 0,
        None => true,
    }
}

/// Writes the container's OCI spec as `config.json` (0600 like init.json: it holds the env).
fn write_bundle_config(oci: &oci_spec::runtime::Spec, path: &std::path::Path) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let text =
        serde_json::to_vec_pretty(oci).map_err(|e| Error::InvalidSpec(format!("cannot write config.json: {e}")))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("cannot write the bundle's config.json"))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io("cannot write the bundle's config.json"))?;
    std::io::Write::write_all(&mut file, &text).map_err(Error::io("cannot write the bundle's config.json"))
}

/// The node's cgroup file systems, read from the daemon's mountinfo once: init and exec-in get
/// them in init.json instead of reading their own mountinfo, whose size grows with every pod's
/// mounts on the node (3 ms a read with 2000 of them in a test node at load 2, 28 ms at load 7).
/// None if it cannot be read (not kept: init then reads its own, and fails as it did before).
fn node_cgroup_mounts() -> Option<Vec<init::cgroup::CgroupMount>> {
    static MOUNTS: std::sync::OnceLock<Vec<init::cgroup::CgroupMount>> = std::sync::OnceLock::new();
    if let Some(mounts) = MOUNTS.get() {
        return Some(mounts.clone());
    }
    let mounts = init::cgroup::mounts().ok()?;
    Some(MOUNTS.get_or_init(|| mounts).clone())
}

#[cfg(test)]
mod stop_signal_tests {
    use super::signal_reaches;

    #[test]
    fn a_namespace_init_gets_only_the_signals_it_catches() {
        let init = |caught: &str| format!("Name:\tsh\nNSpid:\t4242\t1\nSigIgn:\t0000000000000004\nSigCgt:\t{caught}\n");
        // No handler yet: SIGTERM would be dropped.
        assert!(!signal_reaches(&init("0000000000000000"), libc::SIGTERM));
        // `trap ... TERM`: bit 15 (SIGTERM) set.
        assert!(signal_reaches(&init("0000000000004000"), libc::SIGTERM));
        assert!(!signal_reaches(&init("0000000000004000"), libc::SIGINT));
        assert!(signal_reaches(&init("0000000000000000"), libc::SIGKILL));
        // Not a namespace's PID 1 (hostPID, a shared pod PID namespace): always delivered.
        assert!(signal_reaches("NSpid:\t4242\t7\nSigCgt:\t0000000000000000\n", libc::SIGTERM));
        assert!(signal_reaches("NSpid:\t4242\nSigCgt:\t0000000000000000\n", libc::SIGTERM));
        assert!(signal_reaches("", libc::SIGTERM));
    }
}
