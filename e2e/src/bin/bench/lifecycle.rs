//! The lifecycle benchmark (issue 4): N pods of one container each, on both runtimes.
//!
//! Per runtime, one after the other in the same node:
//! 1. sequential: RunPodSandbox, then CreateContainer+StartContainer, for pod after pod (latency
//!    of each call); with all N running, a snapshot of the processes and memory; ExecSync `true`
//!    K times; then StopPodSandbox+RemovePodSandbox pod after pod;
//! 2. parallel: P clients (own connections) bring up N pods (run + create + start) as fast as
//!    they can: the wall time until all N run; then P clients tear them down.
//!
//! The floor (issue 17 item 2): before the runtimes of each round, N bare `systemd-run`s in the
//! node of the same busybox sleep, each a transient service (Type=exec: started once the binary
//! runs; ours are Type=notify, ready once init has exec'd) in a slice of its own named like a
//! kubelet's pod slice, timed in the node by bash around each `systemd-run` (its own start and
//! bus connection included: that is the bare tool's cost). Pod + container start is compared with
//! it (the ratio row).
//!
//! Per-pod overhead is measured, not assumed: the processes that appeared in the node while the
//! N pods were up, minus the containers' own (found by their cgroups, which carry the container
//! id), are what the runtime costs per pod (containerd: a shim and the pause process per pod).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e::{CriClient, cri};

use crate::procs::{self, NodeCpu};
use crate::runtimes::{CNI_CONF_DIR, Kind, Runtime};
use crate::table::{Table, median_f64, mib, p50_p99, percentile, secs};
use crate::{BUSYBOX_REPO, Only, PAUSE_REPO, Setup, call, image_ref, image_spec};

#[derive(Debug, Clone)]
pub struct Options {
    pub pods: usize,
    pub parallel: usize,
    pub execs: usize,
    /// Times the whole measurement is repeated per runtime (latencies pooled, the rest medians).
    pub rounds: usize,
    /// Pods in their own network namespace with a bridge CNI network (both runtimes), instead of
    /// the node's network.
    pub cni: bool,
    pub only: Only,
}

impl Default for Options {
    fn default() -> Self {
        Options { pods: 100, parallel: 10, execs: 100, rounds: 3, cni: false, only: Only::Both }
    }
}

const CALL: Duration = Duration::from_secs(120);

/// What was measured for one runtime.
#[derive(Debug, Default)]
struct Measured {
    run_pod: Vec<Duration>,
    create_start: Vec<Duration>,
    /// The two calls of `create_start` on their own (sequential pods only).
    create: Vec<Duration>,
    start: Vec<Duration>,
    stop_remove: Vec<Duration>,
    exec: Vec<Duration>,
    /// Why ExecSync could not be measured (the runtime answers Unimplemented).
    exec_unavailable: Option<String>,
    parallel_up: Duration,
    parallel_down: Duration,
    node_cpu_up: f64,
    node_cpu_down: f64,
    daemon_rss_kib: u64,
    daemon_hwm_kib: u64,
    daemon_cpu: f64,
    extra_count: usize,
    extra_summary: String,
    extra_rss_kib: u64,
    extra_pss_kib: u64,
    /// CPU time of the node's systemd (PID 1) while the pods came up one by one.
    pid1_cpu_up: f64,
}

pub async fn run(options: Options) -> Result<(), String> {
    let load = crate::load_average();
    let setup = Setup::boot("bench-life", options.only).await?;
    let registry = setup.registry();
    let busybox = image_ref(&format!("{BUSYBOX_REPO}:1"));
    let pause = image_ref(&format!("{PAUSE_REPO}:1"));
    if options.cni {
        setup.node.write_file(&format!("{CNI_CONF_DIR}/10-bench.conflist"), CNI_CONFLIST);
    }
    pull_images(&setup, &busybox, &pause).await?;
    // Rounds alternate which runtime goes first, so that neither always runs on a fresher node
    // or in a quieter minute of the machine.
    let mut rounds: Vec<(Runtime, Vec<Measured>)> = setup.runtimes.iter().map(|rt| (rt.clone(), Vec::new())).collect();
    let mut floor = Vec::new();
    for round in 0..options.rounds {
        eprintln!("bench: round {}/{}: the floor: {} bare systemd-run", round + 1, options.rounds, options.pods);
        floor.extend(systemd_run_floor(&setup, options.pods, &round.to_string())?);
        let mut order: Vec<usize> = (0..rounds.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let rt = rounds[i].0.clone();
            eprintln!("bench: round {}/{}: {}: {} pods", round + 1, options.rounds, rt.label, options.pods);
            let measured = measure(&setup, &rt, &busybox, &options, round).await?;
            rounds[i].1.push(measured);
        }
    }
    drop(registry);
    let results: Vec<(Runtime, Measured)> = rounds.into_iter().map(|(rt, all)| (rt, merge(all))).collect();
    print!("{}", render(&options, &results, &floor, &load));
    Ok(())
}

