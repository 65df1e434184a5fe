//! ExecSync, Exec, Attach and PortForward against a daemon in a real systemd node, on containers
//! of a busybox image pulled from a registry in the node. (The image's busybox has only `sh`,
//! `ls` and `true` links: other applets are called as `busybox X`.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::oci::busybox_image;
use e2e::registry::{Registry, RegistryOptions};
use e2e::{CriClient, Node, NodeOptions, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const REGISTRY_PORT: u16 = 5000;

/// A node whose daemon pulls from the plain-HTTP registry on the node's loopback; `extra` is
/// more config TOML.
fn node(label: &str, extra: &str) -> Node {
    let config = std::env::temp_dir().join(format!("cri-e2e-{label}-{}.toml", std::process::id()));
    std::fs::write(&config, format!("{extra}\n[images.registries.\"127.0.0.1:{REGISTRY_PORT}\"]\nplain_http = true\n")).unwrap();
    let node = Node::up(label, NodeOptions { config: Some(config.clone()), ..Default::default() });
    let _ = std::fs::remove_file(config);
    node
}

async fn pull_busybox(node: &Node, client: &mut CriClient) -> String {
    let registry = Registry::start(node, "exec", REGISTRY_PORT, RegistryOptions::default());
    registry.push_image("busybox", "1", &busybox_image(""));
    let image = registry.repo("busybox:1");
    let request = cri::PullImageRequest { image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }), ..Default::default() };
    client.image.pull_image(request).await.expect("PullImage");
    image
}

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-0000-1111-2222-333344445555"),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        ..Default::default()
    }
}

fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        labels: HashMap::from([("container".into(), name.into())]),
        ..Default::default()
    }
}

async fn run_pod(client: &mut CriClient, name: &str) -> String {
    let request = cri::RunPodSandboxRequest { config: Some(pod_config(name)), runtime_handler: String::new() };
    client.runtime.run_pod_sandbox(request).await.expect("RunPodSandbox").into_inner().pod_sandbox_id
}

async fn create(client: &mut CriClient, pod: &str, config: cri::ContainerConfig) -> String {
    let request = cri::CreateContainerRequest { pod_sandbox_id: pod.into(), config: Some(config), sandbox_config: Some(pod_config("x")) };
    client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id
}

async fn start(client: &mut CriClient, id: &str) {
    client.runtime.start_container(cri::StartContainerRequest { container_id: id.into() }).await.expect("StartContainer");
}

async fn exec_sync(client: &mut CriClient, id: &str, cmd: &[&str], timeout: i64) -> Result<cri::ExecSyncResponse, tonic::Status> {
    let request = cri::ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout };
    client.runtime.exec_sync(request).await.map(|r| r.into_inner())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running sleeper container with a user, env, working dir and no_new_privs, in a fresh pod.
async fn sleeper(client: &mut CriClient, image: &str, pod_name: &str) -> (String, String) {
    let pod = run_pod(client, pod_name).await;
    let mut config = container_config("sleeper", image, &["/bin/busybox", "sleep", "100000"]);
    config.envs = vec![cri::KeyValue { key: "GREETING".into(), value: "hello from the container".into() }];
    config.working_dir = "/tmp".into();
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 33 }),
            no_new_privs: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create(client, &pod, config).await;
    start(client, &id).await;
    (pod, id)
}

