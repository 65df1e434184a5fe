//! Everything a cgroup tells of its processes, for ListPodSandboxMetrics (cadvisor's metrics)
//! and the extras of the stats RPCs (process counts, swap, pressure): CPU time split into user
//! and system and CFS throttling, memory by kind with peaks, failures and OOM kills, processes,
//! threads and their limit, open files and sockets, block I/O per device, and pressure (PSI).
//!
//! Each value is read where this node has it: the unified hierarchy (v2), or on a v1/hybrid node
//! the v1 controller's files, falling back to the hybrid layout's unified hierarchy (which has
//! `cpu.stat`, `cgroup.procs`, `cgroup.threads` and, with PSI enabled, `*.pressure` in every
//! cgroup). A value the node does not have is None, never a made-up zero.

use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The `some` and `full` lines of a `*.pressure` file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub some: PressureLine,
    pub full: PressureLine,
}

/// One line of a `*.pressure` file: averages in percent, total stall time in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PressureLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    pub total_usec: u64,
}

/// Bytes and operations of one block device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIo {
    pub major: u64,
    pub minor: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub writes: u64,
}

/// One sample of a cgroup's details (None: not available on this node).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupDetail {
    pub cpu_usage_nanos: Option<u64>,
    pub cpu_user_nanos: Option<u64>,
    pub cpu_system_nanos: Option<u64>,
    pub cfs_periods: Option<u64>,
    pub cfs_throttled_periods: Option<u64>,
    pub cfs_throttled_nanos: Option<u64>,
    pub memory_usage: Option<u64>,
    pub memory_max_usage: Option<u64>,
    pub memory_working_set: Option<u64>,
    pub memory_cache: Option<u64>,
    pub memory_rss: Option<u64>,
    pub memory_kernel: Option<u64>,
    pub memory_mapped_file: Option<u64>,
    pub memory_swap: Option<u64>,
    pub memory_failcnt: Option<u64>,
    pub memory_active_file: Option<u64>,
    pub memory_inactive_file: Option<u64>,
    pub pgfault: Option<u64>,
    pub pgmajfault: Option<u64>,
    pub oom_kills: Option<u64>,
    /// The processes' ids (host PID namespace).
    pub pids: Vec<i32>,
    pub threads: Option<u64>,
    /// None: no pids controller; Some(0): no limit.
    pub threads_max: Option<u64>,
    pub io: Vec<DeviceIo>,
    pub cpu_pressure: Option<Pressure>,
    pub memory_pressure: Option<Pressure>,
    pub io_pressure: Option<Pressure>,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// `key value` lines (memory.stat, cpu.stat, memory.events, memory.oom_control).
fn field(text: &Option<String>, key: &str) -> Option<u64> {
    text.as_deref()?.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

/// The ids in `file` (cgroup.procs, tasks, cgroup.threads) of the cgroup `dir` and of every
/// cgroup below it (a pod's slice holds no process itself); None without the file.
fn pids_of(dir: &Path, file: &str) -> Option<Vec<i32>> {
    let mut ids: Vec<i32> = read(&dir.join(file))?.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for child in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            let path = child.path();
            if let Some(text) = read(&path.join(file)) {
                ids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            stack.push(path);
        }
    }
    Some(ids)
}

/// A `*.pressure` file: `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and a `full` line.
pub fn parse_pressure(text: &str) -> Option<Pressure> {
    let mut pressure = Pressure::default();
    let mut seen = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let target = match words.next() {
            Some("some") => &mut pressure.some,
            Some("full") => &mut pressure.full,
            _ => continue,
        };
        seen = true;
        for word in words {
            match word.split_once('=') {
                Some(("avg10", v)) => target.avg10 = v.parse().ok()?,
                Some(("avg60", v)) => target.avg60 = v.parse().ok()?,
                Some(("avg300", v)) => target.avg300 = v.parse().ok()?,
                Some(("total", v)) => target.total_usec = v.parse().ok()?,
                _ => {}
            }
        }
    }
    seen.then_some(pressure)
}