/// Pulls `busybox` into every runtime, and `pause` into containerd's, untimed: the pause image
/// only matters to containerd (cri-systemd has no sandbox process), which would otherwise pull it
/// within the first RunPodSandbox.
pub(crate) async fn pull_images(setup: &Setup, busybox: &str, pause: &str) -> Result<(), String> {
    for rt in &setup.runtimes {
        let mut client = rt.client().await?;
        for image in [busybox, pause] {
            if image == pause && rt.kind == Kind::CriSystemd {
                continue;
            }
            let request = cri::PullImageRequest { image: image_spec(image), ..Default::default() };
            call(rt, &format!("PullImage {image}"), CALL, client.image.pull_image(request)).await?;
        }
    }
    Ok(())
}

/// `n` bare `systemd-run`s of busybox sleep in the node, each in a slice of its own beside the
/// pods' (kubepods-besteffort.slice), timed by bash in the node ($EPOCHREALTIME: no process of its
/// own around the call); then stopped. `tag` keeps the unit names of different calls apart.
pub(crate) fn systemd_run_floor(setup: &Setup, n: usize, tag: &str) -> Result<Vec<Duration>, String> {
    let script = format!(
        r#"set -e
for i in $(seq 1 {n}); do
  t0=$EPOCHREALTIME
  systemd-run --quiet --unit=bench-floor-{tag}x$i --slice=kubepods-besteffort-podfloor{tag}x$i.slice \
    -p Type=exec -p CollectMode=inactive-or-failed /bin/busybox sleep 2147483647
  t1=$EPOCHREALTIME
  echo "${{t0/./}} ${{t1/./}}"
done"#
    );
    let run = setup.node.exec(&["bash", "-c", &script]);
    let stop = setup.node.exec(&["sh", "-c", &format!("systemctl stop 'kubepods-besteffort-podfloor{tag}x*.slice'")]);
    if !run.success() || !stop.success() {
        return Err(format!("the systemd-run floor: {}{}{}", run.stdout, run.stderr, stop.stderr));
    }
    parse_floor(&run.stdout)
}

/// Lines of "<start> <end>" in microseconds (bash's $EPOCHREALTIME without its dot).
pub(crate) fn parse_floor(text: &str) -> Result<Vec<Duration>, String> {
    text.lines()
        .map(|line| {
            let mut parts = line.split_whitespace().map(str::parse::<u64>);
            match (parts.next(), parts.next()) {
                (Some(Ok(t0)), Some(Ok(t1))) if t1 >= t0 => Ok(Duration::from_micros(t1 - t0)),
                _ => Err(format!("the systemd-run floor: cannot read {line:?}")),
            }
        })
        .collect()
}

