//! The pull benchmark (issue 3): a ~200 MB image of several gzip layers (busybox plus generated
//! files: compressible text with some incompressible "binaries"), pulled and unpacked from the
//! registry in the node by
//! - cri-systemd: CRI PullImage;
//! - containerd: CRI PullImage (pull + unpack into the overlayfs snapshotter, namespace k8s.io);
//! - containerd: `ctr images pull --plain-http` (namespace bench; the client fetches, the daemon
//!   stores and unpacks).
//!
//! Each measured pull starts from an empty store: the image is removed and garbage-collected
//! after each run and the store's blob and layer/snapshot directories are checked to be empty.
//! Then the same pull again with everything present (what is left is the manifest round trip).
//! Methods take turns within each run; the table shows medians over the runs.
//! `--parallel P` splits the image's data into P distinct images (own layers, the busybox layer
//! shared) pulled at once, each method's P pulls concurrently.
//!
//! Both stores are on the node's state directory, by default a fresh journaled ext4 in an image
//! file (`e2e/node up --state-ext4`), as a production node's /var/lib would be; `--fs host` keeps
//! it a directory of the host's root file system (the test VMs' is ext4 without a journal: there
//! every file created shortly after a delete makes ext4 scan past the recently freed inodes,
//! which the delete-then-pull loop here turns into seconds of system CPU per pull).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::Node;
use e2e::cri;
use e2e::oci::{Compression, ConfigOptions, Image, LayerBuilder};

use crate::procs;
use crate::runtimes::{CONTAINERD_ROOT, CONTAINERD_SOCKET, Kind, Runtime, ctr};
use crate::table::{Table, median_f64, mib, ms};
use crate::{Only, Setup, busybox_layer, call, image_spec};

#[derive(Debug, Clone)]
pub struct Options {
    pub runs: usize,
    pub size_mb: usize,
    pub layers: usize,
    /// Distinct images pulled at once (the size is split between them).
    pub parallel: usize,
    pub only: Only,
    /// Where the stores are: a fresh journaled ext4 (default) or the host's file system.
    pub fs: StoreFs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFs {
    /// A fresh ext4 with a journal (mkfs.ext4 defaults) in an image file, loop-mounted.
    Journaled,
    /// The node directory on the host's own file system.
    Host,
}

impl StoreFs {
    pub fn parse(value: &str) -> Result<StoreFs, String> {
        match value {
            "journaled" => Ok(StoreFs::Journaled),
            "host" => Ok(StoreFs::Host),
            other => Err(format!("--fs: want journaled or host, got {other:?}")),
        }
    }
}

/// The journaled ext4's size: sparse, only what the stores write takes space.
const STATE_EXT4_SIZE: &str = "16G";

impl Default for Options {
    fn default() -> Self {
        Options { runs: 5, size_mb: 200, layers: 4, parallel: 1, only: Only::Both, fs: StoreFs::Journaled }
    }
}

const PULL_LIMIT: Duration = Duration::from_secs(600);
const BIG_REPO: &str = "bench/big";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    CriSystemd,
    ContainerdCri,
    Ctr,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::CriSystemd => "cri-systemd, CRI PullImage",
            Method::ContainerdCri => "containerd, CRI PullImage",
            Method::Ctr => "containerd, ctr images pull",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Method::CriSystemd => Kind::CriSystemd,
            Method::ContainerdCri | Method::Ctr => Kind::Containerd,
        }
    }
}

/// One pull's numbers.
#[derive(Debug, Default, Clone)]
struct Sample {
    seconds: f64,
    daemon_peak_kib: u64,
    daemon_cpu: f64,
    /// ctr's own peak RSS and CPU (the client does the downloading).
    client_peak_kib: u64,
    client_cpu: f64,
    repull_seconds: f64,
}

/// The generated image and what it holds.
pub(crate) struct Big {
    pub image: Image,
    pub unpacked_bytes: u64,
    pub compressed_bytes: u64,
    pub files: usize,
}

