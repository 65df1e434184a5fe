//! cgroup v1 hierarchies that systemd does not place units in: container init joins the unit's
//! path in each of them (`init/src/cgroup.rs` says which and why); the daemon removes those
//! directories, and the parents left empty, with the container.
//!
//! # Why init joins them
//!
//! systemd places units only in the v1 hierarchies it drives; as runc's systemd driver does,
//! container init joins the unit's path in the others it may (`init/src/cgroup.rs`: cpuacct mounted
//! on its own, freezer, net_cls/net_prio, perf_event, rdma, misc; not cpuset), so the pod slice's
//! `cpuacct.usage`, the kubelet's pod CPU on v1, counts its containers; the daemon removes those
//! directories with the container and the pod.

use std::path::Path;

use crate::error::Error;

/// Removes a stopped container's cgroups in the unmanaged v1 hierarchies (or, with `unit`
/// None, what is left of a pod's slice there), and the parents they leave empty.
pub(crate) fn remove(slice: &str, unit: Option<&str>) -> Result<(), Error> {
    for mount in init::cgroup::mounts().unwrap_or_default().iter().filter(|m| init::cgroup::unmanaged(m)) {
        crate::hugetlb::remove_in(Path::new(&mount.mount_point), slice, unit)?;
    }
    Ok(())
}