/// Brings the N pods up and down, sequentially then in parallel, measuring as it goes.
async fn measure(
    setup: &Setup,
    rt: &Runtime,
    image: &str,
    options: &Options,
    round: usize,
) -> Result<Measured, String> {
    let n = options.pods;
    let mut m = Measured::default();
    let mut client = rt.client().await?;
    let node_cpu = NodeCpu::of(&setup.node.dir());
    let tag = match rt.kind {
        Kind::CriSystemd => format!("cs{round}"),
        Kind::Containerd => format!("ctd{round}"),
    };

    let node_procs = procs::NodeProcs::of(&setup.node.dir(), setup.pid1)?;
    let baseline: HashSet<u32> = node_procs.list().iter().map(|p| p.pid).collect();
    procs::reset_peak(rt.daemon_pid)?;
    let daemon_cpu0 = procs::cpu_seconds(rt.daemon_pid).unwrap_or(0.0);

    // 1. Sequential.
    let cpu0 = node_cpu.seconds().unwrap_or(0.0);
    let pid1_cpu0 = procs::cpu_seconds(setup.pid1).unwrap_or(0.0);
    let mut pods = Vec::with_capacity(n);
    for i in 0..n {
        let config = pod_config(&format!("{tag}s"), i, options.cni);
        let t = Instant::now();
        let pod = run_pod(rt, &mut client, &config).await?;
        m.run_pod.push(t.elapsed());
        if options.cni && i == 0 {
            check_pod_ip(rt, &mut client, &pod).await?;
        }
        let t = Instant::now();
        let (container, create, start) = create_start_timed(rt, &mut client, &pod, &config, image).await?;
        m.create_start.push(t.elapsed());
        m.create.push(create);
        m.start.push(start);
        pods.push((pod, container));
    }
    m.node_cpu_up = node_cpu.seconds().unwrap_or(0.0) - cpu0;
    m.pid1_cpu_up = procs::cpu_seconds(setup.pid1).unwrap_or(0.0) - pid1_cpu0;
    expect_running(rt, &mut client, n, CALL).await?;

    // All N running: who is there besides the containers?
    let container_ids: Vec<&str> = pods.iter().map(|(_, c)| c.as_str()).collect();
    let now = node_procs.list();
    let extra: Vec<&procs::Proc> = now
        .iter()
        .filter(|p| !baseline.contains(&p.pid))
        .filter(|p| !container_ids.iter().any(|id| p.cgroup.contains(id)))
        .collect();
    m.extra_count = extra.len();
    m.extra_summary = procs::summarize(&extra);
    m.extra_rss_kib = extra.iter().map(|p| p.rss_kib).sum();
    m.extra_pss_kib = extra.iter().filter_map(|p| procs::pss_kib(p.pid)).sum();
    let in_containers = now.iter().filter(|p| container_ids.iter().any(|id| p.cgroup.contains(id))).count();
    if in_containers != n {
        eprintln!("bench: {}: warning: {in_containers} processes found in the {n} containers' cgroups", rt.short());
    }
    m.daemon_rss_kib = procs::status_kib(rt.daemon_pid, "VmRSS").unwrap_or(0);

    // ExecSync `true` in the running containers, round robin.
    for k in 0..options.execs {
        let request =
            cri::ExecSyncRequest { container_id: pods[k % n].1.clone(), cmd: vec!["/bin/true".into()], timeout: 10 };
        let t = Instant::now();
        match tokio::time::timeout(CALL, client.runtime.exec_sync(request)).await {
            Ok(Ok(response)) => {
                let elapsed = t.elapsed();
                let code = response.into_inner().exit_code;
                if code != 0 {
                    return Err(format!("{}: ExecSync /bin/true exited {code}", rt.short()));
                }
                m.exec.push(elapsed);
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                m.exec_unavailable = Some(format!("not implemented ({})", status.message()));
                break;
            }
            Ok(Err(status)) => {
                return Err(format!("{}: ExecSync: {:?}: {}", rt.short(), status.code(), status.message()));
            }
            Err(_) => return Err(format!("{}: ExecSync: no answer within {CALL:?}", rt.short())),
        }
    }

    let cpu0 = node_cpu.seconds().unwrap_or(0.0);
    for (pod, _) in &pods {
        let t = Instant::now();
        stop_remove(rt, &mut client, pod).await?;
        m.stop_remove.push(t.elapsed());
    }
    m.node_cpu_down = node_cpu.seconds().unwrap_or(0.0) - cpu0;
    expect_no_pods(rt, &mut client).await?;

    // 2. Parallel clients.
    let mut clients = Vec::with_capacity(options.parallel);
    for _ in 0..options.parallel {
        clients.push(rt.client().await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in clients.clone() {
        let (rt, next, image, cni, tag) = (rt.clone(), next.clone(), image.to_owned(), options.cni, tag.clone());
        tasks.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(ids);
                }
                let config = pod_config(&format!("{tag}p"), i, cni);
                let pod = run_pod(&rt, &mut c, &config).await?;
                create_start(&rt, &mut c, &pod, &config, &image).await?;
                ids.push(pod);
            }
        });
    }
    let mut pods = Vec::new();
    while let Some(result) = tasks.join_next().await {
        pods.extend(result.map_err(|e| format!("client task: {e}"))??);
    }
    m.parallel_up = t.elapsed();
    expect_running(rt, &mut client, n, CALL).await?;

    let pods = Arc::new(std::sync::Mutex::new(pods));
    let t = Instant::now();
    for mut c in clients {
        let (rt, pods) = (rt.clone(), pods.clone());
        tasks.spawn(async move {
            loop {
                let Some(pod) = pods.lock().unwrap_or_else(|p| p.into_inner()).pop() else { return Ok(Vec::new()) };
                stop_remove(&rt, &mut c, &pod).await?;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| format!("client task: {e}"))??;
    }
    m.parallel_down = t.elapsed();
    expect_no_pods(rt, &mut client).await?;

    m.daemon_hwm_kib = procs::status_kib(rt.daemon_pid, "VmHWM").unwrap_or(0);
    m.daemon_cpu = procs::cpu_seconds(rt.daemon_pid).unwrap_or(0.0) - daemon_cpu0;
    Ok(m)
}

/// One runtime's rounds as one: latency samples pooled, peaks as the maximum, the other numbers
/// as the median round's.
fn merge(all: Vec<Measured>) -> Measured {
    let median = |f: &dyn Fn(&Measured) -> f64| median_f64(&all.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    let mut m = Measured {
        parallel_up: Duration::from_secs_f64(median(&|m| m.parallel_up.as_secs_f64())),
        parallel_down: Duration::from_secs_f64(median(&|m| m.parallel_down.as_secs_f64())),
        node_cpu_up: median(&|m| m.node_cpu_up),
        node_cpu_down: median(&|m| m.node_cpu_down),
        daemon_rss_kib: median(&|m| m.daemon_rss_kib as f64) as u64,
        daemon_hwm_kib: all.iter().map(|m| m.daemon_hwm_kib).max().unwrap_or(0),
        daemon_cpu: median(&|m| m.daemon_cpu),
        extra_count: median(&|m| m.extra_count as f64).round() as usize,
        extra_rss_kib: median(&|m| m.extra_rss_kib as f64) as u64,
        extra_pss_kib: median(&|m| m.extra_pss_kib as f64) as u64,
        pid1_cpu_up: median(&|m| m.pid1_cpu_up),
        ..Default::default()
    };
    for round in all {
        m.run_pod.extend(round.run_pod);
        m.create_start.extend(round.create_start);
        m.create.extend(round.create);
        m.start.extend(round.start);
        m.stop_remove.extend(round.stop_remove);
        m.exec.extend(round.exec);
        m.exec_unavailable = m.exec_unavailable.or(round.exec_unavailable);
        m.extra_summary = round.extra_summary;
    }
    m
}

/// The label by which the kubelet finds a pod's sandboxes and containers.
pub(crate) const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";

/// A pod as the kubelet would ask for it: its own slice under kubepods, logs, a hostname, the
/// namespace modes spelled out (the node's network unless CNI; container PID namespaces).
pub(crate) fn pod_config(tag: &str, i: usize, cni: bool) -> cri::PodSandboxConfig {
    let uid = format!("bench-{tag}-{i:05}");
    let name = format!("bench-{tag}-{i}");
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: uid.clone(),
            namespace: "bench".into(),
            attempt: 0,
        }),
        // As the kubelet: host-network pods keep the node's hostname (runc refuses to set one
        // without a UTS namespace of the pod's own).
        hostname: if cni { name.clone() } else { String::new() },
        log_directory: format!("/var/log/pods/bench_{name}_{uid}"),
        // The kubelet's label: it lists a pod's sandboxes and containers by it.
        labels: HashMap::from([("app".into(), "bench".into()), (POD_UID_LABEL.into(), uid.clone())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces(cni)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn namespaces(cni: bool) -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: if cni { cri::NamespaceMode::Pod } else { cri::NamespaceMode::Node } as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

pub(crate) async fn run_pod(
    rt: &Runtime,
    client: &mut CriClient,
    config: &cri::PodSandboxConfig,
) -> Result<String, String> {
    let request = cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() };
    Ok(call(rt, "RunPodSandbox", CALL, client.runtime.run_pod_sandbox(request)).await?.pod_sandbox_id)
}

/// A container sleeping forever in `pod`, created and started; its namespace options are the
/// pod's, as the kubelet gives them.
pub(crate) async fn create_start(
    rt: &Runtime,
    client: &mut CriClient,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    image: &str,
) -> Result<String, String> {
    create_start_timed(rt, client, pod, pod_config, image).await.map(|(id, _, _)| id)
}

/// [`create_start`], with the time CreateContainer and StartContainer each took.
async fn create_start_timed(
    rt: &Runtime,
    client: &mut CriClient,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    image: &str,
) -> Result<(String, Duration, Duration), String> {
    let namespace_options =
        pod_config.linux.as_ref().and_then(|l| l.security_context.as_ref()).and_then(|s| s.namespace_options.clone());
    let uid = pod_config.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "sleep".into(), attempt: 0 }),
        labels: HashMap::from([(POD_UID_LABEL.into(), uid)]),
        image: image_spec(image),
        command: vec!["/bin/busybox".into(), "sleep".into(), "2147483647".into()],
        log_path: "sleep/0.log".into(),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext { namespace_options, ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(pod_config.clone()),
    };
    let t = Instant::now();
    let id = call(rt, "CreateContainer", CALL, client.runtime.create_container(request)).await?.container_id;
    let created = t.elapsed();
    let t = Instant::now();
    call(
        rt,
        "StartContainer",
        CALL,
        client.runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }),
    )
    .await?;
    Ok((id, created, t.elapsed()))
}

