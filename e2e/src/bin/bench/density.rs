//! The density benchmark (issue 17 items 1, 4, 5): how each runtime copes with many pods on one
//! node, both runtimes in turn in the same node.
//!
//! Per runtime: P clients bring pods up (RunPodSandbox, CreateContainer, StartContainer; busybox
//! sleeping, the node's network) until the next step's count runs (10, 100, 500, 1000 by
//! default). At each step, with that many pods running and nothing else going on:
//! - the node's memory: MemAvailable (the machine's: the node shares its kernel) and the node's
//!   memory cgroup, against the same before the first pod; the containers' own processes' RSS
//!   apart (what is left is what the runtime costs per pod: daemon, shims, pause, systemd's units);
//! - systemd's (the node's PID 1) CPU since the first pod and its RSS; the daemon's (containerd:
//!   containerd and its shims together);
//! - a sample of S pods created one after the other (RunPodSandbox, Create+Start latency), K
//!   ExecSync `true` round robin over the running containers, then the sample pods stopped and
//!   removed (StopPodSandbox+RemovePodSandbox latency): the load stays at the step's count.
//!
//! Then the pods are removed by P clients. The table has one column group per step, the plot
//! (`--plot FILE`, PNG) each latency's p50 against the pods running, both runtimes.
//!
//! Statistics and the steps parser are pure functions with unit tests; nothing here asserts a
//! time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e::{CriClient, cri};

use crate::lifecycle::{POD_UID_LABEL, create_start, expect_running, pod_config, run_pod, stop_remove};
use crate::procs::{self, NodeCpu, NodeProcs};
use crate::runtimes::{Kind, Runtime};
use crate::table::{Table, mib, p50_p99, percentile, secs};
use crate::{BUSYBOX_REPO, Only, PAUSE_REPO, Setup, call, image_ref};

#[derive(Debug, Clone)]
pub struct Options {
    /// Pods running at the end (the last step).
    pub pods: usize,
    /// Pod counts at which latency and memory are measured, ascending, the last one `pods`.
    pub steps: Vec<usize>,
    /// Clients bringing pods up and down.
    pub parallel: usize,
    /// Pods created and removed one after the other at each step (latency samples).
    pub sample: usize,
    /// ExecSync calls at each step.
    pub execs: usize,
    pub only: Only,
    /// Where to write the PNG plot of latency against pods running.
    pub plot: Option<PathBuf>,
}

pub const DEFAULT_STEPS: [usize; 4] = [10, 100, 500, 1000];

impl Default for Options {
    fn default() -> Self {
        Options {
            pods: 1000,
            steps: DEFAULT_STEPS.to_vec(),
            parallel: 10,
            sample: 20,
            execs: 100,
            only: Only::Both,
            plot: None,
        }
    }
}

impl Options {
    /// The steps actually run: those up to `pods`, and `pods` itself last.
    pub fn effective_steps(&self) -> Vec<usize> {
        let mut steps: Vec<usize> = self.steps.iter().copied().filter(|s| *s < self.pods).collect();
        steps.push(self.pods);
        steps
    }
}

/// `--steps 10,100,500,1000`: positive, strictly ascending pod counts.
pub fn parse_steps(text: &str) -> Result<Vec<usize>, String> {
    let mut steps = Vec::new();
    for part in text.split(',') {
        let step = part
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("--steps: {part:?} is not a positive number (want e.g. 10,100,500,1000)"))?;
        if steps.last().is_some_and(|last| *last >= step) {
            return Err(format!("--steps: want ascending pod counts, got {text:?}"));
        }
        steps.push(step);
    }
    Ok(steps)
}

const CALL: Duration = Duration::from_secs(300);
/// Quiet time after a bring-up before memory is read (exits of runc, shims settling, the
/// daemon's and systemd's work queued by the last starts).
const SETTLE: Duration = Duration::from_secs(3);

