//! Resource usage of pods and containers, read from their cgroups (what the kubelet's CRI stats
//! provider asks for): CPU time and rate, memory usage and working set, writable layer size.
//! cgroup v1 (hybrid, per-controller hierarchies) and v2 (unified) are both read.
//!
//! # Limits, stats and network counters
//!
//! Resource limits are unit properties (`MemoryMax`, `CPUShares`, `CPUQuotaPerSecUSec`; memory QoS
//! and swap in `memory_qos.rs`), changed live by UpdateContainerResources; stats are read from the unit's and the slice's cgroups (v1
//! controllers, or v2; on hybrid nodes CPU time comes from the unified hierarchy).
//!
//! A ready pod's stats carry its network counters (rx/tx bytes and errors of each interface but
//! loopback, eth0 as the default one, as containerd), read from /proc/thread-self/net/dev by a
//! short-lived thread that joins the pod's pinned network namespace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One sample of a cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Nanoseconds since the epoch.
    pub timestamp: i64,
    pub cpu_total_nanos: Option<u64>,
    /// Average cores in use (in nano-cores) since the previous sample of the same cgroup.
    pub cpu_nano_cores: Option<u64>,
    pub memory_usage_bytes: Option<u64>,
    /// Usage less inactive file pages: what the kubelet evicts on.
    pub memory_working_set_bytes: Option<u64>,
    pub memory_rss_bytes: Option<u64>,
    pub page_faults: Option<u64>,
    pub major_page_faults: Option<u64>,
}

/// Counters of one network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceUsage {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// The interfaces of the network namespace pinned at `netns`, loopback left out, from its
/// /proc/net/dev. Read by a thread of its own that joins the namespace (setns moves only the
/// calling thread; /proc/thread-self/net is that thread's namespace) and ends right after.
pub fn network_usage(netns: &Path) -> std::io::Result<Vec<InterfaceUsage>> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> std::io::Result<String> {
        let file = std::fs::File::open(&netns)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        std::fs::read_to_string("/proc/thread-self/net/dev")
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the reading thread panicked")))
    .map(|text| parse_net_dev(&text))
}

/// /proc/net/dev: two header lines, then `name: rx bytes packets errs drop fifo frame compressed
/// multicast tx bytes packets errs ...`.
fn parse_net_dev(text: &str) -> Vec<InterfaceUsage> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let counters: Vec<u64> = counters.split_whitespace().filter_map(|c| c.parse().ok()).collect();
            let name = name.trim();
            (name != "lo" && counters.len() >= 12).then(|| InterfaceUsage {
                name: name.to_owned(),
                rx_bytes: counters[0],
                rx_packets: counters[1],
                rx_errors: counters[2],
                rx_dropped: counters[3],
                tx_bytes: counters[8],
                tx_packets: counters[9],
                tx_errors: counters[10],
                tx_dropped: counters[11],
            })
        })
        .collect()
}

/// Disk use of a directory tree (a container's writable layer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub bytes: u64,
    pub inodes: u64,
}

/// Remembers the previous CPU sample of each cgroup to compute rates.
#[derive(Debug, Default)]
pub struct Sampler {
    previous: Mutex<HashMap<String, (i64, u64)>>,
}

