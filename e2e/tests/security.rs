//! Container breakout classes (issue 11), each tried as an attacker would in a throwaway node,
//! through the real path: CRI calls to the daemon running as its production unit.

use std::time::Duration;

use e2e::crisimple::{self, container_config, pod, pod_config, run_pod_sandbox};
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
    let pod = run_pod_sandbox(&mut client, pod_config("sec-fd")).await.expect("RunPodSandbox");

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

// ---- CVE-2019-5736 class: the node's binary through /proc/<pid>/exe ---------------------------

/// The attacker, seeing its victims' processes (hostPID): it waits for processes named `evil`
/// (the `#!/proc/self/exe` script, run as the daemon's binary), keeps a descriptor of their
/// `/proc/<pid>/exe` (fds 5 and 6), and once the node says `go` (the daemon is stopped, so no
/// process runs the binary any more) opens those descriptors for writing through /proc/self/fd.
const ATTACKER: &str = r#"
n=5; seen=
while [ $n -le 6 ]; do
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    case " $seen " in *" $p "*) continue;; esac
    read c < $d/comm 2>/dev/null || continue
    [ "$c" = evil ] || continue
    seen="$seen $p"
    if eval "command exec $n<$d/exe" 2>>/shared/caught; then
      echo "fd $n: opened /proc/$p/exe ($(readlink /proc/self/fd/$n))" >> /shared/caught
    else
      echo "fd $n: open /proc/$p/exe refused" >> /shared/caught
    fi
    n=$((n+1))
  done
done
until [ -e /shared/go ]; do sleep 0.1; done
for n in 5 6; do
  if (eval "echo pwned > /proc/self/fd/$n") 2>>/shared/write; then echo "fd $n: written" >> /shared/write; fi
done
echo done > /shared/done
exec sleep 100000
"#;

/// busybox plus the dynamic loader and libraries of the daemon's binary (as `ldd` names them), as
/// an image with a C library has them: what the binary needs to run inside the container.
fn image_with_the_daemons_libraries() -> Image {
    let bin = std::env::var("CRI_SYSTEMD_BIN").unwrap_or_else(|_| {
        let target = std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_string());
        format!("{target}/debug/cri-systemd")
    });
    let ldd = std::process::Command::new("ldd").arg(&bin).output().expect("run ldd");
    let ldd = String::from_utf8_lossy(&ldd.stdout).into_owned();
    let mut layer = LayerBuilder::new();
    let mut dirs = std::collections::BTreeSet::new();
    let mut files = Vec::new();
    for word in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let path = std::path::Path::new(word);
        for dir in path.ancestors().skip(1).filter(|d| d.as_os_str().len() > 1) {
            dirs.insert(dir.to_string_lossy().trim_start_matches('/').to_string());
        }
        files.push((word.trim_start_matches('/').to_string(), std::fs::read(path).expect("read a library")));
    }
    assert!(files.len() >= 2, "ldd {bin} names the loader and libraries:\n{ldd}");
    for dir in &dirs {
        layer.dir(dir, 0o755);
    }
    for (path, data) in &files {
        layer.file(path, 0o755, data);
    }
    Image::new(vec![oci::busybox_layer(Compression::Gzip), layer.build(Compression::Gzip)], ConfigOptions::default())
}