pub async fn run(options: Options) -> Result<(), String> {
    let load = crate::load_average();
    let parallel = options.parallel;
    eprintln!(
        "bench: building {parallel} test image(s) of {} MB in all, {} data layers each",
        options.size_mb, options.layers
    );
    let t = Instant::now();
    let bigs: Vec<Big> = (0..parallel)
        .map(|k| big_image_seeded(options.size_mb / parallel, options.layers, k * options.layers))
        .collect();
    let (files, unpacked_bytes, compressed_bytes) = (
        bigs.iter().map(|b| b.files).sum::<usize>(),
        bigs.iter().map(|b| b.unpacked_bytes).sum::<u64>(),
        bigs.iter().map(|b| b.compressed_bytes).sum::<u64>(),
    );
    eprintln!(
        "bench: built in {:.1} s: {files} files, {:.1} MB unpacked, {:.1} MB compressed",
        t.elapsed().as_secs_f64(),
        unpacked_bytes as f64 / 1e6,
        compressed_bytes as f64 / 1e6
    );

    let state_ext4 = (options.fs == StoreFs::Journaled).then_some(STATE_EXT4_SIZE);
    let setup = Setup::boot_with("bench-pull", options.only, state_ext4).await?;
    let registry = setup.registry();
    let references: Vec<String> = bigs
        .into_iter()
        .enumerate()
        .map(|(k, big)| registry.push_image(BIG_REPO, &(k + 1).to_string(), &big.image))
        .collect();
    let node_dir = setup.node.dir();
    let store_fs = crate::file_system_note(&node_dir.join("state"));
    eprintln!("bench: stores on {store_fs}");

    let methods: Vec<Method> = [Method::CriSystemd, Method::ContainerdCri, Method::Ctr]
        .into_iter()
        .filter(|m| options.only.wants(m.kind()))
        .collect();
    let mut samples: Vec<(Method, Vec<Sample>)> = methods.iter().map(|m| (*m, Vec::new())).collect();
    let mut store_kib: Vec<(Method, u64)> = Vec::new();
    for run in 0..options.runs {
        for k in 0..methods.len() {
            let method = methods[(run + k) % methods.len()];
            let rt = setup.runtimes.iter().find(|rt| rt.kind == method.kind()).expect("runtime of the method");
            expect_empty(method, &node_dir).await?;
            eprintln!("bench: run {}/{}: {}", run + 1, options.runs, method.label());
            let sample = pull_once(&setup, rt, method, &references).await?;
            if run == 0 {
                store_kib.push((method, disk_kib(&store_dir(method, &node_dir))));
            }
            for reference in &references {
                remove(&setup.node, rt, method, reference).await?;
            }
            expect_empty(method, &node_dir).await?;
            samples.iter_mut().find(|(m, _)| *m == method).expect("method").1.push(sample);
        }
    }
    drop(registry);

    let mut t = Table::new(
        format!(
            "Image pull: {}{} layers (gzip), {:.1} MB unpacked in {} files, {:.1} MB compressed; median of {} runs, empty store each",
            if parallel > 1 { format!("{parallel} images pulled at once, ") } else { String::new() },
            if parallel > 1 { format!("{} + 1 shared", options.layers) } else { (options.layers + 1).to_string() },
            unpacked_bytes as f64 / 1e6,
            files,
            compressed_bytes as f64 / 1e6,
            options.runs
        ),
        &[
            "",
            "pull+unpack (min-max)",
            "MB/s compr.",
            "MB/s unpacked",
            "daemon peak RSS",
            "daemon CPU",
            "re-pull (present)",
            "store on disk",
        ],
    );
    for (method, s) in &samples {
        let med = |f: &dyn Fn(&Sample) -> f64| median_f64(&s.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
        let seconds = med(&|x| x.seconds);
        let mut peak = mib(med(&|x| x.daemon_peak_kib as f64) as u64);
        let mut cpu = format!("{:.2} s", med(&|x| x.daemon_cpu));
        if *method == Method::Ctr {
            peak = format!("{peak} + ctr {}", mib(med(&|x| x.client_peak_kib as f64) as u64));
            cpu = format!("{cpu} + ctr {:.2} s", med(&|x| x.client_cpu));
        }
        let disk = store_kib
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, k)| format!("{:.1} MB", *k as f64 * 1024.0 / 1e6))
            .unwrap_or_default();
        t.row(vec![
            method.label().to_owned(),
            {
                let all: Vec<f64> = s.iter().map(|x| x.seconds).collect();
                let (lo, hi) = all.iter().fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
                if all.len() > 1 { format!("{seconds:.2} s ({lo:.2}-{hi:.2})") } else { format!("{seconds:.2} s") }
            },
            format!("{:.1}", compressed_bytes as f64 / 1e6 / seconds),
            format!("{:.1}", unpacked_bytes as f64 / 1e6 / seconds),
            peak,
            cpu,
            ms(Duration::from_secs_f64(med(&|x| x.repull_seconds))),
            disk,
        ]);
    }
    for rt in &setup.runtimes {
        t.note(format!("{}: {}", rt.short(), rt.label));
    }
    t.note("MB = 10^6 bytes; MB/s = image bytes / wall time of the pull call (registry on the node's loopback)");
    t.note(format!("both runtimes' stores (the node's /var/lib/cri-systemd): {store_fs}"));
    t.note("daemon peak RSS: VmHWM of the daemon process during the pull (reset before each pull); CPU: user+sys of the daemon during the pull");
    t.note("ctr: the client downloads and streams content to the daemon, which unpacks; its own peak RSS and CPU are shown after the +");
    t.note("re-pull: the same pull again with the image present; store on disk: blobs + unpacked layers/snapshots after the first pull");
    t.note(format!(
        "per run, the methods take turns (starting one later each run); `sync` before each pull; runs: {}",
        options.runs
    ));
    t.note(crate::machine_note(&load));
    print!("{}", t.render());
    Ok(())
}