/// What was measured at one step of one runtime.
#[derive(Debug, Default, Clone)]
pub struct Step {
    pub pods: usize,
    pub run_pod: Vec<Duration>,
    pub create_start: Vec<Duration>,
    pub exec: Vec<Duration>,
    pub stop_remove: Vec<Duration>,
    /// ListPodSandbox + ListContainers of one pod by its uid label (the kubelet's pod status sync).
    pub list_one: Vec<Duration>,
    /// Bare `systemd-run`s of the same busybox in a slice beside the pods': what systemd alone
    /// costs per start with the step's units loaded (PID 1's own work grows with them).
    pub floor: Vec<Duration>,
    /// MemAvailable drop since before the first pod (KiB; negative: more available).
    pub mem_available_drop_kib: i64,
    /// The node's memory cgroup growth since before the first pod (KiB).
    pub node_memory_kib: i64,
    /// Memory charged to the containers' own cgroups (KiB).
    pub containers_memory_kib: u64,
    pub pid1_rss_kib: u64,
    /// systemd's CPU time since before the first pod.
    pub pid1_cpu: f64,
    /// The daemon's PSS (containerd: with its shims, whose shared pages PSS counts once).
    pub daemon_pss_kib: u64,
    pub daemon_cpu: f64,
    /// Open file descriptors and threads of the daemon (containerd: with its shims), and PID 1's fds.
    pub daemon_fds: usize,
    pub daemon_threads: u64,
    pub pid1_fds: usize,
    /// Everything in the node's cgroup since before the first pod.
    pub node_cpu: f64,
    pub load: String,
}

impl Step {
    /// Node memory per pod outside the containers' processes, in KiB.
    pub fn memory_per_pod_kib(&self) -> i64 {
        (self.node_memory_kib - self.containers_memory_kib as i64) / self.pods.max(1) as i64
    }
}

#[derive(Debug, Default)]
pub struct Measured {
    pub steps: Vec<Step>,
    /// Wall time of the bring-ups (the samples' time excluded).
    pub up: Duration,
    pub down: Duration,
}

pub async fn run(options: Options) -> Result<(), String> {
    let load = crate::load_average();
    let setup = Setup::boot("bench-dens", options.only).await?;
    let limits = node_limits(&setup);
    let registry = setup.registry();
    let busybox = image_ref(&format!("{BUSYBOX_REPO}:1"));
    let pause = image_ref(&format!("{PAUSE_REPO}:1"));
    crate::lifecycle::pull_images(&setup, &busybox, &pause).await?;
    let mut results = Vec::new();
    for rt in &setup.runtimes {
        eprintln!("bench: density: {}: up to {} pods, steps {:?}", rt.label, options.pods, options.effective_steps());
        results.push((rt.clone(), measure(&setup, rt, &busybox, &options).await?));
    }
    drop(registry);
    print!("{}", render(&options, &results, &load, &limits));
    if let Some(path) = &options.plot {
        crate::plot::latency_vs_pods(path, &series(&results))?;
        eprintln!("bench: plot written to {}", path.display());
    }
    Ok(())
}

/// The node's limits that 1000 pods meet, for the table (the kernel's are the machine's: the
/// node shares its kernel; the units' are the node's systemd's).
fn node_limits(setup: &Setup) -> String {
    let sys = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "?".into());
    let show = setup
        .node
        .exec(&["systemctl", "show", "-p", "DefaultTasksMax,DefaultLimitNOFILE", "--value"])
        .stdout
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("/");
    format!(
        "limits: kernel.pid_max {}, threads-max {}, fs.inotify.max_user_instances {}, max_user_watches {}, fs.file-max {}; node systemd DefaultTasksMax/DefaultLimitNOFILE {show}; containerd runs with TasksMax=infinity LimitNOFILE=infinity, cri-systemd's unit TasksMax=infinity LimitNOFILE=1048576",
        sys("/proc/sys/kernel/pid_max"),
        sys("/proc/sys/kernel/threads-max"),
        sys("/proc/sys/fs/inotify/max_user_instances"),
        sys("/proc/sys/fs/inotify/max_user_watches"),
        sys("/proc/sys/fs/file-max"),
    )
}

