//! CDI devices: a container asks for `example.com/loop=disk` (CRI `CDI_devices`, or a
//! `cdi.k8s.io/` annotation as device plugins set it) and gets what the node's CDI spec file says:
//! a loop device of the node (its number and type read from the host node), an environment
//! variable and a read-only bind mount; in a pod with a user namespace too. Unknown and ambiguous
//! devices are refused with nothing made, a broken spec file is skipped, and a created container
//! keeps its devices across a daemon kill even once the spec file is gone.

use std::time::Duration;

use e2e::crisimple::{
    LOOP_TEXT, LoopDevice, container_config, create, run_pod, run_pod_sandbox, sh, start, userns_pod_config,
};
use e2e::{CriClient, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const DEVICE: &str = "example.com/loop=disk";

/// The spec file: the loop device at /dev/cdi-disk (type and number left to the host node), an
/// env edit, and a read-only bind mount of /tmp/cdi-share; YAML, as DRA drivers write them.
fn loop_spec(loop_path: &str) -> String {
    format!(
        "cdiVersion: 0.5.0\nkind: example.com/loop\ncontainerEdits:\n  env: [\"CDI_SPEC=loop\"]\ndevices:\n  - name: disk\n    \
         containerEdits:\n      env: [\"CDI_DISK=disk\"]\n      deviceNodes:\n        - path: /dev/cdi-disk\n          \
         hostPath: {loop_path}\n          permissions: rw\n      mounts:\n        - hostPath: /tmp/cdi-share\n          \
         containerPath: /cdi-share\n          options: [ro, nosuid, rbind]\n"
    )
}

fn with_cdi(mut config: cri::ContainerConfig, names: &[&str]) -> cri::ContainerConfig {
    config.cdi_devices = names.iter().map(|name| cri::CdiDevice { name: name.to_string() }).collect();
    config
}

/// What the container sees of the device's edits: the device's first bytes, the env, the mount.
async fn check_edits(client: &mut CriClient, id: &str) {
    let script = format!(
        "busybox head -c {} /dev/cdi-disk; echo; echo $CDI_SPEC $CDI_DISK; cat /cdi-share/file; \
         touch /cdi-share/new 2>/dev/null && echo writable || echo read-only",
        LOOP_TEXT.len()
    );
    let (code, out, err) = sh(client, id, &script).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out, format!("{LOOP_TEXT}\nloop disk\nshared\nread-only\n"), "stderr: {err}");
}

async fn container_count(client: &mut CriClient) -> usize {
    client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner().containers.len()
}

#[tokio::test]
async fn cdi_devices_are_injected_from_the_nodes_spec_files() {
    let node = e2e::node_with_local_registry("cdi", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "cdi").await;
    let loop_device = LoopDevice::attach(&node);
    node.sh("mkdir -p /etc/cdi /var/run/cdi /tmp/cdi-share && echo shared > /tmp/cdi-share/file");
    node.write_file("/etc/cdi/loop.yaml", &loop_spec(&loop_device.path));
    // A broken spec file is skipped (with its reason in the journal), not fatal.
    node.write_file("/etc/cdi/broken.json", "{\"cdiVersion\": \"0.5.0\", \"kind\": ");
    let sleep = ["/bin/busybox", "sleep", "100000"];
    let pod = run_pod(&mut client, "cdi").await;

    // CDI_devices, as the kubelet sends DRA and device plugin CDI devices.
    let by_field = create(&mut client, &pod, with_cdi(container_config("field", &image, &sleep), &[DEVICE])).await;
    let by_field = by_field.expect("CreateContainer with a CDI device");
    start(&mut client, &by_field).await.unwrap();
    check_edits(&mut client, &by_field).await;

    // A cdi.k8s.io/ annotation, as device plugins may still set them (containerd honours both).
    let mut annotated = container_config("annotated", &image, &sleep);
    annotated.annotations.insert("cdi.k8s.io/test-plugin_dev0".into(), DEVICE.into());
    let annotated = create(&mut client, &pod, annotated).await.expect("CreateContainer with a CDI annotation");
    start(&mut client, &annotated).await.unwrap();
    check_edits(&mut client, &annotated).await;
    assert!(node.logs().contains("broken.json"), "the skipped spec file is not in the journal");

    // In a pod with a user namespace: the device node belongs to the pod's root, the mount is
    // idmapped to the pod's range.
    let userns_pod = run_pod_sandbox(&mut client, userns_pod_config("cdiuserns")).await.expect("RunPodSandbox");
    let in_userns = create(&mut client, &userns_pod, with_cdi(container_config("userns", &image, &sleep), &[DEVICE]));
    let in_userns = in_userns.await.expect("CreateContainer in a user namespace");
    start(&mut client, &in_userns).await.unwrap();
    check_edits(&mut client, &in_userns).await;

    // Unknown, malformed and ambiguous names are refused, naming the device; nothing is made.
    let before = container_count(&mut client).await;
    node.write_file("/var/run/cdi/dup-a.json", &loop_spec_json("a"));
    node.write_file("/var/run/cdi/dup-b.json", &loop_spec_json("b"));
    let refusals = [
        ("example.com/loop=nope", "example.com/loop=nope"),
        ("loop=disk", "loop=disk"),
        ("example.com/loop=twice", "ambiguous"),
    ];
    for (index, (name, named)) in refusals.into_iter().enumerate() {
        let config = container_config(&format!("bad{index}"), &image, &sleep);
        let error = create(&mut client, &pod, with_cdi(config, &[name])).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{name}: {error:?}");
        assert!(error.message().contains(named), "{name}: {}", error.message());
    }
    let mut bad_annotation = container_config("badannotation", &image, &sleep);
    bad_annotation.annotations.insert("cdi.k8s.io/x".into(), "gpu0".into());
    let error = create(&mut client, &pod, bad_annotation).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("cdi.k8s.io/x"), "{}", error.message());
    assert_eq!(container_count(&mut client).await, before);

    // A created container's devices are in its record: it starts with them after a daemon kill,
    // though the spec file is gone by then.
    let created = create(&mut client, &pod, with_cdi(container_config("later", &image, &sleep), &[DEVICE])).await;
    let created = created.expect("CreateContainer");
    node.sh("rm /etc/cdi/loop.yaml");
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd; systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    start(&mut client, &created).await.expect("StartContainer after the restart");
    check_edits(&mut client, &created).await;
    let error = create(&mut client, &pod, with_cdi(container_config("gone", &image, &sleep), &[DEVICE])).await;
    assert_eq!(error.unwrap_err().code(), tonic::Code::InvalidArgument);
}

/// A JSON spec of device `example.com/loop=twice`, written twice in one directory (ambiguous).
fn loop_spec_json(which: &str) -> String {
    format!(
        r#"{{"cdiVersion": "0.3.0", "kind": "example.com/loop",
            "devices": [{{"name": "twice", "containerEdits": {{"env": ["WHICH={which}"]}}}}]}}"#
    )
}