/// cgroup v2's io.stat: `8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0`.
pub fn parse_io_stat(text: &str) -> Vec<DeviceIo> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (major, minor) = words.next()?.split_once(':')?;
            let mut io = DeviceIo { major: major.parse().ok()?, minor: minor.parse().ok()?, ..Default::default() };
            for word in words {
                let Some((key, value)) = word.split_once('=') else { continue };
                let value = value.parse().unwrap_or(0);
                match key {
                    "rbytes" => io.read_bytes = value,
                    "wbytes" => io.write_bytes = value,
                    "rios" => io.reads = value,
                    "wios" => io.writes = value,
                    _ => {}
                }
            }
            Some(io)
        })
        .collect()
}

/// cgroup v1's blkio.throttle.io_service_bytes / io_serviced: `8:0 Read 4096` lines.
fn parse_blkio(bytes: &str, ops: &str) -> Vec<DeviceIo> {
    let mut devices: Vec<DeviceIo> = Vec::new();
    for (text, is_bytes) in [(bytes, true), (ops, false)] {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [device, op, value] = words[..] else { continue };
            let Some((major, minor)) = device.split_once(':') else { continue };
            let (Ok(major), Ok(minor), Ok(value)) = (major.parse(), minor.parse(), value.parse::<u64>()) else {
                continue;
            };
            let index = match devices.iter().position(|d| d.major == major && d.minor == minor) {
                Some(index) => index,
                None => {
                    devices.push(DeviceIo { major, minor, ..Default::default() });
                    devices.len() - 1
                }
            };
            let io = &mut devices[index];
            match (op, is_bytes) {
                ("Read", true) => io.read_bytes = value,
                ("Write", true) => io.write_bytes = value,
                ("Read", false) => io.reads = value,
                ("Write", false) => io.writes = value,
                _ => {}
            }
        }
    }
    devices
}

fn unified_root() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

/// The first of the v1 hierarchies `names` (e.g. `cpu,cpuacct`, `cpu`) that has `rel`.
fn v1_dir(names: &[&str], rel: &str) -> Option<PathBuf> {
    names.iter().map(|name| Path::new(CGROUP_ROOT).join(name).join(rel)).find(|dir| dir.is_dir())
}

/// Samples the cgroup at `path` (relative to each hierarchy's root, as `stats::cgroup_path`).
pub fn sample(path: &str) -> CgroupDetail {
    let rel = path.trim_start_matches('/');
    if unified_root() { sample_v2(&Path::new(CGROUP_ROOT).join(rel)) } else { sample_v1(rel) }
}

fn pressure(dir: &Path, name: &str) -> Option<Pressure> {
    parse_pressure(&read(&dir.join(name))?)
}

fn sample_v2(dir: &Path) -> CgroupDetail {
    let cpu = read(&dir.join("cpu.stat"));
    let memory = read(&dir.join("memory.stat"));
    let events = read(&dir.join("memory.events"));
    let usage = read_u64(&dir.join("memory.current"));
    let inactive = field(&memory, "inactive_file");
    CgroupDetail {
        cpu_usage_nanos: field(&cpu, "usage_usec").map(|us| us * 1000),
        cpu_user_nanos: field(&cpu, "user_usec").map(|us| us * 1000),
        cpu_system_nanos: field(&cpu, "system_usec").map(|us| us * 1000),
        cfs_periods: field(&cpu, "nr_periods"),
        cfs_throttled_periods: field(&cpu, "nr_throttled"),
        cfs_throttled_nanos: field(&cpu, "throttled_usec").map(|us| us * 1000),
        memory_usage: usage,
        memory_max_usage: read_u64(&dir.join("memory.peak")),
        memory_working_set: usage.map(|u| u.saturating_sub(inactive.unwrap_or(0))),
        memory_cache: field(&memory, "file"),
        memory_rss: field(&memory, "anon"),
        memory_kernel: field(&memory, "kernel").or_else(|| field(&memory, "kernel_stack")),
        memory_mapped_file: field(&memory, "file_mapped"),
        memory_swap: read_u64(&dir.join("memory.swap.current")),
        // v2 has no failcnt; memory.events' `max` counts the times usage hit memory.max.
        memory_failcnt: field(&events, "max"),
        memory_active_file: field(&memory, "active_file"),
        memory_inactive_file: inactive,
        pgfault: field(&memory, "pgfault"),
        pgmajfault: field(&memory, "pgmajfault"),
        oom_kills: field(&events, "oom_kill"),
        pids: pids_of(dir, "cgroup.procs").unwrap_or_default(),
        threads: pids_of(dir, "cgroup.threads").map(|t| t.len() as u64),
        threads_max: read(&dir.join("pids.max")).map(|v| v.trim().parse().unwrap_or(0)),
        io: read(&dir.join("io.stat")).map(|t| parse_io_stat(&t)).unwrap_or_default(),
        cpu_pressure: pressure(dir, "cpu.pressure"),
        memory_pressure: pressure(dir, "memory.pressure"),
        io_pressure: pressure(dir, "io.pressure"),
    }
}

