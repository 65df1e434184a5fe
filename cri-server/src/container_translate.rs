//! CRI container messages <-> `runtime` containers.

use std::collections::HashMap;

use imagestore::Image;
use proto::cri;
use runtime::apparmor::AppArmor;
use runtime::{
    BindMount, Container, ContainerImage, ContainerSpec, ContainerState, Device, HugepageLimit, Propagation, Resources,
    Seccomp,
};
use tonic::Status;

/// Reads a CRI ContainerConfig, and the image it names, as a runtime ContainerSpec.
pub fn container_spec(config: cri::ContainerConfig, image: &Image) -> Result<ContainerSpec, Status> {
    // CDI devices (`cdi_devices`, cdi.k8s.io/ annotations) are injected by the caller afterwards
    // (crate::cdi), from spec files on the node.
    let devices = config
        .devices
        .iter()
        .map(|d| Device::resolve(&d.host_path, &d.container_path, &d.permissions))
        .collect::<Result<Vec<_>, _>>()
        .map_err(crate::errors::runtime_status)?;
    let metadata = config.metadata.ok_or_else(|| Status::invalid_argument("container config has no metadata"))?;
    let linux = config.linux.unwrap_or_default();
    let security = linux.security_context.unwrap_or_default();
    let pid_target = pid_target_of(security.namespace_options.as_ref())?;
    let resources = linux.resources.unwrap_or_default();
    let mut mounts = Vec::with_capacity(config.mounts.len());
    let mut image_volumes = Vec::new();
    for (index, mount) in config.mounts.into_iter().enumerate() {
        if mount.image.is_some() {
            image_volumes.push(image_volume(index, mount)?);
            continue;
        }
        if !mount.image_sub_path.is_empty() {
            return Err(Status::invalid_argument(format!(
                "mounts[{index}] at {}: image_sub_path is only for image volumes (a mount with an image)",
                mount.container_path
            )));
        }
        let propagation = match cri::MountPropagation::try_from(mount.propagation) {
            Ok(cri::MountPropagation::PropagationPrivate) => Propagation::Private,
            Ok(cri::MountPropagation::PropagationHostToContainer) => Propagation::HostToContainer,
            Ok(cri::MountPropagation::PropagationBidirectional) => Propagation::Bidirectional,
            Err(_) => return Err(Status::invalid_argument(format!("unknown mount propagation {}", mount.propagation))),
        };
        // selinux_relabel is ignored: this runtime does not use SELinux labels.
        mounts.push(BindMount {
            container_path: mount.container_path,
            host_path: mount.host_path.into(),
            readonly: mount.readonly,
            recursive_readonly: mount.recursive_read_only,
            propagation,
            uid_mappings: crate::pod_translate::id_mappings(&mount.uid_mappings),
            gid_mappings: crate::pod_translate::id_mappings(&mount.gid_mappings),
            extra_options: Vec::new(),
        });
    }
    // Older clients still send the deprecated path form.
    #[allow(deprecated)]
    let seccomp = seccomp_of(security.seccomp.as_ref(), &security.seccomp_profile_path)?;
    #[allow(deprecated)]
    let apparmor = apparmor_of(security.apparmor.as_ref(), &security.apparmor_profile)?;
    if let Some(refusal) = runtime::selinux::refusal("the container", security.selinux_options.is_some()) {
        return Err(Status::failed_precondition(refusal));
    }
    let capabilities = security.capabilities.unwrap_or_default();
    let image_name = config.image.map(|i| i.image).unwrap_or_default();
    check_log_path(&config.log_path)?;
    let stop_signal = stop_signal_of(config.stop_signal)?;
    let supplemental_groups_policy = supplemental_groups_policy_of(security.supplemental_groups_policy)?;
    Ok(ContainerSpec {
        name: metadata.name,
        attempt: metadata.attempt,
        image: container_image(image, &image_name),
        command: config.command,
        args: config.args,
        working_dir: config.working_dir,
        env: config.envs.into_iter().map(env_var).collect::<Result<_, _>>()?,
        mounts,
        image_volumes,
        devices,
        labels: config.labels.into_iter().collect(),
        annotations: config.annotations.into_iter().collect(),
        log_path: config.log_path,
        resources: resources_of(&resources)?,
        run_as_user: security.run_as_user.map(|v| v.value),
        run_as_group: security.run_as_group.map(|v| v.value),
        run_as_username: security.run_as_username,
        supplemental_groups: security.supplemental_groups,
        supplemental_groups_policy,
        readonly_rootfs: security.readonly_rootfs,
        no_new_privs: security.no_new_privs,
        privileged: security.privileged,
        add_capabilities: capabilities.add_capabilities,
        drop_capabilities: capabilities.drop_capabilities,
        masked_paths: (!security.masked_paths.is_empty()).then_some(security.masked_paths),
        readonly_paths: (!security.readonly_paths.is_empty()).then_some(security.readonly_paths),
        seccomp,
        apparmor,
        stdin: config.stdin,
        // Without stdin there is nothing to close.
        stdin_once: config.stdin && config.stdin_once,
        tty: config.tty,
        stop_signal,
        pid_target,
        // From CDI devices (crate::cdi::inject).
        hooks: Vec::new(),
    })
}

