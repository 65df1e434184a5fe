//! Containers as transient systemd services in their pod's slice, from an image pulled from a
//! real registry, driven over the CRI socket of a daemon in a real systemd node.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::crisimple::{
    self, container_config, create, parse_log, pod_config, run_pod, run_pod_sandbox, start, status, wait_exited,
};
use e2e::{CriClient, Node, cri, eventually};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn node(label: &str) -> Node {
    e2e::node_with_local_registry(label, "")
}

async fn pull_busybox(node: &Node, client: &mut CriClient) -> String {
    e2e::pull_busybox(node, client, "containers").await
}

#[tokio::test]
async fn container_lifecycle_as_a_systemd_service() {
    let node = node("ctr-life");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "life").await;
    let slice = "kubepods-besteffort-podlife_0000_1111_2222_333344445555.slice";

    // Created, then Running: the entrypoint is the service's main process, in the pod's slice,
    // and it is the only process there is for this container.
    let id = create(&mut client, &pod, container_config("sleeper", &image, &["/bin/busybox", "sleep", "1000"]))
        .await
        .unwrap();
    let created = status(&mut client, &id).await;
    assert_eq!(created.state, cri::ContainerState::ContainerCreated as i32);
    assert_eq!(created.image.unwrap().image, image);
    assert!(created.image_id.starts_with("sha256:"));
    start(&mut client, &id).await.unwrap();
    let running = status(&mut client, &id).await;
    assert_eq!(running.state, cri::ContainerState::ContainerRunning as i32);
    assert!(running.started_at >= running.created_at);
    let unit = format!("cri-{id}.service");
    assert_eq!(node.sh(&format!("systemctl show -p Slice --value {unit}")).trim(), slice);
    // Set up by the init helper of the daemon's build, sealed beside the daemon's binary.
    let exec_start = node.sh(&format!("systemctl show -p ExecStart --value {unit}"));
    assert!(exec_start.contains("path=/run/cri-systemd/exe/cri-systemd-init ;"), "{unit}: {exec_start}");
    let main_pid = node.sh(&format!("systemctl show -p MainPID --value {unit}")).trim().to_string();
    assert_eq!(node.sh(&format!("tr '\\0' ' ' < /proc/{main_pid}/cmdline")).trim(), "/bin/busybox sleep 1000");
    let cgroup = node.sh(&format!("systemctl show -p ControlGroup --value {unit}")).trim().to_string();
    let procs = node.sh(&format!("cat /sys/fs/cgroup/systemd{cgroup}/cgroup.procs"));
    assert_eq!(procs.split_whitespace().collect::<Vec<_>>(), vec![main_pid.as_str()], "processes of {unit}");
    // Its own PID namespace (it is PID 1 there), the pod's network and UTS namespaces.
    assert_eq!(node.sh(&format!("grep NSpid /proc/{main_pid}/status")).split_whitespace().last(), Some("1"));
    let pins = format!("/run/cri-systemd/pods/{pod}/ns");
    assert_eq!(
        node.sh(&format!("stat -L -c %i /proc/{main_pid}/ns/net")),
        node.sh(&format!("stat -L -c %i {pins}/net"))
    );
    assert_eq!(
        node.sh(&format!("stat -L -c %i /proc/{main_pid}/ns/uts")),
        node.sh_in_pod_mounts(&format!("stat -L -c %i {pins}/uts"))
    );

    let listed =
        client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner().containers;
    assert_eq!(listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), vec![id.as_str()]);

    // Stop: SIGTERM ends sleep (PID 1 of its namespace has no default handlers, so SIGKILL after the grace).
    client.runtime.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 2 }).await.unwrap();
    let stopped = status(&mut client, &id).await;
    assert_eq!(stopped.state, cri::ContainerState::ContainerExited as i32);
    assert!(stopped.finished_at >= stopped.started_at);
    client.runtime.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 2 }).await.unwrap();

    // Remove: unit and files gone; again is fine.
    for _ in 0..2 {
        client.runtime.remove_container(cri::RemoveContainerRequest { container_id: id.clone() }).await.unwrap();
    }
    node.sh(&format!("test ! -e /var/lib/cri-systemd/containers/{id}"));
    assert_ne!(node.exec(&["systemctl", "is-active", &unit]).stdout.trim(), "active");
    let gone =
        client.runtime.container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: false }).await;
    assert_eq!(gone.unwrap_err().code(), tonic::Code::NotFound);

    // StopPodSandbox with a container still running (crictl stopp; the kubelet stops each one
    // first): killed at once, as containerd does, with its exit recorded as such.
    let id =
        create(&mut client, &pod, container_config("left", &image, &["/bin/busybox", "sleep", "1000"])).await.unwrap();
    start(&mut client, &id).await.unwrap();
    client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    let killed = status(&mut client, &id).await;
    assert_eq!(
        (killed.state, killed.exit_code, killed.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 137, "Error")
    );
}

#[tokio::test]
async fn process_rules_exit_codes_mounts_and_oom() {
    let node = node("ctr-rules");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "rules").await;
    node.sh("mkdir -p /srv/out /srv/ro && chmod 777 /srv/out && echo data > /srv/ro/file");

    // Command, args, env (config over image), working dir, user by number; a rw and a ro bind.
    let mut config = container_config(
        "report",
        &image,
        &[
            "sh",
            "-c",
            "{ echo \"$A $B\"; pwd; busybox id -u; busybox id -g; busybox cat /ro/file; busybox touch /ro/x 2>/dev/null && echo writable || echo readonly; busybox hostname; } > /out/report",
        ],
    );
    config.envs = vec![
        cri::KeyValue { key: "A".into(), value: "alpha".into() },
        cri::KeyValue { key: "B".into(), value: "beta".into() },
    ];
    config.working_dir = "/tmp".into();
    config.mounts = vec![
        cri::Mount { container_path: "/out".into(), host_path: "/srv/out".into(), ..Default::default() },
        cri::Mount { container_path: "/ro".into(), host_path: "/srv/ro".into(), readonly: true, ..Default::default() },
    ];
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 33 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &id).await.unwrap();
    let done = wait_exited(&mut client, &id).await;
    let report = node.sh("cat /srv/out/report");
    assert_eq!((done.exit_code, done.reason.as_str()), (0, "Completed"), "report: {report}");
    assert_eq!(report, "alpha beta\n/tmp\n33\n33\ndata\nreadonly\nrules\n");

    // Exit codes, from systemd.
    let id = create(&mut client, &pod, container_config("three", &image, &["sh", "-c", "exit 3"])).await.unwrap();
    start(&mut client, &id).await.unwrap();
    let done = wait_exited(&mut client, &id).await;
    assert_eq!((done.exit_code, done.reason.as_str()), (3, "Error"));

    // A binary that is not in the image: StartContainer fails with a message a user understands.
    let id = create(&mut client, &pod, container_config("missing", &image, &["no-such-binary"])).await.unwrap();
    let err = start(&mut client, &id).await.unwrap_err();
    assert!(err.message().contains("no-such-binary") && err.message().contains("not found"), "{err:?}");
    let failed = status(&mut client, &id).await;
    assert_eq!((failed.state, failed.reason.as_str()), (cri::ContainerState::ContainerExited as i32, "StartError"));

    // OOM: a 32 MiB limit and a shell that doubles a string until the kernel kills it.
    let mut hog = container_config("hog", &image, &["sh", "-c", "x=0123456789abcdef; while :; do x=$x$x; done"]);
    hog.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources { memory_limit_in_bytes: 32 << 20, ..Default::default() }),
        ..Default::default()
    });
    let id = create(&mut client, &pod, hog).await.unwrap();
    start(&mut client, &id).await.unwrap();
    let done = wait_exited(&mut client, &id).await;
    assert_eq!((done.exit_code, done.reason.as_str()), (137, "OOMKilled"), "{done:?}");

    // A container that ignores SIGTERM is killed after the grace period.
    let stubborn =
        container_config("stubborn", &image, &["sh", "-c", "trap '' TERM; while :; do busybox sleep 1; done"]);
    let id = create(&mut client, &pod, stubborn).await.unwrap();
    start(&mut client, &id).await.unwrap();
    let begin = Instant::now();
    client.runtime.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 3 }).await.unwrap();
    assert!(begin.elapsed() >= Duration::from_secs(3), "stopped after {:?}", begin.elapsed());
    assert_eq!(status(&mut client, &id).await.exit_code, 137);
}