/// One cold pull of every reference (at once) and one re-pull, with the daemon's peak RSS and CPU
/// during the cold one; ctr's peak is the largest of its clients', its CPU their sum.
async fn pull_once(setup: &Setup, rt: &Runtime, method: Method, references: &[String]) -> Result<Sample, String> {
    let _ = std::process::Command::new("sync").status();
    let mut sample = Sample::default();
    procs::reset_peak(rt.daemon_pid)?;
    let cpu0 = procs::cpu_seconds(rt.daemon_pid).unwrap_or(0.0);
    let t = Instant::now();
    let (peak, cpu) = pull_all(setup, rt, method, references).await?;
    (sample.client_peak_kib, sample.client_cpu) = (peak, cpu);
    sample.seconds = t.elapsed().as_secs_f64();
    sample.daemon_peak_kib = procs::status_kib(rt.daemon_pid, "VmHWM").unwrap_or(0);
    sample.daemon_cpu = procs::cpu_seconds(rt.daemon_pid).unwrap_or(0.0) - cpu0;

    let t = Instant::now();
    pull_all(setup, rt, method, references).await?;
    sample.repull_seconds = t.elapsed().as_secs_f64();
    Ok(sample)
}

/// Pulls every reference at once; for ctr, returns its clients' largest peak RSS and CPU sum.
async fn pull_all(setup: &Setup, rt: &Runtime, method: Method, references: &[String]) -> Result<(u64, f64), String> {
    match method {
        Method::CriSystemd | Method::ContainerdCri => {
            let pulls = references.iter().map(|reference| cri_pull(rt, reference));
            futures_util::future::try_join_all(pulls).await?;
            Ok((0, 0.0))
        }
        Method::Ctr => {
            let pid1 = setup.pid1;
            let clients: Vec<_> = references
                .iter()
                .map(|reference| {
                    let reference = reference.clone();
                    std::thread::spawn(move || ctr_pull(pid1, &reference))
                })
                .collect();
            let (mut peak, mut cpu) = (0, 0.0);
            for client in clients {
                let (p, c) = client.join().map_err(|_| "ctr thread panicked".to_owned())??;
                (peak, cpu) = (peak.max(p), cpu + c);
            }
            Ok((peak, cpu))
        }
    }
}

