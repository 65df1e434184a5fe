//! Hugepage limits (CRI `hugepage_limits`) through the kernel's hugetlb controller, which
//! systemd 252 does not manage (no unit property, and it never places units in a v1 hugetlb
//! hierarchy). Used by init (the limits are in place before the entrypoint runs), by
//! UpdateContainerResources (live changes) and by removals (v1 directories are ours to delete).
//!
//! - cgroup v1 (a hierarchy with the `hugetlb` controller mounted): the container's cgroup is
//!   created there at the same relative path as its unit's cgroup in the other hierarchies,
//!   `hugetlb.<size>.limit_in_bytes` is written, and init writes itself into it before it forks
//!   the entrypoint (exec-in joins every hierarchy of the main process, this one included).
//! - cgroup v2, pure or the unified hierarchy of a hybrid node whose v1 mounts do not take
//!   hugetlb: the controller is enabled in `cgroup.subtree_control` of every ancestor of the
//!   unit's cgroup (as runc's systemd driver does for controllers systemd does not know; systemd
//!   only writes the controllers it knows there, so it never takes it away), then
//!   `hugetlb.<size>.max` is written in the unit's cgroup, which systemd creates and removes.
//!
//! The reservation limits (`rsvd`, Linux 5.7+) get the same value when the kernel has them, as
//! runc does: with them a mapping beyond the limit fails at mmap rather than at the first touch.

use std::path::{Path, PathBuf};

use crate::Error;
use crate::container::HugepageLimit;

const CONTROLLER: &str = "hugetlb";
const HUGEPAGES_DIR: &str = "/sys/kernel/mm/hugepages";

/// Whether the limits ask for anything to be enforced. The kubelet sends a zero limit for every
/// page size of the node when the pod asked for none; those alone are left unenforced (as before
/// hugetlb support: no cgroup work for every container).
pub(crate) fn wanted(limits: &[HugepageLimit]) -> bool {
    limits.iter().any(|l| l.limit != 0)
}

/// The size in KiB of a CRI page size name: "2MB" (2048), "1GB", "64KB".
fn page_size_kib(name: &str) -> Option<u64> {
    let split = name.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = name.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor = match unit {
        "KB" => 1,
        "MB" => 1 << 10,
        "GB" => 1 << 20,
        _ => return None,
    };
    number.checked_mul(factor).filter(|&kib| kib > 0)
}

/// The page sizes this node's kernel has, as CRI names them ("2MB", "1GB").
fn node_page_sizes() -> Vec<String> {
    let mut sizes: Vec<(u64, String)> = std::fs::read_dir(HUGEPAGES_DIR)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let kib: u64 = name.strip_prefix("hugepages-")?.strip_suffix("kB")?.parse().ok()?;
                    Some((kib, cri_name(kib)))
                })
                .collect()
        })
        .unwrap_or_default();
    sizes.sort();
    sizes.into_iter().map(|(_, name)| name).collect()
}

/// The kernel's name of a size in the controller's files, which is also the CRI one.
fn cri_name(kib: u64) -> String {
    if kib >= 1 << 20 && kib.is_multiple_of(1 << 20) {
        format!("{}GB", kib >> 20)
    } else if kib >= 1 << 10 && kib.is_multiple_of(1 << 10) {
        format!("{}MB", kib >> 10)
    } else {
        format!("{kib}KB")
    }
}

/// Refuses page sizes the node does not have (InvalidArgument) and, when something is to be
/// enforced, a node without the hugetlb controller (FailedPrecondition), naming the page size.
pub(crate) fn check(limits: &[HugepageLimit]) -> Result<(), Error> {
    let sizes = node_page_sizes();
    for limit in limits {
        let known = page_size_kib(&limit.page_size).is_some_and(|kib| sizes.contains(&cri_name(kib)));
        if !known {
            return Err(Error::InvalidSpec(format!(
                "hugepage size {:?} is not one of this node's ({})",
                limit.page_size,
                if sizes.is_empty() { "none".to_string() } else { sizes.join(", ") }
            )));
        }
    }
    if let Some(limit) = limits.iter().find(|l| l.limit != 0) {
        Hierarchy::find().map_err(|why| {
            Error::NodeUnsupported(format!(
                "cannot limit {} hugepages to {} bytes: {why}",
                limit.page_size, limit.limit
            ))
        })?;
    }
    Ok(())
}

/// Where the hugetlb controller is: its mount point and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hierarchy {
    V1(PathBuf),
    V2(PathBuf),
}

