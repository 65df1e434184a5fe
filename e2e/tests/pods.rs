//! Pod sandboxes as systemd slices with pinned namespaces, driven over the CRI socket of a daemon
//! in a real systemd node.

use std::collections::HashMap;
use std::time::Duration;

use e2e::crisimple::{kubelet_pod, run_pod_sandbox};
use e2e::{CriClient, Node, NodeOptions, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A pod as the kubelet sends one, with the DNS config, labels and annotations the lifecycle
/// checks look for.
fn labelled_pod(name: &str, uid: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["e2e.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([("app".into(), name.into()), ("tier".into(), "test".into())]),
        annotations: HashMap::from([("note".into(), "hello".into())]),
        ..kubelet_pod(name).uid(uid).hostname(&format!("{name}-host")).build()
    }
}

async fn pod_status(client: &mut CriClient, id: &str) -> Result<cri::PodSandboxStatusResponse, tonic::Status> {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: true };
    client.runtime.pod_sandbox_status(request).await.map(|r| r.into_inner())
}

async fn list_pods(client: &mut CriClient, filter: Option<cri::PodSandboxFilter>) -> Vec<String> {
    let items =
        client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter }).await.unwrap().into_inner().items;
    items.into_iter().map(|p| p.id).collect()
}

#[tokio::test]
async fn pod_lifecycle_on_a_slice_with_pinned_namespaces() {
    let node = Node::up("pods-life", NodeOptions::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    let uid = "5f0c7e4a-1111-4c2d-9e8f-0123456789ab";
    let id = run_pod_sandbox(&mut client, labelled_pod("web", uid)).await.expect("RunPodSandbox");
    let slice = "kubepods-besteffort-pod5f0c7e4a_1111_4c2d_9e8f_0123456789ab.slice";
    assert_eq!(node.sh(&format!("systemctl is-active {slice}")).trim(), "active");

    let status = pod_status(&mut client, &id).await.unwrap();
    let pod = status.status.unwrap();
    assert_eq!(pod.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(pod.metadata.unwrap().name, "web");
    assert_eq!(pod.labels["app"], "web");
    assert_eq!(pod.annotations["note"], "hello");
    assert!(pod.created_at > 0);
    assert!(status.info["info"].contains(slice), "{:?}", status.info);

    // Namespaces are pinned files, with no process holding them: the slice has no tasks at all.
    let pins = format!("/run/cri-systemd/pods/{id}/ns");
    let links = node.sh(&format!("nsenter --net={pins}/net ip -o link"));
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");
    // The IPC and UTS pins and /dev/shm are mounts of the daemon's pod mount namespace, not of the
    // node's: the node's mount table (copied by every container start, parsed by systemd at each
    // change) has one mount per pod, its network namespace's pin.
    assert_eq!(node.sh_in_pod_mounts(&format!("nsenter --uts={pins}/uts hostname")).trim(), "web-host");
    assert_ne!(
        node.sh_in_pod_mounts(&format!(
            "readlink /proc/self/ns/ipc; nsenter --ipc={pins}/ipc readlink /proc/self/ns/ipc"
        ))
        .lines()
        .collect::<std::collections::HashSet<_>>()
        .len(),
        1
    );
    let in_node: Vec<String> = node
        .sh(&format!("grep 'cri-systemd/pods/{id}/' /proc/self/mountinfo | cut -d' ' -f5 || true"))
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(in_node, [format!("{pins}/net")], "the pod's mounts in the node's mount namespace");
    let in_pod_mounts =
        node.sh_in_pod_mounts(&format!(
            "awk '$5 ~ \"cri-systemd/pods/{id}/\" {{ for (i = 7; i < NF; i++) if ($i == \"-\") print $5, $(i + 1) }}' /proc/self/mountinfo"
        ));
    for (path, fs) in [("ns/ipc", "nsfs"), ("ns/uts", "nsfs"), ("shm", "tmpfs")] {
        assert!(
            in_pod_mounts.contains(&format!("/run/cri-systemd/pods/{id}/{path} {fs}")),
            "{path} in the pod mount namespace:\n{in_pod_mounts}"
        );
    }
    let procs = node.sh(&format!(
        "find /sys/fs/cgroup/systemd/kubepods.slice -path '*{slice}*' -name cgroup.procs -exec cat {{}} +"
    ));
    assert_eq!(procs.trim(), "", "processes in the pod's slice: {procs}");

    // Pod files.
    let files = format!("/run/cri-systemd/pods/{id}");
    assert_eq!(
        node.sh(&format!("cat {files}/resolv.conf")),
        "search e2e.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
    );
    assert_eq!(node.sh(&format!("cat {files}/hostname")), "web-host\n");
    assert!(node.sh(&format!("cat {files}/hosts")).contains("web-host"));
    assert!(node.sh_in_pod_mounts(&format!("findmnt -n -o FSTYPE {files}/shm")).contains("tmpfs"));

    // The same pod attempt again is the same pod.
    assert_eq!(run_pod_sandbox(&mut client, labelled_pod("web", uid)).await.unwrap(), id);

    // Listing, with filters.
    let other = run_pod_sandbox(&mut client, labelled_pod("db", "9a9a9a9a-2222-4c2d-9e8f-0123456789ab")).await.unwrap();
    assert_eq!(list_pods(&mut client, None).await, vec![id.clone(), other.clone()]);
    let by_label =
        cri::PodSandboxFilter { label_selector: HashMap::from([("app".into(), "db".into())]), ..Default::default() };
    assert_eq!(list_pods(&mut client, Some(by_label)).await, vec![other.clone()]);
    let by_prefix = cri::PodSandboxFilter { id: id[..12].into(), ..Default::default() };
    assert_eq!(list_pods(&mut client, Some(by_prefix)).await, vec![id.clone()]);

    // Stop: not ready, namespaces and slice released; twice is fine.
    for _ in 0..2 {
        client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await.unwrap();
    }
    let state = pod_status(&mut client, &id).await.unwrap().status.unwrap().state;
    assert_eq!(state, cri::PodSandboxState::SandboxNotready as i32);
    assert!(node.exec(&["test", "-e", &format!("{pins}/net")]).status.code() == Some(1));
    for mountinfo in [node.sh("cat /proc/self/mountinfo"), node.sh_in_pod_mounts("cat /proc/self/mountinfo")] {
        assert!(!mountinfo.contains(&format!("cri-systemd/pods/{id}/")), "left mounted after the stop:\n{mountinfo}");
    }
    assert_ne!(node.exec(&["systemctl", "is-active", slice]).stdout.trim(), "active");
    let ready_only = cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue { state: cri::PodSandboxState::SandboxReady as i32 }),
        ..Default::default()
    };
    assert_eq!(list_pods(&mut client, Some(ready_only)).await, vec![other.clone()]);

    // Remove: gone everywhere; removing again, or an unknown pod, succeeds.
    for pod in [&id, &id, &"f".repeat(64)] {
        client
            .runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.to_string() })
            .await
            .unwrap();
    }
    assert_eq!(pod_status(&mut client, &id).await.unwrap_err().code(), tonic::Code::NotFound);
    node.sh(&format!("test ! -e {files} && test ! -e /var/lib/cri-systemd/pods/{id}"));
    assert_eq!(list_pods(&mut client, None).await, vec![other.clone()]);
}