/// The kubelet's seccomp choice: the `seccomp` profile, or the deprecated path form when that is
/// absent (crictl may send either; absent both, unconfined, as with containerd).
fn seccomp_of(profile: Option<&cri::SecurityProfile>, path: &str) -> Result<Seccomp, Status> {
    use cri::security_profile::ProfileType;
    let localhost = |path: &str| {
        if path.is_empty() {
            Err(Status::invalid_argument("a Localhost seccomp profile needs localhost_ref, the profile's path"))
        } else {
            Ok(Seccomp::Localhost(path.into()))
        }
    };
    match profile {
        Some(profile) => match ProfileType::try_from(profile.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(Seccomp::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(Seccomp::Unconfined),
            Ok(ProfileType::Localhost) => localhost(&profile.localhost_ref),
            Err(_) => Err(Status::invalid_argument(format!("unknown seccomp profile type {}", profile.profile_type))),
        },
        None => match path {
            "" | "unconfined" => Ok(Seccomp::Unconfined),
            "runtime/default" | "docker/default" => Ok(Seccomp::RuntimeDefault),
            path if path.starts_with("localhost/") => localhost(&path["localhost/".len()..]),
            other => Err(Status::invalid_argument(format!("unknown seccomp profile {other:?}"))),
        },
    }
}

/// The kubelet's AppArmor choice: the `apparmor` profile, or the deprecated string form when that
/// is absent (`runtime/default`, `localhost/<name>`, `unconfined`). Absent both: unset, which the
/// runtime turns into its default profile on a node with AppArmor (runtime::apparmor).
fn apparmor_of(profile: Option<&cri::SecurityProfile>, deprecated: &str) -> Result<AppArmor, Status> {
    use cri::security_profile::ProfileType;
    let localhost = |name: &str| {
        if name.is_empty() {
            Err(Status::invalid_argument("a Localhost apparmor profile needs localhost_ref, the profile's name"))
        } else {
            // The kubelet sends the bare name; older clients may keep the prefix.
            Ok(AppArmor::Localhost(name.strip_prefix("localhost/").unwrap_or(name).to_string()))
        }
    };
    match profile {
        Some(profile) => match ProfileType::try_from(profile.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(AppArmor::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(AppArmor::Unconfined),
            Ok(ProfileType::Localhost) => localhost(&profile.localhost_ref),
            Err(_) => Err(Status::invalid_argument(format!("unknown apparmor profile type {}", profile.profile_type))),
        },
        None => match deprecated {
            "" => Ok(AppArmor::Unset),
            "unconfined" => Ok(AppArmor::Unconfined),
            "runtime/default" => Ok(AppArmor::RuntimeDefault),
            name if name.starts_with("localhost/") => localhost(&name["localhost/".len()..]),
            other => Err(Status::invalid_argument(format!("unknown apparmor profile {other:?}"))),
        },
    }
}

/// The limits the runtime applies, from CRI LinuxContainerResources. Hugepage page sizes and
/// the node's hugetlb controller are checked by the runtime (they are the node's).
pub fn resources_of(r: &cri::LinuxContainerResources) -> Result<Resources, Status> {
    let mut hugepage_limits = Vec::new();
    for h in &r.hugepage_limits {
        if h.page_size.is_empty() {
            return Err(Status::invalid_argument("a hugepage limit needs a page size such as \"2MB\""));
        }
        hugepage_limits.push(HugepageLimit { page_size: h.page_size.clone(), limit: h.limit });
    }
    for (what, list) in [("cpuset_cpus", &r.cpuset_cpus), ("cpuset_mems", &r.cpuset_mems)] {
        runtime::parse_cpu_list(list).map_err(|e| {
            Status::invalid_argument(format!("{what}: {}", e.to_string().trim_start_matches("cpuset ")))
        })?;
    }
    Ok(Resources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit_in_bytes: r.memory_limit_in_bytes,
        oom_score_adj: r.oom_score_adj,
        cpuset_cpus: r.cpuset_cpus.clone(),
        cpuset_mems: r.cpuset_mems.clone(),
        hugepage_limits,
        unified: r.unified.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        memory_swap_limit_in_bytes: r.memory_swap_limit_in_bytes,
    })
}

fn container_image(image: &Image, requested: &str) -> ContainerImage {
    ContainerImage {
        id: image.id.to_string(),
        name: if requested.is_empty() {
            image.repo_tags.first().cloned().unwrap_or_default()
        } else {
            requested.to_string()
        },
        repo_digest: image.repo_digests.first().cloned().unwrap_or_else(|| image.id.to_string()),
        entrypoint: image.config.entrypoint.clone(),
        cmd: image.config.cmd.clone(),
        env: image.config.env.clone(),
        working_dir: image.config.working_dir.clone(),
        user: image.config.user.clone(),
        stop_signal: image.config.stop_signal.clone(),
    }
}

pub fn cri_state(state: ContainerState) -> i32 {
    match state {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Creating | ContainerState::Removing => cri::ContainerState::ContainerUnknown as i32,
    }
}

pub fn container_state(value: i32) -> Result<ContainerState, Status> {
    match cri::ContainerState::try_from(value) {
        Ok(cri::ContainerState::ContainerCreated) => Ok(ContainerState::Created),
        Ok(cri::ContainerState::ContainerRunning) => Ok(ContainerState::Running),
        Ok(cri::ContainerState::ContainerExited) => Ok(ContainerState::Exited),
        // Nothing is ever listed as unknown; a filter for it matches nothing.
        Ok(cri::ContainerState::ContainerUnknown) => Ok(ContainerState::Removing),
        Err(_) => Err(Status::invalid_argument(format!("unknown container state {value}"))),
    }
}

fn map(from: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    from.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn metadata(c: &Container) -> cri::ContainerMetadata {
    cri::ContainerMetadata { name: c.spec.name.clone(), attempt: c.spec.attempt }
}

pub fn container_status(c: &Container, pod_log_directory: &std::path::Path) -> cri::ContainerStatus {
    let log_path = if c.spec.log_path.is_empty() || pod_log_directory.as_os_str().is_empty() {
        String::new()
    } else {
        pod_log_directory.join(&c.spec.log_path).to_string_lossy().into_owned()
    };
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(metadata(c)),
        state: cri_state(c.state),
        created_at: c.created_at,
        started_at: c.started_at,
        finished_at: c.finished_at,
        exit_code: c.exit_code,
        image: Some(cri::ImageSpec { image: c.spec.image.name.clone(), ..Default::default() }),
        image_ref: c.spec.image.repo_digest.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: map(&c.spec.labels),
        annotations: map(&c.spec.annotations),
        mounts: c
            .spec
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.to_string_lossy().into_owned(),
                readonly: m.readonly,
                recursive_read_only: m.recursive_readonly,
                propagation: match m.propagation {
                    Propagation::Private => cri::MountPropagation::PropagationPrivate as i32,
                    Propagation::HostToContainer => cri::MountPropagation::PropagationHostToContainer as i32,
                    Propagation::Bidirectional => cri::MountPropagation::PropagationBidirectional as i32,
                },
                uid_mappings: crate::pod_translate::cri_id_mappings(&m.uid_mappings),
                gid_mappings: crate::pod_translate::cri_id_mappings(&m.gid_mappings),
                ..Default::default()
            })
            .chain(c.spec.image_volumes.iter().map(image_volume_status))
            .collect(),
        log_path,
        resources: Some(cri::ContainerResources {
            linux: Some(cri::LinuxContainerResources {
                cpu_period: c.spec.resources.cpu_period,
                cpu_quota: c.spec.resources.cpu_quota,
                cpu_shares: c.spec.resources.cpu_shares,
                memory_limit_in_bytes: c.spec.resources.memory_limit_in_bytes,
                oom_score_adj: c.spec.resources.oom_score_adj,
                cpuset_cpus: c.spec.resources.cpuset_cpus.clone(),
                cpuset_mems: c.spec.resources.cpuset_mems.clone(),
                hugepage_limits: c
                    .spec
                    .resources
                    .hugepage_limits
                    .iter()
                    .map(|h| cri::HugepageLimit { page_size: h.page_size.clone(), limit: h.limit })
                    .collect(),
                unified: map(&c.spec.resources.unified),
                memory_swap_limit_in_bytes: c.spec.resources.memory_swap_limit_in_bytes,
            }),
            ..Default::default()
        }),
        image_id: c.spec.image.id.clone(),
        user: c.user.as_ref().map(|u| cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: u.uid.into(),
                gid: u.gid.into(),
                supplemental_groups: u.additional_gids.iter().map(|&g| g.into()).collect(),
            }),
        }),
        stop_signal: cri_stop_signal(&c.spec),
    }
}

