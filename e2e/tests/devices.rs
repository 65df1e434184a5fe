//! Devices: the device cgroup policy of container units (what runc gives by default), CRI
//! `devices` mapped into containers with their permissions, and CPU sets, against a daemon in a
//! real systemd node (cgroup v1 devices and cpuset controllers, as the host has them).

use std::time::Duration;

use e2e::crisimple::{container_config, create, exec_sync, run_pod, sh, start};
use e2e::{CriClient, Node, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A loop device of the host attached, from inside `node`, to a 1 MiB file on the node's tmpfs
/// that starts with `LOOP_TEXT`; detached on drop. (The machine's own disk cannot be opened even by
/// the host's root, so a disk would prove nothing; any loop device can be.)
struct Loop<'n> {
    node: &'n Node,
    path: String,
    /// "MAJ MIN"
    number: String,
}

const LOOP_TEXT: &str = "hello-device";

impl<'n> Loop<'n> {
    fn attach(node: &'n Node) -> Loop<'n> {
        // The node's /dev (nspawn's tmpfs) has no loop nodes: make those the kernel has, then
        // attach (again if another user took the free device meanwhile).
        let path = node.sh(&format!(
            "test -e /dev/loop-control || mknod /dev/loop-control c 10 237; \
             printf {LOOP_TEXT} > /tmp/loop.img && truncate -s 1M /tmp/loop.img; \
             for try in 1 2 3 4 5; do \
               for f in /sys/class/block/loop*/dev; do d=/dev/${{f#/sys/class/block/}}; d=${{d%/dev}}; \
                 test -e $d || mknod $d b $(tr : ' ' < $f); done; \
               if l=$(losetup -f --show /tmp/loop.img 2>/dev/null); then echo $l; exit 0; fi; \
             done; exit 1"
        ));
        let path = path.trim().to_string();
        let name = path.trim_start_matches("/dev/");
        let number = node.sh(&format!("tr : ' ' < /sys/class/block/{name}/dev")).trim().to_string();
        Loop { node, path, number }
    }
}

impl Drop for Loop<'_> {
    fn drop(&mut self) {
        let run = self.node.exec(&["losetup", "-d", &self.path]);
        if !run.success() {
            eprintln!("cannot detach {}: {}", self.path, run.stderr);
        }
    }
}

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
    for rule in ["c *:* m", "b *:* m", "c 1:3 rwm", "c 5:2 rwm", "c 136:* rwm"] {
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
    let _ = exec_sync;
}
