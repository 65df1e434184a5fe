//! `bench`: cri-systemd next to containerd, measured in the same run on the same machine, both
//! inside one throwaway test node (its own network namespace, nothing on the machine's own
//! interfaces), both driven over CRI by the same Rust client. Each subcommand prints one table.
//!
//! ```text
//! bench lifecycle [--pods N] [--parallel P] [--execs K] [--rounds R] [--network host|cni] [--only RUNTIME]
//! bench pull      [--runs R] [--size-mb M] [--layers L] [--parallel P] [--fs journaled|host] [--only RUNTIME]
//! bench userns    [--runs R] [--size-mb M] [--layers L]   (cri-systemd only)
//! bench measure   [--starts N] [--rounds R]   (cri-systemd only: measured starts off / log / TPM)
//! bench density   [--pods N] [--steps A,B,..] [--parallel P] [--sample S] [--execs K] [--plot FILE.png] [--only RUNTIME]
//! bench all       (lifecycle, lifecycle --network cni, pull, userns: each in its own node, default options)
//! ```
//!
//! Needs root, Debian's containerd, runc and docker-registry, and a release build of the daemon
//! (`target/release/cri-systemd`, or `CRI_SYSTEMD_BIN`). `scripts/bench` builds and runs it all.
//! `E2E_KEEP_NODES=1` keeps the node afterwards for inspection (`e2e/node down NAME` removes it).

mod density;
mod lifecycle;
mod measure;
mod plot;
mod procs;
mod pull;
mod runtimes;
mod table;
mod userns;

use std::process::ExitCode;
use std::time::Duration;

use e2e::oci::{Compression, ConfigOptions, Image, Layer, LayerBuilder, busybox_binary};
use e2e::registry::{NodeNet, Registry, RegistryOptions};
use e2e::{Node, NodeOptions, cri};

use runtimes::{Kind, Runtime};

pub const REGISTRY_PORT: u16 = 5000;

const USAGE: &str = "usage: bench lifecycle [--pods N] [--parallel P] [--execs K] [--rounds R] [--network host|cni] [--only cri-systemd|containerd]
       bench pull [--runs R] [--size-mb M] [--layers L] [--parallel P] [--fs journaled|host] [--only cri-systemd|containerd]
       bench userns [--runs R] [--size-mb M] [--layers L]
       bench measure [--starts N] [--rounds R]
       bench density [--pods N] [--steps 10,100,500,1000] [--parallel P] [--sample S] [--execs K] [--plot FILE.png] [--only cri-systemd|containerd]
       bench all";

/// Which runtimes to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    Both,
    One(Kind),
}

impl Only {
    pub fn wants(self, kind: Kind) -> bool {
        self == Only::Both || self == Only::One(kind)
    }
}

#[derive(Debug)]
enum Command {
    Lifecycle(lifecycle::Options),
    Pull(pull::Options),
    Userns(userns::Options),
    Measure(measure::Options),
    Density(density::Options),
    All,
}