pub fn container(c: &Container) -> cri::Container {
    cri::Container {
        id: c.id.clone(),
        pod_sandbox_id: c.pod_id.clone(),
        metadata: Some(metadata(c)),
        image: Some(cri::ImageSpec { image: c.spec.image.name.clone(), ..Default::default() }),
        image_ref: c.spec.image.repo_digest.clone(),
        state: cri_state(c.state),
        created_at: c.created_at,
        labels: map(&c.spec.labels),
        annotations: map(&c.spec.annotations),
        image_id: c.spec.image.id.clone(),
    }
}
/// The CRI's log_path is relative to the pod's log_directory: an absolute path or `..` would put
/// the log (created by the daemon as root) anywhere on the node.
/// An environment variable of the config. Since cri-api 1.36.2 values are bytes; this runtime keeps
/// them as text (the container's record is JSON), so a value that is not UTF-8 is refused, naming it.
fn env_var(kv: cri::KeyValue) -> Result<(String, String), Status> {
    match String::from_utf8(kv.value) {
        Ok(value) => Ok((kv.key, value)),
        Err(_) => Err(Status::invalid_argument(format!(
            "envs: the value of {} is not UTF-8, which cri-systemd does not support",
            kv.key
        ))),
    }
}

/// `stop_signal` (cri-api 1.33) as the runtime keeps it: the CRI's name with `PLUS`/`MINUS` as
/// `+`/`-` (`SIGRTMIN+1`, as containerd writes it in the OCI spec); RUNTIME_DEFAULT: None, the
/// image's STOPSIGNAL.
fn stop_signal_of(stop_signal: i32) -> Result<Option<String>, Status> {
    match cri::Signal::try_from(stop_signal) {
        Ok(cri::Signal::RuntimeDefault) => Ok(None),
        Ok(signal) => Ok(Some(signal.as_str_name().replacen("PLUS", "+", 1).replacen("MINUS", "-", 1))),
        Err(_) => Err(Status::invalid_argument(format!("stop_signal {stop_signal}: unknown signal"))),
    }
}