fn sample_v1(rel: &str) -> CgroupDetail {
    let hybrid = Path::new(CGROUP_ROOT).join("unified").join(rel);
    let hybrid = hybrid.is_dir().then_some(hybrid);
    let unified_cpu = hybrid.as_ref().and_then(|d| read(&d.join("cpu.stat")));
    let cpuacct = v1_dir(&["cpu,cpuacct", "cpuacct"], rel);
    let cpu = v1_dir(&["cpu,cpuacct", "cpu"], rel).and_then(|d| read(&d.join("cpu.stat")));
    let memory_dir = v1_dir(&["memory"], rel);
    let memory = memory_dir.as_ref().and_then(|d| read(&d.join("memory.stat")));
    let memory_file = |name: &str| memory_dir.as_ref().and_then(|d| read_u64(&d.join(name)));
    let usage = memory_file("memory.usage_in_bytes");
    let inactive = field(&memory, "total_inactive_file");
    // cpuacct.stat counts USER_HZ ticks (100 per second on Linux).
    let cpuacct_stat = cpuacct.as_ref().and_then(|d| read(&d.join("cpuacct.stat")));
    let ticks = |key: &str| field(&cpuacct_stat, key).map(|t| t * 10_000_000);
    // Processes: any hierarchy systemd places the unit in.
    let procs_dir = memory_dir.clone().or_else(|| hybrid.clone()).or_else(|| v1_dir(&["systemd"], rel));
    let blkio = v1_dir(&["blkio"], rel);
    let blkio_file = |name: &str| blkio.as_ref().and_then(|d| read(&d.join(name)));
    CgroupDetail {
        cpu_usage_nanos: cpuacct
            .as_ref()
            .and_then(|d| read_u64(&d.join("cpuacct.usage")))
            .or_else(|| field(&unified_cpu, "usage_usec").map(|us| us * 1000)),
        cpu_user_nanos: field(&unified_cpu, "user_usec").map(|us| us * 1000).or_else(|| ticks("user")),
        cpu_system_nanos: field(&unified_cpu, "system_usec").map(|us| us * 1000).or_else(|| ticks("system")),
        cfs_periods: field(&cpu, "nr_periods"),
        cfs_throttled_periods: field(&cpu, "nr_throttled"),
        cfs_throttled_nanos: field(&cpu, "throttled_time"),
        memory_usage: usage,
        memory_max_usage: memory_file("memory.max_usage_in_bytes"),
        memory_working_set: usage.map(|u| u.saturating_sub(inactive.unwrap_or(0))),
        memory_cache: field(&memory, "total_cache"),
        memory_rss: field(&memory, "total_rss"),
        memory_kernel: memory_file("memory.kmem.usage_in_bytes"),
        memory_mapped_file: field(&memory, "total_mapped_file"),
        memory_swap: field(&memory, "total_swap"),
        memory_failcnt: memory_file("memory.failcnt"),
        memory_active_file: field(&memory, "total_active_file"),
        memory_inactive_file: inactive,
        pgfault: field(&memory, "total_pgfault"),
        pgmajfault: field(&memory, "total_pgmajfault"),
        oom_kills: field(&memory_dir.as_ref().and_then(|d| read(&d.join("memory.oom_control"))), "oom_kill"),
        pids: procs_dir.as_ref().and_then(|d| pids_of(d, "cgroup.procs")).unwrap_or_default(),
        threads: procs_dir
            .as_ref()
            .and_then(|d| pids_of(d, "tasks").or_else(|| pids_of(d, "cgroup.threads")))
            .map(|t| t.len() as u64),
        threads_max: v1_dir(&["pids"], rel)
            .or_else(|| hybrid.clone())
            .and_then(|d| read(&d.join("pids.max")))
            .map(|v| v.trim().parse().unwrap_or(0)),
        io: match (blkio_file("blkio.throttle.io_service_bytes"), blkio_file("blkio.throttle.io_serviced")) {
            (Some(bytes), Some(ops)) => parse_blkio(&bytes, &ops),
            _ => Vec::new(),
        },
        cpu_pressure: hybrid.as_ref().and_then(|d| pressure(d, "cpu.pressure")),
        memory_pressure: hybrid.as_ref().and_then(|d| pressure(d, "memory.pressure")),
        io_pressure: hybrid.as_ref().and_then(|d| pressure(d, "io.pressure")),
    }
}