#[tokio::test]
async fn bad_requests_change_nothing_and_containers_outlive_the_daemon() {
    let node = node("ctr-bad");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "bad").await;

    let code = |r: Result<String, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(create(&mut client, &"f".repeat(64), container_config("a", &image, &["true"])).await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(create(&mut client, &pod, container_config("a", "127.0.0.1:5000/nope:1", &["true"])).await),
        tonic::Code::NotFound
    );
    let mut nameless = container_config("a", &image, &["true"]);
    nameless.metadata = None;
    assert_eq!(code(create(&mut client, &pod, nameless).await), tonic::Code::InvalidArgument);
    let mut escaping = container_config("a", &image, &["true"]);
    escaping.mounts =
        vec![cri::Mount { container_path: "/../../etc".into(), host_path: "/tmp".into(), ..Default::default() }];
    assert_eq!(code(create(&mut client, &pod, escaping).await), tonic::Code::InvalidArgument);
    let mut unknown_user = container_config("a", &image, &["true"]);
    unknown_user.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "nobody-here".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(code(create(&mut client, &pod, unknown_user).await), tonic::Code::InvalidArgument);
    assert_eq!(node.sh("ls -A /var/lib/cri-systemd/containers"), "");

    // The daemon is killed while a container runs; the container does not notice, and its exit,
    // while the daemon is down, is still recorded.
    let id = create(&mut client, &pod, container_config("survivor", &image, &["sh", "-c", "busybox sleep 4; exit 7"]))
        .await
        .unwrap();
    start(&mut client, &id).await.unwrap();
    let unit = format!("cri-{id}.service");
    let pid = node.sh(&format!("systemctl show -p MainPID --value {unit}"));
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd");
    assert_eq!(node.sh(&format!("systemctl show -p MainPID --value {unit}")), pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    node.sh("systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let done = status(&mut client, &id).await;
    assert_eq!((done.state, done.exit_code), (cri::ContainerState::ContainerExited as i32, 7));

    // Removing the pod removes its containers.
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    let left =
        client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner().containers;
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(node.sh("ls -A /var/lib/cri-systemd/containers"), "");
}

#[tokio::test]
async fn logs_in_the_cri_format_survive_restarts_and_reopen() {
    let node = node("ctr-logs");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod =
        run_pod_sandbox(&mut client, crisimple::pod("logs").log_directory("/var/log/pods/e2e_logs")).await.unwrap();

    // stdout and stderr, a line over 16 KiB, and a last line without a newline.
    let script = "echo out-1; echo err-1 >&2; s=; i=0; while [ $i -lt 2000 ]; do s=${s}xxxxxxxxxx; i=$((i+1)); done; echo $s; printf no-newline";
    let mut config = container_config("talker", &image, &["sh", "-c", script]);
    config.log_path = "talker/0.log".into();
    let id = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &id).await.unwrap();
    wait_exited(&mut client, &id).await;
    let log = "/var/log/pods/e2e_logs/talker/0.log";
    let lines = eventually(Duration::from_secs(20), "the last log line", || {
        let text = node.exec(&["cat", log]).stdout;
        async move {
            let lines = parse_log(&text);
            lines.iter().any(|(_, _, t)| t == "no-newline").then_some(lines)
        }
    })
    .await;
    let stdout: Vec<_> = lines.iter().filter(|(s, _, _)| s == "stdout").collect();
    assert_eq!((stdout[0].1.as_str(), stdout[0].2.as_str()), ("F", "out-1"));
    assert!(lines.contains(&("stderr".into(), "F".into(), "err-1".into())), "{lines:?}");
    let long: String = stdout.iter().skip(1).take_while(|(_, tag, _)| tag == "P").map(|(_, _, t)| t.as_str()).collect();
    let long_end = stdout.iter().skip(1).find(|(_, tag, _)| tag == "F").unwrap();
    assert_eq!(
        long.len() + long_end.2.len(),
        20000,
        "the long line, reassembled from P parts and its F end: {:?}",
        lines.iter().map(|(s, t, x)| format!("{s} {t} {}", &x[..x.len().min(40)])).collect::<Vec<_>>()
    );
    assert!(long.len() >= 16 * 1024 && long.chars().chain(long_end.2.chars()).all(|c| c == 'x'));

    // While the daemon is down, output waits in the container's pipes, and is written once it is back;
    // ReopenContainerLog then moves writing to a new file after the kubelet rotated the old one.
    let mut config = container_config(
        "ticker",
        &image,
        &["sh", "-c", "i=0; while :; do echo tick-$i; i=$((i+1)); busybox sleep 0.2; done"],
    );
    config.log_path = "ticker/0.log".into();
    let id = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &id).await.unwrap();
    node.sh(
        "systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd && sleep 2 && systemctl start cri-systemd",
    );
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let log = "/var/log/pods/e2e_logs/ticker/0.log";
    let ticks = eventually(Duration::from_secs(20), "ticks from before, during and after the restart", || {
        let text = node.exec(&["cat", log]).stdout;
        async move {
            let ticks: Vec<String> = parse_log(&text).into_iter().map(|(_, _, t)| t).collect();
            (ticks.len() > 15).then_some(ticks)
        }
    })
    .await;
    // No tick is missing or repeated.
    let numbers: Vec<u32> = ticks.iter().map(|t| t.trim_start_matches("tick-").parse().unwrap()).collect();
    let expected: Vec<u32> = (0..numbers.len() as u32).collect();
    assert_eq!(numbers, expected, "ticks in the log: {ticks:?}");

    node.sh(&format!("mv {log} {log}.1"));
    client.runtime.reopen_container_log(cri::ReopenContainerLogRequest { container_id: id.clone() }).await.unwrap();
    eventually(Duration::from_secs(10), "ticks in the reopened log", || {
        let text = node.exec(&["cat", log]).stdout;
        async move { parse_log(&text).iter().any(|(_, _, t)| t.starts_with("tick-")).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn resources_update_live_and_recursive_read_only_mounts() {
    let node = node("ctr-res");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "res").await;

    // A memory limit set at start, then raised while the container runs.
    let mut config = container_config("limited", &image, &["/bin/busybox", "sleep", "1000"]);
    config.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_shares: 512,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &id).await.unwrap();
    let unit = format!("cri-{id}.service");
    let cgroup = node.sh(&format!("systemctl show -p ControlGroup --value {unit}")).trim().to_string();
    let limit = || node.sh(&format!("cat /sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes")).trim().to_string();
    assert_eq!(limit(), (64u64 << 20).to_string());
    assert_eq!(node.sh(&format!("cat /sys/fs/cgroup/cpu{cgroup}/cpu.shares")).trim(), "512");
    let update = cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 128 << 20,
            cpu_shares: 512,
            ..Default::default()
        }),
        ..Default::default()
    };
    client.runtime.update_container_resources(update).await.unwrap();
    assert_eq!(limit(), (128u64 << 20).to_string());
    let status = status(&mut client, &id).await;
    assert_eq!(status.resources.unwrap().linux.unwrap().memory_limit_in_bytes, 128 << 20);

    // Recursive read-only: a submount of the volume is read-only too; advertised in Status.
    let answer = client.runtime.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    assert!(answer.runtime_handlers[0].features.unwrap().recursive_read_only_mounts);
    node.sh("mkdir -p /srv/vol/sub /srv/out && chmod 777 /srv/out && mount -t tmpfs tmpfs /srv/vol/sub && chmod 777 /srv/vol/sub");
    let script = "for d in /rro/sub /rw/sub; do busybox touch $d/x 2>/dev/null && echo $d writable || echo $d read-only; done > /out/rro";
    let mut config = container_config("rro", &image, &["sh", "-c", script]);
    config.mounts = vec![
        cri::Mount {
            container_path: "/rro".into(),
            host_path: "/srv/vol".into(),
            readonly: true,
            recursive_read_only: true,
            ..Default::default()
        },
        cri::Mount { container_path: "/rw".into(), host_path: "/srv/vol".into(), ..Default::default() },
        cri::Mount { container_path: "/out".into(), host_path: "/srv/out".into(), ..Default::default() },
    ];
    let id = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &id).await.unwrap();
    wait_exited(&mut client, &id).await;
    assert_eq!(node.sh("cat /srv/out/rro"), "/rro/sub read-only\n/rw/sub writable\n");

    // Recursive read-only needs readonly and private propagation.
    for (readonly, propagation) in
        [(false, cri::MountPropagation::PropagationPrivate), (true, cri::MountPropagation::PropagationHostToContainer)]
    {
        let mut config = container_config("bad-rro", &image, &["true"]);
        config.mounts = vec![cri::Mount {
            container_path: "/rro".into(),
            host_path: "/srv/vol".into(),
            readonly,
            recursive_read_only: true,
            propagation: propagation as i32,
            ..Default::default()
        }];
        assert_eq!(create(&mut client, &pod, config).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}

#[tokio::test]
async fn stats_come_from_the_container_cgroups() {
    let node = node("ctr-stats");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "stats").await;
    // Burns some CPU, writes 1 MiB into its writable layer and keeps an 8 MiB string in memory
    // (the shell lives on: `sleep` is not its last command, so it is not exec'd).
    let script = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; \
                  busybox dd if=/dev/urandom of=/written bs=1024 count=1024 2>/dev/null; \
                  x=0123456789abcdef; while [ ${#x} -lt 8388608 ]; do x=$x$x; done; busybox sleep 1000; echo ${#x}";
    let id = create(&mut client, &pod, container_config("busy", &image, &["sh", "-c", script])).await.unwrap();
    start(&mut client, &id).await.unwrap();
    let mut stats = None;
    for _ in 0..100 {
        let sample = client
            .runtime
            .container_stats(cri::ContainerStatsRequest { container_id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap();
        let memory = sample.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value);
        let layer = sample.writable_layer.as_ref().and_then(|l| l.used_bytes.as_ref()).map_or(0, |v| v.value);
        let done = memory > 8 << 20 && layer >= 1 << 20;
        stats = Some(sample);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stats = stats.unwrap();
    let memory = stats.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value);
    let layer = stats.writable_layer.as_ref().and_then(|l| l.used_bytes.as_ref()).map_or(0, |v| v.value);
    assert!(memory > 8 << 20 && layer >= 1 << 20, "stats after 30 s: {stats:?}");
    assert!(stats.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    assert_eq!(stats.attributes.unwrap().id, id);

    let pods = client
        .runtime
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(pods.len(), 1);
    let linux = pods[0].linux.clone().unwrap();
    assert_eq!(linux.containers.len(), 1);
    assert!(linux.memory.unwrap().usage_bytes.unwrap().value > 8 << 20, "the pod's slice counts its containers");
    let listed = client
        .runtime
        .list_container_stats(cri::ListContainerStatsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn runtime_default_seccomp_blocks_what_containerd_blocks() {
    let node = node("ctr-seccomp");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "seccomp").await;
    node.sh("mkdir -p /srv/out && chmod 777 /srv/out");
    // unshare(2) needs CAP_SYS_ADMIN under RuntimeDefault; as root with default caps the
    // kernel would allow a user namespace, so only the filter can refuse it. Ordinary work
    // (fork, exec, files, sockets) goes on.
    let script = "busybox unshare -U true 2>/dev/null && echo unshare-allowed || echo unshare-refused; \
                  echo ok > /tmp/f && busybox cat /tmp/f; busybox grep Seccomp: /proc/self/status";
    for (name, profile) in [("confined", Some(0)), ("unconfined", Some(1)), ("default", None)] {
        let mut config = container_config(name, &image, &["sh", "-c", &format!("{{ {script}; }} > /out/{name}")]);
        config.mounts =
            vec![cri::Mount { container_path: "/out".into(), host_path: "/srv/out".into(), ..Default::default() }];
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: profile
                    .map(|profile_type| cri::SecurityProfile { profile_type, localhost_ref: String::new() }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = create(&mut client, &pod, config).await.unwrap();
        start(&mut client, &id).await.unwrap();
        wait_exited(&mut client, &id).await;
    }
    let report = |name: &str| node.sh(&format!("cat /srv/out/{name}")).split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(report("confined"), "unshare-refused ok Seccomp: 2");
    assert_eq!(report("unconfined"), "unshare-allowed ok Seccomp: 0");
    assert_eq!(report("default"), "unshare-allowed ok Seccomp: 0");
}

#[tokio::test]
async fn localhost_seccomp_profiles_are_read_at_create_and_enforced() {
    let node = node("ctr-seccomp-local");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "seccomp-local").await;
    // Docker's format, as kubelet profiles are: allow all but mkdir, which answers EACCES.
    node.sh(
        r#"mkdir -p /srv/out /srv/profiles && chmod 777 /srv/out && cat > /srv/profiles/no-mkdir.json <<'EOF'
{"defaultAction": "SCMP_ACT_ALLOW",
 "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
 "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13, "comment": "no dirs"},
              {"names": ["chroot"], "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_SYS_MODULE"]}}]}
EOF
echo '{"defaultAction": ' > /srv/profiles/broken.json
echo '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}' > /srv/profiles/notify.json"#,
    );
    // `seccomp_profile_path` is deprecated, but older kubelets and crictl still send it.
    #[allow(deprecated)]
    let config_with = |name: &str, seccomp: Option<cri::SecurityProfile>, path: &str| {
        let script = "busybox mkdir /tmp/d 2>&1; echo rc=$?; echo ok > /tmp/f && busybox cat /tmp/f; \
                      busybox grep Seccomp: /proc/self/status";
        let mut config = container_config(name, &image, &["sh", "-c", &format!("{{ {script}; }} > /out/{name}")]);
        config.mounts =
            vec![cri::Mount { container_path: "/out".into(), host_path: "/srv/out".into(), ..Default::default() }];
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp,
                seccomp_profile_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        config
    };
    let localhost = |path: &str| Some(cri::SecurityProfile { profile_type: 2, localhost_ref: path.into() });

    let by_field =
        create(&mut client, &pod, config_with("field", localhost("/srv/profiles/no-mkdir.json"), "")).await.unwrap();
    let by_path =
        create(&mut client, &pod, config_with("path", None, "localhost//srv/profiles/no-mkdir.json")).await.unwrap();
    // The profile was read at CreateContainer: changing the file now changes nothing.
    node.sh("echo garbage > /srv/profiles/no-mkdir.json");
    for id in [&by_field, &by_path] {
        start(&mut client, id).await.unwrap();
        wait_exited(&mut client, id).await;
    }
    for name in ["field", "path"] {
        let report = node.sh(&format!("cat /srv/out/{name}")).split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(report.contains("Permission denied") && report.ends_with("rc=1 ok Seccomp: 2"), "{name}: {report}");
    }

    // Unreadable, malformed and unsupported profiles are refused at create, naming the file, and
    // leave no container behind.
    let before = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
    for (name, path, says) in [
        ("missing", "/srv/profiles/missing.json", "No such file"),
        ("broken", "/srv/profiles/broken.json", "not a seccomp profile"),
        ("notify", "/srv/profiles/notify.json", "SCMP_ACT_NOTIFY"),
        ("relative", "profiles/x.json", "not an absolute path"),
    ] {
        let error = create(&mut client, &pod, config_with(name, localhost(path), "")).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{name}: {error:?}");
        assert!(error.message().contains(path) && error.message().contains(says), "{name}: {}", error.message());
    }
    let after = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
    assert_eq!(before.containers.len(), after.containers.len());
}

#[tokio::test]
async fn pod_sysctls_are_set_in_the_pods_namespaces_only() {
    let node = node("ctr-sysctls");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let node_values = node.sh("cat /proc/sys/net/core/somaxconn /proc/sys/kernel/shm_rmid_forced");
    let sysctls = [
        ("net.ipv4.ip_unprivileged_port_start", "80"),
        ("net.core.somaxconn", "1234"),
        ("net/ipv4/ping_group_range", "0\t2147483647"),
        ("kernel.shm_rmid_forced", "1"),
        ("fs.mqueue.msg_max", "20"),
    ];
    let mut config = pod_config("sysctls");
    config.linux = Some(cri::LinuxPodSandboxConfig {
        sysctls: sysctls.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    });
    let pod = run_pod_sandbox(&mut client, config).await.expect("RunPodSandbox");
    node.sh("mkdir -p /srv/sysctl-out && chmod 777 /srv/sysctl-out");
    let files = "/proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/net/core/somaxconn \
                 /proc/sys/net/ipv4/ping_group_range /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max";
    let mut config = container_config("reader", &image, &["sh", "-c", &format!("busybox cat {files} > /out/values")]);
    config.mounts =
        vec![cri::Mount { container_path: "/out".into(), host_path: "/srv/sysctl-out".into(), ..Default::default() }];
    let id = create(&mut client, &pod, config).await.unwrap();
    start(&mut client, &id).await.unwrap();
    wait_exited(&mut client, &id).await;
    let seen: Vec<String> = node.sh("cat /srv/sysctl-out/values").lines().map(|l| l.to_string()).collect();
    assert_eq!(seen, ["80", "1234", "0\t2147483647", "1", "20"]);
    // The node's own values did not move.
    assert_eq!(node.sh("cat /proc/sys/net/core/somaxconn /proc/sys/kernel/shm_rmid_forced"), node_values);

    // Sysctls that would change the node, or that do not exist, are refused and leave no pod.
    let pods_before = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap();
    for (name, key, host_network, says) in [
        ("global", "kernel.panic", false, "not namespaced"),
        ("hostnet", "net.core.somaxconn", true, "node's network namespace"),
        ("missing", "net.ipv4.no_such_sysctl", false, "net.ipv4.no_such_sysctl"),
    ] {
        let mut config = pod_config(name);
        config.linux = Some(cri::LinuxPodSandboxConfig {
            sysctls: HashMap::from([(key.to_string(), "1".to_string())]),
            security_context: host_network.then(|| cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption { network: 2, pid: 1, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let error = run_pod_sandbox(&mut client, config).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{name}: {error:?}");
        assert!(error.message().contains(says), "{name}: {}", error.message());
    }
    let pods_after = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap();
    assert_eq!(pods_before.into_inner().items.len(), pods_after.into_inner().items.len());
    let slices = node.sh("systemctl list-units --all --plain --no-legend 'kubepods-besteffort-pod*' | wc -l");
    assert_eq!(slices.trim(), "1", "only the first pod's slice");
}

async fn exec_sync(client: &mut CriClient, id: &str, cmd: &[&str]) -> String {
    let request =
        cri::ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout: 10 };
    let response = client.runtime.exec_sync(request).await.expect("ExecSync").into_inner();
    assert_eq!(response.exit_code, 0, "{cmd:?}: {}", String::from_utf8_lossy(&response.stderr));
    String::from_utf8_lossy(&response.stdout).into_owned()
}

/// The processes of every cgroup under a slice (the systemd hierarchy), as PIDs.
fn slice_processes(node: &Node, slice: &str) -> Vec<String> {
    let procs = node.sh(&format!(
        "find /sys/fs/cgroup/systemd/kubepods.slice -path '*{slice}*' -name cgroup.procs -exec cat {{}} +"
    ));
    let mut pids: Vec<String> = procs.split_whitespace().map(String::from).collect();
    pids.sort();
    pids
}

#[tokio::test]
async fn pods_sharing_a_pid_namespace_have_an_init_that_reaps() {
    let node = node("ctr-podpid");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;

    // shareProcessNamespace: one pod-level init, PID 1 of the pod's PID namespace, in the slice.
    let config = crisimple::pod("shared").pid(cri::NamespaceMode::Pod);
    let pod = run_pod_sandbox(&mut client, config).await.expect("RunPodSandbox");
    let slice = "kubepods-besteffort-podshared_0000_1111_2222_333344445555.slice";
    let init_unit = format!("cri-pod-{pod}.service");
    assert_eq!(node.sh(&format!("systemctl is-active {init_unit}")).trim(), "active");
    assert_eq!(node.sh(&format!("systemctl show -p Slice --value {init_unit}")).trim(), slice);
    let init_pid = node.sh(&format!("systemctl show -p MainPID --value {init_unit}")).trim().to_string();
    assert_eq!(node.sh(&format!("grep NSpid /proc/{init_pid}/status")).split_whitespace().last(), Some("1"));
    let pins = format!("/run/cri-systemd/pods/{pod}/ns");
    // The network pin is the node's; the others are in the daemon's pod mount namespace.
    let inode = |path: &str| {
        let stat = format!("stat -L -c %i {path}");
        if path.ends_with("/net") { node.sh(&stat) } else { node.sh_in_pod_mounts(&stat) }.trim().to_string()
    };
    let pod_pidns = inode(&format!("{pins}/pid"));
    assert_eq!(inode(&format!("/proc/{init_pid}/ns/pid")), pod_pidns);
    // It lives in the pod's network, IPC and UTS namespaces, with no capabilities.
    for kind in ["net", "ipc", "uts"] {
        assert_eq!(inode(&format!("/proc/{init_pid}/ns/{kind}")), inode(&format!("{pins}/{kind}")), "{kind}");
    }
    assert!(node.sh(&format!("grep CapEff /proc/{init_pid}/status")).contains("0000000000000000"));
    let pod_status = client
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: pod.clone(), verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(pod_status.state, cri::PodSandboxState::SandboxReady as i32);
    let options = pod_status.linux.unwrap().namespaces.unwrap().options.unwrap();
    assert_eq!(options.pid, cri::NamespaceMode::Pod as i32);

    // Two containers in it. The second leaves an orphan: its shell starts a short sleep in the
    // background and exits, so the sleep's parent becomes the pod's PID 1, which must reap it.
    let first =
        create(&mut client, &pod, container_config("first", &image, &["/bin/busybox", "sleep", "1000"])).await.unwrap();
    start(&mut client, &first).await.unwrap();
    // (12 s: under load the checks below took over 3 s to reach the orphan, gone by then.)
    let script = "/bin/busybox sh -c '/bin/busybox sleep 12 & echo $! > /tmp/orphan'; exec /bin/busybox sleep 2000";
    let second = create(&mut client, &pod, container_config("second", &image, &["/bin/busybox", "sh", "-c", script]))
        .await
        .unwrap();
    start(&mut client, &second).await.unwrap();

    // Each container's main process is its unit's MainPID, in the pod's PID namespace (not PID 1).
    let mut mains = Vec::new();
    for (id, cmdline) in [(&first, "/bin/busybox sleep 1000"), (&second, "/bin/busybox sleep 2000")] {
        let unit = format!("cri-{id}.service");
        let main = node.sh(&format!("systemctl show -p MainPID --value {unit}")).trim().to_string();
        assert_eq!(node.sh(&format!("tr '\\0' ' ' < /proc/{main}/cmdline")).trim(), cmdline);
        assert_eq!(inode(&format!("/proc/{main}/ns/pid")), pod_pidns, "{unit}");
        assert_ne!(node.sh(&format!("grep NSpid /proc/{main}/status")).split_whitespace().last(), Some("1"));
        mains.push(main);
    }

    // From inside (ExecSync joins the same namespace): PID 1 is the pod's init, and each
    // container sees the other's processes.
    let ps = exec_sync(&mut client, &first, &["/bin/busybox", "ps", "-o", "pid,args"]).await;
    let pid_of =
        |args: &str| ps.lines().find(|l| l.contains(args)).and_then(|l| l.split_whitespace().next()).map(String::from);
    assert_eq!(pid_of("pod-init").as_deref(), Some("1"), "{ps}");
    assert!(pid_of("sleep 1000").is_some() && pid_of("sleep 2000").is_some(), "{ps}");
    let from_second = exec_sync(&mut client, &second, &["/bin/busybox", "ps", "-o", "pid,args"]).await;
    assert!(from_second.contains("sleep 1000"), "{from_second}");
    // The init is out of reach: not dumpable, so its root (an empty tmpfs anyway) and memory
    // are closed to the containers' root.
    let request = cri::ExecSyncRequest {
        container_id: first.clone(),
        cmd: ["/bin/busybox", "ls", "/proc/1/root/"].map(String::from).to_vec(),
        timeout: 10,
    };
    let peek = client.runtime.exec_sync(request).await.unwrap().into_inner();
    assert_ne!(peek.exit_code, 0);
    assert!(String::from_utf8_lossy(&peek.stderr).contains("Permission denied"), "{peek:?}");
    node.sh(&format!("test -z \"$(ls -A /proc/{init_pid}/root/)\""));

    // The orphan: adopted by PID 1 while it runs, reaped (not a zombie) once it ends.
    let orphan = exec_sync(&mut client, &second, &["/bin/busybox", "cat", "/tmp/orphan"]).await.trim().to_string();
    let orphan_status = format!("/proc/{orphan}/status");
    let parent = exec_sync(&mut client, &first, &["/bin/busybox", "grep", "PPid", &orphan_status]).await;
    assert_eq!(parent.split_whitespace().last(), Some("1"), "{parent}");
    eventually(Duration::from_secs(40), "the orphan to be reaped", || {
        let mut client = client.clone();
        let first = first.clone();
        let orphan_status = orphan_status.clone();
        async move {
            let request = cri::ExecSyncRequest {
                container_id: first,
                cmd: vec!["/bin/busybox".into(), "cat".into(), orphan_status],
                timeout: 10,
            };
            let response = client.runtime.exec_sync(request).await.expect("ExecSync").into_inner();
            // Still running (State S), or a zombie (State Z) if nobody reaps it: not yet.
            (response.exit_code != 0).then_some(())
        }
    })
    .await;

    // The slice holds the containers' processes and the init, nothing else.
    let mut expected = vec![init_pid.clone(), mains[0].clone(), mains[1].clone()];
    expected.sort();
    assert_eq!(slice_processes(&node, slice), expected);

    // A pod without a shared PID namespace has no process in its slice but its container's.
    let plain = run_pod(&mut client, "plain").await;
    let plain_slice = "kubepods-besteffort-podplain_0000_1111_2222_333344445555.slice";
    node.sh(&format!("test ! -e /run/cri-systemd/pods/{plain}/ns/pid"));
    assert_ne!(node.exec(&["systemctl", "is-active", &format!("cri-pod-{plain}.service")]).stdout.trim(), "active");
    let alone = create(&mut client, &plain, container_config("alone", &image, &["/bin/busybox", "sleep", "1000"]))
        .await
        .unwrap();
    start(&mut client, &alone).await.unwrap();
    let alone_main = node.sh(&format!("systemctl show -p MainPID --value cri-{alone}.service")).trim().to_string();
    assert_eq!(slice_processes(&node, plain_slice), vec![alone_main]);

    // hostPID (pid NODE): the node's PID namespace, no init either.
    let host_config = crisimple::pod("hostpid").pid(cri::NamespaceMode::Node);
    let host_pod = run_pod_sandbox(&mut client, host_config).await.expect("RunPodSandbox");
    let on_host =
        create(&mut client, &host_pod, container_config("onhost", &image, &["/bin/busybox", "sleep", "1000"]))
            .await
            .unwrap();
    start(&mut client, &on_host).await.unwrap();
    let on_host_main = node.sh(&format!("systemctl show -p MainPID --value cri-{on_host}.service")).trim().to_string();
    assert_eq!(inode(&format!("/proc/{on_host_main}/ns/pid")), inode("/proc/1/ns/pid"));
    assert_ne!(node.exec(&["systemctl", "is-active", &format!("cri-pod-{host_pod}.service")]).stdout.trim(), "active");
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: host_pod }).await.unwrap();

    // A pod whose init died has lost its PID namespace: NotReady, and no container starts in it.
    let doomed_config = crisimple::pod("doomed").pid(cri::NamespaceMode::Pod);
    let doomed = run_pod_sandbox(&mut client, doomed_config).await.expect("RunPodSandbox");
    let late =
        create(&mut client, &doomed, container_config("late", &image, &["/bin/busybox", "sleep", "1"])).await.unwrap();
    node.sh(&format!("systemctl kill -s KILL cri-pod-{doomed}.service"));
    eventually(Duration::from_secs(20), "the pod without init to be NotReady", || {
        let mut client = client.clone();
        let doomed = doomed.clone();
        async move {
            let request = cri::PodSandboxStatusRequest { pod_sandbox_id: doomed, verbose: false };
            let state = client.runtime.pod_sandbox_status(request).await.unwrap().into_inner().status.unwrap().state;
            (state == cri::PodSandboxState::SandboxNotready as i32).then_some(())
        }
    })
    .await;
    assert_eq!(start(&mut client, &late).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: doomed.clone() }).await.unwrap();

    // The daemon's SIGKILL changes nothing: the init is a unit of its own.
    node.sh("systemctl kill -s KILL cri-systemd");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    assert_eq!(node.sh(&format!("systemctl show -p MainPID --value {init_unit}")).trim(), init_pid);
    assert_eq!(status(&mut client, &first).await.state, cri::ContainerState::ContainerRunning as i32);

    // Stop: the containers end first (killed through their own stop path, as containerd does,
    // not with the PID namespace), then the init; remove leaves no unit, slice or pin.
    client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    for id in [&first, &second] {
        let stopped = status(&mut client, id).await;
        assert_eq!((stopped.state, stopped.exit_code), (cri::ContainerState::ContainerExited as i32, 137));
    }
    // systemd's own account: both containers' main processes ended before the init stopped
    // (systemd 252 logs "Stopped <unit> - <description>." for it; no "Stopping" line at info level).
    // (journald may write systemd's lines a moment after the stop returned)
    let deadline = Instant::now() + Duration::from_secs(10);
    let (journal, init_stopped) = loop {
        let journal = node.sh("journalctl -b _PID=1 -o cat | grep -E 'of pod e2e/shared|cri-.*[.]service: '");
        let at = journal.lines().position(|l| l.starts_with("Stopped ") && l.contains(" - init of pod e2e/shared"));
        match at {
            Some(at) => break (journal, at),
            None if Instant::now() > deadline => panic!("no stop of the init in the journal:\n{journal}"),
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let lines: Vec<&str> = journal.lines().collect();
    for id in [&first, &second] {
        let unit = format!("cri-{id}.service");
        let ended = lines
            .iter()
            .position(|l| l.contains(&unit) && (l.contains("Main process exited") || l.starts_with("Stopped ")))
            .unwrap_or_else(|| panic!("the end of {unit} in the journal"));
        assert!(ended < init_stopped, "{unit} ended after the init stopped:\n{journal}");
    }
    for unit in [init_unit.as_str(), slice] {
        assert_ne!(node.exec(&["systemctl", "is-active", unit]).stdout.trim(), "active", "{unit}");
    }
    node.sh(&format!("test ! -e {pins}/pid"));
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    let left = node.sh(&format!("systemctl list-units --all --plain --no-legend 'cri-pod-*' '{slice}' 'cri-{first}*'"));
    assert_eq!(left.trim(), "", "units left: {left}");
    node.sh(&format!("test ! -e /run/cri-systemd/pods/{pod} && test ! -e /var/lib/cri-systemd/pods/{pod}"));
}

#[tokio::test]
async fn container_events_stream_created_started_stopped_deleted() {
    let node = node("ctr-events");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let mut events = client
        .runtime
        .get_container_events(cri::GetEventsRequest::default())
        .await
        .expect("GetContainerEvents")
        .into_inner();
    let pod = run_pod(&mut client, "events").await;
    // It exits by itself: nothing but the exit watch tells the daemon (no status call until the
    // STOPPED event is in).
    let id =
        create(&mut client, &pod, container_config("brief", &image, &["/bin/busybox", "sh", "-c", "sleep 2; exit 3"]))
            .await
            .unwrap();
    start(&mut client, &id).await.unwrap();
    let mut next = async || {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message()).await.expect("an event in time");
        event.expect("an event, not an error").expect("the stream goes on")
    };
    // The pod's own events first (as containerd sends them: its id as the container id).
    let kind = |event: &cri::ContainerEventResponse| (event.container_id.clone(), event.container_event_type);
    let pod_event = |t: cri::ContainerEventType| (pod.clone(), t as i32);
    assert_eq!(kind(&next().await), pod_event(cri::ContainerEventType::ContainerCreatedEvent));
    assert_eq!(kind(&next().await), pod_event(cri::ContainerEventType::ContainerStartedEvent));
    let created = next().await;
    let started = next().await;
    let stopped = next().await;
    client.runtime.remove_container(cri::RemoveContainerRequest { container_id: id.clone() }).await.unwrap();
    let deleted = next().await;

    let kinds = [&created, &started, &stopped, &deleted].map(|e| e.container_event_type);
    assert_eq!(
        kinds,
        [
            cri::ContainerEventType::ContainerCreatedEvent as i32,
            cri::ContainerEventType::ContainerStartedEvent as i32,
            cri::ContainerEventType::ContainerStoppedEvent as i32,
            cri::ContainerEventType::ContainerDeletedEvent as i32,
        ]
    );
    let mut last = 0;
    for event in [&created, &started, &stopped, &deleted] {
        assert_eq!(event.container_id, id);
        assert!(event.created_at >= last, "events in time order");
        last = event.created_at;
        let pod_status = event.pod_sandbox_status.as_ref().expect("the pod's status");
        assert_eq!(pod_status.id, pod);
        assert_eq!(pod_status.state, cri::PodSandboxState::SandboxReady as i32);
        assert_eq!(pod_status.metadata.as_ref().unwrap().name, "events");
    }
    // The container's status as it was at each event; gone from the pod's once deleted.
    let state_in = |event: &cri::ContainerEventResponse| {
        let statuses: Vec<_> = event.containers_statuses.iter().filter(|s| s.id == id).collect();
        assert!(statuses.len() <= 1);
        statuses.first().map(|s| (s.state, s.exit_code))
    };
    assert_eq!(state_in(&created), Some((cri::ContainerState::ContainerCreated as i32, 0)));
    assert_eq!(state_in(&started), Some((cri::ContainerState::ContainerRunning as i32, 0)));
    assert_eq!(state_in(&stopped), Some((cri::ContainerState::ContainerExited as i32, 3)));
    assert_eq!(state_in(&deleted), None);
    assert_eq!(stopped.containers_statuses[0].reason, "Error");

    // An OOM kill is a STOPPED event too, with the reason in the container's status.
    let mut hog = container_config("hog", &image, &["sh", "-c", "x=0123456789abcdef; while :; do x=$x$x; done"]);
    hog.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources { memory_limit_in_bytes: 32 << 20, ..Default::default() }),
        ..Default::default()
    });
    let hog = create(&mut client, &pod, hog).await.unwrap();
    start(&mut client, &hog).await.unwrap();
    let mut events_of_hog = Vec::new();
    while events_of_hog.len() < 3 {
        let event = next().await;
        assert_eq!(event.container_id, hog);
        events_of_hog.push(event);
    }
    assert_eq!(events_of_hog[2].container_event_type, cri::ContainerEventType::ContainerStoppedEvent as i32);
    let killed = events_of_hog[2].containers_statuses.iter().find(|s| s.id == hog).expect("the hog's status");
    assert_eq!((killed.exit_code, killed.reason.as_str()), (137, "OOMKilled"), "{killed:?}");

    // The pod stops, then goes with its container.
    client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    let stopped_pod = next().await;
    assert_eq!(kind(&stopped_pod), pod_event(cri::ContainerEventType::ContainerStoppedEvent));
    let status = stopped_pod.pod_sandbox_status.unwrap();
    assert_eq!(status.state, cri::PodSandboxState::SandboxNotready as i32);
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    assert_eq!(kind(&next().await), (hog.clone(), cri::ContainerEventType::ContainerDeletedEvent as i32));
    let deleted_pod = next().await;
    assert_eq!(kind(&deleted_pod), pod_event(cri::ContainerEventType::ContainerDeletedEvent));
    assert!(deleted_pod.containers_statuses.is_empty(), "{deleted_pod:?}");
    assert_eq!(deleted_pod.pod_sandbox_status.unwrap().id, pod);
}

