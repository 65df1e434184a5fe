//! Memory QoS and swap: CRI `unified` (cgroup v2 files by name) and `memory_swap_limit_in_bytes`,
//! as systemd unit properties.
//!
//! # What the kubelet sends and what it becomes
//!
//! The kubelet fills `unified` only on cgroup v2 (`pkg/kubelet/kuberuntime/
//! kuberuntime_container_linux.go`): `memory.min` and `memory.high` (MemoryQoS), `memory.swap.max`
//! (NodeSwap: 0 for NoSwap, a share of the node's swap for LimitedSwap) and `memory.oom.group=1`
//! (unless singleProcessOOMKill). Each key of the allow-list maps to the systemd property that
//! writes that file, so that systemd never undoes it on its next cgroup realisation:
//! `memory.min` -> `MemoryMin=`, `memory.low` -> `MemoryLow=`, `memory.high` -> `MemoryHigh=`,
//! `memory.swap.max` -> `MemorySwapMax=`, and `memory.oom.group=1` is what containers' units
//! already have (`OOMPolicy=kill` makes systemd set it). Any other key is an InvalidArgument
//! naming it; so is a key on a node without the unified hierarchy (the kubelet never sends one
//! there), and `memory.oom.group=0` (the unit's OOM policy is fixed).
//!
//! `memory_swap_limit_in_bytes` is memory plus swap, as docker's and runc's on cgroup v1 (the
//! kubelet's NoSwap on v1 sends it equal to the memory limit): 0 is unset, -1 unlimited, other
//! values need a memory limit no larger. On v2 it becomes `MemorySwapMax=` of the difference, as
//! runc converts it (`ConvertMemorySwapToCgroupV2Value`); a `memory.swap.max` in `unified` wins,
//! as in runc. systemd has no swap property on v1: there a limit that grants no swap beyond
//! the memory limit (equal to it, 0, or -1 for the node's default) is recorded and reported, and
//! one that would grant swap is refused.

use std::collections::BTreeMap;

use zbus::zvariant::Value;

use crate::container::Resources;
use crate::error::Error;

/// The `unified` keys the runtime accepts, with the systemd property each becomes.
pub const UNIFIED_KEYS: [(&str, &str); 5] = [
    ("memory.min", "MemoryMin"),
    ("memory.low", "MemoryLow"),
    ("memory.high", "MemoryHigh"),
    ("memory.swap.max", "MemorySwapMax"),
    ("memory.oom.group", "OOMPolicy"),
];

/// A cgroup v2 byte value: a decimal number, or `max`.
fn bytes(key: &str, value: &str) -> Result<u64, Error> {
    if value == "max" {
        return Ok(u64::MAX);
    }
    value
        .parse::<u64>()
        .map_err(|_| Error::InvalidSpec(format!("unified: {key}={value:?} is not a number of bytes or \"max\"")))
}

/// Checks `unified` against the allow-list and the swap limit against the memory limit: what
/// does not depend on the node.
pub fn check(r: &Resources) -> Result<(), Error> {
    for (key, value) in &r.unified {
        if !UNIFIED_KEYS.iter().any(|(k, _)| k == key) {
            let known: Vec<&str> = UNIFIED_KEYS.iter().map(|(k, _)| *k).collect();
            return Err(Error::InvalidSpec(format!(
                "unified: key {key:?} is not supported (supported: {})",
                known.join(", ")
            )));
        }
        if key == "memory.oom.group" {
            if value != "1" {
                return Err(Error::InvalidSpec(format!(
                    "unified: memory.oom.group={value:?}: containers always have it set (OOMPolicy=kill); only \"1\" is accepted"
                )));
            }
        } else {
            bytes(key, value)?;
        }
    }
    match r.memory_swap_limit_in_bytes {
        0 | -1 => {}
        swap if swap < -1 => {
            return Err(Error::InvalidSpec(format!("memory_swap_limit_in_bytes {swap} is negative")));
        }
        swap if r.memory_limit_in_bytes <= 0 => {
            return Err(Error::InvalidSpec(format!(
                "memory_swap_limit_in_bytes {swap} needs a memory_limit_in_bytes (it is memory plus swap)"
            )));
        }
        swap if swap < r.memory_limit_in_bytes => {
            return Err(Error::InvalidSpec(format!(
                "memory_swap_limit_in_bytes {swap} is below memory_limit_in_bytes {} (it is memory plus swap)",
                r.memory_limit_in_bytes
            )));
        }
        _ => {}
    }
    Ok(())
}

