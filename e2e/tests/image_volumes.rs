//! Image volumes (CRI `Mount.image`, `image_sub_path`; issue 13 feature 1): an image the kubelet
//! pulled, mounted read-only in a container, whole or one directory of it, its layers idmapped
//! for a pod in a user namespace, reported in ContainerStatus with the image's id, kept by the
//! image store while a container mounts it (RemoveImage hides it, the layers stay), through a
//! daemon kill and restart. And what is refused: a writable one, a missing image or sub path, a
//! sub path that goes up or out of the image.

use std::time::Duration;

use e2e::crisimple::{self, container_config, kubelet_pod, run_pod_sandbox};
use e2e::oci::{self, Compression, ConfigOptions, Image, LayerBuilder};
use e2e::registry::{Registry, RegistryOptions};
use e2e::{CriClient, LOCAL_REGISTRY_PORT, Node, cri, node_with_local_registry};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The volume's image: two layers. The first has `data/hello`, `etc/passwd` (the image's, with a
/// marker line), a file `plain`, `gone/x`, and hostile symlinks: `escape` climbs far above the
/// image's root, `abs` is the absolute `/etc`; the second deletes `gone` (whiteout).
fn volume_image() -> Image {
    let mut base = LayerBuilder::new();
    base.dir("data", 0o755)
        .file("data/hello", 0o644, b"hello from the image\n")
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"image-volume-marker:x:0:0::/:/bin/sh\n")
        .file("plain", 0o644, b"not a directory\n")
        .dir("gone", 0o755)
        .file("gone/x", 0o644, b"x\n")
        .symlink("escape", "../../../../../../../../etc")
        .symlink("abs", "/etc")
        .symlink("loop", "loop");
    let mut top = LayerBuilder::new();
    top.whiteout("gone");
    Image::new(vec![base.build(Compression::Gzip), top.build(Compression::None)], ConfigOptions::default())
}

/// Pushes busybox and the volume's image to a registry on the node, pulls both; returns
/// (busybox's name, the volume image's name, PullImage's image_ref of the volume image).
async fn pull_images(node: &Node, client: &mut CriClient) -> (String, String, String) {
    let registry = Registry::start(node, "imgvol", LOCAL_REGISTRY_PORT, RegistryOptions::default());
    registry.push_image("busybox", "1", &oci::busybox_image(""));
    registry.push_image("data", "1", &volume_image());
    let mut refs = Vec::new();
    for name in [registry.repo("busybox:1"), registry.repo("data:1")] {
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: name.clone(), ..Default::default() }),
            ..Default::default()
        };
        refs.push(client.image.pull_image(request).await.expect("PullImage").into_inner().image_ref);
    }
    (registry.repo("busybox:1"), registry.repo("data:1"), refs.pop().unwrap())
}

fn image_mount(container_path: &str, image: &str, sub_path: &str) -> cri::Mount {
    cri::Mount {
        container_path: container_path.into(),
        readonly: true,
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        image_sub_path: sub_path.into(),
        ..Default::default()
    }
}

/// A sleeping busybox container of pod `pod` with `mounts`.
fn sleeper(name: &str, busybox: &str, mounts: Vec<cri::Mount>) -> cri::ContainerConfig {
    cri::ContainerConfig { mounts, ..container_config(name, busybox, &["/bin/busybox", "sleep", "100000"]) }
}

/// The image volume's layer directories in the container's init spec (on the node).
fn volume_layers(node: &Node, container: &str) -> Vec<String> {
    let spec = node.sh(&format!("cat /var/lib/cri-systemd/containers/{container}/init.json"));
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("init.json is JSON");
    let lowers = spec["imageVolumes"][0]["overlay"]["lowerdirs"].as_array().expect("imageVolumes[0] has lower dirs");
    lowers.iter().map(|l| l.as_str().unwrap().to_string()).collect()
}

