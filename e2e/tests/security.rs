//! Container breakout classes (issue 11), each tried as an attacker would in a throwaway node,
//! through the real path: CRI calls to the daemon running as its production unit.

use std::time::Duration;

use e2e::crisimple::{self, container_config, pod_config};
use e2e::oci::{self, Compression, ConfigOptions, Image, LayerBuilder};
use e2e::registry::{Registry, RegistryOptions};
use e2e::{CriClient, LOCAL_REGISTRY_PORT, Node, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Pushes `image` as `busybox:<tag>` to registry `name` in the node and pulls it; returns its name.
async fn push_and_pull(node: &Node, client: &mut CriClient, name: &str, tag: &str, image: &Image) -> String {
    let registry = Registry::start(node, name, LOCAL_REGISTRY_PORT, RegistryOptions::default());
    registry.push_image("busybox", tag, image);
    let image = registry.repo(&format!("busybox:{tag}"));
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
        ..Default::default()
    };
    client.image.pull_image(request).await.expect("PullImage");
    image
}

async fn run_pod(client: &mut CriClient, config: cri::PodSandboxConfig) -> String {
    let request = cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() };
    client.runtime.run_pod_sandbox(request).await.expect("RunPodSandbox").into_inner().pod_sandbox_id
}

fn out_mount(host_dir: &str) -> cri::Mount {
    cri::Mount { container_path: "/out".into(), host_path: host_dir.into(), ..Default::default() }
}

// ---- CVE-2024-21626 class: a descriptor of init's as working directory -------------------------

/// A working directory that goes through `/proc/self/fd/N` (from the pod spec, the image's
/// WORKDIR, or a symlink of the image) must not put the entrypoint's cwd on the node: the start
/// fails with an error naming the working directory, and nothing of the node is read. Then, in
/// a running container whose working directory is replaced by such a symlink, ExecSync
/// (exec-in) must not start there either.
#[tokio::test]
async fn working_dir_through_a_descriptor_never_reaches_the_node() {
    let node = e2e::node_with_local_registry("sec-fd", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let machine_id = node.sh("cat /etc/machine-id").trim().to_string();
    assert_eq!(machine_id.len(), 32, "the node's machine id: {machine_id:?}");

    let mut extra = LayerBuilder::new();
    extra.symlink("fdlink", "/proc/self/fd/3").dir("wd", 0o755).dir("out", 0o755);
    let image = Image::new(
        vec![oci::busybox_layer(Compression::Gzip), extra.build(Compression::Gzip)],
        ConfigOptions { working_dir: "/proc/self/fd/3".into(), ..Default::default() },
    );
    let image = push_and_pull(&node, &mut client, "sec-fd", "fd", &image).await;
    node.sh("mkdir -p /srv/sec-out && chmod 777 /srv/sec-out");
    let pod = run_pod(&mut client, pod_config("sec-fd")).await;

    // (case name, working_dir of the pod spec; "" takes the image's WORKDIR)
    let mut cases: Vec<(String, String)> =
        (3..=9).map(|fd| (format!("spec-fd{fd}"), format!("/proc/self/fd/{fd}"))).collect();
    cases.push(("image-workdir".into(), String::new()));
    cases.push(("image-symlink".into(), "/fdlink".into()));
    cases.push(("spec-fd3-below".into(), "/proc/self/fd/3/sub".into()));
    let mut started = Vec::new();
    for (name, working_dir) in &cases {
        let script = format!("pwd > /out/{name}; cat ../../../../../etc/machine-id >> /out/{name} 2>&1");
        let mut config = container_config(name, &image, &["/bin/sh", "-c", &script]);
        config.working_dir = working_dir.clone();
        config.mounts = vec![out_mount("/srv/sec-out")];
        let id = crisimple::create(&mut client, &pod, config).await.expect("CreateContainer");
        match crisimple::start(&mut client, &id).await {
            Ok(()) => {
                crisimple::wait_exited(&mut client, &id).await;
                started.push(name.clone());
            }
            Err(status) => {
                assert!(
                    status.message().contains("cwd") || status.message().contains("working dir"),
                    "{name}: StartContainer's error names the working directory: {status:?}"
                );
            }
        }
    }
    let outputs = node.sh("for f in /srv/sec-out/*; do [ -e \"$f\" ] && echo \"== $f\" && cat \"$f\"; done; true");
    assert!(!outputs.contains(&machine_id), "the node's machine id was read from a container:\n{outputs}");
    assert!(
        started.is_empty(),
        "containers started in a working directory reached through a descriptor: {started:?}\n{outputs}"
    );

    // exec-in: the container replaces its working directory by a symlink to one of its
    // descriptors (the node says which through /ctl; the cwd of every exec is /wd).
    node.sh("mkdir -p /srv/sec-ctl && chmod 777 /srv/sec-ctl");
    let script = "last=; while :; do n=$(cat /ctl/n 2>/dev/null); if [ -n \"$n\" ] && [ \"$n\" != \"$last\" ]; then \
                  rm -rf /wd; ln -sfn /proc/self/fd/$n /wd; echo $n > /ctl/ack; last=$n; fi; sleep 0.1; done";
    let mut config = container_config("execin", &image, &["/bin/sh", "-c", script]);
    config.working_dir = "/wd".into();
    config.mounts =
        vec![cri::Mount { container_path: "/ctl".into(), host_path: "/srv/sec-ctl".into(), ..Default::default() }];
    let id = crisimple::create(&mut client, &pod, config).await.expect("CreateContainer");
    crisimple::start(&mut client, &id).await.expect("StartContainer with a plain working dir");
    let mut ran = Vec::new();
    for fd in 0..=12 {
        node.sh(&format!(
            "echo {fd} > /srv/sec-ctl/n; i=0; until [ \"$(cat /srv/sec-ctl/ack 2>/dev/null)\" = {fd} ]; do \
             i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done"
        ));
        let result =
            crisimple::exec_sync(&mut client, &id, &["/bin/sh", "-c", "pwd; cat ../../../../../etc/machine-id"]).await;
        match result {
            Ok(out) => {
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(
                    !stdout.contains(&machine_id),
                    "exec in cwd /proc/self/fd/{fd} read the node's machine id:\n{stdout}"
                );
                ran.push((fd, out.exit_code, stdout, String::from_utf8_lossy(&out.stderr).into_owned()));
            }
            Err(status) => assert!(status.message().contains("cwd"), "fd {fd}: the error names the cwd: {status:?}"),
        }
    }
    assert!(ran.is_empty(), "commands ran with a cwd reached through a descriptor: {ran:?}");
}