/// The kubelet's (cadvisor's) pod CPU on a cgroup v1 node is the pod slice's cpuacct.usage: the
/// container's processes must be in the cpuacct hierarchy, under the unit's path in the pod's
/// slice, as runc's systemd driver puts them (it joins every v1 hierarchy).
#[tokio::test]
async fn a_busy_containers_cpu_time_counts_in_its_pod_slices_cpuacct() {
    let node = node("ctr-cpuacct");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    if !node.exec(&["test", "-d", "/sys/fs/cgroup/cpuacct"]).success() {
        eprintln!("no cgroup v1 cpuacct hierarchy on this node: nothing to check");
        return;
    }
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "cpuacct").await;
    let id = create(&mut client, &pod, container_config("busy", &image, &["/bin/sh", "-c", "while :; do :; done"]))
        .await
        .unwrap();
    start(&mut client, &id).await.unwrap();
    let unit = format!("cri-{id}.service");
    let cgroup = node.sh(&format!("systemctl show -p ControlGroup --value {unit}")).trim().to_string();
    let slice = cgroup.rsplit_once('/').unwrap().0.to_string();
    let main_pid = node.sh(&format!("systemctl show -p MainPID --value {unit}")).trim().to_string();
    let usage = |path: &str| node.sh(&format!("cat /sys/fs/cgroup/cpuacct{path}/cpuacct.usage")).trim().parse::<u64>();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let in_cpuacct = node.sh(&format!("grep :cpuacct: /proc/{main_pid}/cgroup"));
        let container_usage = usage(&cgroup).unwrap_or(0);
        let pod_usage = usage(&slice).unwrap_or(0);
        if pod_usage > 100_000_000 {
            assert_eq!(in_cpuacct.trim().rsplit(':').next().unwrap(), cgroup, "the entrypoint's cpuacct cgroup");
            assert!(container_usage <= pod_usage, "the pod's usage ({pod_usage}) includes its container's");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod slice {slice}'s cpuacct.usage is {pod_usage} after 10 s of a busy loop; the entrypoint is in {in_cpuacct}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The directories the container's init made go with the container, and the pod's with it.
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    let left = node.exec(&["test", "-e", &format!("/sys/fs/cgroup/cpuacct{slice}")]);
    assert!(!left.success(), "the pod's cpuacct cgroup {slice} outlives the pod");
}