/// The cgroup path systemd gives unit `unit` in slice `slice`: slices nest by their dashes
/// (`a-b.slice` lives in `a.slice`).
pub fn cgroup_path(slice: &str, unit: Option<&str>) -> String {
    let mut path = String::new();
    if slice != "-.slice" {
        let stem = slice.trim_end_matches(".slice");
        let parts: Vec<&str> = stem.split('-').collect();
        for end in 1..=parts.len() {
            path.push('/');
            path.push_str(&parts[..end].join("-"));
            path.push_str(".slice");
        }
    }
    if let Some(unit) = unit {
        path.push('/');
        path.push_str(unit);
    }
    path
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_field(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn unified() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

impl Sampler {
    /// Samples the cgroup at `path` (relative to each hierarchy's root).
    pub fn sample(&self, path: &str) -> Usage {
        let now = now_nanos();
        let root = PathBuf::from(CGROUP_ROOT);
        let rel = path.trim_start_matches('/');
        let mut usage = Usage { timestamp: now, ..Default::default() };
        if unified() {
            let dir = root.join(rel);
            usage.cpu_total_nanos = stat_field(&dir.join("cpu.stat"), "usage_usec").map(|us| us * 1000);
            usage.memory_usage_bytes = read_u64(&dir.join("memory.current"));
            let inactive = stat_field(&dir.join("memory.stat"), "inactive_file").unwrap_or(0);
            usage.memory_working_set_bytes = usage.memory_usage_bytes.map(|u| u.saturating_sub(inactive));
            usage.memory_rss_bytes = stat_field(&dir.join("memory.stat"), "anon");
            usage.page_faults = stat_field(&dir.join("memory.stat"), "pgfault");
            usage.major_page_faults = stat_field(&dir.join("memory.stat"), "pgmajfault");
        } else {
            // systemd may not make cpuacct cgroups when cpu and cpuacct are mounted apart; the
            // hybrid layout's unified hierarchy has cpu.stat in every cgroup regardless.
            usage.cpu_total_nanos = read_u64(&root.join("cpuacct").join(rel).join("cpuacct.usage"))
                .or_else(|| read_u64(&root.join("cpu,cpuacct").join(rel).join("cpuacct.usage")))
                .or_else(|| {
                    stat_field(&root.join("unified").join(rel).join("cpu.stat"), "usage_usec").map(|us| us * 1000)
                });
            let memory = root.join("memory").join(rel);
            usage.memory_usage_bytes = read_u64(&memory.join("memory.usage_in_bytes"));
            let stat = memory.join("memory.stat");
            let inactive = stat_field(&stat, "total_inactive_file").unwrap_or(0);
            usage.memory_working_set_bytes = usage.memory_usage_bytes.map(|u| u.saturating_sub(inactive));
            usage.memory_rss_bytes = stat_field(&stat, "total_rss");
            usage.page_faults = stat_field(&stat, "total_pgfault");
            usage.major_page_faults = stat_field(&stat, "total_pgmajfault");
        }
        if let Some(total) = usage.cpu_total_nanos {
            let mut previous = self.previous.lock().expect("sampler lock");
            if let Some((then, before)) = previous.insert(path.to_string(), (now, total)) {
                let elapsed = (now - then).max(1) as u128;
                usage.cpu_nano_cores =
                    Some((u128::from(total.saturating_sub(before)) * 1_000_000_000 / elapsed) as u64);
            }
        }
        usage
    }

    /// Forgets a removed cgroup's previous sample.
    pub fn forget(&self, path: &str) {
        self.previous.lock().expect("sampler lock").remove(path);
    }
}

/// Bytes allocated and inodes used under `dir` (hard links counted once), without following
/// symlinks or crossing into other file systems.
pub fn disk_usage(dir: &Path) -> DiskUsage {
    use std::os::unix::fs::MetadataExt;
    let mut usage = DiskUsage::default();
    let Ok(root) = std::fs::symlink_metadata(dir) else { return usage };
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.dev() != root.dev() || !seen.insert(meta.ino()) {
            continue;
        }
        usage.inodes += 1;
        usage.bytes += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    usage
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_gives_every_interface_but_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0\n  \
             eth0:   25318     31    1    0    0     0          0         0    23410      27    2    0    0     0       0          0\n";
        assert_eq!(
            parse_net_dev(text),
            vec![InterfaceUsage {
                name: "eth0".into(),
                rx_bytes: 25318,
                rx_packets: 31,
                rx_errors: 1,
                rx_dropped: 0,
                tx_bytes: 23410,
                tx_packets: 27,
                tx_errors: 2,
                tx_dropped: 0,
            }]
        );
    }

    #[test]
    fn slices_nest_by_dashes() {
        assert_eq!(
            cgroup_path("kubepods-besteffort-podx.slice", Some("cri-1.service")),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podx.slice/cri-1.service"
        );
        assert_eq!(cgroup_path("-.slice", Some("a.service")), "/a.service");
    }

    #[test]
    fn disk_usage_counts_files_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let usage = disk_usage(dir.path());
        assert_eq!(usage.inodes, 2); // the dir and one file
        assert!(usage.bytes >= 10_000);
    }
}