/// MemAvailable of the machine, KiB.
fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:")?.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

/// The node's memory cgroup usage (v1 memory.usage_in_bytes, or cgroup2 memory.current), KiB.
fn node_memory_kib(node_dir: &std::path::Path) -> u64 {
    let v1 = procs::node_cgroup(node_dir, "memory").map(|d| format!("{d}/memory.usage_in_bytes"));
    let v2 = procs::node_cgroup(node_dir, "unified").map(|d| format!("{d}/memory.current"));
    [v1, v2]
        .into_iter()
        .flatten()
        .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse::<u64>().ok())
        .map(|b| b / 1024)
        .unwrap_or(0)
}

/// The memory charged to the containers' own cgroups (their names carry the container id), KiB:
/// what the containers cost, not the runtime. (Their processes' RSS would count the shared busybox
/// pages once per process, more than the node's cgroup was charged.)
fn containers_memory_kib(node_dir: &std::path::Path, container_ids: &[&str]) -> u64 {
    let roots = [
        procs::node_cgroup(node_dir, "memory").map(|d| (d, "memory.usage_in_bytes")),
        procs::node_cgroup(node_dir, "unified").map(|d| (d, "memory.current")),
    ];
    let Some((root, file)) = roots.into_iter().flatten().find(|(d, f)| std::path::Path::new(d).join(f).exists()) else {
        return 0;
    };
    let ids: std::collections::HashSet<&str> = container_ids.iter().copied().collect();
    let mut total = 0;
    let mut dirs = vec![PathBuf::from(root)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            let name = entry.file_name().to_string_lossy().into_owned();
            // cri-<id>.service (cri-systemd), cri-containerd-<id>.scope (runc under systemd).
            let id = name.trim_end_matches(".service").trim_end_matches(".scope");
            let id = id.strip_prefix("cri-containerd-").or_else(|| id.strip_prefix("cri-")).unwrap_or("");
            if ids.contains(id) {
                total += std::fs::read_to_string(entry.path().join(file))
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            } else {
                dirs.push(entry.path());
            }
        }
    }
    total / 1024
}

/// How many file descriptors process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The daemon's processes: cri-systemd's daemon; containerd and its shims.
fn daemon_procs(rt: &Runtime, node_procs: &NodeProcs) -> Vec<procs::Proc> {
    node_procs
        .list()
        .into_iter()
        .filter(|p| match rt.kind {
            Kind::CriSystemd => p.pid == rt.daemon_pid,
            Kind::Containerd => p.pid == rt.daemon_pid || p.comm.starts_with("containerd-shim"),
        })
        .collect()
}

