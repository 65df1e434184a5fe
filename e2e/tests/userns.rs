//! Pods in user namespaces (KEP-127 `hostUsers: false`): per-pod host id ranges from the daemon's
//! pool or the kubelet, kept across daemon kills; root inside, an unprivileged range outside;
//! images stored in the foreign range and seen through idmapped mounts; volumes plain or idmapped.

use std::collections::HashMap;
use std::time::Duration;

use e2e::cri::NamespaceMode;
use e2e::crisimple::{kubelet_pod, remove_pod, run_pod_sandbox};
use e2e::oci::{Compression, ConfigOptions, Image, LayerBuilder, busybox_layer};
use e2e::registry::{Registry, RegistryOptions};
use e2e::{CriClient, Node, cri, eventually, node_with_local_registry};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const RANGE: u32 = 65536;
const FOREIGN: u32 = 0x7FFE_0000;
/// systemd's container range, the default pool.
const POOL: std::ops::Range<u64> = 0x0008_0000..0x7000_0000;

/// A static x86-64 program that exits with its effective uid (low 8 bits): 0 when a setuid-root
/// copy runs as someone else and setuid works. geteuid(); exit(euid).
fn euid_program() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let code: [u8; 16] = [
        0xB8, 0x6B, 0x00, 0x00, 0x00, // mov eax, 107 (geteuid)
        0x0F, 0x05, // syscall
        0x89, 0xC7, // mov edi, eax
        0xB8, 0x3C, 0x00, 0x00, 0x00, // mov eax, 60 (exit)
        0x0F, 0x05, // syscall
    ];
    let entry = BASE + 64 + 56;
    let size = (64 + 56 + code.len()) as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7F, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3Eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after this header
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [0, BASE, BASE, size, size, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    elf
}

/// busybox, plus a layer with files of user 1000 and a setuid-root program.
fn owners_image() -> Image {
    let mut extra = LayerBuilder::new();
    extra
        .dir("data", 0o755)
        .file_owned("data/owned", 0o640, 1000, 1000, b"owned-by-1000\n")
        .dir_owned("data/dir", 0o700, 1000, 1000)
        .file_owned("data/dir/inner", 0o600, 1000, 1000, b"inner\n")
        .file("bin/euid", 0o4755, &euid_program());
    Image::new(vec![busybox_layer(Compression::Gzip), extra.build(Compression::Gzip)], ConfigOptions::default())
}

/// Pushes busybox (and the owners image) to a registry in the node and pulls both.
async fn pull_images(node: &Node, client: &mut CriClient) -> (String, String) {
    let registry = Registry::start(node, "userns", e2e::LOCAL_REGISTRY_PORT, RegistryOptions::default());
    registry.push_image("busybox", "1", &e2e::oci::busybox_image(""));
    registry.push_image("owners", "1", &owners_image());
    let mut names = Vec::new();
    for repo in ["busybox:1", "owners:1"] {
        let image = registry.repo(repo);
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
            ..Default::default()
        };
        client.image.pull_image(request).await.expect("PullImage");
        names.push(image);
    }
    (names[0].clone(), names[1].clone())
}

/// The pod's user namespace as PodSandboxStatus reports it: (mode, uid mappings), after checking
/// that the gid mappings are the same and that the verbose info has it too.
async fn pod_userns(client: &mut CriClient, id: &str) -> (i32, Vec<(u32, u32, u32)>) {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: true };
    let response = client.runtime.pod_sandbox_status(request).await.expect("PodSandboxStatus").into_inner();
    let options = response.status.unwrap().linux.unwrap().namespaces.unwrap().options.unwrap();
    let userns = options.userns_options.expect("userns_options in the status");
    let list = |m: &[cri::IdMapping]| m.iter().map(|m| (m.container_id, m.host_id, m.length)).collect::<Vec<_>>();
    assert_eq!(list(&userns.uids), list(&userns.gids));
    let info: serde_json::Value = serde_json::from_str(&response.info["info"]).unwrap();
    match userns.uids.first() {
        Some(m) => assert_eq!(info["userns"]["range"]["host_id"], m.host_id, "{info}"),
        None => assert!(info["userns"].is_null(), "{info}"),
    }
    (userns.mode, list(&userns.uids))
}

/// The first host id of a pod in a user namespace of the pool, checked to be a whole aligned
/// 64K range in systemd's container range.
async fn pool_range(client: &mut CriClient, id: &str) -> u32 {
    let (mode, uids) = pod_userns(client, id).await;
    assert_eq!(mode, cri::NamespaceMode::Pod as i32);
    let [(0, host, length)] = uids[..] else { panic!("one mapping from container id 0 expected: {uids:?}") };
    assert_eq!(length, RANGE);
    assert_eq!(host % RANGE, 0);
    assert!(POOL.contains(&u64::from(host)), "{host:#x} outside the pool");
    host
}

