//! The cgroups init sees: the unit's own cgroup, the cgroup file systems mounted on the node,
//! and the cgroup v1 hierarchies that systemd does not place units in, joined by the container's
//! init as runc's systemd driver joins every v1 hierarchy (`libcontainer/cgroups/systemd/v1.go`).
//!
//! systemd 252 only realizes the v1 controllers it drives (cpu, memory, blkio, devices, pids;
//! cpuacct only when mounted together with cpu). On a node where cpuacct has a hierarchy of its
//! own, a unit's processes stay in that hierarchy's root, and the kubelet's (cadvisor's) pod CPU,
//! read from the pod slice's `cpuacct.usage`, is 0. init, still root in the node's namespaces,
//! makes the unit's cgroup path in each such hierarchy and joins it before it forks the
//! entrypoint (which inherits it; `exec-in` follows the main process into every hierarchy). The
//! daemon removes those directories, and the parents left empty, with the container
//! (`runtime/src/cgroup_v1.rs`).
//! Not joined: cpuset (a new v1 cpuset cgroup has no CPUs until written; CPU sets are applied
//! with `CPUAffinity=` on v1) and hugetlb (`hugetlb.rs`, with the limits).

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Controllers systemd never puts a unit's processes in on cgroup v1.
const UNMANAGED: &[&str] = &["cpuacct", "freezer", "net_cls", "net_prio", "perf_event", "rdma", "misc"];

/// The path of the systemd unit's cgroup in a `/proc/<pid>/cgroup` text: the `name=systemd`
/// hierarchy on cgroup v1 (hybrid), the unified `0::` one otherwise.
pub fn systemd_cgroup(cgroups: &str) -> Option<String> {
    let path = |line: &str| line.splitn(3, ':').nth(2).map(str::to_string);
    cgroups
        .lines()
        .find(|l| l.split(':').nth(1) == Some("name=systemd"))
        .or_else(|| cgroups.lines().find(|l| l.starts_with("0::")))
        .and_then(path)
}

/// A cgroup file system mounted here: v1 (with its controllers or `name=`) or v2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupMount {
    /// "" for cgroup2, else the super options naming the hierarchy (`memory`, `name=systemd`).
    pub controllers: Vec<String>,
    /// The cgroup at the mount's root, and where it is mounted.
    pub root: String,
    pub mount_point: String,
}

pub fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else { continue };
        let fields: Vec<&str> = before.split(' ').collect();
        let rest: Vec<&str> = after.split(' ').collect();
        if fields.len() < 5 || rest.len() < 3 {
            continue;
        }
        let unescape = |s: &str| s.replace("\\040", " ");
        let controllers = match rest[0] {
            "cgroup2" => Vec::new(),
            "cgroup" => rest[2]
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent"))
                .map(str::to_string)
                .collect(),
            _ => continue,
        };
        mounts.push(CgroupMount { controllers, root: unescape(fields[3]), mount_point: unescape(fields[4]) });
    }
    mounts
}

/// A v1 hierarchy whose controllers are all unmanaged by systemd (so `cpu,cpuacct` is not).
pub fn unmanaged(mount: &CgroupMount) -> bool {
    !mount.controllers.is_empty() && mount.controllers.iter().all(|c| UNMANAGED.contains(&c.as_str()))
}

impl CgroupMount {
    /// The file system type: `cgroup2`, or `cgroup` (v1) for a hierarchy with controllers or a name.
    pub fn fstype(&self) -> &'static str {
        if self.controllers.is_empty() { "cgroup2" } else { "cgroup" }
    }
}

/// The node's cgroup mounts as the daemon read them (once, at its first CreateContainer:
/// [`InitSpec::cgroup_mounts`]), when init or exec-in was given them.
///
/// [`InitSpec::cgroup_mounts`]: crate::InitSpec::cgroup_mounts
static GIVEN: OnceLock<Vec<CgroupMount>> = OnceLock::new();

/// Takes the daemon's list of cgroup mounts (from the spec) for [`mounts`]. Reading
/// /proc/self/mountinfo costs O(mounts on the node): 3 ms with 2000 pod mounts in a test node at
/// load 2, 28 ms at load 7, several times per container start and once per exec otherwise.
pub fn use_given_mounts(mounts: Option<&[CgroupMount]>) {
    if let Some(mounts) = mounts {
        let _ = GIVEN.set(mounts.to_vec());
    }
}

/// The cgroup file systems mounted in this process's mount namespace: the daemon's list when
/// given ([`use_given_mounts`]), else read from mountinfo.
pub fn mounts() -> std::io::Result<Vec<CgroupMount>> {
    if let Some(given) = GIVEN.get() {
        return Ok(given.clone());
    }
    std::fs::read_to_string("/proc/self/mountinfo").map(|m| cgroup_mounts(&m))
}

/// init: joins the unit's cgroup path (`relative`, its systemd cgroup) in every unmanaged v1
/// hierarchy it is not in yet.
pub(crate) fn join_unmanaged_v1(relative: &str) -> Result<()> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|source| Error::File { what: "cannot read /proc/self/cgroup".into(), source })?;
    for mount in mounts().unwrap_or_default().iter().filter(|m| unmanaged(m)) {
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
            .map_err(|source| Error::File { what: format!("cannot join {}", dir.display()), source })?;
    }
    Ok(())
}

/// Creates a cgroup directory and its parents. A concurrent removal of an empty parent (another
/// pod's last container) can take a directory away mid-way: it is tried again a few times.
pub fn create_cgroup_dir(dir: &Path) -> Result<()> {
    let mut made = std::fs::create_dir_all(dir);
    for _ in 0..3 {
        if made.is_ok() {
            break;
        }
        made = std::fs::create_dir_all(dir);
    }
    made.map_err(|source| Error::File { what: format!("cannot create {}", dir.display()), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_cgroup_line_is_found_on_v1_and_v2() {
        let v1 = "12:memory:/a.slice/cri-x.service\n1:name=systemd:/a.slice/cri-x.service\n0::/\n";
        assert_eq!(systemd_cgroup(v1).as_deref(), Some("/a.slice/cri-x.service"));
        assert_eq!(systemd_cgroup("0::/a.slice/cri-y.service\n").as_deref(), Some("/a.slice/cri-y.service"));
        assert_eq!(systemd_cgroup("5:cpu:/\n"), None);
    }

    #[test]
    fn cgroup_mounts_are_read_from_mountinfo() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:27 / /sys/fs/cgroup/systemd rw,nosuid shared:6 - cgroup cgroup rw,xattr,name=systemd
34 25 0:30 /sub /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
40 25 0:40 / /proc rw - proc proc rw
";
        let mounts = cgroup_mounts(mountinfo);
        assert_eq!(mounts.len(), 3);
        assert_eq!(
            mounts[0],
            CgroupMount { controllers: vec![], root: "/".into(), mount_point: "/sys/fs/cgroup/unified".into() }
        );
        assert_eq!(mounts[1].controllers, ["xattr", "name=systemd"]);
        assert_eq!(
            (mounts[2].controllers.clone(), mounts[2].root.as_str()),
            (vec!["cpu".to_string(), "cpuacct".to_string()], "/sub")
        );
    }

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