/// ContainerStatus.stop_signal: the config's, else the image's STOPSIGNAL, else SIGTERM, as
/// containerd reports it (an image signal the CRI has no name for: RUNTIME_DEFAULT).
pub(crate) fn cri_stop_signal(spec: &runtime::ContainerSpec) -> i32 {
    let name = match &spec.stop_signal {
        Some(name) => Some(name.clone()),
        None => runtime::stop_signal(&spec.image.stop_signal).ok().and_then(runtime::signal_name),
    };
    name.and_then(|n| cri::Signal::from_str_name(&n.replacen('+', "PLUS", 1).replacen('-', "MINUS", 1)))
        .unwrap_or(cri::Signal::RuntimeDefault) as i32
}

/// PID namespace mode TARGET (`kubectl debug --target`, which the kubelet sends for an ephemeral
/// container with a target in a pod without a shared PID namespace): the target's id. The other
/// modes are the pod's (this runtime takes them from the pod's config, as the kubelet sends the
/// same).
fn pid_target_of(options: Option<&cri::NamespaceOption>) -> Result<Option<String>, Status> {
    let Some(options) = options else { return Ok(None) };
    match (cri::NamespaceMode::try_from(options.pid), options.target_id.is_empty()) {
        (Ok(cri::NamespaceMode::Target), false) => Ok(Some(options.target_id.clone())),
        (Ok(cri::NamespaceMode::Target), true) => Err(Status::invalid_argument(
            "namespace_options.pid is TARGET but namespace_options.target_id names no container",
        )),
        (_, false) => Err(Status::invalid_argument(format!(
            "namespace_options.target_id {:?} is only for namespace_options.pid TARGET",
            options.target_id
        ))),
        (_, true) => Ok(None),
    }
}