/// What the container sees of its volumes: the whole image at /mnt/whole, its `data` at /mnt/sub,
/// and the hostile `escape` and `abs` (which resolve inside the image, to its /etc).
async fn check_volumes(client: &mut CriClient, id: &str) {
    let checks = [
        ("busybox cat /mnt/whole/data/hello", "hello from the image\n"),
        ("busybox cat /mnt/sub/hello", "hello from the image\n"),
        // The whiteout of the second layer hides `gone`.
        ("test -e /mnt/whole/gone || echo no-gone", "no-gone\n"),
        // Read-only, whatever the user.
        ("busybox touch /mnt/whole/new 2>/dev/null || echo read-only", "read-only\n"),
        ("busybox touch /mnt/sub/new 2>/dev/null || echo read-only", "read-only\n"),
        // The image's files are root's (the layers are idmapped).
        ("busybox stat -c %u:%g /mnt/whole/data/hello", "0:0\n"),
        // The hostile links: the image's /etc, never the node's.
        ("busybox cat /mnt/escape/passwd", "image-volume-marker:x:0:0::/:/bin/sh\n"),
        ("busybox cat /mnt/abs/passwd", "image-volume-marker:x:0:0::/:/bin/sh\n"),
        ("busybox ls /mnt/escape", "passwd\n"),
        // Not noexec (critest runs a binary of an image volume).
        ("/mnt/bin/busybox echo exec-ok", "exec-ok\n"),
    ];
    for (script, want) in checks {
        let (code, out, err) = crisimple::sh(client, id, script).await;
        assert_eq!((code, out.as_str()), (0, want), "`{script}` said {out:?} (stderr {err:?})");
    }
}