fn parse(args: &[String]) -> Result<Command, String> {
    let Some((verb, rest)) = args.split_first() else { return Err(USAGE.into()) };
    let mut lifecycle = lifecycle::Options::default();
    let mut pull = pull::Options::default();
    let mut userns = userns::Options::default();
    let mut measure = measure::Options::default();
    let mut density = density::Options::default();
    let mut i = 0;
    let value = |i: usize| rest.get(i + 1).cloned().ok_or_else(|| format!("{} needs a value\n{USAGE}", rest[i]));
    let number = |i: usize| -> Result<usize, String> {
        let v = value(i)?;
        v.parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{}: want a positive number, got {v:?}", rest[i]))
    };
    while i < rest.len() {
        match (verb.as_str(), rest[i].as_str()) {
            ("lifecycle", "--pods") => lifecycle.pods = number(i)?,
            ("lifecycle", "--parallel") => lifecycle.parallel = number(i)?,
            ("lifecycle", "--execs") => lifecycle.execs = number(i)?,
            ("lifecycle", "--rounds") => lifecycle.rounds = number(i)?,
            ("lifecycle", "--network") => {
                lifecycle.cni = match value(i)?.as_str() {
                    "host" => false,
                    "cni" => true,
                    other => return Err(format!("--network: want host or cni, got {other:?}")),
                }
            }
            ("pull", "--runs") => pull.runs = number(i)?,
            ("pull", "--size-mb") => pull.size_mb = number(i)?,
            ("pull", "--layers") => pull.layers = number(i)?,
            ("pull", "--parallel") => pull.parallel = number(i)?,
            ("pull", "--fs") => pull.fs = pull::StoreFs::parse(&value(i)?)?,
            ("userns", "--runs") => userns.runs = number(i)?,
            ("userns", "--size-mb") => userns.size_mb = number(i)?,
            ("userns", "--layers") => userns.layers = number(i)?,
            ("measure", "--starts") => measure.starts = number(i)?,
            ("measure", "--rounds") => measure.rounds = number(i)?,
            ("density", "--pods") => density.pods = number(i)?,
            ("density", "--steps") => density.steps = density::parse_steps(&value(i)?)?,
            ("density", "--parallel") => density.parallel = number(i)?,
            ("density", "--sample") => density.sample = number(i)?,
            ("density", "--execs") => density.execs = number(i)?,
            ("density", "--plot") => density.plot = Some(value(i)?.into()),
            ("lifecycle" | "pull" | "density", "--only") => {
                let only = match value(i)?.as_str() {
                    "cri-systemd" => Only::One(Kind::CriSystemd),
                    "containerd" => Only::One(Kind::Containerd),
                    other => return Err(format!("--only: want cri-systemd or containerd, got {other:?}")),
                };
                lifecycle.only = only;
                pull.only = only;
                density.only = only;
            }
            ("-h" | "--help", _) | (_, "-h" | "--help") => return Err(USAGE.into()),
            (_, other) => return Err(format!("unknown argument {other:?} for {verb}\n{USAGE}")),
        }
        i += 2;
    }
    match verb.as_str() {
        "lifecycle" => Ok(Command::Lifecycle(lifecycle)),
        "pull" => Ok(Command::Pull(pull)),
        "userns" => Ok(Command::Userns(userns)),
        "measure" => Ok(Command::Measure(measure)),
        "density" => Ok(Command::Density(density)),
        "all" => Ok(Command::All),
        "-h" | "--help" => Err(USAGE.into()),
        other => Err(format!("unknown benchmark {other:?}\n{USAGE}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse(&args) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = daemon_binary() {
        eprintln!("bench: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        match command {
            Command::Lifecycle(options) => interruptible(lifecycle::run(options)).await,
            Command::Pull(options) => interruptible(pull::run(options)).await,
            Command::Userns(options) => interruptible(userns::run(options)).await,
            Command::Measure(options) => interruptible(measure::run(options)).await,
            Command::Density(options) => interruptible(density::run(options)).await,
            Command::All => {
                interruptible(lifecycle::run(lifecycle::Options::default())).await?;
                interruptible(lifecycle::run(lifecycle::Options { cni: true, ..Default::default() })).await?;
                interruptible(pull::run(pull::Options::default())).await?;
                interruptible(userns::run(userns::Options::default())).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a benchmark until it ends or Ctrl-C / SIGTERM; either way its node is dropped (and so
/// removed) before this returns.
async fn interruptible(work: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        _ = term.recv() => Err("terminated".into()),
    }
}

/// The node takes the daemon from CRI_SYSTEMD_BIN: default to the release build next to this
/// binary, and refuse to compare a debug build with containerd.
fn daemon_binary() -> Result<(), String> {
    let bin = match std::env::var_os("CRI_SYSTEMD_BIN") {
        Some(bin) => std::path::PathBuf::from(bin),
        None => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let bin = exe.with_file_name("cri-systemd");
            // SAFETY: set before the tokio runtime (or any other thread) starts.
            unsafe { std::env::set_var("CRI_SYSTEMD_BIN", &bin) };
            bin
        }
    };
    if !bin.is_file() {
        return Err(format!(
            "no daemon binary at {}: run `cargo build --release -p cri-server` (or set CRI_SYSTEMD_BIN)",
            bin.display()
        ));
    }
    if bin.components().any(|c| c.as_os_str() == "debug") && std::env::var_os("BENCH_ALLOW_DEBUG").is_none() {
        return Err(format!(
            "{} looks like a debug build: benchmark a release build (BENCH_ALLOW_DEBUG=1 to insist)",
            bin.display()
        ));
    }
    eprintln!("bench: daemon binary {}", bin.display());
    Ok(())
}

/// A node with cri-systemd (pulling plain HTTP from the node's registry), the registry, and
/// containerd started next to it, for the runtimes `only` selects.
#[derive(Debug)]
pub struct Setup {
    pub node: Node,
    pub pid1: u32,
    pub runtimes: Vec<Runtime>,
}

pub const BUSYBOX_REPO: &str = "bench/busybox";
pub const PAUSE_REPO: &str = "bench/pause";

/// The image reference of a repo:tag in the node's registry.
pub fn image_ref(repo_tag: &str) -> String {
    format!("127.0.0.1:{REGISTRY_PORT}/{repo_tag}")
}

/// A plain busybox root: bin/busybox with applet symlinks, /etc with root, /tmp. (Not the e2e
/// tests' busybox layer: its hard link entry carries mode 0644, which containerd applies to the
/// link's target, leaving busybox not executable there.)
pub fn busybox_layer() -> Layer {
    let mut l = LayerBuilder::new();
    l.dir("bin", 0o755).file("bin/busybox", 0o755, &busybox_binary());
    for applet in ["sh", "sleep", "true", "ls", "cat"] {
        l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l.dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/group", 0o644, b"root:x:0:\n")
        .dir("root", 0o700)
        .dir("tmp", 0o1777);
    l.build(Compression::Gzip)
}

/// The containers' image: busybox, `sh` by default (the benchmarks give a command).
pub fn busybox_image() -> Image {
    Image::new(vec![busybox_layer()], ConfigOptions::default())
}

/// containerd's sandbox image: busybox sleeping forever, as PID 1 of the pod (the pause role).
pub fn pause_image() -> Image {
    Image::new(
        vec![busybox_layer()],
        ConfigOptions { cmd: vec!["/bin/busybox".into(), "sleep".into(), "2147483647".into()], ..Default::default() },
    )
}

impl Setup {
    pub async fn boot(label: &str, only: Only) -> Result<Setup, String> {
        Setup::boot_with(label, only, None).await
    }

    /// [`Setup::boot`] with the node's state directory (both runtimes' stores) on a fresh
    /// journaled ext4 of `state_ext4` bytes (`"16G"`) when given (`e2e/node up --state-ext4`).
    pub async fn boot_with(label: &str, only: Only, state_ext4: Option<&str>) -> Result<Setup, String> {
        let config = std::env::temp_dir().join(format!("cri-systemd-bench-{}.toml", std::process::id()));
        std::fs::write(&config, format!("[images.registries.\"127.0.0.1:{REGISTRY_PORT}\"]\nplain_http = true\n"))
            .map_err(|e| format!("write {}: {e}", config.display()))?;
        eprintln!("bench: booting a node");
        let node = Node::up(
            label,
            NodeOptions {
                config: Some(config.clone()),
                state_ext4: state_ext4.map(str::to_owned),
                ..Default::default()
            },
        );
        let _ = std::fs::remove_file(&config);
        let pid1 = NodeNet::of(&node).pid1();
        let mut runtimes = Vec::new();
        if only.wants(Kind::CriSystemd) {
            runtimes.push(runtimes::cri_systemd(&node, pid1).await?);
        }
        if only.wants(Kind::Containerd) {
            eprintln!("bench: starting containerd in node {}", node.name());
            runtimes.push(
                runtimes::containerd(
                    &node,
                    pid1,
                    &format!("127.0.0.1:{REGISTRY_PORT}"),
                    &image_ref(&format!("{PAUSE_REPO}:1")),
                )
                .await?,
            );
        }
        Ok(Setup { node, pid1, runtimes })
    }

    /// Starts the registry and pushes the small images every benchmark uses.
    pub fn registry(&self) -> Registry<'_> {
        let registry = Registry::start(&self.node, "bench", REGISTRY_PORT, RegistryOptions::default());
        registry.push_image(BUSYBOX_REPO, "1", &busybox_image());
        registry.push_image(PAUSE_REPO, "1", &pause_image());
        registry
    }
}

/// The 1-minute load average now.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// A table note on the machine: CPUs, model, and how busy it was (other work skews numbers).
pub fn machine_note(load_at_start: &str) -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned()))
        })
        .unwrap_or_default();
    format!("machine: {cpus} CPUs ({model}); load average {load_at_start} at the start, {} at the end", load_average())
}