/// `config` in the node's PID namespace (it sees every process of the node) with `host_dir` at
/// /shared: the attacker's and its victims' containers.
fn host_pid_with_shared_dir(mut config: cri::ContainerConfig, host_dir: &str) -> cri::ContainerConfig {
    config.mounts =
        vec![cri::Mount { container_path: "/shared".into(), host_path: host_dir.into(), ..Default::default() }];
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// `#!/proc/self/exe` scripts, as a container's entrypoint (exec'd by init) and as an ExecSync
/// command (exec'd by exec-in), run the binary that exec'd them. Another container keeps
/// their `/proc/<pid>/exe` open and writes to it once the daemon stopped: the node's
/// `/usr/local/bin/cri-systemd` stays unchanged, and the write is refused (read-only). Here init
/// and exec-in are the daemon's binary, as without an init helper of its build (and as pod-init,
/// restore-in and record-exit always are); the helper's case is the next test.
#[tokio::test]
async fn the_nodes_binary_cannot_be_written_through_proc_exe() {
    let node = e2e::node_with_local_registry("sec-exe", "");
    node.sh("rm /usr/local/bin/cri-systemd-init && systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = push_and_pull(&node, &mut client, "sec-exe", "libc", &image_with_the_daemons_libraries()).await;
    let sha = || node.sh("sha256sum /usr/local/bin/cri-systemd").split_whitespace().next().unwrap().to_string();
    let before = sha();
    // The script is read by the binary as its config (`--config <script>`): a sparse tail of
    // 64 MiB keeps it running long enough for the attacker to find it.
    node.sh("mkdir -p /srv/sec-exe && chmod 777 /srv/sec-exe && cd /srv/sec-exe && \
         printf '#!/proc/self/exe --config\\n' > evil && truncate -s 64M evil && chmod 755 evil");

    // hostPID, so that the attacker sees its victims without a pod init (which would keep the
    // binary busy: the attack needs a moment when nothing runs it, e.g. a daemon upgrade).
    let pod = pod("sec-exe").pid(cri::NamespaceMode::Node).build();
    let pod_id = run_pod_sandbox(&mut client, pod.clone()).await.expect("RunPodSandbox");
    let mut create = async |name: &str, command: &[&str]| {
        let config = host_pid_with_shared_dir(container_config(name, &image, command), "/srv/sec-exe");
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        };
        let id = client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id;
        crisimple::start(&mut client, &id).await.expect("StartContainer");
        id
    };
    create("attacker", &["/bin/sh", "-c", ATTACKER]).await;
    let victim = create("victim", &["/shared/evil"]).await;
    let caught = |lines: usize| {
        let node = &node;
        e2e::eventually(Duration::from_secs(60), "the attacker to catch the script", move || {
            let text = node.exec(&["cat", "/srv/sec-exe/caught"]).stdout;
            async move { (text.lines().filter(|l| l.starts_with("fd ")).count() >= lines).then_some(text) }
        })
    };
    caught(1).await;
    // exec-in runs the same script in a running container.
    let sleeper = create("sleeper", &["/bin/busybox", "sleep", "100000"]).await;
    let request = cri::ExecSyncRequest { container_id: sleeper, cmd: vec!["/shared/evil".into()], timeout: 3 };
    let _ = client.runtime.exec_sync(request).await;
    let caught = caught(2).await;
    // The attack needs a moment when no process runs the binary (a daemon upgrade, say).
    let request = cri::StopContainerRequest { container_id: victim, timeout: 0 };
    client.runtime.stop_container(request).await.expect("StopContainer");
    node.sh("systemctl stop cri-systemd");
    e2e::eventually(Duration::from_secs(30), "no process running the daemon's binary", || {
        let running = node.sh("for p in /proc/[0-9]*; do [ \"$(readlink $p/exe)\" -ef /usr/local/bin/cri-systemd ] && echo $p; done; true");
        async move { running.trim().is_empty().then_some(()) }
    })
    .await;
    node.sh("touch /srv/sec-exe/go");
    let done = e2e::eventually(Duration::from_secs(30), "the attacker's write attempts", || {
        let text = node.exec(&["cat", "/srv/sec-exe/done"]).stdout;
        async move { (!text.is_empty()).then_some(()) }
    });
    done.await;
    let write = node.exec(&["cat", "/srv/sec-exe/write"]).stdout;
    let after = sha();
    assert_eq!(before, after, "the node's binary was changed from a container:\n{caught}\n{write}");
    assert!(
        caught.lines().filter(|l| l.contains("opened")).count() == 2,
        "the attacker held both binaries open (the write below was really tried):\n{caught}"
    );
    assert_eq!(
        write.lines().filter(|l| l.contains("Read-only file system")).count(),
        2,
        "both writes refused as read-only:\n{caught}\n{write}"
    );
}

/// The init helper (`cri-systemd-init`, which runs init and exec-in) against the same attack: a
/// container that sees a running exec-in (hostPID) cannot open its `/proc/<pid>/exe` (exec-in
/// keeps the node's capabilities until it execs, and is not dumpable: either refuses the open;
/// checked by hand, the open stays refused with both not-dumpable calls removed, so this does not
/// prove the helper's own early one), a `#!/proc/self/exe` script gets a usage error from it, not
/// a daemon, the sealed mount is read-only and the node's file unchanged.
#[tokio::test]
async fn the_init_helper_cannot_be_opened_or_written_through_proc_exe() {
    let node = e2e::node_with_local_registry("sec-helper", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    // The helper's loader and libraries are a subset of the daemon's.
    let image = push_and_pull(&node, &mut client, "sec-helper", "libc", &image_with_the_daemons_libraries()).await;
    let sha = || node.sh("sha256sum /usr/local/bin/cri-systemd-init").split_whitespace().next().unwrap().to_string();
    let before = sha();
    node.sh("mkdir -p /srv/sec-helper && chmod 777 /srv/sec-helper && \
         printf '#!/proc/self/exe --config\\n' > /srv/sec-helper/evil && chmod 755 /srv/sec-helper/evil");
    let pod = pod("sec-helper").pid(cri::NamespaceMode::Node).build();
    let pod_id = run_pod_sandbox(&mut client, pod.clone()).await.expect("RunPodSandbox");
    let config = host_pid_with_shared_dir(
        container_config("attacker", &image, &["/bin/busybox", "sleep", "100000"]),
        "/srv/sec-helper",
    );
    let request =
        cri::CreateContainerRequest { pod_sandbox_id: pod_id, config: Some(config), sandbox_config: Some(pod) };
    let attacker = client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id;
    crisimple::start(&mut client, &attacker).await.expect("StartContainer");

    // exec-in stays for as long as its command runs: the attacker looks for it meanwhile.
    let long = cri::ExecSyncRequest {
        container_id: attacker.clone(),
        cmd: vec!["/bin/busybox".into(), "sleep".into(), "4".into()],
        timeout: 20,
    };
    let mut exec_client = node.cri(ANSWER_TIMEOUT).await;
    let running = tokio::spawn(async move { exec_client.runtime.exec_sync(long).await });
    let helper = e2e::eventually(Duration::from_secs(10), "exec-in running from the helper", || {
        let pids = node.sh("for p in /proc/[0-9]*; do [ \"$(readlink $p/exe)\" = /run/cri-systemd/exe/cri-systemd-init ] && echo ${p#/proc/}; done; true");
        async move { pids.split_whitespace().next().map(str::to_string) }
    })
    .await;
    let probe = format!("(exec 5</proc/{helper}/exe) 2>/dev/null && echo opened || echo refused");
    let request = cri::ExecSyncRequest {
        container_id: attacker.clone(),
        cmd: vec!["/bin/sh".into(), "-c".into(), probe],
        timeout: 10,
    };
    let answer = client.runtime.exec_sync(request).await.expect("ExecSync").into_inner();
    assert_eq!(String::from_utf8_lossy(&answer.stdout).trim(), "refused", "{answer:?}");
    assert_eq!(running.await.unwrap().expect("the long ExecSync").into_inner().exit_code, 0);

    // A script whose interpreter is /proc/self/exe, run by exec-in, runs the helper, which
    // refuses the script's arguments.
    let request = cri::ExecSyncRequest { container_id: attacker, cmd: vec!["/shared/evil".into()], timeout: 10 };
    let answer = client.runtime.exec_sync(request).await.expect("ExecSync").into_inner();
    assert_eq!(answer.exit_code, 2, "{answer:?}");
    assert!(String::from_utf8_lossy(&answer.stderr).contains("cri-systemd-init: usage"), "{answer:?}");

    let write = node.exec(&["sh", "-c", "echo pwned >> /run/cri-systemd/exe/cri-systemd-init"]);
    assert!(write.stderr.contains("Read-only file system"), "{write:?}");
    assert_eq!(sha(), before, "the node's helper changed");
}

// ---- CVE-2021-41091 class: a container's files seen by other users of the node ----------------

/// As `nobody` on the node: no record (init.json and container.json carry the env, i.e.
/// Secrets), no CNI result (the pod's, which must exist), no directory listing, and no
/// setuid-root binary a container wrote into its writable layer can be reached. Modes: records
/// and CNI results 0600, directories 0700, CRI log 0640. The directory modes are the only guard:
/// loosened as an older install had them, the same probes reach everything (so they can fail);
/// a daemon restart tightens them again.
#[tokio::test]
async fn nothing_of_a_container_is_reachable_by_other_node_users() {
    let node = e2e::node_with_local_registry("sec-perm", "");
    // Pod networking, so that the pod has a CNI result.
    node.write_file(e2e::CNI_CONFLIST_PATH, e2e::CNI_CONFLIST);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "sec-perm").await;
    let pod_id = run_pod_sandbox(&mut client, pod("sec-perm").log_directory("/var/log/pods/e2e_sec-perm"))
        .await
        .expect("RunPodSandbox");
    let mut config = container_config(
        "writer",
        &image,
        // Named busybox, so that it runs the applet its first argument names.
        &[
            "/bin/sh",
            "-c",
            "mkdir /suid && cp /bin/busybox /suid/busybox && chmod 4755 /suid/busybox && exec sleep 100000",
        ],
    );
    config.envs = vec![cri::KeyValue { key: "API_TOKEN".into(), value: "s3cr3t-token".into() }];
    config.log_path = "writer/0.log".into();
    let id = crisimple::create(&mut client, &pod_id, config).await.expect("CreateContainer");
    crisimple::start(&mut client, &id).await.expect("StartContainer");
    let state = "/var/lib/cri-systemd";
    let dir = format!("{state}/containers/{id}");
    e2e::eventually(Duration::from_secs(20), "the setuid binary in the writable layer", || {
        let found = node.exec(&["test", "-u", &format!("{dir}/upper/suid/busybox")]).success();
        async move { found.then_some(()) }
    })
    .await;
    assert_eq!(node.sh(&format!("stat -c %U {dir}/upper/suid/busybox")).trim(), "root");
    let cni_results = format!("{state}/cni/results");
    let results = node.sh(&format!("ls {cni_results}"));
    assert!(results.contains(&pod_id), "no CNI result of pod {pod_id} in {cni_results}: {results}");

    let check = |node: &Node| {
        let as_nobody = |args: &str| node.exec(&["sh", "-c", &format!("runuser -u nobody -- {args}")]);
        let mut reached = Vec::new();
        for args in [
            format!("cat {dir}/init.json"),
            format!("cat {dir}/container.json"),
            format!("cat {state}/pods/{pod_id}/pod.json"),
            format!("ls {state}/containers"),
            format!("ls {state}/pods"),
            format!("ls {dir}"),
            format!("ls {state}/cni/results"),
            format!("cat {state}/cni/results/*"),
            format!("{dir}/upper/suid/busybox id -u"),
            format!("ls /run/cri-systemd/pods/{pod_id}"),
            "ls /run/cri-systemd/pods".to_string(),
            "cat /var/log/pods/e2e_sec-perm/writer/0.log".to_string(),
        ] {
            let run = as_nobody(&args);
            if run.success() || run.stdout.contains("s3cr3t") {
                let first: String = run.stdout.trim().lines().next().unwrap_or("").chars().take(40).collect();
                reached.push(format!("{args} -> {first}"));
            }
        }
        let modes = node.sh(&format!(
            "stat -c '%a %n' {dir}/init.json {dir}/container.json {state}/pods/{pod_id}/pod.json {dir} \
             {state}/containers {state}/pods /run/cri-systemd/pods /run/cri-systemd/pods/{pod_id} \
             /var/log/pods/e2e_sec-perm/writer/0.log {state}/cni {cni_results} {cni_results}/*"
        ));
        (reached, modes)
    };
    let (reached, modes) = check(&node);
    assert!(
        reached.is_empty(),
        "nobody on the node reached a container's files:\n{}\nmodes:\n{modes}",
        reached.join("\n")
    );
    let expected = |path: &str| match path {
        p if p.ends_with(".log") => "640",
        p if p.ends_with(".json") => "600",
        _ => "700",
    };
    for line in modes.lines() {
        let (mode, path) = line.split_once(' ').unwrap();
        assert_eq!(mode, expected(path), "mode of {path}\n{modes}");
    }

    // An install from before: everything world-readable. The probes reach it all (the setuid
    // binary through the loosened directories alone: upper/ is 0755, the container's `/`).
    node.sh(&format!(
        "systemctl stop cri-systemd && chmod 755 {state}/containers {state}/pods {state}/pods/{pod_id} {dir} \
         /run/cri-systemd/pods /run/cri-systemd/pods/{pod_id} {state}/cni {cni_results} && chmod 644 {dir}/init.json \
         {dir}/container.json {state}/pods/{pod_id}/pod.json {cni_results}/*"
    ));
    let (reached, modes) = check(&node);
    for probe in ["suid/busybox id -u", "init.json", "container.json", "pod.json", "cat /var/lib/cri-systemd/cni/"] {
        assert!(
            reached.iter().any(|r| r.contains(probe)),
            "loosened modes, yet nobody did not reach {probe:?}: the probe cannot fail\nreached: {reached:#?}\nmodes:\n{modes}"
        );
    }
    // A restart tightens it.
    node.sh("systemctl start cri-systemd");
    node.cri(ANSWER_TIMEOUT).await;
    let (reached, modes) = check(&node);
    assert!(reached.is_empty(), "after a restart, nobody reached:\n{}\nmodes:\n{modes}", reached.join("\n"));
}

// ---- issue 11 item 8: log paths, task limits, id ranges ----------------------------------------

/// A log_path that is absolute or climbs out with `..` is refused (InvalidArgument) and nothing
/// is created; a container's unit has the finite default TasksMax; a kubelet-chosen user
/// namespace range over the image layers' ids is refused; a misaligned `images.layer_uid_shift`
/// stops the daemon naming the key.
#[tokio::test]
async fn log_paths_task_limits_and_id_ranges_are_checked() {
    let node = e2e::node_with_local_registry("sec-misc", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "sec-misc").await;
    let pod_id = run_pod_sandbox(&mut client, pod("sec-misc").log_directory("/var/log/pods/e2e_sec-misc"))
        .await
        .expect("RunPodSandbox");
    let containers = || node.sh("ls /var/lib/cri-systemd/containers | wc -l").trim().to_string();
    let before = containers();
    for log_path in ["/etc/sec-misc.log", "../../../../etc/sec-misc.log", "a/../../sec-misc.log"] {
        let mut config = container_config("logger", &image, &["/bin/sh", "-c", "echo hello"]);
        config.log_path = log_path.into();
        let result = match crisimple::create(&mut client, &pod_id, config).await {
            Ok(id) => crisimple::start(&mut client, &id).await.map(|()| id),
            Err(status) => Err(status),
        };
        let status = result.expect_err(&format!("log_path {log_path:?} accepted"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{log_path}: {status:?}");
        assert!(status.message().contains("log_path"), "{status:?}");
    }
    assert!(!node.exec(&["test", "-e", "/etc/sec-misc.log"]).success(), "a log file was created in /etc");
    assert!(!node.exec(&["test", "-e", "/var/log/sec-misc.log"]).success(), "a log file was created in /var/log");
    assert_eq!(containers(), before, "a refused container left a directory");

    let id = crisimple::create(
        &mut client,
        &pod_id,
        container_config("tasks", &image, &["/bin/busybox", "sleep", "100000"]),
    )
    .await
    .expect("CreateContainer");
    crisimple::start(&mut client, &id).await.expect("StartContainer");
    assert_eq!(node.sh(&format!("systemctl show -p TasksMax --value cri-{id}.service")).trim(), "4096");

    let layers = pod("sec-misc-userns").userns(cri::NamespaceMode::Pod, Some((0x7FFE_0000, 65536)));
    let status = run_pod_sandbox(&mut client, layers).await.expect_err("a pod range over the layers' ids");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    node.write_file("/tmp/misaligned.toml", "[images]\nlayer_uid_shift = 2147352577\n");
    let run = node.exec(&["cri-systemd", "--config", "/tmp/misaligned.toml", "config"]);
    assert!(!run.success() && run.stderr.contains("images.layer_uid_shift"), "{run:?}");
}
