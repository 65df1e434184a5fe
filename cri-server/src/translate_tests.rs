//! The CRI translators (`pod_translate`, `container_translate`) on requests a kubelet v1.32 sent
//! (`testdata/kubelet-1.32-requests.json`: the request bytes of chosen RunPodSandbox and
//! CreateContainer calls, recorded between a real kubelet and this runtime), then on edge cases.
//! Each translated spec goes through the runtime's own validation, as the handlers do.

use prost::Message;
use proto::cri;
use runtime::{NamespaceMode, Propagation, Seccomp, UsernsMode};
use tonic::Code;

use crate::container_translate::container_spec;
use crate::pod_translate::pod_spec;

const REQUESTS: &str = include_str!("../testdata/kubelet-1.32-requests.json");

#[derive(serde::Deserialize)]
struct Recorded {
    method: String,
    seq: u64,
    request_hex: String,
}

/// The recorded request of `method` at sequence number `seq`.
fn recorded<M: Message + Default>(method: &str, seq: u64) -> M {
    let all: Vec<Recorded> = serde_json::from_str(REQUESTS).unwrap();
    let request = all.into_iter().find(|r| r.method == method && r.seq == seq).expect("recorded request");
    let hex = request.request_hex.as_bytes();
    let bytes: Vec<u8> =
        hex.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap()).collect();
    M::decode(bytes.as_slice()).unwrap()
}

fn image() -> imagestore::Image {
    let digest: imagestore::Digest =
        "sha256:70a46787caee505bac7ae6581da81d80fe7d0f4451e219fa2751d1c17837a76c".parse().unwrap();
    imagestore::Image {
        id: imagestore::ImageId(digest.clone()),
        repo_tags: vec!["registry.k8s.io/e2e-test-images/busybox:1.29-2".into()],
        repo_digests: vec![],
        size: 0,
        pinned: false,
        config: imagestore::ImageConfig { cmd: vec!["sh".into()], ..Default::default() },
        layers: vec![],
        manifest_digest: digest,
    }
}

/// The gRPC code a runtime validation error reaches the client with.
fn code_of(result: Result<(), runtime::Error>) -> Code {
    result.map_or_else(|e| crate::errors::runtime_status(e).code(), |()| Code::Ok)
}

#[test]
fn the_kubelets_pod_with_ports_and_dns_in_its_qos_slice() {
    let request: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 175);
    let spec = pod_spec(request).unwrap();
    spec.validate().unwrap();
    assert_eq!((spec.name.as_str(), spec.namespace.as_str()), ("b2-nginx-logvol-vm", "default"));
    // The kubelet's expanded path: the pod's slice is its last component.
    assert_eq!(spec.slice_name(), "kubepods-besteffort-pod615b6861ed4ebb27eff508f234012ec8.slice");
    assert_eq!((spec.network, spec.pid, spec.ipc), (NamespaceMode::Pod, NamespaceMode::Container, NamespaceMode::Pod));
    assert_eq!(spec.userns, UsernsMode::Node);
    let port = &spec.port_mappings[..];
    assert_eq!(port.len(), 1);
    assert_eq!((port[0].protocol.as_str(), port[0].container_port, port[0].host_port), ("TCP", 80, 0));
    assert_eq!(spec.dns.unwrap().servers, ["10.255.255.53"]);
    assert_eq!(
        spec.log_directory.to_str(),
        Some("/var/log/pods/default_b2-nginx-logvol-vm_615b6861ed4ebb27eff508f234012ec8")
    );
}

#[test]
fn the_kubelets_user_namespaced_pod_keeps_its_mappings() {
    let request: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 160);
    let spec = pod_spec(request).unwrap();
    spec.validate().unwrap();
    let range = spec.userns.requested_range().unwrap().expect("the kubelet's range");
    assert_eq!((range.host_id, range.size), (796721152, 65536));
}