/// The file system a directory is on, for table notes: type, device, for ext4 whether it has a
/// journal (ext4 without one avoids reusing recently freed inodes, at a cost to every file
/// created after a delete), and a loop device's backing file.
pub fn file_system_note(dir: &std::path::Path) -> String {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some((fstype, source)) = mount_of(&mountinfo, dir) else {
        return format!("{}: file system unknown", dir.display());
    };
    let device = source.rsplit('/').next().unwrap_or(&source).to_owned();
    let mut note = format!("{fstype} on {source}");
    if fstype == "ext4" {
        let journal = std::fs::read_to_string(format!("/sys/fs/ext4/{device}/journal_task")).unwrap_or_default();
        let options = std::fs::read_to_string(format!("/proc/fs/ext4/{device}/options")).unwrap_or_default();
        let data = options.lines().find(|o| o.starts_with("data=")).unwrap_or("");
        note = match journal.trim() {
            "" => format!("{note} (journal unknown)"),
            "<none>" => format!("{note} without a journal"),
            _ => format!("{note} with a journal ({})", if data.is_empty() { "journaled" } else { data }),
        };
    }
    if let Ok(backing) = std::fs::read_to_string(format!("/sys/block/{device}/loop/backing_file")) {
        note = format!("{note}, loop-mounted image file {}", backing.trim());
    }
    note
}