async fn cri_pull(rt: &Runtime, reference: &str) -> Result<(), String> {
    let mut client = rt.client().await?;
    let request = cri::PullImageRequest { image: image_spec(reference), ..Default::default() };
    call(rt, &format!("PullImage {reference}"), PULL_LIMIT, client.image.pull_image(request)).await?;
    Ok(())
}

/// `ctr -n bench images pull --plain-http` in the node's mount and network namespaces, under
/// /usr/bin/time for the client's peak RSS and CPU. Returns (peak KiB, CPU seconds).
fn ctr_pull(pid1: u32, reference: &str) -> Result<(u64, f64), String> {
    let output = std::process::Command::new("nsenter")
        .args(["-t", &pid1.to_string(), "-m", "-n", "--", "/usr/bin/time", "-f", "BENCH-TIME %M %U %S"])
        .args(["ctr", "--address", CONTAINERD_SOCKET, "-n", "bench", "images", "pull", "--plain-http", reference])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nsenter ... ctr: {e} (is /usr/bin/time installed? Debian package `time`)"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "ctr images pull {reference} failed ({}):\n{}{stderr}",
            output.status,
            String::from_utf8_lossy(&output.stdout)
        ));
    }
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("BENCH-TIME "))
        .ok_or_else(|| format!("no /usr/bin/time output: {stderr}"))?;
    let fields: Vec<f64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    match fields[..] {
        [peak, user, sys] => Ok((peak as u64, user + sys)),
        _ => Err(format!("odd /usr/bin/time output {line:?}")),
    }
}

/// Removes the image the way the method's user would (the caller then waits for garbage
/// collection to empty the store).
async fn remove(node: &Node, rt: &Runtime, method: Method, reference: &str) -> Result<(), String> {
    match method {
        Method::CriSystemd | Method::ContainerdCri => {
            let mut client = rt.client().await?;
            let request = cri::RemoveImageRequest { image: image_spec(reference) };
            call(rt, "RemoveImage", Duration::from_secs(120), client.image.remove_image(request)).await?;
        }
        Method::Ctr => {
            let run = ctr(node, &["-n", "bench", "images", "rm", "--sync", reference]);
            if !run.success() {
                return Err(format!("ctr images rm {reference}: {}{}", run.stdout, run.stderr));
            }
        }
    }
    Ok(())
}

/// The directories that must be empty before a cold pull: blobs and unpacked layers.
fn content_dirs(method: Method, node_dir: &Path) -> Vec<PathBuf> {
    let state = node_dir.join("state");
    match method.kind() {
        Kind::CriSystemd => vec![state.join("images/blobs/sha256"), state.join("images/layers/sha256")],
        Kind::Containerd => {
            let root = state.join(CONTAINERD_ROOT.trim_start_matches("/var/lib/cri-systemd/"));
            vec![
                root.join("io.containerd.content.v1.content/blobs/sha256"),
                root.join("io.containerd.snapshotter.v1.overlayfs/snapshots"),
            ]
        }
    }
}

fn store_dir(method: Method, node_dir: &Path) -> PathBuf {
    let state = node_dir.join("state");
    match method.kind() {
        Kind::CriSystemd => state.join("images"),
        Kind::Containerd => state.join(CONTAINERD_ROOT.trim_start_matches("/var/lib/cri-systemd/")),
    }
}