fn volume(container_path: &str, host_path: &str) -> cri::Mount {
    cri::Mount { container_path: container_path.into(), host_path: host_path.into(), ..Default::default() }
}

/// Creates and starts a container; `user` None runs the image's user (root).
async fn start_container(
    client: &mut CriClient,
    pod: &str,
    name: &str,
    image: &str,
    script: &str,
    mounts: Vec<cri::Mount>,
    user: Option<i64>,
) -> String {
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        mounts,
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: user.map(|value| cri::Int64Value { value }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let request =
        cri::CreateContainerRequest { pod_sandbox_id: pod.into(), config: Some(config), sandbox_config: None };
    let id = client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id;
    client
        .runtime
        .start_container(cri::StartContainerRequest { container_id: id.clone() })
        .await
        .expect("StartContainer");
    id
}

/// Waits until the file `path` in the node exists; returns its content.
async fn wait_file(node: &Node, path: &str) -> String {
    eventually(Duration::from_secs(30), path, || {
        let run = node.exec(&["cat", path]);
        async move { run.success().then_some(run.stdout) }
    })
    .await
}

/// The host uids (real, effective, saved, fs) of the container's main process.
fn host_uids(node: &Node, container: &str) -> Vec<u32> {
    let pid = node.sh(&format!("systemctl show -p MainPID --value cri-{container}.service"));
    let status = node.sh(&format!("cat /proc/{}/status", pid.trim()));
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().skip(1).map(|f| f.parse().unwrap()).collect()
}

/// What the node has of pods: records, run dirs, slices.
fn pod_traces(node: &Node) -> String {
    node.sh("ls /var/lib/cri-systemd/pods; ls /run/cri-systemd/pods; systemctl list-units --all --plain --no-legend 'kubepods*'")
}

#[tokio::test]
async fn userns_pods_get_disjoint_ranges_and_root_inside_is_not_root_outside() {
    let node = node_with_local_registry("userns-ranges", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let status = client.runtime.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    assert!(status.runtime_handlers[0].features.as_ref().unwrap().user_namespaces, "user namespaces are advertised");
    let (busybox, _) = pull_images(&node, &mut client).await;
    node.sh("mkdir -p /srv/out && chmod 777 /srv/out");

    // Image files are stored in the foreign range, the layer root included.
    let stored = node.sh("stat -c %u:%g /var/lib/cri-systemd/images/layers/sha256/*/diff/bin/busybox /var/lib/cri-systemd/images/layers/sha256/*/diff | sort -u");
    assert_eq!(stored.trim(), format!("{FOREIGN}:{FOREIGN}"));

    let a = run_pod_sandbox(&mut client, kubelet_pod("a").userns(NamespaceMode::Pod, None)).await.unwrap();
    let b = run_pod_sandbox(&mut client, kubelet_pod("b").userns(NamespaceMode::Pod, None)).await.unwrap();
    let (ra, rb) = (pool_range(&mut client, &a).await, pool_range(&mut client, &b).await);
    assert_ne!(ra, rb, "two pods share a range");
    let node_pod = run_pod_sandbox(&mut client, kubelet_pod("n").userns(NamespaceMode::Node, None)).await.unwrap();
    assert_eq!(pod_userns(&mut client, &node_pod).await, (cri::NamespaceMode::Node as i32, vec![]));

    let script = "busybox id > /out/$P.id; busybox stat -c %u:%g /bin/busybox /etc/passwd / /dev/null /dev/shm /dev /etc/hostname > /out/$P.owners; \
                  busybox cat /proc/self/uid_map /proc/self/gid_map > /out/$P.map; \
                  busybox touch /etc/hostname /dev/shm/x /tmp/x /new /dev/x && echo ok > /out/$P.writable; \
                  exec busybox sleep 1000";
    for (pod, host, name) in [(&a, Some(ra), "a"), (&b, Some(rb), "b"), (&node_pod, None, "n")] {
        let container = start_container(
            &mut client,
            pod,
            name,
            &busybox,
            &script.replace("$P", name),
            vec![volume("/out", "/srv/out")],
            None,
        )
        .await;
        assert_eq!(
            wait_file(&node, &format!("/srv/out/{name}.writable")).await,
            "ok\n",
            "{name}: root can write its files"
        );
        let id = node.sh(&format!("cat /srv/out/{name}.id"));
        assert!(id.starts_with("uid=0(root) gid=0(root)"), "{name}: {id}");
        assert_eq!(
            node.sh(&format!("cat /srv/out/{name}.owners")),
            "0:0\n".repeat(7),
            "{name}: image and pod files are root's"
        );
        let host = host.unwrap_or(0);
        // From the node: the pod's root is the first id of its range, and owns what it writes.
        assert_eq!(host_uids(&node, &container), vec![host; 4], "{name}");
        assert_eq!(node.sh(&format!("stat -c %u:%g /srv/out/{name}.id")).trim(), format!("{host}:{host}"));
        let map: Vec<String> = node
            .sh(&format!("cat /srv/out/{name}.map"))
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let expected = if name == "n" { "0 0 4294967295".to_string() } else { format!("0 {host} 65536") };
        assert_eq!(map, vec![expected.clone(), expected], "{name}");
        // ContainerStatus tells the mapping too.
        let request = cri::ContainerStatusRequest { container_id: container.clone(), verbose: true };
        let info = client.runtime.container_status(request).await.unwrap().into_inner().info;
        if name == "n" {
            assert_eq!(info["userns"], "null");
        } else {
            let userns: serde_json::Value = serde_json::from_str(&info["userns"]).unwrap();
            assert_eq!(userns["uidMappings"][0]["host_id"], host, "{userns}");
        }
        // A command run in the container (ExecSync) is in its user namespace too: root there,
        // the pod's first id on the node.
        let cmd = ["/bin/busybox", "sh", "-c", "busybox id -u; busybox touch /exec-probe"].map(String::from).to_vec();
        let request = cri::ExecSyncRequest { container_id: container.clone(), cmd, timeout: 10 };
        let exec = client.runtime.exec_sync(request).await.expect("ExecSync").into_inner();
        assert_eq!((exec.exit_code, String::from_utf8_lossy(&exec.stdout).as_ref()), (0, "0\n"), "{name}: {exec:?}");
        let probe = node.sh(&format!("stat -c %u:%g /var/lib/cri-systemd/containers/{container}/upper/exec-probe"));
        assert_eq!(probe.trim(), format!("{host}:{host}"), "{name}: the exec'd command's files");
        // The user namespace is the pod's pinned one, and owns the pod's network namespace.
        let pid = node.sh(&format!("systemctl show -p MainPID --value cri-{container}.service")).trim().to_string();
        if name != "n" {
            let pins = format!("/run/cri-systemd/pods/{pod}/ns");
            assert_eq!(
                node.sh(&format!("stat -L -c %i /proc/{pid}/ns/user")),
                node.sh_in_pod_mounts(&format!("stat -L -c %i {pins}/user"))
            );
            // Root of the pod's user namespace administers the pod's network (its namespace
            // belongs to the pod's user namespace), and nothing of the node's.
            let as_pod_root = |args: &[&str]| {
                let mut command = vec!["nsenter", "-t", pid.as_str(), "-U", "-n"];
                command.extend_from_slice(args);
                node.exec(&command)
            };
            assert!(as_pod_root(&["ip", "link", "set", "lo", "mtu", "1400"]).success());
            assert!(node.sh(&format!("nsenter --net={pins}/net ip -o link show lo")).contains("mtu 1400"));
            assert!(
                !as_pod_root(&["nsenter", "--net=/proc/1/ns/net", "true"]).success(),
                "pod root joined the node's network"
            );
        }
    }
    // Root of pod a is nobody to the node: it cannot read root's files there.
    assert!(
        !node
            .exec(&[
                "setpriv",
                &format!("--reuid={ra}"),
                &format!("--regid={ra}"),
                "--clear-groups",
                "cat",
                "/etc/shadow"
            ])
            .success()
    );

    // Removing a pod frees its pins.
    remove_pod(&mut client, &a).await;
    node.sh(&format!("test ! -e /run/cri-systemd/pods/{a}"));
}

#[tokio::test]
async fn kubelet_mappings_are_used_verbatim_and_bad_or_overlapping_ones_refused() {
    // A small pool starting where the kubelet's range is: the pool must go around it.
    let node = node_with_local_registry("userns-kubelet", "[userns]\npool_start = 2097152\npool_ranges = 2\n");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, _) = pull_images(&node, &mut client).await;

    let kubelet = run_pod_sandbox(&mut client, kubelet_pod("k").userns(NamespaceMode::Pod, Some((0x20_0000, RANGE))))
        .await
        .unwrap();
    assert_eq!(pod_userns(&mut client, &kubelet).await, (cri::NamespaceMode::Pod as i32, vec![(0, 0x20_0000, RANGE)]));
    let container =
        start_container(&mut client, &kubelet, "k", &busybox, "exec busybox sleep 1000", vec![], None).await;
    assert_eq!(host_uids(&node, &container), vec![0x20_0000; 4]);
    // Bigger kubelet ranges (idsPerPod a multiple of 65536) are taken as they are.
    let wide = run_pod_sandbox(&mut client, kubelet_pod("w").userns(NamespaceMode::Pod, Some((0x40_0000, 2 * RANGE))))
        .await
        .unwrap();
    assert_eq!(pod_userns(&mut client, &wide).await.1, vec![(0, 0x40_0000, 2 * RANGE)]);
    // What critest's NamespaceMode_POD spec sends, neither aligned nor a multiple of 65536: taken
    // as given, as containerd and CRI-O do (it was refused as "not a positive multiple of 65536").
    let critest =
        run_pod_sandbox(&mut client, kubelet_pod("c").userns(NamespaceMode::Pod, Some((1000, 100_000)))).await.unwrap();
    assert_eq!(pod_userns(&mut client, &critest).await.1, vec![(0, 1000, 100_000)]);
    let container =
        start_container(&mut client, &critest, "c", &busybox, "exec busybox sleep 1000", vec![], None).await;
    assert_eq!(host_uids(&node, &container), vec![1000; 4]);

    let before = pod_traces(&node);
    // Overlaps with ranges in use: refused.
    for (name, host, length) in [("o1", 0x20_0000, RANGE), ("o2", 0x1F_0000, 2 * RANGE), ("o3", 0x41_0000, RANGE)] {
        let err = run_pod_sandbox(&mut client, kubelet_pod(name).userns(NamespaceMode::Pod, Some((host, length))))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{name}: {err:?}");
        assert!(err.message().contains("overlap"), "{err:?}");
    }
    // Malformed mappings and modes: refused as invalid.
    let mut bad = Vec::new();
    for (host, length) in [(0, RANGE), (0x50_0000, 1000), (FOREIGN, RANGE)] {
        bad.push(kubelet_pod("bad").userns(NamespaceMode::Pod, Some((host, length))).build());
    }
    let mut not_root = kubelet_pod("bad").userns(NamespaceMode::Pod, Some((0x50_0000, RANGE))).build();
    let options =
        not_root.linux.as_mut().unwrap().security_context.as_mut().unwrap().namespace_options.as_mut().unwrap();
    options.userns_options.as_mut().unwrap().uids[0].container_id = 1;
    bad.push(not_root.clone());
    let mut differing = kubelet_pod("bad").userns(NamespaceMode::Pod, Some((0x50_0000, RANGE))).build();
    let options =
        differing.linux.as_mut().unwrap().security_context.as_mut().unwrap().namespace_options.as_mut().unwrap();
    options.userns_options.as_mut().unwrap().gids[0].host_id = 0x60_0000;
    bad.push(differing);
    bad.push(kubelet_pod("bad").userns(NamespaceMode::Container, None).build());
    bad.push(kubelet_pod("bad").userns(NamespaceMode::Pod, None).network(NamespaceMode::Node).build());
    for config in bad {
        let err = run_pod_sandbox(&mut client, config.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{config:?}: {err:?}");
    }
    assert_eq!(pod_traces(&node), before, "refused pods leave nothing");

    // The pool skips the kubelet's range at its start: one pool range is left, then none.
    let pooled = run_pod_sandbox(&mut client, kubelet_pod("p").userns(NamespaceMode::Pod, None)).await.unwrap();
    assert_eq!(pool_range(&mut client, &pooled).await, 0x21_0000);
    let err = run_pod_sandbox(&mut client, kubelet_pod("q").userns(NamespaceMode::Pod, None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
}

#[tokio::test]
async fn pods_cannot_touch_each_others_files_and_idmapped_volumes_look_root_owned() {
    let node = node_with_local_registry("userns-volumes", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, _) = pull_images(&node, &mut client).await;
    node.sh("mkdir -p /srv/shared /srv/out && chmod 1777 /srv/shared && chmod 777 /srv/out");
    // An idmapped volume must be on a file system that supports them (ext4 here, not the node's
    // overlay root): a directory and a file of the node's root.
    node.sh("mkdir -p /var/lib/cri-systemd/e2e-vol && echo from-the-node > /var/lib/cri-systemd/e2e-vol/hostfile && chmod 755 /var/lib/cri-systemd/e2e-vol");

    let a = run_pod_sandbox(&mut client, kubelet_pod("a").userns(NamespaceMode::Pod, None)).await.unwrap();
    let b = run_pod_sandbox(&mut client, kubelet_pod("b").userns(NamespaceMode::Pod, None)).await.unwrap();
    let (ra, rb) = (pool_range(&mut client, &a).await, pool_range(&mut client, &b).await);

    // Pod a writes a private and a public file into the shared (plain) volume.
    let script = "echo secret > /shared/private && busybox chmod 600 /shared/private && echo hello > /shared/public && busybox chmod 644 /shared/public && touch /out/a.done; exec busybox sleep 1000";
    start_container(
        &mut client,
        &a,
        "a",
        &busybox,
        script,
        vec![volume("/shared", "/srv/shared"), volume("/out", "/srv/out")],
        None,
    )
    .await;
    wait_file(&node, "/srv/out/a.done").await;
    assert_eq!(node.sh("stat -c %u:%g /srv/shared/private").trim(), format!("{ra}:{ra}"));

    // Root of pod b: the public file is readable (permissions say so), the private one neither
    // readable nor writable, nor can b take it over.
    let script = "{ busybox cat /shared/public || echo no-read-public; busybox cat /shared/private 2>/dev/null || echo no-read; \
                  { echo x >> /shared/private; } 2>/dev/null || echo no-write; busybox chmod 666 /shared/private 2>/dev/null || echo no-chmod; \
                  busybox chown 0 /shared/private 2>/dev/null || echo no-chown; } > /out/b.result; touch /out/b.done";
    start_container(
        &mut client,
        &b,
        "b",
        &busybox,
        script,
        vec![volume("/shared", "/srv/shared"), volume("/out", "/srv/out")],
        None,
    )
    .await;
    wait_file(&node, "/srv/out/b.done").await;
    assert_eq!(node.sh("cat /srv/out/b.result"), "hello\nno-read\nno-write\nno-chmod\nno-chown\n");
    assert_eq!(node.sh("cat /srv/shared/private"), "secret\n");

    // Kubelet-style idmapped volume for pod b (the pod's own mapping): the node root's files are
    // the pod root's, and what the pod writes lands as the node's root.
    let mapping = vec![cri::IdMapping { host_id: rb, container_id: 0, length: RANGE }];
    let mut idmapped = volume("/vol", "/var/lib/cri-systemd/e2e-vol");
    idmapped.uid_mappings = mapping.clone();
    idmapped.gid_mappings = mapping;
    let plain = volume("/plain", "/var/lib/cri-systemd/e2e-vol");
    let script = "{ busybox stat -c %u:%g /vol /vol/hostfile /plain/hostfile; echo more >> /vol/hostfile && echo appended; \
                  touch /vol/from-pod && echo created; { echo x >> /plain/hostfile; } 2>/dev/null || echo plain-read-only; } > /out/v.result; touch /out/v.done";
    let id = start_container(
        &mut client,
        &b,
        "v",
        &busybox,
        script,
        vec![idmapped, plain, volume("/out", "/srv/out")],
        None,
    )
    .await;
    wait_file(&node, "/srv/out/v.done").await;
    assert_eq!(node.sh("cat /srv/out/v.result"), "0:0\n0:0\n65534:65534\nappended\ncreated\nplain-read-only\n");
    assert_eq!(node.sh("stat -c %u:%g /var/lib/cri-systemd/e2e-vol/from-pod").trim(), "0:0");
    assert_eq!(node.sh("cat /var/lib/cri-systemd/e2e-vol/hostfile"), "from-the-node\nmore\n");
    let request = cri::ContainerStatusRequest { container_id: id, verbose: false };
    let status = client.runtime.container_status(request).await.unwrap().into_inner().status.unwrap();
    let reported = status.mounts.iter().find(|m| m.container_path == "/vol").unwrap();
    assert_eq!(
        reported.uid_mappings.iter().map(|m| (m.container_id, m.host_id, m.length)).collect::<Vec<_>>(),
        vec![(0, rb, RANGE)]
    );

    // Half a mapping is refused.
    let mut half = volume("/vol", "/var/lib/cri-systemd/e2e-vol");
    half.uid_mappings = vec![cri::IdMapping { host_id: rb, container_id: 0, length: RANGE }];
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "half".into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: busybox.clone(), ..Default::default() }),
        command: vec!["true".into()],
        mounts: vec![half],
        ..Default::default()
    };
    let request = cri::CreateContainerRequest { pod_sandbox_id: b.clone(), config: Some(config), sandbox_config: None };
    assert_eq!(client.runtime.create_container(request).await.unwrap_err().code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn ranges_survive_a_daemon_kill_and_an_exhausted_pool_leaves_nothing() {
    let node = node_with_local_registry("userns-restart", "[userns]\npool_ranges = 3\n");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, _) = pull_images(&node, &mut client).await;

    let a = run_pod_sandbox(&mut client, kubelet_pod("a").userns(NamespaceMode::Pod, None)).await.unwrap();
    let b = run_pod_sandbox(&mut client, kubelet_pod("b").userns(NamespaceMode::Pod, None)).await.unwrap();
    let (ra, rb) = (pool_range(&mut client, &a).await, pool_range(&mut client, &b).await);
    let container = start_container(&mut client, &b, "b", &busybox, "exec busybox sleep 1000", vec![], None).await;

    node.sh("systemctl kill -s KILL cri-systemd");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    assert_eq!(pool_range(&mut client, &a).await, ra, "ranges are kept");
    assert_eq!(pool_range(&mut client, &b).await, rb);
    assert_eq!(host_uids(&node, &container), vec![rb; 4], "the container kept running in its range");

    // A new pod gets the one range nobody uses, then the pool is empty.
    let c = run_pod_sandbox(&mut client, kubelet_pod("c").userns(NamespaceMode::Pod, None)).await.unwrap();
    let rc = pool_range(&mut client, &c).await;
    assert!(rc != ra && rc != rb, "{rc:#x} is in use");
    let before = pod_traces(&node);
    for _ in 0..2 {
        let err = run_pod_sandbox(&mut client, kubelet_pod("d").userns(NamespaceMode::Pod, None)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("userns.pool_ranges"), "{err:?}");
    }
    assert_eq!(pod_traces(&node), before, "an exhausted pool leaves nothing behind");
    // Pods without a user namespace need no range.
    run_pod_sandbox(&mut client, kubelet_pod("n").userns(NamespaceMode::Node, None)).await.unwrap();

    // Still full after another kill; removing a pod gives its range back.
    node.sh("systemctl kill -s KILL cri-systemd");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    assert_eq!(
        run_pod_sandbox(&mut client, kubelet_pod("d").userns(NamespaceMode::Pod, None)).await.unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
    remove_pod(&mut client, &a).await;
    let d = run_pod_sandbox(&mut client, kubelet_pod("d").userns(NamespaceMode::Pod, None)).await.unwrap();
    assert_eq!(pool_range(&mut client, &d).await, ra);
}

#[tokio::test]
async fn image_owners_and_setuid_behave_the_same_in_node_and_pod_mode() {
    let node = node_with_local_registry("userns-owners", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (_, owners) = pull_images(&node, &mut client).await;
    node.sh("mkdir -p /srv/out && chmod 777 /srv/out");

    let script = "{ busybox stat -c '%u:%g %a' /data/owned /data/dir /bin/euid; busybox cat /data/owned /data/dir/inner; \
                  echo appended >> /data/owned && echo append-ok; /bin/euid; echo euid-exit $?; busybox id -u; \
                  busybox ls /home/user 2>/dev/null || echo no-home; busybox grep CapEff /proc/self/status; \
                  busybox grep -c /layers/ /proc/self/mountinfo; } > /out/$P.result; touch /out/$P.done";
    let mut results = HashMap::new();
    let mut uppers = HashMap::new();
    for (name, mode) in [("node", NamespaceMode::Node), ("pod", NamespaceMode::Pod)] {
        let pod = run_pod_sandbox(&mut client, kubelet_pod(name).userns(mode, None)).await.unwrap();
        let id = start_container(
            &mut client,
            &pod,
            name,
            &owners,
            &script.replace("$P", name),
            vec![volume("/out", "/srv/out")],
            Some(1000),
        )
        .await;
        wait_file(&node, &format!("/srv/out/{name}.done")).await;
        results.insert(name, node.sh(&format!("cat /srv/out/{name}.result")));
        let host = if name == "pod" { pool_range(&mut client, &pod).await } else { 0 };
        uppers.insert(
            name,
            (node.sh(&format!("stat -c %u:%g /var/lib/cri-systemd/containers/{id}/upper/data/owned")), host),
        );
    }
    // User 1000 (run_as_user): its own files, the setuid program runs as root, another user's
    // home stays closed, and no capabilities. No image layer is mounted in the container: the
    // idmapped layers were staged elsewhere to make the overlay (0 lines of mountinfo name one).
    assert_eq!(
        results["node"],
        "1000:1000 640\n1000:1000 700\n0:0 4755\nowned-by-1000\ninner\nappend-ok\neuid-exit 0\n1000\nno-home\nCapEff:\t0000000000000000\n0\n"
    );
    assert_eq!(results["pod"], results["node"], "the same in a user namespace");
    // Copied up as the ids the container saw, in the pod's range; the layer itself untouched.
    for (name, (owner, host)) in uppers {
        assert_eq!(owner.trim(), format!("{}:{}", host + 1000, host + 1000), "{name}");
    }
    let layer = node.sh("stat -c %u:%g /var/lib/cri-systemd/images/layers/sha256/*/diff/data/owned");
    assert_eq!(layer.trim(), format!("{}:{}", FOREIGN + 1000, FOREIGN + 1000));
}

#[tokio::test]
async fn a_userns_pod_on_the_bridge_network() {
    let node = node_with_local_registry("userns-network", "");
    node.write_file(e2e::CNI_CONFLIST_PATH, e2e::CNI_CONFLIST);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, _) = pull_images(&node, &mut client).await;
    node.sh("mkdir -p /srv/out && chmod 777 /srv/out");

    // CNI (run as the node's root) wires up a network namespace that belongs to the pod's user
    // namespace; inside, sysfs shows the pod's interfaces and root may use raw sockets (ping).
    let pod = run_pod_sandbox(&mut client, kubelet_pod("net").userns(NamespaceMode::Pod, None)).await.unwrap();
    pool_range(&mut client, &pod).await;
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: pod.clone(), verbose: false };
    let ip = client.runtime.pod_sandbox_status(request).await.unwrap().into_inner().status.unwrap().network.unwrap().ip;
    assert!(ip.starts_with("10.88."), "pod ip {ip:?}");
    let script = "{ busybox ls /sys/class/net; busybox ip -o -4 addr show eth0 | busybox awk '{print $4}'; \
                  busybox ping -c 1 -W 5 10.88.0.1 >/dev/null && echo reached-the-node; } > /out/net; touch /out/net.done";
    start_container(&mut client, &pod, "net", &busybox, script, vec![volume("/out", "/srv/out")], None).await;
    wait_file(&node, "/srv/out/net.done").await;
    let report = node.sh("cat /srv/out/net");
    assert!(report.contains("eth0\n") && report.contains("lo\n"), "{report}");
    assert!(report.contains(&format!("{ip}/")), "{report}");
    assert!(report.ends_with("reached-the-node\n"), "{report}");
    remove_pod(&mut client, &pod).await;
}

#[tokio::test]
async fn a_userns_pod_shares_a_pid_namespace_that_its_user_namespace_owns() {
    let node = node_with_local_registry("userns-pidns", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, _) = pull_images(&node, &mut client).await;
    let config = kubelet_pod("sharedpid").userns(NamespaceMode::Pod, None).pid(NamespaceMode::Pod);
    let pod = run_pod_sandbox(&mut client, config).await.expect("RunPodSandbox");
    let host = pool_range(&mut client, &pod).await;

    // The pod's init is the pod's root, not the node's, in the pod's user namespace, and the
    // PID namespace it heads belongs to that user namespace.
    let init_unit = format!("cri-pod-{pod}.service");
    let init = node.sh(&format!("systemctl show -p MainPID --value {init_unit}")).trim().to_string();
    let status = node.sh(&format!("cat /proc/{init}/status"));
    let uids: Vec<u32> = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    assert_eq!(uids, vec![host; 4]);
    let pins = format!("/run/cri-systemd/pods/{pod}/ns");
    // The network pin is the node's; the others are in the daemon's pod mount namespace.
    let inode = |path: &str| {
        let stat = format!("stat -L -c %i {path}");
        if path.ends_with("/net") { node.sh(&stat) } else { node.sh_in_pod_mounts(&stat) }.trim().to_string()
    };
    assert_eq!(inode(&format!("/proc/{init}/ns/user")), inode(&format!("{pins}/user")));
    let pidns = inode(&format!("{pins}/pid"));
    let owner = node.sh(&format!("lsns -t pid -n -o NS,ONS | awk '$1 == {pidns} {{ print $2 }}' | sort -u"));
    assert_eq!(owner.trim(), inode(&format!("{pins}/user")));

    // A container joins it as the pod's root and sees the init as PID 1.
    let id = start_container(&mut client, &pod, "c", &busybox, "exec sleep 1000", vec![], None).await;
    let main = node.sh(&format!("systemctl show -p MainPID --value cri-{id}.service")).trim().to_string();
    assert_eq!(inode(&format!("/proc/{main}/ns/pid")), pidns);
    assert_eq!(host_uids(&node, &id), vec![host; 4]);
    let request = cri::ExecSyncRequest {
        container_id: id.clone(),
        cmd: ["/bin/busybox", "cat", "/proc/1/cmdline"].map(String::from).to_vec(),
        timeout: 10,
    };
    let exec = client.runtime.exec_sync(request).await.expect("ExecSync").into_inner();
    assert!(String::from_utf8_lossy(&exec.stdout).contains("pod-init"), "{exec:?}");

    remove_pod(&mut client, &pod).await;
    let left = node.sh(&format!("systemctl list-units --all --plain --no-legend '{init_unit}' 'cri-{id}.service'"));
    assert_eq!(left.trim(), "", "units left: {left}");
    let traces = pod_traces(&node);
    assert!(!traces.contains(&pod) && !traces.contains("sharedpid"), "{traces}");
}

/// A userns pod's container has a mount namespace its user namespace owns (as with runc): root
/// in the pod, given CAP_SYS_ADMIN, can mount a tmpfs, but cannot uncover a masked path or make
/// a read-only one writable (the mounts it inherited are locked). Without that capability it
/// mounts nothing. In a NODE-mode pod the same container runs without a user namespace, where
/// its mount namespace stays the node's.
#[tokio::test]
async fn a_userns_pod_owns_its_mount_namespace_but_not_the_mounts_it_was_given() {
    let node = node_with_local_registry("userns-mounts", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, _) = pull_images(&node, &mut client).await;
    let pod = run_pod_sandbox(&mut client, kubelet_pod("mounts").userns(NamespaceMode::Pod, None)).await.unwrap();
    node.sh("mkdir -p /srv/mounts && chmod 777 /srv/mounts");
    let script = "{ busybox mkdir -p /tmp/m; busybox mount -t tmpfs none /tmp/m && echo tmpfs-mounted; \
                   busybox umount /proc/kcore 2>/dev/null && echo kcore-uncovered || echo kcore-locked; \
                   busybox mount -o remount,rw /proc/sys 2>/dev/null && echo sys-writable || echo sys-locked; \
                   busybox grep -c ' /tmp/m ' /proc/self/mounts; } > /out/$NAME 2>&1";
    for (name, caps) in [("admin", vec!["CAP_SYS_ADMIN".to_string()]), ("plain", vec![])] {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(cri::ImageSpec { image: busybox.clone(), ..Default::default() }),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            envs: vec![cri::KeyValue { key: "NAME".into(), value: name.into() }],
            mounts: vec![volume("/out", "/srv/mounts")],
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability { add_capabilities: caps, ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request =
            cri::CreateContainerRequest { pod_sandbox_id: pod.clone(), config: Some(config), sandbox_config: None };
        let id = client.runtime.create_container(request).await.unwrap().into_inner().container_id;
        client.runtime.start_container(cri::StartContainerRequest { container_id: id }).await.unwrap();
    }
    let admin = wait_file(&node, "/srv/mounts/admin").await;
    let plain = wait_file(&node, "/srv/mounts/plain").await;
    assert_eq!(
        admin.split_whitespace().collect::<Vec<_>>(),
        ["tmpfs-mounted", "kcore-locked", "sys-locked", "1"],
        "{admin}"
    );
    assert!(
        !plain.contains("tmpfs-mounted") && plain.contains("kcore-locked") && plain.contains("sys-locked"),
        "{plain}"
    );
    // Nothing of it reached the node's mount table.
    assert_eq!(node.sh("grep -c ' /tmp/m ' /proc/self/mountinfo || true").trim(), "0");
}

/// `security.capability` values granting cap_net_bind_service, permitted and effective, as
/// `setcap cap_net_bind_service+ep` writes them: v2 (no root id, what image builders running as
/// the node's root store), and v3 with root id 0 (what one running as root of a user namespace
/// stores).
const NET_BIND_CAP_V2: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const NET_BIND_CAP_V3: [u8; 24] = [1, 0, 0, 3, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// busybox, plus copies of it named httpd carrying file capabilities (v2 and v3 xattrs).
fn file_caps_image() -> Image {
    let busybox = e2e::oci::busybox_binary();
    let mut extra = LayerBuilder::new();
    extra.dir("opt", 0o755).dir("opt/v2", 0o755).dir("opt/v3", 0o755);
    extra.pax(&[("SCHILY.xattr.security.capability", &NET_BIND_CAP_V2)]).file("opt/v2/httpd", 0o755, &busybox);
    extra.pax(&[("SCHILY.xattr.security.capability", &NET_BIND_CAP_V3)]).file("opt/v3/httpd", 0o755, &busybox);
    Image::new(vec![busybox_layer(Compression::Gzip), extra.build(Compression::Gzip)], ConfigOptions::default())
}

#[tokio::test]
async fn file_capabilities_of_image_binaries_work_in_node_and_pod_mode() {
    let node = node_with_local_registry("userns-filecaps", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let registry = Registry::start(&node, "filecaps", e2e::LOCAL_REGISTRY_PORT, RegistryOptions::default());
    registry.push_image("filecaps", "1", &file_caps_image());
    let image = registry.repo("filecaps:1");
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
        ..Default::default()
    };
    client.image.pull_image(request).await.expect("PullImage");
    node.sh("mkdir -p /srv/out && chmod 777 /srv/out");

    // As user 1000: each httpd tries port 80 of the pod's network namespace (privileged: below
    // ip_unprivileged_port_start). Only the file capability can let it bind.
    let script = "serve() { \"$@\" -f -p 80 -h /tmp 2>/dev/null & pid=$!; busybox sleep 1; \
                  if busybox kill -0 $pid 2>/dev/null; then echo bound; busybox kill $pid; else echo refused; fi; wait; }; \
                  { echo v2 $(serve /opt/v2/httpd); echo v3 $(serve /opt/v3/httpd); echo none $(serve busybox httpd); \
                  busybox id -u; } > /out/$P.result; touch /out/$P.done";
    for (name, mode) in [("node", NamespaceMode::Node), ("pod", NamespaceMode::Pod)] {
        let pod = run_pod_sandbox(&mut client, kubelet_pod(name).userns(mode, None)).await.unwrap();
        start_container(
            &mut client,
            &pod,
            name,
            &image,
            &script.replace("$P", name),
            vec![volume("/out", "/srv/out")],
            Some(1000),
        )
        .await;
        wait_file(&node, &format!("/srv/out/{name}.done")).await;
        assert_eq!(
            node.sh(&format!("cat /srv/out/{name}.result")),
            "v2 bound\nv3 bound\nnone refused\n1000\n",
            "user namespace mode {name}"
        );
    }
}
