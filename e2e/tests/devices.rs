//! Devices: the device cgroup policy of container units (what runc gives by default), CRI
//! `devices` mapped into containers with their permissions, CPU sets and hugepage limits, against
//! a daemon in a real systemd node (cgroup v1 devices and cpuset controllers, as the host has
//! them; hugetlb in a v1 hierarchy if the node has one, else in the unified one).

use std::time::Duration;

use e2e::crisimple::{LOOP_TEXT, LoopDevice as Loop, container_config, create, run_pod, sh, start};
use e2e::{CriClient, Node, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The devices.list of a container's unit in the node's v1 devices hierarchy.
fn devices_list(node: &Node, id: &str) -> String {
    let cgroup = node.sh(&format!("systemctl show -p ControlGroup --value cri-{id}.service")).trim().to_string();
    node.sh(&format!("cat /sys/fs/cgroup/devices{cgroup}/devices.list"))
}

fn privileged(mut config: cri::ContainerConfig) -> cri::ContainerConfig {
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext { privileged: true, ..Default::default() }),
        ..Default::default()
    });
    config
}

async fn running(client: &mut CriClient, pod: &str, config: cri::ContainerConfig) -> String {
    let id = create(client, pod, config).await.expect("CreateContainer");
    start(client, &id).await.expect("StartContainer");
    id
}

/// A script that makes a node of the loop device with mknod (CAP_MKNOD is a default capability)
/// and reads its first bytes: the text, or head's error.
fn read_disk_script(disk: &str, node_path: &str) -> String {
    format!("busybox mknod {node_path} b {disk} && busybox head -c {} {node_path} 2>&1", LOOP_TEXT.len())
}

#[tokio::test]
async fn containers_get_only_the_default_devices_unless_privileged() {
    let node = e2e::node_with_local_registry("dev-policy", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "devices").await;
    let loop_device = Loop::attach(&node);
    let disk = loop_device.number.clone();
    let pod = run_pod(&mut client, "devpolicy").await;

    // The entrypoint itself (in the unit's cgroup from the start) cannot read the disk.
    let main_script =
        format!("{{ {}; }} > /tmp/main-result; exec busybox sleep 100000", read_disk_script(&disk, "/dev/d1"));
    let plain = running(&mut client, &pod, container_config("plain", &image, &["/bin/sh", "-c", &main_script])).await;
    let result = e2e::eventually(Duration::from_secs(30), "the entrypoint's read of the disk", || {
        let mut client = client.clone();
        let plain = plain.clone();
        async move {
            let (code, out, _) = sh(&mut client, &plain, "busybox cat /tmp/main-result").await;
            (code == 0 && !out.is_empty()).then_some(out)
        }
    })
    .await;
    assert!(result.contains("Operation not permitted"), "entrypoint read the host's disk: {result}");
    // Nor can a command run by ExecSync (which joins the unit's cgroups).
    let (_, out, _) = sh(&mut client, &plain, &read_disk_script(&disk, "/dev/d2")).await;
    assert!(out.contains("Operation not permitted"), "exec read the host's disk: {out}");
    // The standard devices work, ptys included.
    let (code, out, err) = sh(
        &mut client,
        &plain,
        "echo x > /dev/null && busybox head -c 3 /dev/zero | busybox wc -c && busybox head -c 3 /dev/urandom | \
         busybox wc -c && busybox head -c 3 /dev/random | busybox wc -c && busybox head -c 3 /dev/full | busybox wc -c \
         && exec 3<>/dev/ptmx && busybox ls /dev/pts",
    )
    .await;
    assert_eq!(code, 0, "standard devices: {out}{err}");
    assert_eq!(out.split_whitespace().take(4).collect::<Vec<_>>(), ["3", "3", "3", "3"], "{out}");
    assert!(out.contains("ptmx") && out.split_whitespace().any(|w| w == "0"), "no pty was allocated: {out}");
    let list = devices_list(&node, &plain);
    for rule in ["c *:* m", "b *:* m", "c 1:3 rwm", "c 5:0 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:200 rwm"] {
        assert!(list.lines().any(|l| l == rule), "{rule} not in the unit's devices.list:\n{list}");
    }
    assert!(!list.contains("a *:*"), "the unit allows every device:\n{list}");

    // A privileged container keeps full access, as with containerd.
    let main_script =
        format!("{{ {}; }} > /tmp/main-result; exec busybox sleep 100000", read_disk_script(&disk, "/dev/d1"));
    let admin =
        running(&mut client, &pod, privileged(container_config("admin", &image, &["/bin/sh", "-c", &main_script])))
            .await;
    let (_, out, _) = sh(&mut client, &admin, &read_disk_script(&disk, "/dev/d2")).await;
    assert_eq!(out.trim(), LOOP_TEXT);
    let result = e2e::eventually(Duration::from_secs(30), "the privileged entrypoint's read", || {
        let mut client = client.clone();
        let admin = admin.clone();
        async move {
            let (code, out, _) = sh(&mut client, &admin, "busybox cat /tmp/main-result").await;
            (code == 0 && !out.is_empty()).then_some(out)
        }
    })
    .await;
    assert_eq!(result.trim(), LOOP_TEXT);
    assert_eq!(devices_list(&node, &admin).trim(), "a *:* rwm");
}