async fn expect_empty(method: Method, node_dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<String> = content_dirs(method, node_dir)
            .iter()
            .filter_map(|dir| {
                let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
                (n > 0).then(|| format!("{} ({n} entries)", dir.display()))
            })
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{}: store not empty after removing the image: {}", method.label(), left.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Disk usage (allocated blocks) of a tree, in KiB.
fn disk_kib(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
            continue;
        }
        total += meta.blocks() * 512 / 1024;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

// ---- the image ----------------------------------------------------------------------------

/// splitmix64: a fixed-seed generator, so the image is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A file's contents: 95% of files are text from a 1024-word vocabulary (compresses about 2.8:1
/// with gzip, like sources, scripts and docs), 5% random bytes (like compressed data, which gzip
/// cannot shrink). The image as a whole compresses about 2.5:1, like a typical distro image.
fn file_data(rng: &mut Rng, words: &[Vec<u8>], size: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size + 16);
    if rng.below(20) == 0 {
        while data.len() < size {
            data.extend_from_slice(&rng.next().to_le_bytes());
        }
    } else {
        while data.len() < size {
            let r = rng.next();
            data.extend_from_slice(&words[(r & 1023) as usize]);
            data.push(if (r >> 10).is_multiple_of(12) { b'\n' } else { b' ' });
        }
    }
    data.truncate(size);
    data
}

/// File sizes like a distribution's: mostly small, some medium, a few large (mean ~33 KB).
fn file_size(rng: &mut Rng) -> usize {
    match rng.below(1000) {
        0..900 => 512 + rng.below(16 << 10) as usize,
        900..995 => (16 << 10) + rng.below(240 << 10) as usize,
        _ => (1 << 20) + rng.below(3 << 20) as usize,
    }
}

fn data_layer(index: usize, bytes: usize) -> (e2e::oci::Layer, u64, usize) {
    let mut rng = Rng(0x5eed_0000 + index as u64);
    let words: Vec<Vec<u8>> = (0..1024)
        .map(|_| {
            let len = 2 + rng.below(10) as usize;
            (0..len).map(|_| b'a' + rng.below(26) as u8).collect()
        })
        .collect();
    let mut layer = LayerBuilder::new();
    let top = format!("usr/share/bench{index}");
    layer.dir("usr", 0o755).dir("usr/share", 0o755).dir(&top, 0o755);
    let (mut total, mut files, mut dir) = (0usize, 0usize, 0usize);
    while total < bytes {
        if files.is_multiple_of(100) {
            dir = files / 100;
            layer.dir(&format!("{top}/d{dir:03}"), 0o755);
        }
        let size = file_size(&mut rng).min(bytes - total).max(1);
        let data = file_data(&mut rng, &words, size);
        layer.file(&format!("{top}/d{dir:03}/f{files:05}"), 0o644, &data);
        total += size;
        files += 1;
    }
    let mut built = layer.build(Compression::Gzip);
    built.tar = Vec::new();
    (built, total as u64, files)
}

/// The busybox layer and `layers` data layers of `size_mb` MB in all, built on two threads.
pub(crate) fn big_image(size_mb: usize, layers: usize) -> Big {
    big_image_seeded(size_mb, layers, 0)
}

/// [`big_image`] with data layers from seeds `first_seed..`: distinct images for parallel pulls.
fn big_image_seeded(size_mb: usize, layers: usize, first_seed: usize) -> Big {
    let per_layer = size_mb * 1_000_000 / layers;
    let built: Vec<(e2e::oci::Layer, u64, usize)> = std::thread::scope(|scope| {
        let (evens, odds): (Vec<usize>, Vec<usize>) = (0..layers).partition(|i| i % 2 == 0);
        let layer = move |i: usize| (i, data_layer(first_seed + i, per_layer));
        let a = scope.spawn(move || evens.into_iter().map(layer).collect::<Vec<_>>());
        let b = scope.spawn(move || odds.into_iter().map(layer).collect::<Vec<_>>());
        let mut all: Vec<_> =
            a.join().expect("layer thread").into_iter().chain(b.join().expect("layer thread")).collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, l)| l).collect()
    });
    let busybox = busybox_layer();
    let busybox_bytes = e2e::oci::busybox_binary().len() as u64;
    let mut all = vec![busybox];
    let (mut unpacked, mut files) = (busybox_bytes + 32, 8);
    for (layer, bytes, n) in built {
        all.push(layer);
        unpacked += bytes;
        files += n;
    }
    let image = Image::new(all, ConfigOptions::default());
    let compressed_bytes = image.layers.iter().map(|l| l.blob.data.len() as u64).sum();
    Big { image, unpacked_bytes: unpacked, compressed_bytes, files }
}
