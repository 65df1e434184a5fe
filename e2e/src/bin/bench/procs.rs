//! What the benchmarks read about processes, from the host's /proc: every process of a node (by
//! its PID namespace), their memory (VmRSS, VmHWM, PSS), CPU time and systemd cgroup; the node's
//! total CPU time from its cpuacct cgroup.

use std::collections::HashMap;
use std::path::Path;

/// One process of the node, seen from the host.
#[derive(Debug, Clone)]
pub struct Proc {
    /// PID on the host (what /proc here is indexed by).
    pub pid: u32,
    /// PID inside the node.
    pub node_pid: u32,
    pub comm: String,
    /// The name=systemd cgroup path (as the host sees it), or the cgroup2 path.
    pub cgroup: String,
    pub rss_kib: u64,
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A `Key:   123 kB` field of /proc/PID/status (or smaps_rollup), in KiB.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    kib_field(&read(format!("/proc/{pid}/status"))?, key)
}

/// Proportional set size: shared pages divided among the processes that map them.
pub fn pss_kib(pid: u32) -> Option<u64> {
    kib_field(&read(format!("/proc/{pid}/smaps_rollup"))?, "Pss")
}

/// Resets the process's VmHWM (peak RSS) to its current RSS (`clear_refs` 5, Linux >= 4.0).
pub fn reset_peak(pid: u32) -> Result<(), String> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").map_err(|e| format!("reset the peak RSS of PID {pid}: {e}"))
}

/// User + system CPU time of a process, in seconds (/proc/PID/stat counts in USER_HZ = 100).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = read(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ": state is field 3 of stat(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The processes of a node: everything in its cgroups (the containers too, which have PID
/// namespaces of their own below the node's). Processes of `e2e/node exec` stay in the caller's
/// cgroups and are not included.
#[derive(Debug, Clone)]
pub struct NodeProcs {
    pid1: u32,
    /// The node's name=systemd (or cgroup2) cgroup as the host's /proc/PID/cgroup shows it.
    cgroup: String,
}

impl NodeProcs {
    pub fn of(node_dir: &Path, pid1: u32) -> Result<NodeProcs, String> {
        let dir = node_cgroup(node_dir, "systemd")
            .or_else(|| node_cgroup(node_dir, "unified"))
            .ok_or_else(|| format!("no systemd cgroup of the node in {}/cgroups", node_dir.display()))?;
        let root = if dir.starts_with("/sys/fs/cgroup/systemd/") {
            "/sys/fs/cgroup/systemd"
        } else {
            "/sys/fs/cgroup/unified"
        };
        let cgroup = dir.strip_prefix(root).unwrap_or(&dir).to_owned();
        Ok(NodeProcs { pid1, cgroup })
    }

    pub fn list(&self) -> Vec<Proc> {
        // The node's PID namespace level: PID 1's NSpid is "<host pid> 1" (or deeper if this
        // benchmark itself runs in a PID namespace).
        let level = read(format!("/proc/{}/status", self.pid1))
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| v.split_whitespace().count()))
            .unwrap_or(2)
            .saturating_sub(1);
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else { return out };
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let cgroups = read(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let cgroup = cgroups
                .lines()
                .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p.to_owned()))
                .or_else(|| cgroups.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned)))
                .unwrap_or_default();
            if !(cgroup == self.cgroup || cgroup.starts_with(&format!("{}/", self.cgroup))) {
                continue;
            }
            let Some(status) = read(format!("/proc/{pid}/status")) else { continue };
            // Zombies hold no memory.
            if status.lines().any(|l| l.starts_with("State:") && l.contains("Z (zombie)")) {
                continue;
            }
            let comm = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("").trim().to_owned();
            let node_pid = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().nth(level)?.parse().ok())
                .unwrap_or(0);
            out.push(Proc { pid, node_pid, comm, cgroup, rss_kib: kib_field(&status, "VmRSS").unwrap_or(0) });
        }
        out
    }

    /// The host PID of the node process with PID `node_pid` inside the node.
    pub fn host_pid(&self, node_pid: u32) -> Option<u32> {
        self.list().into_iter().find(|p| p.node_pid == node_pid).map(|p| p.pid)
    }
}

/// The node's cgroup directory in hierarchy `controller` on the host (from `<node dir>/cgroups`).
pub fn node_cgroup(node_dir: &Path, controller: &str) -> Option<String> {
    let list = read(node_dir.join("cgroups"))?;
    list.lines().find(|l| l.starts_with(&format!("/sys/fs/cgroup/{controller}/"))).map(str::to_owned)
}

/// CPU time (user + system, seconds) used so far by everything in the node's cgroup: the
/// daemons, systemd, shims, runc, containers. Processes started with `e2e/node exec` stay in the
/// caller's cgroups and are not counted.
#[derive(Debug, Clone)]
pub struct NodeCpu {
    usage_file: Option<String>,
}

impl NodeCpu {
    pub fn of(node_dir: &Path) -> NodeCpu {
        NodeCpu { usage_file: node_cgroup(node_dir, "cpuacct").map(|d| format!("{d}/cpuacct.usage")) }
    }

    pub fn seconds(&self) -> Option<f64> {
        let text = read(self.usage_file.as_ref()?)?;
        Some(text.trim().parse::<u64>().ok()? as f64 / 1e9)
    }
}

/// Processes grouped by command name: "name xN (RSS m MiB each)" for a table note.
pub fn summarize(procs: &[&Proc]) -> String {
    let mut groups: HashMap<&str, (usize, u64)> = HashMap::new();
    for p in procs {
        let g = groups.entry(p.comm.as_str()).or_default();
        g.0 += 1;
        g.1 += p.rss_kib;
    }
    let mut parts: Vec<String> = groups
        .into_iter()
        .map(|(c, (n, rss))| format!("{c} x{n} (RSS {:.1} MiB each)", rss as f64 / n as f64 / 1024.0))
        .collect();
    parts.sort();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}