impl Hierarchy {
    fn find() -> Result<Hierarchy, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mounts = crate::init::exec_in::cgroup_mounts(&mountinfo);
        if let Some(m) = mounts.iter().find(|m| m.controllers.iter().any(|c| c == CONTROLLER)) {
            return Ok(Hierarchy::V1(PathBuf::from(&m.mount_point)));
        }
        for m in mounts.iter().filter(|m| m.controllers.is_empty()) {
            let controllers =
                std::fs::read_to_string(Path::new(&m.mount_point).join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == CONTROLLER) {
                return Ok(Hierarchy::V2(PathBuf::from(&m.mount_point)));
            }
        }
        Err("this node has no hugetlb controller (no cgroup v1 hierarchy with it, and not in the cgroup2 root's \
             cgroup.controllers)"
            .into())
    }

    fn dir(&self, relative: &str) -> PathBuf {
        let (Hierarchy::V1(mount) | Hierarchy::V2(mount)) = self;
        mount.join(relative.trim_start_matches('/'))
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

/// Applies `limits` to the cgroup at `relative` (a unit's cgroup path, as in /proc/<pid>/cgroup),
/// creating it on cgroup v1; `join`: also moves these processes into it on v1 (on v2 they are in
/// the unit's cgroup already).
fn apply_at(limits: &[HugepageLimit], relative: &str, join: &[u32]) -> Result<(), String> {
    apply_in(&Hierarchy::find()?, limits, relative, join)
}

fn apply_in(hierarchy: &Hierarchy, limits: &[HugepageLimit], relative: &str, join: &[u32]) -> Result<(), String> {
    let dir = hierarchy.dir(relative);
    let files: (&str, &str) = match hierarchy {
        Hierarchy::V1(_) => {
            crate::cgroup_v1::create_cgroup_dir(&dir)?;
            ("limit_in_bytes", "rsvd.limit_in_bytes")
        }
        Hierarchy::V2(mount) => {
            let mut ancestor = mount.clone();
            let parents: Vec<&str> = relative.trim_start_matches('/').split('/').filter(|p| !p.is_empty()).collect();
            for part in parents.iter().take(parents.len().saturating_sub(1)).map(Some).chain([None]) {
                let control = ancestor.join("cgroup.subtree_control");
                let enabled = std::fs::read_to_string(&control).unwrap_or_default();
                if !enabled.split_whitespace().any(|c| c == CONTROLLER) {
                    write(&control, &format!("+{CONTROLLER}"))?;
                }
                match part {
                    Some(part) => ancestor.push(part),
                    None => break,
                }
            }
            ("max", "rsvd.max")
        }
    };
    for limit in limits {
        let kib = page_size_kib(&limit.page_size).ok_or_else(|| format!("bad hugepage size {:?}", limit.page_size))?;
        let name = cri_name(kib);
        let value = limit.limit.to_string();
        write(&dir.join(format!("hugetlb.{name}.{}", files.0)), &value)?;
        let reserved = dir.join(format!("hugetlb.{name}.{}", files.1));
        if reserved.exists() {
            write(&reserved, &value)?;
        }
    }
    if matches!(hierarchy, Hierarchy::V1(_)) {
        for pid in join {
            match std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
                Ok(()) => {}
                // Gone meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(format!("cannot move process {pid} into {}: {e}", dir.display())),
            }
        }
    }
    Ok(())
}

/// init: applies the limits to its own cgroup (the unit's) and, on v1, joins it, so that the
/// entrypoint it forks next starts limited.
pub(crate) fn apply_to_self(limits: &[HugepageLimit]) -> Result<(), String> {
    let cgroups =
        std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let relative = crate::init::exec_in::systemd_cgroup(&cgroups)
        .ok_or_else(|| "/proc/self/cgroup names no systemd cgroup".to_string())?;
    apply_at(limits, &relative, &[std::process::id()]).map_err(|e| format!("hugepage limits: {e}"))
}

/// UpdateContainerResources on a running container: new limits, at once. On v1 the unit's
/// processes are (re)written into the hugetlb cgroup, which a container started without limits
/// does not have yet.
pub(crate) fn apply_to_unit(limits: &[HugepageLimit], slice: &str, unit: &str) -> Result<(), Error> {
    let relative = crate::stats::cgroup_path(slice, Some(unit));
    let procs = match Hierarchy::find() {
        Ok(Hierarchy::V1(_)) => {
            let systemd =
                Path::new("/sys/fs/cgroup/systemd").join(relative.trim_start_matches('/')).join("cgroup.procs");
            std::fs::read_to_string(&systemd)
                .map_err(Error::io(format!("cannot list the processes of {unit}")))?
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        }
        _ => Vec::new(),
    };
    apply_at(limits, &relative, &procs)
        .map_err(|e| Error::NodeUnsupported(format!("cannot set the hugepage limits of {unit}: {e}")))
}

/// Removes a container's v1 hugetlb cgroup (its unit stopped) and the parents it leaves empty.
/// Nothing to do on v2 (systemd removes the unit's cgroup) or without the controller.
pub(crate) fn remove(slice: &str, unit: Option<&str>) -> Result<(), Error> {
    match Hierarchy::find() {
        Ok(Hierarchy::V1(mount)) => remove_in(&mount, slice, unit),
        _ => Ok(()),
    }
}