#[tokio::test]
async fn exec_sync_runs_in_the_container() {
    let node = node("exec-sync", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let (_pod, id) = sleeper(&mut client, &image, "execsync").await;
    let unit = format!("cri-{id}.service");

    // Exit codes, and stdout and stderr kept apart.
    let ok = exec_sync(&mut client, &id, &["sh", "-c", "echo out; echo err >&2"], 0).await.unwrap();
    assert_eq!((text(&ok.stdout).as_str(), text(&ok.stderr).as_str(), ok.exit_code), ("out\n", "err\n", 0));
    assert_eq!(exec_sync(&mut client, &id, &["sh", "-c", "exit 1"], 0).await.unwrap().exit_code, 1);
    assert_eq!(exec_sync(&mut client, &id, &["sh", "-c", "exit 127"], 0).await.unwrap().exit_code, 127);
    // A command that is not in the image: 127 and a message, as a shell would.
    let missing = exec_sync(&mut client, &id, &["no-such-tool", "x"], 0).await.unwrap();
    assert_eq!(missing.exit_code, 127);
    assert!(text(&missing.stderr).contains("no-such-tool") && text(&missing.stderr).contains("not found"), "{missing:?}");
    // A command killed by a signal: 128 + the signal.
    assert_eq!(exec_sync(&mut client, &id, &["sh", "-c", "kill -9 $$"], 0).await.unwrap().exit_code, 137);

    // The container's user, environment, working dir, no_new_privs and capabilities.
    let who = exec_sync(&mut client, &id, &["sh", "-c", "busybox id -u; pwd; echo \"$GREETING\"; busybox grep -E '^(NoNewPrivs|CapEff)' /proc/self/status"], 10)
        .await
        .unwrap();
    let main = exec_sync(&mut client, &id, &["busybox", "grep", "-E", "^(NoNewPrivs|CapEff)", "/proc/1/status"], 10).await.unwrap();
    assert_eq!(text(&who.stdout), format!("33\n/tmp\nhello from the container\n{}", text(&main.stdout)), "{who:?}");
    assert!(text(&main.stdout).contains("NoNewPrivs:\t1"), "{main:?}");

    // The container's PID namespace (its PID 1 is the entrypoint), hostname, root and cgroup.
    let ps = exec_sync(&mut client, &id, &["busybox", "ps", "-o", "pid,args"], 10).await.unwrap();
    let first = text(&ps.stdout).lines().nth(1).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(first, "1 /bin/busybox sleep 100000", "{}", text(&ps.stdout));
    let host = exec_sync(&mut client, &id, &["busybox", "hostname"], 10).await.unwrap();
    assert_eq!(text(&host.stdout), "execsync\n");
    let root = exec_sync(&mut client, &id, &["ls", "/bin/busybox", "/etc/passwd"], 10).await.unwrap();
    assert_eq!(root.exit_code, 0, "{root:?}");
    let cgroup = exec_sync(&mut client, &id, &["busybox", "cat", "/proc/self/cgroup"], 10).await.unwrap();
    let systemd_line = text(&cgroup.stdout).lines().find(|l| l.contains(":name=systemd:")).unwrap_or_default().to_string();
    assert!(systemd_line.ends_with(&format!("/{unit}")), "{}", text(&cgroup.stdout));
    let unit_cgroup = node.sh(&format!("systemctl show -p ControlGroup --value {unit}")).trim().to_string();
    // While it runs, the exec'd process is one of the unit's processes in every hierarchy
    // systemd manages for it (name=systemd and the unified one on this hybrid node).
    let mut waiting = client.clone();
    let waiting_id = id.clone();
    let background = tokio::spawn(async move { exec_sync(&mut waiting, &waiting_id, &["busybox", "sleep", "3"], 10).await });
    let found = e2e::eventually(Duration::from_secs(10), "the exec'd sleep in the unit's cgroup", || {
        let script = format!(
            "for p in $(cat /sys/fs/cgroup/systemd{unit_cgroup}/cgroup.procs); do tr '\\0' ' ' < /proc/$p/cmdline; echo; done"
        );
        let listed = node.sh(&script);
        async move { listed.lines().any(|l| l.trim() == "busybox sleep 3").then_some(listed) }
    })
    .await;
    assert!(found.lines().any(|l| l.trim() == "/bin/busybox sleep 100000"), "{found}");
    assert_eq!(background.await.unwrap().unwrap().exit_code, 0);
    let unified = node.sh(&format!("cat /sys/fs/cgroup/unified{unit_cgroup}/cgroup.procs"));
    assert_eq!(unified.split_whitespace().count(), 1, "only the main process is left: {unified}");

    // The timeout kills the command, and the call fails with DeadlineExceeded.
    let begin = Instant::now();
    let err = exec_sync(&mut client, &id, &["sh", "-c", "echo started; busybox sleep 100"], 2).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(begin.elapsed() < Duration::from_secs(8), "took {:?}", begin.elapsed());
    assert!(err.message().contains("started"), "the output so far is in the message: {err:?}");
    let left = exec_sync(&mut client, &id, &["busybox", "ps", "-o", "args"], 10).await.unwrap();
    assert!(!text(&left.stdout).contains("sleep 100\n"), "{}", text(&left.stdout));

    // Output beyond 16 MiB per stream is read and dropped; the command goes on to the end.
    let mut big = CriClient { runtime: client.runtime.clone().max_decoding_message_size(64 << 20), image: client.image.clone() };
    let flood = exec_sync(&mut big, &id, &["sh", "-c", "busybox head -c 20000000 /dev/zero; busybox head -c 17000000 /dev/zero >&2; echo done >&2"], 60)
        .await
        .unwrap();
    assert_eq!((flood.stdout.len(), flood.stderr.len(), flood.exit_code), (16 << 20, 16 << 20, 0));

    // Many at once, each with its own output.
    let calls = (0..16).map(|i| {
        let mut client = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let out = exec_sync(&mut client, &id, &["sh", "-c", &format!("echo {i}; busybox sleep 0.2; echo {i} >&2")], 30).await.unwrap();
            assert_eq!((text(&out.stdout), text(&out.stderr)), (format!("{i}\n"), format!("{i}\n")));
        })
    });
    for call in calls.collect::<Vec<_>>() {
        call.await.unwrap();
    }
    assert_eq!(node.sh(&format!("cat /sys/fs/cgroup/unified{unit_cgroup}/cgroup.procs")).split_whitespace().count(), 1);
}

#[tokio::test]
async fn exec_sync_refuses_what_it_cannot_run() {
    let node = node("exec-refuse", "[exec]\nsync_max_output_bytes = 1000\n");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let (pod, id) = sleeper(&mut client, &image, "execrefuse").await;

    // The configured cap.
    let capped = exec_sync(&mut client, &id, &["busybox", "head", "-c", "5000", "/dev/zero"], 10).await.unwrap();
    assert_eq!((capped.stdout.len(), capped.exit_code), (1000, 0));

    let code = |r: Result<cri::ExecSyncResponse, tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(exec_sync(&mut client, &"f".repeat(64), &["true"], 0).await), tonic::Code::NotFound);
    assert_eq!(code(exec_sync(&mut client, &id, &[], 0).await), tonic::Code::InvalidArgument);
    assert_eq!(code(exec_sync(&mut client, &id, &["true"], -1).await), tonic::Code::InvalidArgument);
    let created = create(&mut client, &pod, container_config("idle", &image, &["true"])).await;
    let err = exec_sync(&mut client, &created, &["true"], 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not running"), "{err:?}");

    // A container that stopped.
    client.runtime.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 0 }).await.unwrap();
    let err = exec_sync(&mut client, &id, &["true"], 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
}