#[tokio::test]
async fn pods_survive_a_daemon_kill_and_bad_requests_change_nothing() {
    let node = Node::up("pods-recover", NodeOptions::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    // The kubelet's systemd cgroup driver names the slice itself.
    let mut config = labelled_pod("kubelet-style", "0000aaaa-3333-4c2d-9e8f-0123456789ab");
    config.linux.as_mut().unwrap().cgroup_parent = "kubepods-burstable-pod0000aaaa_3333.slice".into();
    let id = run_pod_sandbox(&mut client, config).await.unwrap();
    assert_eq!(node.sh("systemctl is-active kubepods-burstable-pod0000aaaa_3333.slice").trim(), "active");

    // Host network: no network namespace of its own.
    let mut host = labelled_pod("hostnet", "0000bbbb-3333-4c2d-9e8f-0123456789ab");
    host.linux.as_mut().unwrap().security_context.as_mut().unwrap().namespace_options.as_mut().unwrap().network =
        cri::NamespaceMode::Node as i32;
    let host_id = run_pod_sandbox(&mut client, host).await.unwrap();
    node.sh(&format!("test ! -e /run/cri-systemd/pods/{host_id}/ns/net"));

    // Bad requests: the right codes, and nothing created.
    let before = node.sh("ls /var/lib/cri-systemd/pods; systemctl list-units --all --plain --no-legend 'kubepods*'");
    let mut nameless = labelled_pod("x", "0000cccc-3333-4c2d-9e8f-0123456789ab");
    nameless.metadata.as_mut().unwrap().name.clear();
    assert_eq!(run_pod_sandbox(&mut client, nameless).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let mut bad_parent = labelled_pod("y", "0000dddd-3333-4c2d-9e8f-0123456789ab");
    bad_parent.linux.as_mut().unwrap().cgroup_parent = "/kubepods/burstable".into();
    assert_eq!(run_pod_sandbox(&mut client, bad_parent).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let no_config = cri::RunPodSandboxRequest { config: None, runtime_handler: String::new() };
    assert_eq!(client.runtime.run_pod_sandbox(no_config).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let odd_handler =
        cri::RunPodSandboxRequest { config: Some(labelled_pod("z", "1")), runtime_handler: "kata".into() };
    assert_eq!(client.runtime.run_pod_sandbox(odd_handler).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(pod_status(&mut client, &"0".repeat(64)).await.unwrap_err().code(), tonic::Code::NotFound);
    let after = node.sh("ls /var/lib/cri-systemd/pods; systemctl list-units --all --plain --no-legend 'kubepods*'");
    assert_eq!(before, after);

    // A pod whose namespaces are gone when the daemon starts (a reboot empties /run) is NotReady,
    // and only that one: the pins of all pods are looked at in one step into the pod mount
    // namespace, and each answer must reach its own pod (four Ready pods: no mix-up of their
    // order, a reversal say, leaves the lost one in place).
    let lost =
        run_pod_sandbox(&mut client, labelled_pod("lost", "0000eeee-3333-4c2d-9e8f-0123456789ab")).await.unwrap();
    let kept =
        run_pod_sandbox(&mut client, labelled_pod("kept", "0000ffff-3333-4c2d-9e8f-0123456789ab")).await.unwrap();
    node.sh("systemctl stop cri-systemd");
    node.sh_in_pod_mounts(&format!("umount /run/cri-systemd/pods/{lost}/ns/ipc"));
    node.sh("systemctl start cri-systemd");

    // SIGKILL the daemon: systemd restarts it, and it knows its pods again.
    let _ = node.cri(ANSWER_TIMEOUT).await;
    node.sh("systemctl kill -s KILL cri-systemd");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let mut listed = list_pods(&mut client, None).await;
    listed.sort();
    let mut expected = vec![id.clone(), host_id.clone(), lost.clone(), kept.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    let ready = cri::PodSandboxState::SandboxReady;
    for (pod, state) in
        [(&id, ready), (&host_id, ready), (&kept, ready), (&lost, cri::PodSandboxState::SandboxNotready)]
    {
        let status = pod_status(&mut client, pod).await.unwrap().status.unwrap();
        assert_eq!(status.state, state as i32, "pod {pod}");
    }
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.clone() }).await.unwrap();
    assert_ne!(
        node.exec(&["systemctl", "is-active", "kubepods-burstable-pod0000aaaa_3333.slice"]).stdout.trim(),
        "active"
    );
}

/// A pod whose config names no hostname keeps the node's name in its UTS namespace and its
/// /etc/hostname, as with containerd, however long the pod's name (critest's are over 64 bytes,
/// more than a hostname may have); in a user namespace too. A configured hostname over 64 bytes
/// is refused and creates nothing.
#[tokio::test]
async fn a_pod_without_a_hostname_has_the_nodes_whatever_its_name() {
    let node = Node::up("pods-hostname", NodeOptions::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let node_hostname = node.sh("hostname").trim().to_string();
    assert!(!node_hostname.is_empty());

    let long_name = format!("podsandbox-with-a-long-name-{}", "x".repeat(72));
    assert_eq!(long_name.len(), 100);
    for (index, userns) in [false, true].into_iter().enumerate() {
        let mut config =
            if userns { e2e::crisimple::userns_pod_config(&long_name) } else { labelled_pod(&long_name, "unused") };
        config.hostname.clear();
        config.metadata.as_mut().unwrap().uid = format!("0000eeee-4444-4c2d-9e8f-00000000000{index}");
        let id = run_pod_sandbox(&mut client, config).await.expect("RunPodSandbox of a pod named with 100 bytes");
        let pins = format!("/run/cri-systemd/pods/{id}/ns");
        assert_eq!(
            node.sh_in_pod_mounts(&format!("nsenter --uts={pins}/uts hostname")).trim(),
            node_hostname,
            "userns {userns}"
        );
        assert_eq!(node.sh(&format!("cat /run/cri-systemd/pods/{id}/hostname")), format!("{node_hostname}\n"));
        assert!(node.sh(&format!("cat /run/cri-systemd/pods/{id}/hosts")).contains(&node_hostname));
        client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }).await.unwrap();
    }

    let before = node.sh("ls /var/lib/cri-systemd/pods; systemctl list-units --all --plain --no-legend 'kubepods*'");
    let mut too_long = labelled_pod("long-hostname", "0000ffff-4444-4c2d-9e8f-0123456789ab");
    too_long.hostname = "h".repeat(65);
    let refused = run_pod_sandbox(&mut client, too_long).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let after = node.sh("ls /var/lib/cri-systemd/pods; systemctl list-units --all --plain --no-legend 'kubepods*'");
    assert_eq!(before, after);
}

fn is_active(node: &Node, unit: &str) -> bool {
    node.exec(&["systemctl", "is-active", unit]).stdout.trim() == "active"
}

fn with_cgroup_parent(mut config: cri::PodSandboxConfig, parent: &str) -> cri::PodSandboxConfig {
    config.linux.get_or_insert_with(Default::default).cgroup_parent = parent.into();
    config
}

/// cgroup_parent as the kubelet sends it: the expanded path of a slice the kubelet started
/// already. The pod runs in that slice, and neither a failed RunPodSandbox, nor StopPodSandbox, nor
/// RemovePodSandbox stops it. A slice that does not exist yet is the runtime's to start and stop;
/// one that critest's pods share (`/test.slice`) stops only with the last of them. Paths whose
/// components are not each other's parent slices are refused.
#[tokio::test]
async fn cgroup_parent_as_the_kubelet_sends_it() {
    use e2e::crisimple::{container_config, create, start, status};
    let node = e2e::node_with_local_registry("pods-cgparent", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "cgparent").await;
    let sleeper = |name: &str| container_config(name, &image, &["/bin/busybox", "sleep", "1000"]);

    // The kubelet's own slice, started before RunPodSandbox.
    let slice = "kubepods-besteffort-pod0000abcd_5555_4c2d_9e8f_0123456789ab.slice";
    let path = format!("/kubepods.slice/kubepods-besteffort.slice/{slice}");
    e2e::start_kubelet_slice(&node, slice);
    let since = node.sh(&format!("systemctl show -p ActiveEnterTimestampMonotonic --value {slice}"));

    // A RunPodSandbox that fails after the slice step rolls back without stopping it (the bare
    // slice name, an older form, is taken too).
    for parent in [path.as_str(), slice] {
        let mut failing =
            with_cgroup_parent(labelled_pod("kubelet-bad", "0000abcd-5555-4c2d-9e8f-0123456789ab"), parent);
        failing.linux.as_mut().unwrap().sysctls = HashMap::from([("net.ipv4.ip_local_port_range".into(), "x".into())]);
        let refused = run_pod_sandbox(&mut client, failing).await.unwrap_err();
        assert!(refused.message().contains("ip_local_port_range"), "{refused:?}");
        assert!(is_active(&node, slice), "a failed RunPodSandbox stopped the kubelet's slice");
    }

    let mut config = with_cgroup_parent(labelled_pod("kubelet", "0000abcd-5555-4c2d-9e8f-0123456789ab"), &path);
    config.linux.as_mut().unwrap().security_context.as_mut().unwrap().namespace_options.as_mut().unwrap().pid =
        cri::NamespaceMode::Pod as i32;
    let pod = run_pod_sandbox(&mut client, config).await.expect("RunPodSandbox in the kubelet's slice");
    let container = create(&mut client, &pod, sleeper("in-kubelet-slice")).await.unwrap();
    start(&mut client, &container).await.unwrap();
    for unit in [format!("cri-{container}.service"), format!("cri-pod-{pod}.service")] {
        assert_eq!(node.sh(&format!("systemctl show -p Slice --value {unit}")).trim(), slice, "{unit}");
    }
    client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    assert_eq!(status(&mut client, &container).await.state, cri::ContainerState::ContainerExited as i32);
    assert!(!is_active(&node, &format!("cri-pod-{pod}.service")), "the pod's init outlived StopPodSandbox");
    assert!(is_active(&node, slice), "StopPodSandbox stopped the kubelet's slice");
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    assert!(is_active(&node, slice), "RemovePodSandbox stopped the kubelet's slice");
    // The very unit the kubelet started, its limits untouched.
    assert_eq!(node.sh(&format!("systemctl show -p ActiveEnterTimestampMonotonic --value {slice}")), since);
    assert_eq!(node.sh(&format!("systemctl show -p CPUShares --value {slice}")).trim(), "2");

    // A slice that does not exist: the runtime starts it, and stops it with the pod.
    let own = "kubepods-burstable-pod0000dcba_5555_4c2d_9e8f_0123456789ab.slice";
    let config = with_cgroup_parent(
        labelled_pod("own", "0000dcba-5555-4c2d-9e8f-0123456789ab"),
        &format!("/kubepods.slice/kubepods-burstable.slice/{own}"),
    );
    let pod = run_pod_sandbox(&mut client, config).await.unwrap();
    assert!(is_active(&node, own));
    client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    assert!(!is_active(&node, own), "the runtime's own slice outlived its pod");
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();

    // critest's pods all name /test.slice: the first pod's stop leaves the second's container running.
    let first =
        run_pod_sandbox(&mut client, with_cgroup_parent(labelled_pod("first", "1"), "/test.slice")).await.unwrap();
    let second =
        run_pod_sandbox(&mut client, with_cgroup_parent(labelled_pod("second", "2"), "/test.slice")).await.unwrap();
    let survivor = create(&mut client, &second, sleeper("survivor")).await.unwrap();
    start(&mut client, &survivor).await.unwrap();
    client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: first.clone() }).await.unwrap();
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: first }).await.unwrap();
    assert_eq!(status(&mut client, &survivor).await.state, cri::ContainerState::ContainerRunning as i32);
    assert!(is_active(&node, "test.slice"));
    client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: second.clone() }).await.unwrap();
    assert!(!is_active(&node, "test.slice"), "the last pod's stop left the runtime's slice");

    // Paths that are not a slice's: refused, nothing created.
    let before = node.sh("ls /var/lib/cri-systemd/pods; systemctl list-units --all --plain --no-legend '*.slice'");
    for bad in [
        "/kubepods.slice/kubepods-besteffort-pod0000eeee.slice",
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod0000eeee.slice",
        "/kubepods/besteffort/pod0000eeee",
        "/kubepods.slice/../x.slice",
    ] {
        let refused =
            run_pod_sandbox(&mut client, with_cgroup_parent(labelled_pod("bad", "3"), bad)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad}: {refused:?}");
    }
    let after = node.sh("ls /var/lib/cri-systemd/pods; systemctl list-units --all --plain --no-legend '*.slice'");
    assert_eq!(before, after);
}
