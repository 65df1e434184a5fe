//! Hugepage limits (CRI `hugepage_limits`), the daemon's side: page sizes checked at
//! CreateContainer, live changes by UpdateContainerResources, and the removal of a container's v1
//! hugetlb cgroup (ours to delete). init applies the limits before the entrypoint runs; how, on
//! cgroup v1 and v2, is in `init/src/hugetlb.rs`, whose hierarchy lookup and writes this reuses.
//!
//! # Hugepage limits, end to end
//!
//! systemd 252 has no property for the hugetlb controller and never places units in a v1 hugetlb
//! hierarchy, so cri-systemd drives it itself, from init (`hugepage_limits` in `init.json`): init
//! is the unit's first process and still root in the node's namespaces, so the limit is in place
//! before the entrypoint is forked, whatever the daemon does meanwhile. cgroup v1 (a hierarchy with
//! `hugetlb` mounted): init creates `<hugetlb mount>/<the unit's cgroup path>`, writes
//! `hugetlb.<size>.limit_in_bytes` and joins it (`cgroup.procs`); the entrypoint inherits it,
//! exec-in joins it like every hierarchy of the main process. The daemon removes that directory,
//! and the parents it leaves empty, with the container (RemoveContainer, pod removal, recovery of
//! half-done removals). cgroup v2, or the unified hierarchy of a hybrid node whose v1 mounts do not
//! take hugetlb (the test machines: the nodes enable it down to their cgroup): init enables
//! `+hugetlb` in `cgroup.subtree_control` of every ancestor of its cgroup (as runc's systemd driver
//! does for controllers systemd does not know; systemd only writes the controllers it knows there,
//! so it never takes it back) and writes `hugetlb.<size>.max` in the unit's cgroup, which systemd
//! creates and removes. The `rsvd` (reservation) limits get the same value when the kernel has
//! them. UpdateContainerResources writes the same files live (on v1 it also moves the unit's
//! processes in) or, for a created container, its `init.json`. Page sizes must be the node's
//! (`/sys/kernel/mm/hugepages`, InvalidArgument otherwise); a non-zero limit on a node without the
//! controller is refused (FailedPrecondition, naming the page size). Limits that are all 0 (what
//! the kubelet sends for every page size when a pod asks for no hugepages) are accepted and not
//! enforced: no cgroup work for every container, but such a pod is not kept from hugepages the node
//! has free.

use std::path::Path;

use init::hugetlb::{Hierarchy, apply_at, cri_name, page_size_kib};

use crate::Error;
use crate::container::HugepageLimit;

const HUGEPAGES_DIR: &str = "/sys/kernel/mm/hugepages";

/// Whether the limits ask for anything to be enforced (see `init::hugetlb::wanted`).
pub(crate) use init::hugetlb::wanted;

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

    fn tree(root: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                found.push(format!("{}/", path.strip_prefix(root).unwrap().display()));
                stack.push(path);
            }
        }
        found.sort();
        found
    }

    // init makes the v1 cgroup (init's hugetlb tests); the daemon removes it with the container.
    #[test]
    fn v1_removal_takes_the_units_cgroup_and_the_parents_it_leaves_empty() {
        let root = std::env::temp_dir().join(format!("hugetlb-v1-remove-{}", std::process::id()));
        std::fs::create_dir_all(root.join("kubepods.slice/kubepods-pod1.slice/cri-x.service")).unwrap();
        std::fs::create_dir(root.join("kubepods.slice/other.slice")).unwrap();
        remove_in(&root, "kubepods-pod1.slice", Some("cri-x.service")).unwrap();
        assert_eq!(tree(&root), ["kubepods.slice/", "kubepods.slice/other.slice/"], "a parent in use stays");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unknown_page_sizes_are_refused() {
        let limit = |size: &str| vec![HugepageLimit { page_size: size.into(), limit: 0 }];
        assert!(matches!(check(&limit("3MB")), Err(Error::InvalidSpec(m)) if m.contains("\"3MB\"")));
        assert!(matches!(check(&limit("bogus")), Err(Error::InvalidSpec(_))));
    }
}