pub(crate) async fn stop_remove(rt: &Runtime, client: &mut CriClient, pod: &str) -> Result<(), String> {
    call(
        rt,
        "StopPodSandbox",
        CALL,
        client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.into() }),
    )
    .await?;
    call(
        rt,
        "RemovePodSandbox",
        CALL,
        client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.into() }),
    )
    .await?;
    Ok(())
}

/// Fails unless exactly `n` containers run (`timeout`: how long the list may take).
pub(crate) async fn expect_running(
    rt: &Runtime,
    client: &mut CriClient,
    n: usize,
    timeout: Duration,
) -> Result<(), String> {
    let filter = cri::ContainerFilter {
        state: Some(cri::ContainerStateValue { state: cri::ContainerState::ContainerRunning as i32 }),
        ..Default::default()
    };
    let request = cri::ListContainersRequest { filter: Some(filter) };
    let running = call(rt, "ListContainers", timeout, client.runtime.list_containers(request)).await?.containers.len();
    if running != n {
        return Err(format!("{}: {running} containers running, expected {n}", rt.short()));
    }
    Ok(())
}

async fn expect_no_pods(rt: &Runtime, client: &mut CriClient) -> Result<(), String> {
    let left = call(rt, "ListPodSandbox", CALL, client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()))
        .await?
        .items;
    if !left.is_empty() {
        return Err(format!("{}: {} pods left after removing them all", rt.short(), left.len()));
    }
    Ok(())
}