/// SupplementalGroupsPolicy (KEP-3619): Merge adds the image's /etc/group groups of the user.
fn supplemental_groups_policy_of(policy: i32) -> Result<runtime::SupplementalGroupsPolicy, Status> {
    match cri::SupplementalGroupsPolicy::try_from(policy) {
        Ok(cri::SupplementalGroupsPolicy::Merge) => Ok(runtime::SupplementalGroupsPolicy::Merge),
        Ok(cri::SupplementalGroupsPolicy::Strict) => Ok(runtime::SupplementalGroupsPolicy::Strict),
        Err(_) => Err(Status::invalid_argument(format!(
            "linux.security_context.supplemental_groups_policy {policy}: unknown policy"
        ))),
    }
}

fn check_log_path(log_path: &str) -> Result<(), Status> {
    let path = std::path::Path::new(log_path);
    if path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(Status::invalid_argument(format!(
            "log_path {log_path:?} must be relative to the pod's log_directory, without \"..\""
        )));
    }
    Ok(())
}

/// An image volume of the config (`mounts[index]` with an `image`): read-only, no host path.
/// The node resolves the image and leases its layers (node::create_container).
fn image_volume(index: usize, mount: cri::Mount) -> Result<runtime::ImageVolume, Status> {
    let at = format!("mounts[{index}] at {}", mount.container_path);
    let image = mount.image.map(|i| i.image).unwrap_or_default();
    if image.is_empty() {
        return Err(Status::invalid_argument(format!("{at}: image.image names no image")));
    }
    // The kubelet always sends image volumes read-only; containerd refuses them otherwise too.
    if !mount.readonly {
        return Err(Status::invalid_argument(format!("{at}: an image volume must be read-only (readonly: true)")));
    }
    if !mount.host_path.is_empty() {
        return Err(Status::invalid_argument(format!("{at}: an image volume takes no host_path")));
    }
    // Propagation, recursive_read_only and id mappings do not apply: the volume is a read-only
    // overlay with no submounts, idmapped like the rootfs's layers.
    Ok(runtime::ImageVolume {
        container_path: mount.container_path,
        image,
        image_id: String::new(),
        sub_path: mount.image_sub_path,
        lowerdirs: Vec::new(),
    })
}

/// An image volume as ContainerStatus reports it: `image.image_ref` is the image's id, what
/// PullImage answered for it (KEP-5365; critest compares them).
fn image_volume_status(v: &runtime::ImageVolume) -> cri::Mount {
    cri::Mount {
        container_path: v.container_path.clone(),
        readonly: true,
        image: Some(cri::ImageSpec { image: v.image.clone(), image_ref: v.image_id.clone(), ..Default::default() }),
        image_sub_path: v.sub_path.clone(),
        ..Default::default()
    }
}

/// What the pod's runtime handler (`[runtimes.<name>]`) changes in its containers: no container
/// of a `seccomp_runtime_default` handler runs without a seccomp filter (privileged ones run
/// unconfined whatever the spec says, as with every handler).
pub fn apply_runtime_handler(spec: &mut ContainerSpec, handler: &crate::config::RuntimeHandlerConfig) {
    if handler.seccomp_runtime_default && spec.seccomp == Seccomp::Unconfined {
        spec.seccomp = Seccomp::RuntimeDefault;
    }
}