/// Checks what the node's cgroups can do: `unified` needs the unified hierarchy, and on v1 no
/// swap beyond the memory limit can be granted through systemd.
pub fn check_on_node(r: &Resources, unified: bool) -> Result<(), Error> {
    if unified {
        return Ok(());
    }
    if let Some(key) = r.unified.keys().next() {
        return Err(Error::InvalidSpec(format!(
            "unified: {key} is a cgroup v2 file and this node's cgroups are v1 (the kubelet sends unified only on cgroup v2)"
        )));
    }
    let swap = r.memory_swap_limit_in_bytes;
    if swap > 0 && swap != r.memory_limit_in_bytes {
        return Err(Error::InvalidSpec(format!(
            "memory_swap_limit_in_bytes {swap}: swap beyond the memory limit cannot be granted on cgroup v1 (systemd has no v1 swap limit)"
        )));
    }
    Ok(())
}

/// The swap a container may use on cgroup v2, in bytes (`u64::MAX`: no limit).
pub fn swap_max(r: &Resources) -> Result<u64, Error> {
    if let Some(value) = r.unified.get("memory.swap.max") {
        return bytes("memory.swap.max", value);
    }
    Ok(match r.memory_swap_limit_in_bytes {
        swap if swap > 0 && r.memory_limit_in_bytes > 0 => (swap - r.memory_limit_in_bytes) as u64,
        _ => u64::MAX,
    })
}

/// The unit properties for memory QoS and swap on cgroup v2 (none on v1, where systemd has
/// none of them). Unset values are systemd's defaults, so that an update lifts them.
pub fn properties(r: &Resources, unified: bool) -> Result<Vec<(&'static str, Value<'static>)>, Error> {
    if !unified {
        return Ok(Vec::new());
    }
    let value = |key: &str, default: u64| r.unified.get(key).map_or(Ok(default), |v| bytes(key, v));
    Ok(vec![
        ("MemoryMin", Value::from(value("memory.min", 0)?)),
        ("MemoryLow", Value::from(value("memory.low", 0)?)),
        ("MemoryHigh", Value::from(value("memory.high", u64::MAX)?)),
        ("MemorySwapMax", Value::from(swap_max(r)?)),
    ])
}