/// Open file descriptors and, of those, sockets, of these processes (ones gone meanwhile are
/// skipped).
pub fn open_files(pids: &[i32]) -> (u64, u64) {
    let (mut files, mut sockets) = (0, 0);
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for entry in entries.flatten() {
            files += 1;
            if std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:")) {
                sockets += 1;
            }
        }
    }
    (files, sockets)
}

/// The file system `dir` is on: its device (the mount's source, as cadvisor's `device` label),
/// size and free inodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsInfo {
    pub device: String,
    pub capacity_bytes: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
}

pub fn fs_info(dir: &Path) -> Option<FsInfo> {
    use std::os::unix::fs::MetadataExt;
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    // /proc/self/mountinfo: `id parent major:minor root mountpoint options ... - fstype source ...`.
    let device = read(Path::new("/proc/self/mountinfo"))
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut words = line.split_whitespace();
                let numbers = words.nth(2)?;
                (numbers == format!("{major}:{minor}"))
                    .then(|| line.split(" - ").nth(1)?.split_whitespace().nth(1).map(str::to_owned))?
            })
        })
        .unwrap_or_else(|| format!("{major}:{minor}"));
    Some(FsInfo {
        device,
        capacity_bytes: stat.blocks() as u64 * stat.fragment_size() as u64,
        inodes_total: stat.files() as u64,
        inodes_free: stat.files_free() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_files_give_both_lines() {
        let text =
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=678\n";
        let p = parse_pressure(text).unwrap();
        assert_eq!(p.some.total_usec, 12345);
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.full.total_usec, 678);
        assert_eq!(parse_pressure(""), None);
    }

    #[test]
    fn io_stat_and_blkio_give_per_device_counts() {
        let v2 = parse_io_stat("8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(v2, vec![DeviceIo { major: 8, minor: 0, read_bytes: 4096, write_bytes: 8192, reads: 1, writes: 2 }]);
        let v1 = parse_blkio(
            "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\nTotal 12288\n",
            "8:0 Read 1\n8:0 Write 2\nTotal 3\n",
        );
        assert_eq!(v1, v2);
    }

    #[test]
    fn this_process_has_open_files() {
        let (files, _) = open_files(&[std::process::id() as i32]);
        assert!(files >= 3);
        let fs = fs_info(Path::new("/")).unwrap();
        assert!(fs.capacity_bytes > 0 && !fs.device.is_empty());
    }
}