async fn measure(setup: &Setup, rt: &Runtime, image: &str, options: &Options) -> Result<Measured, String> {
    let node_dir = setup.node.dir();
    let node_procs = NodeProcs::of(&node_dir, setup.pid1)?;
    let node_cpu = NodeCpu::of(&node_dir);
    let tag = match rt.kind {
        Kind::CriSystemd => "dcs",
        Kind::Containerd => "dctd",
    };
    let mut client = rt.client().await?;
    let mut clients = Vec::with_capacity(options.parallel);
    for _ in 0..options.parallel {
        clients.push(rt.client().await?);
    }

    tokio::time::sleep(SETTLE).await;
    let mem0 = mem_available_kib() as i64;
    let node_mem0 = node_memory_kib(&node_dir) as i64;
    let pid1_cpu0 = procs::cpu_seconds(setup.pid1).unwrap_or(0.0);
    let cpu0 = node_cpu.seconds().unwrap_or(0.0);
    let daemon_cpu = |procs: &[procs::Proc]| procs.iter().filter_map(|p| procs::cpu_seconds(p.pid)).sum::<f64>();
    // Shims that exit take their CPU time with them: containerd's is counted from the node's
    // processes at each step, cri-systemd's daemon is one process.
    let daemon_cpu0 = daemon_cpu(&daemon_procs(rt, &node_procs));

    let mut m = Measured::default();
    let mut pods: Vec<(String, String)> = Vec::new();
    let mut sample_index = 0usize;
    for step in options.effective_steps() {
        let t = Instant::now();
        let added = bring_up(rt, &clients, image, &format!("{tag}u"), pods.len(), step).await?;
        m.up += t.elapsed();
        pods.extend(added);
        eprintln!("bench: density: {}: {} pods running ({:.1} s so far)", rt.short(), pods.len(), m.up.as_secs_f64());
        expect_running(rt, &mut client, pods.len(), CALL).await?;
        tokio::time::sleep(SETTLE).await;

        let container_ids: Vec<&str> = pods.iter().map(|(_, c)| c.as_str()).collect();
        let containers_memory = containers_memory_kib(&node_dir, &container_ids);
        let daemon = daemon_procs(rt, &node_procs);
        let mut s = Step {
            pods: pods.len(),
            mem_available_drop_kib: mem0 - mem_available_kib() as i64,
            node_memory_kib: node_memory_kib(&node_dir) as i64 - node_mem0,
            containers_memory_kib: containers_memory,
            pid1_rss_kib: procs::status_kib(setup.pid1, "VmRSS").unwrap_or(0),
            pid1_cpu: procs::cpu_seconds(setup.pid1).unwrap_or(0.0) - pid1_cpu0,
            daemon_pss_kib: daemon.iter().filter_map(|p| procs::pss_kib(p.pid)).sum(),
            daemon_cpu: daemon_cpu(&daemon) - daemon_cpu0,
            daemon_fds: daemon.iter().map(|p| open_fds(p.pid)).sum(),
            daemon_threads: daemon.iter().filter_map(|p| procs::status_kib(p.pid, "Threads")).sum(),
            pid1_fds: open_fds(setup.pid1),
            node_cpu: node_cpu.seconds().unwrap_or(0.0) - cpu0,
            load: crate::load_average(),
            ..Default::default()
        };

        // The sample: pods that come and go while `step` pods run.
        let mut sample = Vec::new();
        for _ in 0..options.sample {
            let config = pod_config(&format!("{tag}s"), sample_index, false);
            sample_index += 1;
            let t = Instant::now();
            let pod = run_pod(rt, &mut client, &config).await?;
            s.run_pod.push(t.elapsed());
            let t = Instant::now();
            create_start(rt, &mut client, &pod, &config, image).await?;
            s.create_start.push(t.elapsed());
            sample.push(pod);
        }
        for k in 0..options.execs {
            let request = cri::ExecSyncRequest {
                container_id: pods[k * pods.len() / options.execs.max(1)].1.clone(),
                cmd: vec!["/bin/true".into()],
                timeout: 30,
            };
            let t = Instant::now();
            let response = call(rt, "ExecSync", CALL, client.runtime.exec_sync(request)).await?;
            s.exec.push(t.elapsed());
            if response.exit_code != 0 {
                return Err(format!("{}: ExecSync /bin/true exited {}", rt.short(), response.exit_code));
            }
        }
        for k in 0..options.execs {
            let uid = pod_config(&format!("{tag}u"), k * pods.len() / options.execs.max(1), false)
                .metadata
                .map(|m| m.uid)
                .unwrap_or_default();
            let selector = std::collections::HashMap::from([(POD_UID_LABEL.to_string(), uid)]);
            let t = Instant::now();
            let filter = cri::PodSandboxFilter { label_selector: selector.clone(), ..Default::default() };
            let request = cri::ListPodSandboxRequest { filter: Some(filter) };
            let found = call(rt, "ListPodSandbox", CALL, client.runtime.list_pod_sandbox(request)).await?.items.len();
            let filter = cri::ContainerFilter { label_selector: selector, ..Default::default() };
            let request = cri::ListContainersRequest { filter: Some(filter) };
            let found = (
                found,
                call(rt, "ListContainers", CALL, client.runtime.list_containers(request)).await?.containers.len(),
            );
            s.list_one.push(t.elapsed());
            if found != (1, 1) {
                return Err(format!("{}: one pod listed by its uid label: {found:?} (pods, containers)", rt.short()));
            }
        }
        for pod in &sample {
            let t = Instant::now();
            stop_remove(rt, &mut client, pod).await?;
            s.stop_remove.push(t.elapsed());
        }
        // The floor with this runtime's pods running (units loaded in PID 1), after the sample's
        // pods are gone.
        s.floor = crate::lifecycle::systemd_run_floor(setup, options.sample, &format!("{tag}{}", s.pods))?;
        eprintln!(
            "bench: density: {}: at {} pods: RunPodSandbox {}, Create+Start {}, ExecSync {}, Stop+Remove {}, floor {}; {}/pod",
            rt.short(),
            s.pods,
            p50_p99(&s.run_pod),
            p50_p99(&s.create_start),
            p50_p99(&s.exec),
            p50_p99(&s.stop_remove),
            p50_p99(&s.floor),
            signed_mib(s.memory_per_pod_kib())
        );
        m.steps.push(s);
    }

    let t = Instant::now();
    bring_down(rt, &clients, pods.into_iter().map(|(pod, _)| pod).collect()).await?;
    m.down = t.elapsed();
    expect_running(rt, &mut client, 0, CALL).await?;
    Ok(m)
}

