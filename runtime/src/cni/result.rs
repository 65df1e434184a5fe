//! Reading a CNI ADD result (spec 0.3.0 to 1.0.0 share its shape): the pod's IPs.

use std::net::IpAddr;

use serde_json::Value;

/// The addresses the result gives the pod's interface `ifname`, IPv4 first (the kubelet takes
/// the first as the pod IP, and containerd orders them so too), each family in result order.
/// An IP tied (by its `interface` index) to an interface other than the pod's is not the pod's:
/// e.g. a gateway address on the host's bridge.
pub(crate) fn pod_ips(result: &Value, ifname: &str) -> Result<Vec<IpAddr>, String> {
    let interfaces = match result.get("interfaces") {
        None | Some(Value::Null) => &Vec::new(),
        Some(Value::Array(list)) => list,
        Some(_) => return Err("\"interfaces\" is not a list".into()),
    };
    let ips = match result.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err("\"ips\" is not a list".into()),
    };
    let mut found = Vec::new();
    for ip in ips {
        let address = ip.get("address").and_then(|a| a.as_str()).ok_or("an ips entry has no \"address\"")?;
        let (addr, prefix) =
            address.split_once('/').ok_or_else(|| format!("address {address:?} is not in CIDR notation"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("address {address:?} is not an IP address"))?;
        prefix.parse::<u8>().map_err(|_| format!("address {address:?} has a bad prefix length"))?;
        if let Some(index) = ip.get("interface").filter(|i| !i.is_null()) {
            let index = index.as_u64().ok_or("an ips entry's \"interface\" is not an index")?;
            let interface = interfaces.get(index as usize).ok_or_else(|| {
                format!("ips entry {address} names interface {index}, which is not in \"interfaces\"")
            })?;
            let in_sandbox = interface.get("sandbox").and_then(|s| s.as_str()).is_some_and(|s| !s.is_empty());
            let name = interface.get("name").and_then(|n| n.as_str()).unwrap_or_default();
            if !in_sandbox || name != ifname {
                continue;
            }
        }
        if !found.contains(&addr) {
            found.push(addr);
        }
    }
    // A stable sort keeps each family's order.
    found.sort_by_key(|ip| ip.is_ipv6());
    Ok(found)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bridge_result_gives_the_sandbox_interface_addresses() {
        let result = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "0a:58:0a:58:00:01"},
                {"name": "veth1", "mac": "c2:ac:1e:29:f7:f8"},
                {"name": "eth0", "mac": "a6:bd:d5:77:d7:18", "sandbox": "/run/cri-systemd/pods/x/ns/net"},
            ],
            "ips": [
                {"interface": 2, "address": "fd00:10::5/64", "gateway": "fd00:10::1"},
                {"interface": 0, "address": "10.88.0.1/16"},
                {"interface": 2, "address": "10.88.0.5/16", "gateway": "10.88.0.1"},
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {},
        });
        let ips = pod_ips(&result, "eth0").unwrap();
        assert_eq!(ips, vec!["10.88.0.5".parse::<IpAddr>().unwrap(), "fd00:10::5".parse().unwrap()]);
    }

    #[test]
    fn spec_0_3_results_and_ipam_style_entries() {
        // 0.3.x/0.4.0 entries carry "version"; an entry without "interface" is taken as the pod's.
        let result = json!({
            "cniVersion": "0.3.1",
            "ips": [{"version": "4", "address": "192.168.5.7/24"}],
        });
        assert_eq!(pod_ips(&result, "eth0").unwrap(), vec!["192.168.5.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(pod_ips(&json!({"cniVersion": "1.0.0"}), "eth0").unwrap(), Vec::<IpAddr>::new());
    }

    #[test]
    fn malformed_results_are_errors() {
        for (result, expected) in [
            (json!({"ips": {}}), "not a list"),
            (json!({"ips": [{"gateway": "10.0.0.1"}]}), "no \"address\""),
            (json!({"ips": [{"address": "10.0.0.5"}]}), "CIDR"),
            (json!({"ips": [{"address": "10.0.0.x/24"}]}), "not an IP"),
            (json!({"ips": [{"address": "10.0.0.5/24", "interface": 3}], "interfaces": []}), "not in \"interfaces\""),
        ] {
            let err = pod_ips(&result, "eth0").unwrap_err();
            assert!(err.contains(expected), "{result}: {err}");
        }
    }
}