#[test]
fn the_kubelets_secured_container() {
    let request: cri::CreateContainerRequest = recorded("CreateContainer", 199);
    let spec = container_spec(request.config.unwrap(), &image()).unwrap();
    spec.validate().unwrap();
    assert_eq!(spec.name, "sec");
    assert_eq!((spec.run_as_user, spec.run_as_group), (Some(1000), Some(3000)));
    assert_eq!(spec.supplemental_groups, [2000]);
    assert!(spec.readonly_rootfs && spec.no_new_privs && !spec.privileged);
    assert_eq!(spec.drop_capabilities, ["ALL"]);
    assert_eq!(spec.seccomp, Seccomp::Unconfined);
    assert_eq!(spec.masked_paths.as_ref().map(Vec::len), Some(12));
    assert_eq!(spec.readonly_paths.as_ref().map(Vec::len), Some(5));
    assert_eq!(spec.log_path, "sec/0.log");
    assert_eq!(spec.resources.oom_score_adj, 1000);
    assert_eq!(spec.resources.cpu_shares, 2);
    // Unset env values are kept as empty ones.
    assert!(spec.env.contains(&("KUBERNETES_SERVICE_HOST".into(), String::new())));
    let data = spec.mounts.iter().find(|m| m.container_path == "/data").unwrap();
    assert!(!data.readonly && data.propagation == Propagation::Private);
    // The image named by id; the name the user gave is in the request too.
    assert_eq!(spec.image.id, image().id.to_string());
    assert_eq!(spec.image.cmd, ["sh"]);
}

#[test]
fn the_kubelets_container_in_a_user_namespace_has_idmapped_mounts() {
    let request: cri::CreateContainerRequest = recorded("CreateContainer", 214);
    let spec = container_spec(request.config.unwrap(), &image()).unwrap();
    spec.validate().unwrap();
    assert!(!spec.mounts.is_empty());
    for mount in &spec.mounts {
        assert_eq!(mount.uid_mappings.len(), 1, "{mount:?}");
        assert_eq!((mount.uid_mappings[0].host_id, mount.uid_mappings[0].size), (796721152, 65536));
        assert_eq!(mount.gid_mappings, mount.uid_mappings);
    }
    // `run_as_user: {}` is user 0, as the kubelet means it.
    assert_eq!(spec.run_as_user, Some(0));
}

#[test]
fn the_kubelets_memory_limited_container() {
    let request: cri::CreateContainerRequest = recorded("CreateContainer", 219);
    let spec = container_spec(request.config.unwrap(), &image()).unwrap();
    spec.validate().unwrap();
    assert_eq!(spec.resources.memory_limit_in_bytes, 32 << 20);
    assert_eq!(spec.resources.oom_score_adj, 999);
    assert_eq!((spec.resources.cpu_period, spec.resources.cpu_quota), (100000, 0));
}

fn pod_with_cgroup_parent(parent: &str) -> cri::RunPodSandboxRequest {
    let mut request: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 175);
    request.config.as_mut().unwrap().linux.as_mut().unwrap().cgroup_parent = parent.into();
    request
}

#[test]
fn cgroup_parent_forms() {
    for (parent, slice) in [
        // critest's
        ("/test.slice", "test.slice"),
        // a bare slice name
        ("kubepods-burstable-podx.slice", "kubepods-burstable-podx.slice"),
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice", "kubepods-burstable-podx.slice"),
    ] {
        let spec = pod_spec(pod_with_cgroup_parent(parent)).unwrap();
        assert_eq!(code_of(spec.validate()), Code::Ok, "{parent}");
        assert_eq!(spec.slice_name(), slice);
    }
    for parent in [
        // the cgroupfs driver's form
        "/kubepods/burstable/podx",
        // not the slice's own ancestors
        "/kubepods.slice/kubepods-besteffort-podx.slice",
        "/other.slice/kubepods-besteffort-podx.slice",
        "kubepods-besteffort-podx",
        "/kubepods.slice/../etc.slice",
    ] {
        let spec = pod_spec(pod_with_cgroup_parent(parent)).unwrap();
        assert_eq!(code_of(spec.validate()), Code::InvalidArgument, "{parent}");
    }
    // None at all (crictl): a slice of the pod's own, named as the kubelet would.
    let spec = pod_spec(pod_with_cgroup_parent("")).unwrap();
    assert_eq!(spec.slice_name(), "kubepods-besteffort-pod615b6861ed4ebb27eff508f234012ec8.slice");
}

