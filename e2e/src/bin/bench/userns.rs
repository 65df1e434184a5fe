//! The user-namespace benchmark (issue 5): what a pod in a user namespace of its own costs at
//! start (`namespace_options.userns_options` mode POD, the kubelet's `hostUsers: false`) against
//! the same pod without one (mode NODE), on a small image (busybox) and on a ~200 MB image of
//! thousands of files, in one node and one run. cri-systemd only: containerd 1.6 has no user
//! namespaces for pods.
//!
//! Image layers are stored in the foreign UID range in both modes and idmapped at each start (to
//! 0..65535 without a user namespace, to the pod's range with one): no start copies or chowns a
//! file, so neither mode should grow with the image. Each run times, for the four combinations
//! in turn (the order rotates from run to run), RunPodSandbox and CreateContainer+StartContainer
//! (StartContainer returns once the entrypoint was exec'd); the pod is then stopped and removed,
//! untimed. One untimed warm-up run first, which also checks that the POD pods got a user
//! namespace and the NODE pods none.

use std::time::{Duration, Instant};

use e2e::cri;

use crate::lifecycle::{create_start, pod_config, run_pod, stop_remove};
use crate::runtimes::{Kind, Runtime};
use crate::table::{Table, ms};
use crate::{BUSYBOX_REPO, Only, Setup, call, image_ref, image_spec};

#[derive(Debug, Clone)]
pub struct Options {
    pub runs: usize,
    pub size_mb: usize,
    pub layers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { runs: 101, size_mb: 200, layers: 4 }
    }
}

const BIG_REPO: &str = "bench/big-userns";
const CALL: Duration = Duration::from_secs(120);

/// One image of the comparison.
struct Subject {
    label: String,
    image: String,
}

/// The samples of one image in one mode.
#[derive(Debug, Default)]
struct Samples {
    run_pod: Vec<Duration>,
    create_start: Vec<Duration>,
    total: Vec<Duration>,
}

pub async fn run(options: Options) -> Result<(), String> {
    let load = crate::load_average();
    eprintln!("bench: building a {} MB test image of {} data layers", options.size_mb, options.layers);
    let big = crate::pull::big_image(options.size_mb, options.layers);
    let big_label =
        format!("{} layers, {:.0} MB, {} files", big.image.layers.len(), big.unpacked_bytes as f64 / 1e6, big.files);
    let setup = Setup::boot("bench-userns", Only::One(Kind::CriSystemd)).await?;
    let rt = setup.runtimes.first().ok_or("no cri-systemd in the node")?;
    let registry = setup.registry();
    let big_ref = registry.push_image(BIG_REPO, "1", &big.image);
    drop(big);
    let subjects = [
        Subject {
            label: format!("busybox (1 layer, {:.1} MB)", e2e::oci::busybox_binary().len() as f64 / 1e6),
            image: image_ref(&format!("{BUSYBOX_REPO}:1")),
        },
        Subject { label: format!("big ({big_label})"), image: big_ref },
    ];
    let mut client = rt.client().await?;
    for subject in &subjects {
        eprintln!("bench: pulling {}", subject.image);
        let request = cri::PullImageRequest { image: image_spec(&subject.image), ..Default::default() };
        call(rt, "PullImage", Duration::from_secs(600), client.image.pull_image(request)).await?;
    }

    // (subject, userns) in a fixed order; runs rotate through it.
    let combos: Vec<(usize, bool)> = vec![(0, false), (0, true), (1, false), (1, true)];
    let mut samples: Vec<Samples> = combos.iter().map(|_| Samples::default()).collect();
    let mut n = 0;
    for run in 0..=options.runs {
        if run == 0 {
            eprintln!("bench: warm-up run");
        } else {
            eprintln!("bench: run {}/{}", run, options.runs);
        }
        for k in 0..combos.len() {
            let c = (run + k) % combos.len();
            let (subject, userns) = combos[c];
            n += 1;
            let config = userns_pod_config(n, userns);
            let begin = Instant::now();
            let pod = run_pod(rt, &mut client, &config).await?;
            let created = Instant::now();
            create_start(rt, &mut client, &pod, &config, &subjects[subject].image).await?;
            let end = Instant::now();
            if run == 0 {
                check_userns(rt, &mut client, &pod, userns).await?;
            } else {
                samples[c].run_pod.push(created - begin);
                samples[c].create_start.push(end - created);
                samples[c].total.push(end - begin);
            }
            stop_remove(rt, &mut client, &pod).await?;
        }
    }
    println!("{}", render(&options, rt, &subjects, &combos, &samples, &load).render());
    Ok(())
}

