//! cgroup v1 hierarchies that systemd does not place units in, joined by the container's init
//! as runc's systemd driver joins every v1 hierarchy (`libcontainer/cgroups/systemd/v1.go`).
//!
//! systemd 252 only realizes the v1 controllers it drives (cpu, memory, blkio, devices, pids;
//! cpuacct only when mounted together with cpu). On a node where cpuacct has a hierarchy of its
//! own, a unit's processes stay in that hierarchy's root, and the kubelet's (cadvisor's) pod CPU,
//! read from the pod slice's `cpuacct.usage`, is 0. init, still root in the node's namespaces,
//! makes the unit's cgroup path in each such hierarchy and joins it before it forks the
//! entrypoint (which inherits it; `exec-in` follows the main process into every hierarchy). The
//! daemon removes those directories, and the parents left empty, with the container.
//! Not joined: cpuset (a new v1 cpuset cgroup has no CPUs until written; CPU sets are applied
//! with `CPUAffinity=` on v1) and hugetlb (`hugetlb.rs`, with the limits).

use std::path::Path;

use crate::error::Error;
use crate::init::exec_in::{CgroupMount, cgroup_mounts};

/// Controllers systemd never puts a unit's processes in on cgroup v1.
const UNMANAGED: &[&str] = &["cpuacct", "freezer", "net_cls", "net_prio", "perf_event", "rdma", "misc"];

/// A v1 hierarchy whose controllers are all unmanaged by systemd (so `cpu,cpuacct` is not).
fn unmanaged(mount: &CgroupMount) -> bool {
    !mount.controllers.is_empty() && mount.controllers.iter().all(|c| UNMANAGED.contains(&c.as_str()))
}

fn mounts() -> Vec<CgroupMount> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|m| cgroup_mounts(&m)).unwrap_or_default()
}

/// init: joins the unit's cgroup path (`relative`, its systemd cgroup) in every unmanaged v1
/// hierarchy it is not in yet.
pub(crate) fn join_self(relative: &str) -> Result<(), String> {
    let cgroups =
        std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    for mount in mounts().iter().filter(|m| unmanaged(m)) {
        // The line of this hierarchy in /proc/self/cgroup: "N:cpuacct:/path".
        let key = mount.controllers.join(",");
        let current = cgroups.lines().find_map(|l| {
            let mut fields = l.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            (controllers == key).then_some(path)
        });
        if current == Some(relative) || current.is_none() {
            continue;
        }
        let dir = Path::new(&mount.mount_point).join(relative.trim_start_matches('/'));
        create_cgroup_dir(&dir)?;
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("cannot join {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Removes a stopped container's cgroups in the unmanaged v1 hierarchies (or, with `unit`
/// None, what is left of a pod's slice there), and the parents they leave empty.
pub(crate) fn remove(slice: &str, unit: Option<&str>) -> Result<(), Error> {
    for mount in mounts().iter().filter(|m| unmanaged(m)) {
        crate::hugetlb::remove_in(Path::new(&mount.mount_point), slice, unit)?;
    }
    Ok(())
}

/// Creates a cgroup directory and its parents. A concurrent removal of an empty parent (another
/// pod's last container) can take a directory away mid-way: it is tried again a few times.
pub(crate) fn create_cgroup_dir(dir: &Path) -> Result<(), String> {
    let mut made = std::fs::create_dir_all(dir);
    for _ in 0..3 {
        if made.is_ok() {
            break;
        }
        made = std::fs::create_dir_all(dir);
    }
    made.map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(controllers: &[&str]) -> CgroupMount {
        CgroupMount {
            controllers: controllers.iter().map(|c| c.to_string()).collect(),
            root: "/".into(),
            mount_point: "/sys/fs/cgroup/x".into(),
        }
    }

    #[test]
    fn only_hierarchies_systemd_leaves_alone_are_joined() {
        assert!(unmanaged(&mount(&["cpuacct"])));
        assert!(unmanaged(&mount(&["net_cls", "net_prio"])));
        assert!(unmanaged(&mount(&["freezer"])));
        assert!(!unmanaged(&mount(&["cpu", "cpuacct"])), "systemd places units in cpu,cpuacct");
        assert!(!unmanaged(&mount(&["memory"])));
        assert!(!unmanaged(&mount(&["cpuset"])));
        assert!(!unmanaged(&mount(&["hugetlb"])));
        assert!(!unmanaged(&mount(&["name=systemd"])));
        assert!(!unmanaged(&mount(&[])), "cgroup2");
    }
}