/// P clients bring pods `from..to` up; returns their (pod, container) ids.
async fn bring_up(
    rt: &Runtime,
    clients: &[CriClient],
    image: &str,
    tag: &str,
    from: usize,
    to: usize,
) -> Result<Vec<(String, String)>, String> {
    let next = Arc::new(AtomicUsize::new(from));
    let mut tasks = tokio::task::JoinSet::new();
    for c in clients {
        let (mut c, rt, next, image, tag) = (c.clone(), rt.clone(), next.clone(), image.to_owned(), tag.to_owned());
        tasks.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return Ok::<_, String>(ids);
                }
                let config = pod_config(&tag, i, false);
                let pod = run_pod(&rt, &mut c, &config).await?;
                let container = create_start(&rt, &mut c, &pod, &config, &image).await?;
                ids.push((pod, container));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.extend(result.map_err(|e| format!("client task: {e}"))??);
    }
    Ok(all)
}

async fn bring_down(rt: &Runtime, clients: &[CriClient], pods: Vec<String>) -> Result<(), String> {
    let pods = Arc::new(std::sync::Mutex::new(pods));
    let mut tasks = tokio::task::JoinSet::new();
    for c in clients {
        let (mut c, rt, pods) = (c.clone(), rt.clone(), pods.clone());
        tasks.spawn(async move {
            loop {
                let Some(pod) = pods.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    return Ok::<_, String>(());
                };
                stop_remove(&rt, &mut c, &pod).await?;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| format!("client task: {e}"))??;
    }
    Ok(())
}

/// Which samples of a step a line shows.
type SamplesOf = fn(&Step) -> &Vec<Duration>;

/// The plot's lines: per runtime and call, (pods running, p50 in ms).
fn series(results: &[(Runtime, Measured)]) -> Vec<crate::plot::Series> {
    let mut out = Vec::new();
    for (rt, m) in results {
        let calls: [(&str, SamplesOf); 6] = [
            ("RunPodSandbox", |s| &s.run_pod),
            ("Create+Start", |s| &s.create_start),
            ("ExecSync", |s| &s.exec),
            ("Stop+Remove", |s| &s.stop_remove),
            ("lists by uid", |s| &s.list_one),
            ("systemd-run floor", |s| &s.floor),
        ];
        for (i, (call, samples)) in calls.into_iter().enumerate() {
            let points = m
                .steps
                .iter()
                .filter_map(|s| Some((s.pods as f64, percentile(samples(s), 50.0)?.as_secs_f64() * 1000.0)))
                .collect();
            out.push(crate::plot::Series {
                label: format!("{} {call}", rt.short()),
                runtime: if rt.kind == Kind::CriSystemd { 0 } else { 1 },
                call: i,
                points,
            });
        }
    }
    out
}

/// KiB as MiB, with a sign when negative (memory given back).
pub fn signed_mib(kib: i64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `b / a` as "1.23x", or "-".
pub fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !a.is_zero() => format!("{:.2}x", b.as_secs_f64() / a.as_secs_f64()),
        _ => "-".into(),
    }
}