async fn check_pod_ip(rt: &Runtime, client: &mut CriClient, pod: &str) -> Result<(), String> {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: false };
    let status = call(rt, "PodSandboxStatus", CALL, client.runtime.pod_sandbox_status(request)).await?.status;
    let ip = status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
    if ip.is_empty() {
        return Err(format!(
            "{}: a pod in CNI mode got no IP address (is CNI implemented in this build? use --network host)",
            rt.short()
        ));
    }
    Ok(())
}

/// The same bridge network for both runtimes, as a cluster's default would be (bridge, host-local,
/// portmap), minus masquerading: nothing leaves the node.
const CNI_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "bench",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "bench0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.222.0.0/16" }]], "routes": [{ "dst": "0.0.0.0/0" }] }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
"#;

fn render(options: &Options, results: &[(Runtime, Measured)], floor: &[Duration], load: &str) -> String {
    let n = options.pods;
    let mode = if options.cni {
        "pod network (bridge CNI, same config for both)"
    } else {
        "hostNetwork pods (namespace_options.network = NODE)"
    };
    let mut header = vec!["".to_owned()];
    header.extend(results.iter().map(|(rt, _)| rt.label.clone()));
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let rounds = options.rounds;
    let mut t = Table::new(
        format!("Pod lifecycle: {n} pods x 1 container (busybox sleep), {mode}; {rounds} round(s)"),
        &header,
    );
    let row = |label: &str, f: &dyn Fn(&Measured) -> String| {
        let mut cells = vec![label.to_owned()];
        cells.extend(results.iter().map(|(_, m)| f(m)));
        cells
    };
    t.row(row("RunPodSandbox                    p50 / p99", &|m| p50_p99(&m.run_pod)));
    t.row(row("CreateContainer+StartContainer   p50 / p99", &|m| p50_p99(&m.create_start)));
    t.row(row("  CreateContainer alone          p50 / p99", &|m| p50_p99(&m.create)));
    t.row(row("  StartContainer alone           p50 / p99", &|m| p50_p99(&m.start)));
    t.row(row("floor: bare systemd-run in a slice p50 / p99", &|_| p50_p99(floor)));
    t.row(row("  pod + container p50 / floor p50", &|m| {
        let both: Vec<Duration> = m.run_pod.iter().zip(&m.create_start).map(|(a, b)| *a + *b).collect();
        crate::density::ratio(percentile(floor, 50.0), percentile(&both, 50.0))
    }));
    t.row(row("StopPodSandbox+RemovePodSandbox  p50 / p99", &|m| p50_p99(&m.stop_remove)));
    t.row(row("ExecSync /bin/true               p50 / p99", &|m| match &m.exec_unavailable {
        None => p50_p99(&m.exec),
        Some(_) => "not implemented".into(),
    }));
    t.row(row(&format!("{n} pods running, {} parallel clients", options.parallel), &|m| {
        secs(m.parallel_up.as_secs_f64())
    }));
    t.row(row("  = pods/s", &|m| format!("{:.1}", n as f64 / m.parallel_up.as_secs_f64())));
    t.row(row(&format!("{n} pods removed, {} parallel clients", options.parallel), &|m| {
        secs(m.parallel_down.as_secs_f64())
    }));
    t.row(row(&format!("node CPU, {n} pods up one by one"), &|m| secs(m.node_cpu_up)));
    t.row(row("  of which systemd (PID 1)", &|m| secs(m.pid1_cpu_up)));
    t.row(row(&format!("node CPU, {n} pods down one by one"), &|m| secs(m.node_cpu_down)));
    t.row(row(&format!("daemon VmRSS, {n} pods running"), &|m| mib(m.daemon_rss_kib)));
    t.row(row("daemon VmHWM (peak, whole run)", &|m| mib(m.daemon_hwm_kib)));
    t.row(row("daemon CPU (whole run)", &|m| secs(m.daemon_cpu)));
    t.row(row("processes per pod besides the container", &|m| format!("{:.2}", m.extra_count as f64 / n as f64)));
    t.row(row("  their RSS per pod", &|m| mib(m.extra_rss_kib / n as u64)));
    t.row(row("  their PSS per pod", &|m| mib(m.extra_pss_kib / n as u64)));
    for (rt, m) in results {
        t.note(format!("{}: processes besides the containers while {n} pods ran: {}", rt.short(), m.extra_summary));
        if let Some(e) = &m.exec_unavailable {
            t.note(format!("{}: ExecSync {e}", rt.short()));
        }
    }
    t.note(format!(
        "p50/p99: nearest rank over all {} calls ({n} pods x {rounds} rounds), one after the other from one client; other rows: the median round (VmHWM: the highest)",
        n * rounds
    ));
    t.note("floor: `systemd-run -p Type=exec --slice=<a pod-like slice> /bin/busybox sleep` in the node, timed around the command by bash; the same for both columns; pod + container: RunPodSandbox + Create+Start of the same pod");
    t.note("the runtimes take turns in the same node, round by round (the first one alternates)");
    t.note("node CPU: user+sys of everything in the node's cgroup (daemon, systemd, shims, runc, containers), not the benchmark client");
    t.note("processes per pod: those that appeared in the node while the pods ran, outside the containers' own cgroups; PSS shares common pages among them");
    if results.iter().any(|(rt, _)| rt.kind == Kind::Containerd) {
        t.note("containerd's pause process is busybox sleep here (registry.k8s.io is out of reach); the real pause binary is smaller");
    }
    if !options.cni {
        t.note("network: the node's for both (hostNetwork: no CNI call, no network namespace); `--network cni` gives each pod its own");
    }
    t.note(format!("{} ExecSync calls per runtime and round, round robin over the containers", options.execs));
    t.note(crate::machine_note(load));
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_lines_are_read_as_durations() {
        let read = parse_floor("1765000000123456 1765000000135456\n1765000001000000 1765000001009000\n").unwrap();
        assert_eq!(read, vec![Duration::from_micros(12_000), Duration::from_micros(9_000)]);
        assert!(parse_floor("12 x\n").unwrap_err().contains("\"12 x\""));
        assert!(parse_floor("20 10\n").is_err());
    }
}