pub(crate) fn remove_in(mount: &Path, slice: &str, unit: Option<&str>) -> Result<(), Error> {
    let mut dir = mount.join(crate::stats::cgroup_path(slice, unit).trim_start_matches('/'));
    if !dir.exists() {
        return Ok(());
    }
    // The unit's processes were killed; the last ones may still be exiting.
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(&dir) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 40 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(Error::Io { what: format!("cannot remove {}", dir.display()), source: e }),
        }
    }
    // Parents (the pod's slice, kubepods.slice...) go once empty; another container may still
    // use them (EBUSY) or have removed them already.
    while dir.pop() && dir != mount && dir.starts_with(mount) {
        if std::fs::remove_dir(&dir).is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_names_are_parsed_as_cri_and_the_kernel_spell_them() {
        assert_eq!(page_size_kib("2MB"), Some(2048));
        assert_eq!(page_size_kib("1GB"), Some(1 << 20));
        assert_eq!(page_size_kib("64KB"), Some(64));
        for bad in ["", "MB", "2mb", "2M", "0MB", "2 MB", "-2MB", "2TB"] {
            assert_eq!(page_size_kib(bad), None, "{bad}");
        }
        assert_eq!(cri_name(2048), "2MB");
        assert_eq!(cri_name(1 << 20), "1GB");
        assert_eq!(cri_name(64), "64KB");
        assert_eq!(cri_name(32 << 10), "32MB");
    }

    fn tree(root: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let name = path.strip_prefix(root).unwrap().display().to_string();
                if path.is_dir() {
                    stack.push(path);
                    found.push(format!("{name}/"));
                } else {
                    found.push(format!("{name}={}", std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        found.sort();
        found
    }

    const UNIT: &str = "/kubepods.slice/kubepods-pod1.slice/cri-x.service";

    // The files written, in a plain directory standing for the mount (the kernel's refusals are
    // what the e2e tests see).
    #[test]
    fn v1_makes_the_units_cgroup_writes_the_limits_and_joins() {
        let root = std::env::temp_dir().join(format!("hugetlb-v1-{}", std::process::id()));
        let limits = [
            HugepageLimit { page_size: "2MB".into(), limit: 4 << 20 },
            HugepageLimit { page_size: "1GB".into(), limit: 0 },
        ];
        apply_in(&Hierarchy::V1(root.clone()), &limits, UNIT, &[42]).unwrap();
        assert_eq!(
            tree(&root),
            [
                "kubepods.slice/",
                "kubepods.slice/kubepods-pod1.slice/",
                "kubepods.slice/kubepods-pod1.slice/cri-x.service/",
                "kubepods.slice/kubepods-pod1.slice/cri-x.service/cgroup.procs=42",
                "kubepods.slice/kubepods-pod1.slice/cri-x.service/hugetlb.1GB.limit_in_bytes=0",
                "kubepods.slice/kubepods-pod1.slice/cri-x.service/hugetlb.2MB.limit_in_bytes=4194304",
            ]
        );
        // Removal (the kernel's cgroup files go with the directory; here they are removed first).
        let unit_dir = root.join(UNIT.trim_start_matches('/'));
        for f in ["cgroup.procs", "hugetlb.1GB.limit_in_bytes", "hugetlb.2MB.limit_in_bytes"] {
            std::fs::remove_file(unit_dir.join(f)).unwrap();
        }
        std::fs::create_dir(root.join("kubepods.slice/other.slice")).unwrap();
        remove_in(&root, "kubepods-pod1.slice", Some("cri-x.service")).unwrap();
        assert_eq!(tree(&root), ["kubepods.slice/", "kubepods.slice/other.slice/"], "a parent in use stays");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_enables_the_controller_in_every_ancestor_and_writes_max() {
        let root = std::env::temp_dir().join(format!("hugetlb-v2-{}", std::process::id()));
        let unit_dir = root.join(UNIT.trim_start_matches('/'));
        std::fs::create_dir_all(&unit_dir).unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "cpu memory hugetlb").unwrap();
        std::fs::write(unit_dir.join("hugetlb.2MB.rsvd.max"), "max").unwrap();
        let limits = [HugepageLimit { page_size: "2MB".into(), limit: 2 << 20 }];
        apply_in(&Hierarchy::V2(root.clone()), &limits, UNIT, &[42]).unwrap();
        assert_eq!(
            tree(&root),
            [
                "cgroup.subtree_control=cpu memory hugetlb",
                "kubepods.slice/",
                "kubepods.slice/cgroup.subtree_control=+hugetlb",
                "kubepods.slice/kubepods-pod1.slice/",
                "kubepods.slice/kubepods-pod1.slice/cgroup.subtree_control=+hugetlb",
                "kubepods.slice/kubepods-pod1.slice/cri-x.service/",
                "kubepods.slice/kubepods-pod1.slice/cri-x.service/hugetlb.2MB.max=2097152",
                "kubepods.slice/kubepods-pod1.slice/cri-x.service/hugetlb.2MB.rsvd.max=2097152",
            ]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unknown_page_sizes_are_refused() {
        let limit = |size: &str| vec![HugepageLimit { page_size: size.into(), limit: 0 }];
        assert!(matches!(check(&limit("3MB")), Err(Error::InvalidSpec(m)) if m.contains("\"3MB\"")));
        assert!(matches!(check(&limit("bogus")), Err(Error::InvalidSpec(_))));
    }
}
