//! Hugepage limits (CRI `hugepage_limits`) through the kernel's hugetlb controller, which
//! systemd 252 does not manage (no unit property, and it never places units in a v1 hugetlb
//! hierarchy). This is init's side (the limits are in place before the entrypoint runs) and what the
//! daemon shares with it; the daemon's side (checks at CreateContainer, live changes by
//! UpdateContainerResources, removal of v1 directories) is `runtime/src/hugetlb.rs`.
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

use crate::{Error, HugepageLimit, Result};

const CONTROLLER: &str = "hugetlb";

/// Whether the limits ask for anything to be enforced. The kubelet sends a zero limit for every
/// page size of the node when the pod asked for none; those alone are left unenforced (as before
/// hugetlb support: no cgroup work for every container).
pub fn wanted(limits: &[HugepageLimit]) -> bool {
    limits.iter().any(|l| l.limit != 0)
}

/// The size in KiB of a CRI page size name: "2MB" (2048), "1GB", "64KB".
pub fn page_size_kib(name: &str) -> Option<u64> {
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

/// The kernel's name of a size in the controller's files, which is also the CRI one.
pub fn cri_name(kib: u64) -> String {
    if kib >= 1 << 20 && kib.is_multiple_of(1 << 20) {
        format!("{}GB", kib >> 20)
    } else if kib >= 1 << 10 && kib.is_multiple_of(1 << 10) {
        format!("{}MB", kib >> 10)
    } else {
        format!("{kib}KB")
    }
}

/// Where the hugetlb controller is: its mount point and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    V1(PathBuf),
    V2(PathBuf),
}

impl Hierarchy {
    pub fn find() -> Result<Hierarchy> {
        let mounts = crate::cgroup::mounts()
            .map_err(|source| Error::File { what: "cannot read /proc/self/mountinfo".into(), source })?;
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
        Err(Error::new(
            "this node has no hugetlb controller (no cgroup v1 hierarchy with it, and not in the cgroup2 root's \
             cgroup.controllers)",
        ))
    }

    pub fn dir(&self, relative: &str) -> PathBuf {
        let (Hierarchy::V1(mount) | Hierarchy::V2(mount)) = self;
        mount.join(relative.trim_start_matches('/'))
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value)
        .map_err(|source| Error::File { what: format!("cannot write {value:?} to {}", path.display()), source })
}

/// Applies `limits` to the cgroup at `relative` (a unit's cgroup path, as in `/proc/<pid>/cgroup`),
/// creating it on cgroup v1; `join`: also moves these processes into it on v1 (on v2 they are in
/// the unit's cgroup already).
pub fn apply_at(limits: &[HugepageLimit], relative: &str, join: &[u32]) -> Result<()> {
    apply_in(&Hierarchy::find()?, limits, relative, join)
}

fn apply_in(hierarchy: &Hierarchy, limits: &[HugepageLimit], relative: &str, join: &[u32]) -> Result<()> {
    let dir = hierarchy.dir(relative);
    let files: (&str, &str) = match hierarchy {
        Hierarchy::V1(_) => {
            crate::cgroup::create_cgroup_dir(&dir)?;
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
        let kib = page_size_kib(&limit.page_size)
            .ok_or_else(|| Error::invalid(format!("bad hugepage size {:?}", limit.page_size)))?;
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
                Err(source) => {
                    return Err(Error::File {
                        what: format!("cannot move process {pid} into {}", dir.display()),
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}

/// init: applies the limits to its own cgroup (the unit's) and, on v1, joins it, so that the
/// entrypoint it forks next starts limited.
pub(crate) fn apply_to_self(limits: &[HugepageLimit]) -> Result<()> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|source| Error::File { what: "cannot read /proc/self/cgroup".into(), source })?;
    let relative = crate::cgroup::systemd_cgroup(&cgroups)
        .ok_or_else(|| Error::new("/proc/self/cgroup names no systemd cgroup"))?;
    apply_at(limits, &relative, &[std::process::id()]).map_err(|e| e.context("hugepage limits"))
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
}