fn volume_mounts(data: &str, busybox: &str) -> Vec<cri::Mount> {
    vec![
        image_mount("/mnt/whole", data, ""),
        image_mount("/mnt/sub", data, "data"),
        image_mount("/mnt/escape", data, "escape"),
        image_mount("/mnt/abs", data, "abs"),
        image_mount("/mnt/bin", busybox, "bin"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn image_volumes_mount_read_only_and_stay_through_restart_and_remove_image() {
    let node = node_with_local_registry("image-volumes", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, data, data_ref) = pull_images(&node, &mut client).await;
    // The node's /etc/passwd must never show through a volume.
    assert!(!node.sh("cat /etc/passwd").contains("image-volume-marker"));

    // A plain pod and a pod in a user namespace (idmapped layers).
    for (round, pod_config) in [
        ("plain", kubelet_pod("imgvol-plain")),
        ("userns", kubelet_pod("imgvol-userns").userns(cri::NamespaceMode::Pod, None)),
    ] {
        let pod = run_pod_sandbox(&mut client, pod_config).await.expect("RunPodSandbox");
        let id = crisimple::create(&mut client, &pod, sleeper("c", &busybox, volume_mounts(&data, &busybox)))
            .await
            .unwrap_or_else(|e| panic!("{round}: CreateContainer: {e}"));
        crisimple::start(&mut client, &id).await.unwrap_or_else(|e| panic!("{round}: StartContainer: {e}"));
        check_volumes(&mut client, &id).await;

        // ContainerStatus reports each volume with the image's id and its sub path.
        let status = crisimple::status(&mut client, &id).await;
        let sub = status.mounts.iter().find(|m| m.container_path == "/mnt/sub").expect("/mnt/sub in the status");
        let image = sub.image.as_ref().expect("the mount's image");
        assert_eq!((image.image.as_str(), image.image_ref.as_str()), (data.as_str(), data_ref.as_str()));
        assert_eq!((sub.image_sub_path.as_str(), sub.readonly, sub.host_path.as_str()), ("data", true, ""));
        crisimple::stop_pod(&mut client, &pod).await;
        crisimple::remove_pod(&mut client, &pod).await;
    }

    // A container that mounts the image, then RemoveImage of that image: it goes from the
    // image list, the container keeps its volume, through a daemon kill and restart.
    let pod = run_pod_sandbox(&mut client, kubelet_pod("imgvol-keep")).await.expect("RunPodSandbox");
    let id = crisimple::create(&mut client, &pod, sleeper("keep", &busybox, volume_mounts(&data, &busybox)))
        .await
        .expect("CreateContainer");
    let layers = volume_layers(&node, &id);
    assert_eq!(layers.len(), 2, "{layers:?}");
    let request = cri::RemoveImageRequest { image: Some(cri::ImageSpec { image: data.clone(), ..Default::default() }) };
    client.image.remove_image(request).await.expect("RemoveImage of an image in use as a volume");
    let request = cri::ImageStatusRequest {
        image: Some(cri::ImageSpec { image: data.clone(), ..Default::default() }),
        verbose: false,
    };
    assert!(client.image.image_status(request).await.unwrap().into_inner().image.is_none(), "the image is gone");
    node.sh("systemctl kill -s SIGKILL cri-systemd; systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    // Something else is removed (image GC runs), the volume's layers stay.
    let other = crisimple::create(&mut client, &pod, sleeper("other", &busybox, Vec::new())).await.unwrap();
    crisimple::remove_container(&mut client, &other).await;
    for layer in &layers {
        node.sh(&format!("test -d {layer}"));
    }
    // Created before the restart and the removal, it starts with its volumes.
    crisimple::start(&mut client, &id).await.expect("StartContainer after the restart");
    check_volumes(&mut client, &id).await;
    // A new container cannot name the removed image.
    let refused =
        crisimple::create(&mut client, &pod, sleeper("late", &busybox, vec![image_mount("/mnt/whole", &data, "")]))
            .await
            .expect_err("an image volume of a removed image");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("/mnt/whole") && refused.message().contains(&data), "{refused:?}");
    // Its last container removed, the image's layers are collected.
    crisimple::stop_pod(&mut client, &pod).await;
    crisimple::remove_pod(&mut client, &pod).await;
    for layer in &layers {
        assert!(node.exec(&["test", "-e", layer]).status.code() == Some(1), "{layer} outlived its last container");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_image_volumes_are_refused_naming_the_field_and_change_nothing() {
    let node = node_with_local_registry("image-volumes-bad", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, data, _) = pull_images(&node, &mut client).await;
    let pod = run_pod_sandbox(&mut client, kubelet_pod("imgvol-bad")).await.expect("RunPodSandbox");

    let writable = cri::Mount { readonly: false, ..image_mount("/mnt/v", &data, "") };
    let with_host_path = cri::Mount { host_path: "/etc".into(), ..image_mount("/mnt/v", &data, "") };
    let sub_path_of_a_bind =
        cri::Mount { host_path: "/etc".into(), image_sub_path: "x".into(), readonly: true, ..Default::default() };
    let cases: Vec<(cri::Mount, tonic::Code, &[&str])> = vec![
        (writable, tonic::Code::InvalidArgument, &["mounts[0]", "read-only"]),
        (with_host_path, tonic::Code::InvalidArgument, &["mounts[0]", "host_path"]),
        (image_mount("/mnt/v", "", ""), tonic::Code::InvalidArgument, &["mounts[0]", "image"]),
        (sub_path_of_a_bind, tonic::Code::InvalidArgument, &["mounts[0]", "image_sub_path"]),
        (image_mount("/mnt/v", "nosuch:1", ""), tonic::Code::NotFound, &["/mnt/v", "nosuch:1", "not found"]),
        (
            image_mount("/mnt/v", &data, "not-existing"),
            tonic::Code::InvalidArgument,
            &["image_sub_path", "does not exist"],
        ),
        (image_mount("/mnt/v", &data, "plain"), tonic::Code::InvalidArgument, &["image_sub_path", "not a directory"]),
        (image_mount("/mnt/v", &data, "gone"), tonic::Code::InvalidArgument, &["image_sub_path", "does not exist"]),
        (image_mount("/mnt/v", &data, "loop"), tonic::Code::InvalidArgument, &["image_sub_path", "symbolic links"]),
        (image_mount("/mnt/v", &data, "../etc"), tonic::Code::InvalidArgument, &["image_sub_path", "\"..\""]),
        (image_mount("/mnt/v", &data, "/etc"), tonic::Code::InvalidArgument, &["image_sub_path", "relative"]),
        // The hostile links resolve inside the image, where `escape/x` is not.
        (
            image_mount("/mnt/v", &data, "escape/ssl"),
            tonic::Code::InvalidArgument,
            &["image_sub_path", "does not exist"],
        ),
        (image_mount("/mnt/v", &data, "abs/ssl"), tonic::Code::InvalidArgument, &["image_sub_path", "does not exist"]),
    ];
    // The node has /etc/ssl: a resolution on the node would find it.
    node.sh("mkdir -p /etc/ssl");
    for (mount, code, words) in cases {
        let shown = format!("{mount:?}");
        let refused = crisimple::create(&mut client, &pod, sleeper("bad", &busybox, vec![mount]))
            .await
            .expect_err(&format!("CreateContainer with {shown}"));
        assert_eq!(refused.code(), code, "{shown}: {refused:?}");
        for word in words {
            assert!(refused.message().contains(word), "{shown}: {:?} does not say {word:?}", refused.message());
        }
    }
    // Nothing was made.
    let listed = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
    assert!(listed.containers.is_empty(), "{:?}", listed.containers);
    assert_eq!(node.sh("ls /var/lib/cri-systemd/containers | wc -l").trim(), "0");
    // The same pod then runs a good one.
    let id =
        crisimple::create(&mut client, &pod, sleeper("good", &busybox, vec![image_mount("/mnt/v", &data, "data")]))
            .await
            .expect("CreateContainer");
    crisimple::start(&mut client, &id).await.expect("StartContainer");
    assert_eq!(crisimple::sh(&mut client, &id, "busybox cat /mnt/v/hello").await.1, "hello from the image\n");
}