/// StopContainer, RemoveContainer, StopPodSandbox and RemovePodSandbox of ids the runtime does not
/// know succeed (the CRI says these calls are idempotent; critest's Idempotence specs send random
/// UUIDs); ids of things that exist keep their answers.
#[tokio::test]
async fn stop_and_remove_of_unknown_ids_succeed() {
    let node = Node::up("ctr-idem", e2e::NodeOptions::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let pod = run_pod(&mut client, "idem").await;
    for unknown in ["3f1c9d2e-5b7a-4e0f-9c1d-2a3b4c5d6e7f".to_string(), "e".repeat(64)] {
        let request = cri::StopContainerRequest { container_id: unknown.clone(), timeout: 0 };
        client.runtime.stop_container(request).await.expect("StopContainer of an unknown id");
        let request = cri::RemoveContainerRequest { container_id: unknown.clone() };
        client.runtime.remove_container(request).await.expect("RemoveContainer of an unknown id");
        let request = cri::StopPodSandboxRequest { pod_sandbox_id: unknown.clone() };
        client.runtime.stop_pod_sandbox(request).await.expect("StopPodSandbox of an unknown id");
        let request = cri::RemovePodSandboxRequest { pod_sandbox_id: unknown.clone() };
        client.runtime.remove_pod_sandbox(request).await.expect("RemovePodSandbox of an unknown id");
    }
    // None of that touched the pod that exists.
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: pod.clone(), verbose: false };
    let state = client.runtime.pod_sandbox_status(request).await.unwrap().into_inner().status.unwrap().state;
    assert_eq!(state, cri::PodSandboxState::SandboxReady as i32);
}