/// A pod of the lifecycle benchmark on a network namespace of its own (a user namespace needs
/// one; no CNI config in the node: loopback only, the same in both modes), with or without a
/// user namespace.
fn userns_pod_config(i: usize, userns: bool) -> cri::PodSandboxConfig {
    let mut config = pod_config("userns", i, true);
    let mode = if userns { cri::NamespaceMode::Pod } else { cri::NamespaceMode::Node };
    if let Some(options) =
        config.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut())
    {
        options.userns_options = Some(cri::UserNamespace { mode: mode as i32, ..Default::default() });
    }
    config
}

/// The pod has a user namespace with a mapping (mode POD) or none (mode NODE), as asked.
async fn check_userns(rt: &Runtime, client: &mut e2e::CriClient, pod: &str, userns: bool) -> Result<(), String> {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: false };
    let status = call(rt, "PodSandboxStatus", CALL, client.runtime.pod_sandbox_status(request)).await?;
    let options = status
        .status
        .and_then(|s| s.linux)
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .and_then(|o| o.userns_options)
        .unwrap_or_default();
    let has = options.mode == cri::NamespaceMode::Pod as i32 && !options.uids.is_empty();
    if has != userns {
        return Err(format!("pod {pod}: user namespace {options:?}, wanted {}", if userns { "POD" } else { "NODE" }));
    }
    Ok(())
}

/// Median and range of the samples: "12.3 ms (10.1-15.0)".
fn median_range(samples: &[Duration]) -> String {
    median(samples).map_or("-".into(), |m| {
        let (lo, hi) = (samples.iter().min().unwrap(), samples.iter().max().unwrap());
        format!("{} ({:.1}-{:.1})", ms(m), lo.as_secs_f64() * 1e3, hi.as_secs_f64() * 1e3)
    })
}

fn median(samples: &[Duration]) -> Option<Duration> {
    crate::table::median_f64(&samples.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
        .map(Duration::from_secs_f64)
}

/// The median of the per-run differences `with[i] - without[i]` (samples of the same run), and
/// that in % of the median of `without`: drift of the machine's load between runs cancels out.
fn overhead(without: &[Duration], with: &[Duration]) -> String {
    let deltas: Vec<f64> = without.iter().zip(with).map(|(a, b)| b.as_secs_f64() - a.as_secs_f64()).collect();
    match (crate::table::median_f64(&deltas), median(without)) {
        (Some(delta), Some(base)) => format!("{:+.1} ms ({:+.0}%)", delta * 1e3, delta / base.as_secs_f64() * 100.0),
        _ => "-".into(),
    }
}

fn render(
    options: &Options,
    rt: &Runtime,
    subjects: &[Subject],
    combos: &[(usize, bool)],
    samples: &[Samples],
    load: &str,
) -> Table {
    let mut t = Table::new(
        format!(
            "Pod start with and without a user namespace ({}): RunPodSandbox + CreateContainer + StartContainer; median of {} runs (min-max, ms)",
            rt.label, options.runs
        ),
        &["", "RunPodSandbox", "Create+StartContainer", "pod + container", "userns overhead"],
    );
    for (c, (subject, userns)) in combos.iter().enumerate() {
        let s = &samples[c];
        let overhead = match combos.iter().position(|(sub, u)| sub == subject && !u) {
            Some(i) if *userns => overhead(&samples[i].total, &s.total),
            _ => String::new(),
        };
        t.row(vec![
            format!("{}, userns {}", subjects[*subject].label, if *userns { "POD" } else { "NODE" }),
            median_range(&s.run_pod),
            median_range(&s.create_start),
            median_range(&s.total),
            overhead,
        ]);
    }
    t.note("userns POD: a user namespace of the pod's own (65536 ids of the pool); NODE: none. Both: the pod's own network namespace (loopback only), container PID namespaces");
    t.note("layers stay in the foreign UID range on disk and are idmapped at every start in both modes: nothing is chowned or copied");
    t.note("userns overhead: median over the runs of (POD - NODE) of pod + container, the two measured in the same run; in % of NODE's median");
    t.note(crate::machine_note(load));
    t
}