/// (file system type, source) of the mount that shows at `dir`, from a mountinfo text: the mount
/// with the longest mount point containing `dir`, the later one of equals (it is on top).
fn mount_of(mountinfo: &str, dir: &std::path::Path) -> Option<(String, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let (fstype, source) = (right.next()?, right.next()?);
            dir.starts_with(mount_point).then(|| (mount_point.len(), fstype.to_owned(), source.to_owned()))
        })
        .fold(None, |best: Option<(usize, String, String)>, m| match &best {
            Some((len, _, _)) if *len > m.0 => best,
            _ => Some(m),
        })
        .map(|(_, fstype, source)| (fstype, source))
}

/// A CRI call with a bound on its duration, and the runtime and call named in its error.
pub async fn call<T>(
    rt: &Runtime,
    what: &str,
    limit: Duration,
    future: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(format!("{}: {what}: {:?}: {}", rt.short(), status.code(), status.message())),
        Err(_) => Err(format!("{}: {what}: no answer within {limit:?}", rt.short())),
    }
}

pub fn image_spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec { image: image.into(), ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_on_top_of_a_directory_names_its_file_system() {
        let mountinfo = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
40 27 0:50 / /var/tmp/n/root rw,relatime - overlay e2e rw,lowerdir=/
41 27 7:1 / /var/tmp/n/state rw,relatime - ext4 /dev/loop1 rw
42 41 0:51 / /var/tmp/n/state rw,relatime - tmpfs tmpfs rw
";
        let at = |dir: &str| mount_of(mountinfo, std::path::Path::new(dir));
        assert_eq!(at("/var/tmp/n/state/images"), Some(("tmpfs".into(), "tmpfs".into())), "the later mount is on top");
        assert_eq!(at("/var/tmp/n/root/etc"), Some(("overlay".into(), "e2e".into())));
        // Path components, not string prefixes: state2 is not under state.
        assert_eq!(at("/var/tmp/n/state2"), Some(("ext4".into(), "/dev/vda".into())));
        assert_eq!(mount_of("", std::path::Path::new("/")), None);
    }

    #[test]
    fn pull_takes_the_store_file_system() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let Ok(Command::Pull(pull)) = parse(&args(&["pull"])) else { panic!("pull") };
        assert_eq!(pull.fs, pull::StoreFs::Journaled, "production-like by default");
        let Ok(Command::Pull(pull)) = parse(&args(&["pull", "--fs", "host"])) else { panic!("pull --fs host") };
        assert_eq!(pull.fs, pull::StoreFs::Host);
        assert!(parse(&args(&["pull", "--fs", "xfs"])).is_err());
    }
}