/// What critest checks of mounts and security contexts: a read-only volume leaves its sub-mounts
/// writable unless it is recursively read-only; `capabilities.add: ALL` gives what the node can
/// grant (the daemon's bounding set, smaller than every capability the kernel names in a node that
/// is itself a container) and `drop: ALL` plus a named add gives only that one, as containerd
/// composes them; run_as_group without a user is refused.
#[tokio::test]
async fn readonly_submounts_all_capabilities_and_group_without_user() {
    let node = node("ctr-critest");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "critestlike").await;
    let sleep = ["/bin/busybox", "sleep", "1000"];

    // A volume with a tmpfs mounted inside it.
    node.sh("mkdir -p /srv/vol/sub && mount -t tmpfs none /srv/vol/sub");
    for recursive in [false, true] {
        let mut config = container_config(&format!("ro-{recursive}"), &image, &sleep);
        config.mounts = vec![cri::Mount {
            container_path: "/mnt".into(),
            host_path: "/srv/vol".into(),
            readonly: true,
            recursive_read_only: recursive,
            ..Default::default()
        }];
        let id = create(&mut client, &pod, config).await.unwrap();
        start(&mut client, &id).await.unwrap();
        let script = "busybox touch /mnt/top 2>&1; busybox touch /mnt/sub/file 2>&1 && echo sub-writable";
        let out = exec_sync(&mut client, &id, &["/bin/sh", "-c", &format!("{script}; true")]).await;
        assert!(out.contains("/mnt/top: Read-only file system"), "recursive {recursive}: {out}");
        if recursive {
            assert!(out.contains("/mnt/sub/file: Read-only file system"), "recursive: {out}");
        } else {
            assert!(out.contains("sub-writable"), "non-recursive: {out}");
        }
    }

    let bounding = |status: &str| {
        status.lines().find_map(|l| l.strip_prefix("CapBnd:")).map(|v| v.trim().to_string()).expect("CapBnd")
    };
    let daemon_pid = node.sh("systemctl show -p MainPID --value cri-systemd").trim().to_string();
    let node_caps = bounding(&node.sh(&format!("cat /proc/{daemon_pid}/status")));
    let with_caps = |name: &str, add: &[&str], drop: &[&str]| {
        let mut config = container_config(name, &image, &sleep);
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: add.iter().map(|c| c.to_string()).collect(),
                    drop_capabilities: drop.iter().map(|c| c.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        config
    };
    for (name, add, drop, expected) in
        [("all", &["ALL"][..], &[][..], node_caps.as_str()), ("only-kill", &["KILL"], &["ALL"], "0000000000000020")]
    {
        let id = create(&mut client, &pod, with_caps(name, add, drop)).await.unwrap();
        start(&mut client, &id).await.unwrap_or_else(|e| panic!("start of {name}: {e:?}"));
        let status = exec_sync(&mut client, &id, &["/bin/busybox", "cat", "/proc/1/status"]).await;
        assert_eq!(bounding(&status), expected, "{name}");
    }

    let mut group_only = container_config("group-only", &image, &sleep);
    group_only.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_group: Some(cri::Int64Value { value: 1002 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let refused = create(&mut client, &pod, group_only).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
}

/// A container stopped right after its start, before its PID 1 installed its handler for the stop
/// signal (critest's stop spec does this with busybox `top`): the kernel drops a signal a PID
/// namespace's init has no handler for, so the stop signal must reach it once the handler is
/// there rather than be lost, leaving the container to be killed at the end of the grace period.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_signal_sent_before_the_entrypoint_handles_it_is_not_lost() {
    let node = node("ctr-early-stop");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "early-stop").await;
    // The handler comes 2 s after the start; the trap's exit code says the signal arrived.
    let script = "sleep 2; trap 'exit 0' TERM; while :; do sleep 0.1; done";
    let id = create(&mut client, &pod, container_config("late-trap", &image, &["/bin/busybox", "sh", "-c", script]))
        .await
        .unwrap();
    start(&mut client, &id).await.unwrap();
    let request = cri::StopContainerRequest { container_id: id.clone(), timeout: 30 };
    client.runtime.stop_container(request).await.expect("StopContainer");
    let stopped = status(&mut client, &id).await;
    assert_eq!(
        (stopped.state, stopped.exit_code, stopped.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 0, "Completed"),
        "the entrypoint's TERM trap never ran: {stopped:?}"
    );
}