/// The sum of two resource sets, for a pod's slice: its containers' resources and its overhead.
/// Limits add up when both are set; an unset one (0) is no limit.
pub fn pod_slice_resources(resources: &Resources, overhead: &Resources) -> Resources {
    let sum = |a: i64, b: i64| {
        if a > 0 && b > 0 {
            a + b
        } else if b > 0 {
            0
        } else {
            a
        }
    };
    let period = if resources.cpu_period > 0 { resources.cpu_period } else { overhead.cpu_period };
    Resources {
        cpu_period: period,
        // Quotas are per period: an overhead at another period is scaled to this one.
        cpu_quota: match (resources.cpu_quota, overhead.cpu_quota) {
            (a, b) if a > 0 && b > 0 && overhead.cpu_period > 0 && overhead.cpu_period != period => {
                a + b * period / overhead.cpu_period
            }
            (a, b) => sum(a, b),
        },
        cpu_shares: resources.cpu_shares.max(0) + overhead.cpu_shares.max(0),
        memory_limit_in_bytes: sum(resources.memory_limit_in_bytes, overhead.memory_limit_in_bytes),
        unified: BTreeMap::new(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(unified: &[(&str, &str)]) -> Resources {
        Resources {
            memory_limit_in_bytes: 64 << 20,
            unified: unified.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_kubelets_keys_are_accepted_and_others_named() {
        let kubelet = resources(&[
            ("memory.min", "1048576"),
            ("memory.high", "max"),
            ("memory.swap.max", "0"),
            ("memory.oom.group", "1"),
        ]);
        check(&kubelet).unwrap();
        let unknown = check(&resources(&[("cpu.weight", "100")])).unwrap_err().to_string();
        assert!(unknown.contains("\"cpu.weight\"") && unknown.contains("memory.high"), "{unknown}");
        let bad = check(&resources(&[("memory.high", "lots")])).unwrap_err().to_string();
        assert!(bad.contains("memory.high") && bad.contains("lots"), "{bad}");
        assert!(check(&resources(&[("memory.oom.group", "0")])).is_err());
    }

    #[test]
    fn swap_limit_is_memory_plus_swap() {
        let mut r = resources(&[]);
        r.memory_swap_limit_in_bytes = 96 << 20;
        check(&r).unwrap();
        assert_eq!(swap_max(&r).unwrap(), 32 << 20);
        r.memory_swap_limit_in_bytes = 64 << 20;
        assert_eq!(swap_max(&r).unwrap(), 0);
        r.memory_swap_limit_in_bytes = -1;
        assert_eq!(swap_max(&r).unwrap(), u64::MAX);
        r.memory_swap_limit_in_bytes = 0;
        assert_eq!(swap_max(&r).unwrap(), u64::MAX);
        // unified wins, as in runc
        r.unified.insert("memory.swap.max".into(), "4096".into());
        r.memory_swap_limit_in_bytes = 96 << 20;
        assert_eq!(swap_max(&r).unwrap(), 4096);
        r.memory_swap_limit_in_bytes = 32 << 20;
        assert!(check(&r).unwrap_err().to_string().contains("below memory_limit_in_bytes"));
        r.memory_limit_in_bytes = 0;
        assert!(check(&r).unwrap_err().to_string().contains("needs a memory_limit_in_bytes"));
    }

    #[test]
    fn cgroup_v1_refuses_unified_and_granted_swap() {
        let mut r = resources(&[("memory.high", "1000000")]);
        let refused = check_on_node(&r, false).unwrap_err().to_string();
        assert!(refused.contains("memory.high") && refused.contains("v1"), "{refused}");
        check_on_node(&r, true).unwrap();
        r.unified.clear();
        r.memory_swap_limit_in_bytes = r.memory_limit_in_bytes;
        check_on_node(&r, false).unwrap();
        assert!(properties(&r, false).unwrap().is_empty());
        r.memory_swap_limit_in_bytes += 1;
        assert!(check_on_node(&r, false).is_err());
    }

    #[test]
    fn pod_slice_limits_add_the_overhead() {
        let resources = Resources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 100,
            ..Default::default()
        };
        let overhead = Resources {
            cpu_period: 100_000,
            cpu_quota: 10_000,
            cpu_shares: 2,
            memory_limit_in_bytes: 20,
            ..Default::default()
        };
        let slice = pod_slice_resources(&resources, &overhead);
        assert_eq!((slice.cpu_quota, slice.cpu_shares, slice.memory_limit_in_bytes), (60_000, 514, 120));
        // No container limit: no pod limit, whatever the overhead.
        let unlimited = Resources { memory_limit_in_bytes: 0, ..resources.clone() };
        assert_eq!(pod_slice_resources(&unlimited, &overhead).memory_limit_in_bytes, 0);
        assert_eq!(pod_slice_resources(&resources, &Resources::default()).memory_limit_in_bytes, 100);
    }
}