fn with_devices(mut config: cri::ContainerConfig, devices: &[(&str, &str, &str)]) -> cri::ContainerConfig {
    config.devices = devices
        .iter()
        .map(|(host, container, permissions)| cri::Device {
            host_path: host.to_string(),
            container_path: container.to_string(),
            permissions: permissions.to_string(),
        })
        .collect();
    config
}

#[tokio::test]
async fn cri_devices_appear_with_exactly_their_permissions() {
    let node = e2e::node_with_local_registry("dev-map", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "devices").await;
    let loop_device = Loop::attach(&node);
    let number = loop_device.number.replace(' ', ":");
    // A symlink to the device (as /dev/disk/by-* names are) is resolved.
    node.sh(&format!("ln -sf {} /tmp/loop-link", loop_device.path));
    let pod = run_pod(&mut client, "devmap").await;
    let sleep = ["/bin/busybox", "sleep", "100000"];

    // Bad requests are refused, naming what is wrong, and leave nothing behind.
    node.sh("touch /tmp/plain-file");
    let refusals = [
        (("/tmp/plain-file", "/dev/x", "rw"), "/tmp/plain-file"),
        (("/dev/no-such-device", "/dev/x", "rw"), "/dev/no-such-device"),
        (("/tmp/loop-link", "/dev/x", "rx"), "permissions"),
        (("/tmp/loop-link", "/dev/x", ""), "permissions"),
        (("/tmp/loop-link", "/etc/x", "r"), "/etc/x"),
        (("/tmp/loop-link", "/dev/../etc/x", "r"), "/dev/../etc/x"),
    ];
    for ((host, container, permissions), named) in refusals {
        let config = with_devices(container_config("bad", &image, &sleep), &[(host, container, permissions)]);
        let error = create(&mut client, &pod, config).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{host} -> {container} {permissions}: {error:?}");
        assert!(error.message().contains(named), "{host} -> {container}: {}", error.message());
    }
    let mut cdi = container_config("bad", &image, &sleep);
    cdi.cdi_devices = vec![cri::CdiDevice { name: "vendor.com/gpu=0".into() }];
    let error = create(&mut client, &pod, cdi).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(error.message().contains("vendor.com/gpu=0"), "{}", error.message());
    let listed = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
    assert!(listed.containers.is_empty(), "refused containers were kept: {:?}", listed.containers);
    assert_eq!(node.sh("ls /var/lib/cri-systemd/containers | wc -l").trim(), "0");

    // Read-only: created, then the daemon restarts before the start (the record holds the device).
    let reader_config = with_devices(
        container_config("reader", &image, &sleep),
        &[("/tmp/loop-link", "/dev/mydev", "r"), ("/dev/zero", "/dev/myzero", "rw")],
    );
    let reader = create(&mut client, &pod, reader_config).await.expect("CreateContainer");
    node.sh("systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    start(&mut client, &reader).await.expect("StartContainer after a restart");
    let (code, out, err) = sh(&mut client, &reader, "busybox stat -c '%F %t %T' /dev/mydev").await;
    assert_eq!(code, 0, "{err}");
    let (major, minor) = loop_device.number.split_once(' ').unwrap();
    let hex = |n: &str| format!("{:x}", n.parse::<u64>().unwrap());
    assert_eq!(out.trim(), format!("block special file {} {}", hex(major), hex(minor)));
    let (code, out, err) = sh(&mut client, &reader, &format!("busybox head -c {} /dev/mydev", LOOP_TEXT.len())).await;
    assert_eq!((code, out.as_str()), (0, LOOP_TEXT), "read of an \"r\" device: {err}");
    let (code, out, _) =
        sh(&mut client, &reader, "echo overwritten | busybox dd of=/dev/mydev conv=notrunc 2>&1").await;
    assert_ne!(code, 0, "an \"r\" device was written: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (code, out, err) =
        sh(&mut client, &reader, "echo x > /dev/myzero && busybox head -c 5 /dev/myzero | busybox wc -c").await;
    assert_eq!((code, out.trim()), (0, "5"), "{err}");
    let list = devices_list(&node, &reader);
    assert!(list.lines().any(|l| l == format!("b {number} r")), "b {number} r not in:\n{list}");

    // Read-write: the write reaches the device.
    let writer_config =
        with_devices(container_config("writer", &image, &sleep), &[(&loop_device.path, "/dev/disks/mine", "rw")]);
    let writer = running(&mut client, &pod, writer_config).await;
    let (code, out, err) =
        sh(&mut client, &writer, "printf written | busybox dd of=/dev/disks/mine conv=notrunc,fsync 2>&1").await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(node.sh(&format!("head -c 7 {}", loop_device.path)), "written");
    let list = devices_list(&node, &writer);
    assert!(list.lines().any(|l| l == format!("b {number} rw")), "b {number} rw not in:\n{list}");

    // A container without devices cannot open the same device through a node it makes itself.
    let plain = running(&mut client, &pod, container_config("plain", &image, &sleep)).await;
    let (_, out, _) = sh(&mut client, &plain, &read_disk_script(&loop_device.number, "/dev/stolen")).await;
    assert!(out.contains("Operation not permitted"), "{out}");

    // In a pod with its own user namespace, the node init makes belongs to the pod's root (a
    // bound host node would stay the host root's, which the pod cannot open through 0660).
    let userns_pod = e2e::crisimple::userns_pod_config("devuserns");
    let userns_pod = e2e::crisimple::run_pod_sandbox(&mut client, userns_pod).await.expect("RunPodSandbox");
    node.sh(&format!("chmod 0660 {}", loop_device.path));
    let in_userns = running(
        &mut client,
        &userns_pod,
        with_devices(container_config("userns", &image, &sleep), &[(&loop_device.path, "/dev/mydev", "rw")]),
    )
    .await;
    let (code, out, err) = sh(
        &mut client,
        &in_userns,
        "busybox stat -c '%u %a' /dev/mydev && busybox head -c 7 /dev/mydev && \
         busybox grep -v '^ *0 *0 ' /proc/self/uid_map | busybox wc -l",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["0", "660", "written1"], "{out}");

    let status = client
        .runtime
        .container_status(cri::ContainerStatusRequest { container_id: reader.clone(), verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
}

fn with_resources(mut config: cri::ContainerConfig, resources: cri::LinuxContainerResources) -> cri::ContainerConfig {
    config.linux = Some(cri::LinuxContainerConfig { resources: Some(resources), ..Default::default() });
    config
}

async fn update(
    client: &mut CriClient,
    id: &str,
    resources: cri::LinuxContainerResources,
) -> Result<(), tonic::Status> {
    let request =
        cri::UpdateContainerResourcesRequest { container_id: id.into(), linux: Some(resources), ..Default::default() };
    client.runtime.update_container_resources(request).await.map(|_| ())
}

fn cpus_allowed(status: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string()
}

#[tokio::test]
async fn cpuset_cpus_pin_containers_and_change_live() {
    let node = e2e::node_with_local_registry("cpuset", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "devices").await;
    assert_eq!(node.sh("cat /sys/devices/system/cpu/online").trim(), "0-1", "the test wants a node of 2 CPUs");
    let pod = run_pod(&mut client, "cpuset").await;
    let sleep = ["/bin/busybox", "sleep", "100000"];
    // What the kubelet sends for a pod without hugepages: a zero limit per page size.
    let zero_hugepages = vec![
        cri::HugepageLimit { page_size: "2MB".into(), limit: 0 },
        cri::HugepageLimit { page_size: "1GB".into(), limit: 0 },
    ];
    let pinned = cri::LinuxContainerResources {
        cpuset_cpus: "0".into(),
        memory_limit_in_bytes: 64 << 20,
        hugepage_limits: zero_hugepages.clone(),
        ..Default::default()
    };

    // Refused: malformed or absent CPUs, a page size the node does not have; nothing is created.
    for (cpus, hugepages, named) in [
        ("0-", vec![], "cpuset_cpus"),
        ("1-0", vec![], "cpuset_cpus"),
        ("a", vec![], "cpuset_cpus"),
        ("7", vec![], "not online"),
        ("0", vec![cri::HugepageLimit { page_size: "3MB".into(), limit: 2 << 20 }], "\"3MB\""),
    ] {
        let resources =
            cri::LinuxContainerResources { cpuset_cpus: cpus.into(), hugepage_limits: hugepages, ..Default::default() };
        let error = create(&mut client, &pod, with_resources(container_config("bad", &image, &sleep), resources))
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{cpus}: {error:?}");
        assert!(error.message().contains(named), "{cpus}: {}", error.message());
    }

    let id = running(&mut client, &pod, with_resources(container_config("pinned", &image, &sleep), pinned)).await;
    let main_pid = node.sh(&format!("systemctl show -p MainPID --value cri-{id}.service")).trim().to_string();
    assert_eq!(cpus_allowed(&node.sh(&format!("cat /proc/{main_pid}/status"))), "0");
    let (_, out, _) = sh(&mut client, &id, "busybox cat /proc/self/status").await;
    assert_eq!(cpus_allowed(&out), "0", "an exec'd process");

    let cgroup = node.sh(&format!("systemctl show -p ControlGroup --value cri-{id}.service")).trim().to_string();
    let memory_limit =
        || node.sh(&format!("cat /sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes")).trim().to_string();
    assert_eq!(memory_limit(), (64u64 << 20).to_string());
    // Live: the entrypoint and later execs move to CPU 1. The kubelet's CPU manager sends the
    // CPUs alone: the memory limit stays.
    let to_one =
        cri::LinuxContainerResources { cpuset_cpus: "1".into(), hugepage_limits: zero_hugepages, ..Default::default() };
    update(&mut client, &id, to_one).await.expect("UpdateContainerResources");
    assert_eq!(cpus_allowed(&node.sh(&format!("cat /proc/{main_pid}/status"))), "1");
    let (_, out, _) = sh(&mut client, &id, "busybox cat /proc/self/status").await;
    assert_eq!(cpus_allowed(&out), "1");
    assert_eq!(memory_limit(), (64u64 << 20).to_string());
    // A bad update changes nothing; one without a cpuset keeps it.
    let bad = cri::LinuxContainerResources { cpuset_cpus: "0,,1".into(), ..Default::default() };
    assert_eq!(update(&mut client, &id, bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let memory_only = cri::LinuxContainerResources { memory_limit_in_bytes: 96 << 20, ..Default::default() };
    update(&mut client, &id, memory_only).await.expect("UpdateContainerResources without a cpuset");
    assert_eq!(cpus_allowed(&node.sh(&format!("cat /proc/{main_pid}/status"))), "1");
    assert_eq!(memory_limit(), (96u64 << 20).to_string());
    let status = client
        .runtime
        .container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.resources.unwrap().linux.unwrap().cpuset_cpus, "1");

    // Memory nodes: on cgroup v1 a NUMA policy binding the entrypoint's memory, set at start.
    let missing_node = cri::LinuxContainerResources { cpuset_mems: "1".into(), ..Default::default() };
    let error = create(&mut client, &pod, with_resources(container_config("bad", &image, &sleep), missing_node))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    let node0 = cri::LinuxContainerResources { cpuset_mems: "0".into(), ..Default::default() };
    let bound = running(&mut client, &pod, with_resources(container_config("bound", &image, &sleep), node0)).await;
    let bound_pid = node.sh(&format!("systemctl show -p MainPID --value cri-{bound}.service")).trim().to_string();
    let maps = node.sh(&format!("cat /proc/{bound_pid}/numa_maps"));
    assert!(maps.lines().all(|l| l.split_whitespace().nth(1) == Some("bind:0")), "not bound to node 0:\n{maps}");
    let (_, unbound, _) = sh(&mut client, &id, "busybox cat /proc/self/numa_maps").await;
    assert!(unbound.lines().all(|l| l.split_whitespace().nth(1) == Some("default")), "{unbound}");
    let change = cri::LinuxContainerResources { cpuset_mems: "0".into(), ..Default::default() };
    let error = update(&mut client, &id, change).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
}

/// Where a node keeps the hugetlb controller: (hierarchy mount point, limit file suffix).
fn hugetlb_hierarchy(node: &Node) -> (&'static str, &'static str) {
    if node.sh("test -d /sys/fs/cgroup/hugetlb && echo v1 || true").trim() == "v1" {
        ("/sys/fs/cgroup/hugetlb", "limit_in_bytes")
    } else {
        let controllers = node.sh("cat /sys/fs/cgroup/unified/cgroup.controllers");
        assert!(controllers.contains("hugetlb"), "the node has no hugetlb controller (unified: {controllers:?})");
        ("/sys/fs/cgroup/unified", "max")
    }
}

fn hugepages(limits: &[(&str, u64)]) -> cri::LinuxContainerResources {
    let hugepage_limits =
        limits.iter().map(|(size, limit)| cri::HugepageLimit { page_size: size.to_string(), limit: *limit }).collect();
    cri::LinuxContainerResources { hugepage_limits, ..Default::default() }
}

#[tokio::test]
async fn hugepage_limits_are_set_in_the_hugetlb_cgroup_and_change_live() {
    let node = e2e::node_with_local_registry("hugetlb", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "devices").await;
    let (hierarchy, suffix) = hugetlb_hierarchy(&node);
    let pod = run_pod(&mut client, "hugetlb").await;
    let sleep = ["/bin/busybox", "sleep", "100000"];

    // A page size the node does not have is refused, naming it.
    let error = create(
        &mut client,
        &pod,
        with_resources(container_config("bad", &image, &sleep), hugepages(&[("3MB", 4 << 20)])),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("\"3MB\""), "{}", error.message());

    // What the kubelet sends for a pod asking for 4 MiB of 2 MB pages on a node with 2 MB and 1 GB.
    let limited = hugepages(&[("2MB", 4 << 20), ("1GB", 0)]);
    let id = running(&mut client, &pod, with_resources(container_config("limited", &image, &sleep), limited)).await;
    let unit = format!("cri-{id}.service");
    let cgroup = node.sh(&format!("systemctl show -p ControlGroup --value {unit}")).trim().to_string();
    let dir = format!("{hierarchy}{cgroup}");
    let limit = |size: &str| node.sh(&format!("cat {dir}/hugetlb.{size}.{suffix}")).trim().to_string();
    assert_eq!(limit("2MB"), (4u64 << 20).to_string());
    assert_eq!(limit("1GB"), "0");
    // The entrypoint and an exec'd command are in that cgroup.
    let main_pid = node.sh(&format!("systemctl show -p MainPID --value {unit}")).trim().to_string();
    let procs = node.sh(&format!("cat {dir}/cgroup.procs"));
    assert!(procs.lines().any(|p| p == main_pid), "main process {main_pid} not in {dir}: {procs:?}");
    let (code, out, _) = sh(&mut client, &id, "busybox cat /proc/self/cgroup").await;
    assert_eq!(code, 0);
    let line = if suffix == "max" { "0::" } else { ":hugetlb:" };
    assert!(
        out.lines().any(|l| l.contains(line) && l.ends_with(&format!("/{unit}"))),
        "an exec'd process is not in the container's hugetlb cgroup:\n{out}"
    );

    // Live: a new limit, kept in the status; a bad one changes nothing.
    update(&mut client, &id, hugepages(&[("2MB", 8 << 20)])).await.expect("UpdateContainerResources");
    assert_eq!(limit("2MB"), (8u64 << 20).to_string());
    assert_eq!(limit("1GB"), "0");
    let error = update(&mut client, &id, hugepages(&[("5MB", 2 << 20)])).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert_eq!(limit("2MB"), (8u64 << 20).to_string());
    let status = e2e::crisimple::status(&mut client, &id).await;
    let reported = status.resources.unwrap().linux.unwrap().hugepage_limits;
    assert!(reported.iter().any(|h| h.page_size == "2MB" && h.limit == 8 << 20), "{reported:?}");

    // An update of a created container is what its start applies.
    let later = create(
        &mut client,
        &pod,
        with_resources(container_config("later", &image, &sleep), hugepages(&[("2MB", 2 << 20)])),
    )
    .await
    .expect("CreateContainer");
    update(&mut client, &later, hugepages(&[("2MB", 6 << 20)])).await.expect("UpdateContainerResources");
    start(&mut client, &later).await.expect("StartContainer");
    let later_cgroup =
        node.sh(&format!("systemctl show -p ControlGroup --value cri-{later}.service")).trim().to_string();
    assert_eq!(
        node.sh(&format!("cat {hierarchy}{later_cgroup}/hugetlb.2MB.{suffix}")).trim(),
        (6u64 << 20).to_string()
    );

    // Removal leaves no hugetlb cgroup: the container's, then the pod's.
    client.runtime.remove_container(cri::RemoveContainerRequest { container_id: id.clone() }).await.unwrap();
    assert_eq!(node.sh(&format!("test -e {dir} && echo left || true")).trim(), "", "{dir} is left");
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    let pod_dir = format!("{hierarchy}{}", later_cgroup.rsplit_once('/').unwrap().0);
    assert_eq!(node.sh(&format!("test -e {pod_dir} && echo left || true")).trim(), "", "{pod_dir} is left");
}

/// 2 MB hugepages reserved on the host (the nodes share its kernel) for one test, so that a
/// mapping beyond a container's limit fails for the limit and not for want of pages; released
/// (the count restored) on drop. Two pages only: the machine is shared.
struct ReservedHugepages {
    old: String,
}

const NR_2MB: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

impl ReservedHugepages {
    fn two() -> ReservedHugepages {
        let old = std::fs::read_to_string(NR_2MB).expect("no 2 MB hugepages on this kernel").trim().to_string();
        let guard = ReservedHugepages { old: old.clone() };
        let wanted = old.parse::<u64>().unwrap() + 2;
        std::fs::write(NR_2MB, wanted.to_string()).unwrap();
        let got = std::fs::read_to_string(NR_2MB).unwrap();
        assert_eq!(got.trim(), wanted.to_string(), "the kernel did not reserve 2 hugepages (memory fragmented?)");
        guard
    }
}

impl Drop for ReservedHugepages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_2MB, &self.old) {
            eprintln!("cannot restore {NR_2MB} to {}: {e}", self.old);
        }
    }
}

#[tokio::test]
async fn hugepage_limit_is_enforced_by_the_kernel() {
    let node = e2e::node_with_local_registry("hugetlb-mmap", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "devices").await;
    hugetlb_hierarchy(&node);
    let pod = run_pod(&mut client, "hugetlb-mmap").await;
    // The node's python, reached by chroot (a default capability) through a read-only bind of
    // its root: busybox cannot map hugepages. The chrooted process is still the exec'd one.
    let mut config = with_resources(
        container_config("mapper", &image, &["/bin/busybox", "sleep", "100000"]),
        hugepages(&[("2MB", 2 << 20)]),
    );
    config.mounts = vec![cri::Mount {
        container_path: "/host".into(),
        host_path: "/".into(),
        readonly: true,
        ..Default::default()
    }];
    let id = running(&mut client, &pod, config).await;
    let _pages = ReservedHugepages::two();
    // Maps (and touches) 2 then 4 MiB of 2 MB pages; prints "ok" or the error of each.
    let map = "busybox chroot /host /usr/bin/python3 -c '
import mmap
def try_map(mib):
    try:
        m = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000 | mmap.MAP_POPULATE)
        m[0] = 1
        m.close()
        return \"ok\"
    except OSError as e:
        return e.strerror
print(try_map(2), \"/\", try_map(4))
'";
    let (code, out, err) = sh(&mut client, &id, map).await;
    assert_eq!((code, out.trim()), (0, "ok / Cannot allocate memory"), "with a 2 MiB limit: {err}");
    // Live: 4 MiB now fit.
    update(&mut client, &id, hugepages(&[("2MB", 4 << 20)])).await.expect("UpdateContainerResources");
    let (code, out, err) = sh(&mut client, &id, map).await;
    assert_eq!((code, out.trim()), (0, "ok / ok"), "with a 4 MiB limit: {err}");
}

#[tokio::test]
async fn a_node_without_the_hugetlb_controller_refuses_non_zero_limits() {
    let node = e2e::node_with_local_registry("no-hugetlb", "");
    // Take the controller away from the node, as on a host whose root does not offer it: the
    // node's root cgroup in the unified hierarchy (seen from the host) stops handing it down.
    let cgroups = std::fs::read_to_string(node.dir().join("cgroups")).unwrap();
    let unified = cgroups.lines().find(|l| l.starts_with("/sys/fs/cgroup/unified/")).expect("no unified cgroup");
    std::fs::write(format!("{unified}/cgroup.subtree_control"), "-hugetlb").unwrap();
    assert!(!node.sh("cat /sys/fs/cgroup/unified/cgroup.controllers").contains("hugetlb"));
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "devices").await;
    let pod = run_pod(&mut client, "no-hugetlb").await;
    let sleep = ["/bin/busybox", "sleep", "100000"];

    let limited = hugepages(&[("2MB", 4 << 20), ("1GB", 0)]);
    let error = create(&mut client, &pod, with_resources(container_config("limited", &image, &sleep), limited))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("2MB") && error.message().contains("hugetlb"), "{}", error.message());
    // What the kubelet sends for a pod without hugepages still runs; an update to a non-zero
    // limit is refused the same way.
    let zero = hugepages(&[("2MB", 0), ("1GB", 0)]);
    let id = running(&mut client, &pod, with_resources(container_config("zero", &image, &sleep), zero)).await;
    let error = update(&mut client, &id, hugepages(&[("2MB", 2 << 20)])).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("2MB"), "{}", error.message());
}