fn render(options: &Options, results: &[(Runtime, Measured)], load: &str, limits: &str) -> String {
    let steps = options.effective_steps();
    let mut header = vec!["".to_owned()];
    for (rt, _) in results {
        for s in &steps {
            header.push(format!("{} @{s}", rt.short()));
        }
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = Table::new(
        format!(
            "Density: up to {} pods x 1 container (busybox sleep), hostNetwork; at each step {} pods created and removed, {} ExecSync",
            options.pods, options.sample, options.execs
        ),
        &header,
    );
    let row = |label: &str, f: &dyn Fn(&Step) -> String| {
        let mut cells = vec![label.to_owned()];
        for (_, m) in results {
            for s in &steps {
                cells.push(m.steps.iter().find(|x| x.pods == *s).map(f).unwrap_or_else(|| "-".into()));
            }
        }
        cells
    };
    t.row(row("RunPodSandbox           p50 / p99", &|s| p50_p99(&s.run_pod)));
    t.row(row("Create+StartContainer   p50 / p99", &|s| p50_p99(&s.create_start)));
    t.row(row("ExecSync /bin/true      p50 / p99", &|s| p50_p99(&s.exec)));
    t.row(row("StopPodSandbox+Remove   p50 / p99", &|s| p50_p99(&s.stop_remove)));
    t.row(row("one pod's lists by uid  p50 / p99", &|s| p50_p99(&s.list_one)));
    t.row(row("floor: bare systemd-run p50 / p99", &|s| p50_p99(&s.floor)));
    t.row(row("  pod + container p50 / floor p50", &|s| {
        let both: Vec<Duration> = s.run_pod.iter().zip(&s.create_start).map(|(a, b)| *a + *b).collect();
        ratio(percentile(&s.floor, 50.0), percentile(&both, 50.0))
    }));
    t.row(row("node memory per pod (outside containers)", &|s| signed_mib(s.memory_per_pod_kib())));
    t.row(row("MemAvailable drop per pod", &|s| signed_mib(s.mem_available_drop_kib / s.pods as i64)));
    t.row(row("containers' own memory per pod", &|s| mib(s.containers_memory_kib / s.pods as u64)));
    t.row(row("systemd (PID 1) RSS", &|s| mib(s.pid1_rss_kib)));
    t.row(row("systemd (PID 1) CPU since 0 pods", &|s| secs(s.pid1_cpu)));
    t.row(row("daemon PSS (containerd: + shims)", &|s| mib(s.daemon_pss_kib)));
    t.row(row("daemon CPU since 0 pods", &|s| secs(s.daemon_cpu)));
    t.row(row("daemon open fds / threads", &|s| format!("{} / {}", s.daemon_fds, s.daemon_threads)));
    t.row(row("systemd (PID 1) open fds", &|s| s.pid1_fds.to_string()));
    t.row(row("node CPU since 0 pods", &|s| secs(s.node_cpu)));
    t.row(row("load average (1 min)", &|s| s.load.clone()));

    for (rt, m) in results {
        let first = m.steps.first();
        let last = m.steps.last();
        let p50 = |s: Option<&Step>, f: fn(&Step) -> &Vec<Duration>| s.and_then(|s| percentile(f(s), 50.0));
        t.note(format!(
            "{}: {} pods up in {} by {} clients ({:.1} pods/s), down in {}; p50 at {} pods / at {}: RunPodSandbox {}, Create+Start {}, the bare systemd-run floor {}",
            rt.short(),
            options.pods,
            secs(m.up.as_secs_f64()),
            options.parallel,
            options.pods as f64 / m.up.as_secs_f64().max(1e-9),
            secs(m.down.as_secs_f64()),
            last.map(|s| s.pods).unwrap_or(0),
            first.map(|s| s.pods).unwrap_or(0),
            ratio(p50(first, |s| &s.run_pod), p50(last, |s| &s.run_pod)),
            ratio(p50(first, |s| &s.create_start), p50(last, |s| &s.create_start)),
            ratio(p50(first, |s| &s.floor), p50(last, |s| &s.floor)),
        ));
    }
    if let [(a, ma), (b, mb)] = results
        && let (Some(sa), Some(sb)) = (ma.steps.last(), mb.steps.last())
    {
        let (pa, pb) = (sa.memory_per_pod_kib(), sb.memory_per_pod_kib());
        t.note(format!(
            "node memory per pod at {} pods: {} {} vs {} {} ({:.3} of it)",
            sa.pods,
            a.short(),
            signed_mib(pa),
            b.short(),
            signed_mib(pb),
            pa as f64 / pb.max(1) as f64
        ));
    }
    t.note("node memory: the node's memory cgroup (everything in it: daemon, shims, pause, systemd, journal, page cache of the runtime's files) since before the first pod, less what the containers' own cgroups were charged, divided by the pods running");
    t.note("MemAvailable: the machine's (the node shares its kernel, so kernel memory per pod counts here): noisy when other work runs");
    t.note("floor: the sample's count of `systemd-run -p Type=exec --slice=<a slice beside the pods'> /bin/busybox sleep`, timed by bash in the node, after the sample's pods are removed: systemd's own cost per start with the step's units loaded");
    t.note("one pod's lists: ListPodSandbox + ListContainers with the label selector io.kubernetes.pod.uid=<a running pod's>, as the kubelet at each pod status sync");
    t.note(format!(
        "latency samples per step: {} pods one after the other from one client while the step's pods run; p99 of {} samples is near their maximum",
        options.sample, options.sample
    ));
    t.note("containerd: containerd 1.6 + runc, a shim and a pause (busybox sleep) per pod; its daemon PSS/CPU includes the shims (PSS: shared pages divided among the processes that map them)");
    t.note(limits);
    for (rt, _) in results {
        t.note(format!("{}: {}", rt.short(), rt.label));
    }
    t.note(crate::machine_note(load));
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_ascending_positive_counts() {
        assert_eq!(parse_steps("10,100,500,1000"), Ok(vec![10, 100, 500, 1000]));
        assert_eq!(parse_steps(" 5, 50"), Ok(vec![5, 50]));
        assert!(parse_steps("10,10").unwrap_err().contains("ascending"));
        assert!(parse_steps("100,10").unwrap_err().contains("ascending"));
        assert!(parse_steps("0,10").unwrap_err().contains("\"0\""));
        assert!(parse_steps("10,x").unwrap_err().contains("\"x\""));
        assert!(parse_steps("").is_err());
    }

    #[test]
    fn effective_steps_stop_at_the_pod_count_and_end_with_it() {
        let o = |pods, steps: &[usize]| Options { pods, steps: steps.to_vec(), ..Default::default() };
        assert_eq!(o(1000, &DEFAULT_STEPS).effective_steps(), vec![10, 100, 500, 1000]);
        assert_eq!(o(200, &DEFAULT_STEPS).effective_steps(), vec![10, 100, 200]);
        assert_eq!(o(5, &DEFAULT_STEPS).effective_steps(), vec![5]);
        assert_eq!(o(100, &[10, 50, 100]).effective_steps(), vec![10, 50, 100]);
    }

    #[test]
    fn memory_per_pod_leaves_out_the_containers() {
        let s = Step { pods: 10, node_memory_kib: 3000, containers_memory_kib: 1000, ..Default::default() };
        assert_eq!(s.memory_per_pod_kib(), 200);
    }

    #[test]
    fn ratio_of_latencies() {
        let d = Duration::from_millis;
        assert_eq!(ratio(Some(d(10)), Some(d(15))), "1.50x");
        assert_eq!(ratio(None, Some(d(15))), "-");
        assert_eq!(ratio(Some(Duration::ZERO), Some(d(1))), "-");
    }
}