#[test]
fn pod_requests_that_are_refused() {
    let mut handler: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 175);
    handler.runtime_handler = "kata".into();
    assert_eq!(pod_spec(handler).unwrap_err().code(), Code::InvalidArgument);

    let mut target: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 175);
    let options = target.config.as_mut().unwrap().linux.as_mut().unwrap().security_context.as_mut().unwrap();
    options.namespace_options.as_mut().unwrap().network = cri::NamespaceMode::Target as i32;
    assert_eq!(pod_spec(target).unwrap_err().code(), Code::InvalidArgument);

    let mut node_mappings: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 160);
    let options = node_mappings.config.as_mut().unwrap().linux.as_mut().unwrap().security_context.as_mut().unwrap();
    options.namespace_options.as_mut().unwrap().userns_options.as_mut().unwrap().mode = cri::NamespaceMode::Node as i32;
    assert_eq!(pod_spec(node_mappings).unwrap_err().code(), Code::InvalidArgument);

    // A user namespace with the node's network namespace: refused by the runtime's validation.
    let mut host_network: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 160);
    let options = host_network.config.as_mut().unwrap().linux.as_mut().unwrap().security_context.as_mut().unwrap();
    options.namespace_options.as_mut().unwrap().network = cri::NamespaceMode::Node as i32;
    assert_eq!(code_of(pod_spec(host_network).unwrap().validate()), Code::InvalidArgument);

    let mut no_name: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 175);
    no_name.config.as_mut().unwrap().metadata.as_mut().unwrap().name.clear();
    assert_eq!(code_of(pod_spec(no_name).unwrap().validate()), Code::InvalidArgument);

    assert_eq!(pod_spec(cri::RunPodSandboxRequest::default()).unwrap_err().code(), Code::InvalidArgument);
}

#[test]
fn a_pod_without_namespace_options_gets_the_kubelets_defaults() {
    let mut request: cri::RunPodSandboxRequest = recorded("RunPodSandbox", 175);
    request.config.as_mut().unwrap().linux.as_mut().unwrap().security_context = None;
    let spec = pod_spec(request).unwrap();
    assert_eq!((spec.network, spec.pid, spec.ipc), (NamespaceMode::Pod, NamespaceMode::Container, NamespaceMode::Pod));
}

fn secured_container() -> cri::ContainerConfig {
    let request: cri::CreateContainerRequest = recorded("CreateContainer", 199);
    request.config.unwrap()
}

#[test]
fn run_as_group_without_a_user_is_refused() {
    let mut config = secured_container();
    config.linux.as_mut().unwrap().security_context.as_mut().unwrap().run_as_user = None;
    let spec = container_spec(config, &image()).unwrap();
    assert_eq!(code_of(spec.validate()), Code::InvalidArgument);

    // With a user name instead of an id: accepted.
    let mut config = secured_container();
    let security = config.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    security.run_as_user = None;
    security.run_as_username = "www".into();
    assert_eq!(code_of(container_spec(config, &image()).unwrap().validate()), Code::Ok);
}

#[test]
fn container_requests_that_are_refused() {
    let refused = |change: &dyn Fn(&mut cri::ContainerConfig)| {
        let mut config = secured_container();
        change(&mut config);
        container_spec(config, &image()).map_or_else(|e| e.code(), |_| Code::Ok)
    };
    assert_eq!(refused(&|c| c.log_path = "/etc/shadow".into()), Code::InvalidArgument);
    assert_eq!(refused(&|c| c.log_path = "sec/../../x.log".into()), Code::InvalidArgument);
    assert_eq!(refused(&|c| c.metadata = None), Code::InvalidArgument);
    assert_eq!(refused(&|c| c.mounts[0].propagation = 7), Code::InvalidArgument);
    assert_eq!(
        refused(&|c| {
            let security = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
            security.namespace_options.as_mut().unwrap().target_id = "other".into();
        }),
        Code::InvalidArgument
    );
    // A relative host path passes the translation and fails the runtime's validation.
    let mut config = secured_container();
    config.mounts[0].host_path = "relative/dir".into();
    assert_eq!(code_of(container_spec(config, &image()).unwrap().validate()), Code::InvalidArgument);
}