/// A container whose end systemd does not record (the unit's ExecStopPost cannot write the exit
/// record: here a directory takes its path) is still seen to exit: the daemon follows the main
/// process itself and, with no record after a grace period, marks the container exited with an
/// unknown status instead of reporting it Running for ever. The same holds for one that ends
/// while the daemon is down. (CI's cgroup v2 VM once saw an OOM-killed container stay Running
/// with no record for over 60 s.)
#[tokio::test]
async fn a_container_whose_end_systemd_does_not_record_is_seen_to_exit() {
    let node = node("ctr-norec");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "norec").await;
    let unrecorded = |name: &str, seconds: u32| {
        container_config(name, &image, &["/bin/busybox", "sh", "-c", &format!("sleep {seconds}; exit 3")])
    };
    let short = create(&mut client, &pod, unrecorded("short", 1)).await.unwrap();
    let later = create(&mut client, &pod, unrecorded("later", 20)).await.unwrap();
    for id in [&short, &later] {
        node.sh(&format!("mkdir /var/lib/cri-systemd/containers/{id}/exit.json"));
        start(&mut client, id).await.unwrap();
    }
    let exited = wait_exited(&mut client, &short).await;
    assert_eq!((exited.exit_code, exited.reason.as_str()), (255, "Unknown"), "{exited:?}");
    assert!(exited.message.contains("no exit status"), "{exited:?}");
    assert!(exited.finished_at >= exited.started_at, "{exited:?}");

    // `later` ends while the daemon is down; the restarted daemon follows it again.
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd");
    let still = node.sh(&format!("systemctl show -p SubState --value cri-{later}.service"));
    assert_eq!(still.trim(), "running", "the container outlives the daemon");
    node.sh("systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    assert_eq!(status(&mut client, &later).await.state, cri::ContainerState::ContainerRunning as i32);
    let exited = wait_exited(&mut client, &later).await;
    assert_eq!((exited.exit_code, exited.reason.as_str()), (255, "Unknown"), "{exited:?}");
    let short_after = status(&mut client, &short).await;
    assert_eq!((short_after.exit_code, short_after.reason.as_str()), (255, "Unknown"), "kept: {short_after:?}");
}