/// Image volumes as the kubelet sends them (`getImageVolumes`: image = the pulled image's ref,
/// readonly, no host path), and the ones refused before any lookup.
#[test]
fn image_volumes_are_read_only_image_mounts() {
    let image_mount = |readonly: bool, host_path: &str, image: &str, sub_path: &str| cri::Mount {
        container_path: "/mnt/vol".into(),
        host_path: host_path.into(),
        readonly,
        image: Some(cri::ImageSpec {
            image: image.into(),
            user_specified_image: "data:1".into(),
            ..Default::default()
        }),
        image_sub_path: sub_path.into(),
        ..Default::default()
    };
    let mut config = secured_container();
    let bind_mounts = config.mounts.len();
    config.mounts.push(image_mount(true, "", "sha256:0123", "etc"));
    let spec = container_spec(config, &image()).unwrap();
    assert_eq!(spec.mounts.len(), bind_mounts, "an image volume is not a bind mount");
    let volume = &spec.image_volumes[0];
    assert_eq!((volume.container_path.as_str(), volume.image.as_str()), ("/mnt/vol", "sha256:0123"));
    assert_eq!(volume.sub_path, "etc");

    for (mount, words) in [
        (image_mount(false, "", "sha256:0123", ""), "must be read-only"),
        (image_mount(true, "/srv", "sha256:0123", ""), "takes no host_path"),
        (image_mount(true, "", "", ""), "names no image"),
        (
            cri::Mount { image: None, ..image_mount(true, "/srv", "", "etc") },
            "image_sub_path is only for image volumes",
        ),
    ] {
        let mut config = secured_container();
        config.mounts.push(mount);
        let at = config.mounts.len() - 1;
        let refused = container_spec(config, &image()).unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().contains(&format!("mounts[{at}]")) && refused.message().contains(words),
            "{refused:?}"
        );
    }
}

/// stop_signal (kept as the CRI's name, reported back as containerd reports it),
/// SupplementalGroupsPolicy and PID namespace mode TARGET, and their refusals.
#[test]
fn stop_signal_groups_policy_and_pid_target() {
    use crate::container_translate::cri_stop_signal;
    let mut config = secured_container();
    config.stop_signal = cri::Signal::Sigrtminplus1 as i32;
    let spec = container_spec(config, &image()).unwrap();
    assert_eq!(spec.stop_signal.as_deref(), Some("SIGRTMIN+1"));
    assert_eq!((spec.stop_signal().unwrap(), code_of(spec.validate())), (35, Code::Ok));
    assert_eq!(cri_stop_signal(&spec), cri::Signal::Sigrtminplus1 as i32);
    // Unset: the image's, else SIGTERM.
    let mut spec = container_spec(secured_container(), &image()).unwrap();
    assert_eq!((spec.stop_signal.as_deref(), cri_stop_signal(&spec)), (None, cri::Signal::Sigterm as i32));
    for (image_signal, reported) in
        [("SIGQUIT", cri::Signal::Sigquit), ("3", cri::Signal::Sigquit), ("RTMAX-1", cri::Signal::Sigrtmaxminus1)]
    {
        spec.image.stop_signal = image_signal.into();
        assert_eq!(cri_stop_signal(&spec), reported as i32, "{image_signal}");
    }

    let policy = |policy: i32| {
        let mut config = secured_container();
        config.linux.as_mut().unwrap().security_context.as_mut().unwrap().supplemental_groups_policy = policy;
        container_spec(config, &image()).map(|s| s.supplemental_groups_policy).map_err(|e| e.code())
    };
    assert_eq!(policy(0), Ok(runtime::SupplementalGroupsPolicy::Merge));
    assert_eq!(policy(cri::SupplementalGroupsPolicy::Strict as i32), Ok(runtime::SupplementalGroupsPolicy::Strict));
    assert_eq!(policy(5), Err(Code::InvalidArgument));

    let target = |target_id: &str| {
        let mut config = secured_container();
        let security = config.linux.as_mut().unwrap().security_context.as_mut().unwrap();
        let options = security.namespace_options.get_or_insert_with(Default::default);
        options.pid = cri::NamespaceMode::Target as i32;
        options.target_id = target_id.into();
        container_spec(config, &image()).map(|s| s.pid_target).map_err(|e| e.code())
    };
    assert_eq!(target("abc"), Ok(Some("abc".into())));
    assert_eq!(target(""), Err(Code::InvalidArgument));
    assert_eq!(container_spec(secured_container(), &image()).unwrap().pid_target, None);
}
