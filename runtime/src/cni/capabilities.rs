//! What a pod passes to CNI plugins beyond the network config: CNI_ARGS, and the runtimeConfig
//! values of the well-known capabilities (CNI CONVENTIONS.md) `portMappings`, `bandwidth` and
//! `ipRanges`, each given only to plugins that declare it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value, json};

use super::CniError;
use crate::pod::PortMapping;

/// The kubelet's bandwidth annotations, in bits per second (resource quantities such as `10M`).
pub(crate) const INGRESS_BANDWIDTH_ANNOTATION: &str = "kubernetes.io/ingress-bandwidth";
pub(crate) const EGRESS_BANDWIDTH_ANNOTATION: &str = "kubernetes.io/egress-bandwidth";

/// The kubelet's bounds for a bandwidth annotation (1 kbit/s to 1 Pbit/s).
const MIN_BANDWIDTH: u128 = 1_000;
const MAX_BANDWIDTH: u128 = 1_000_000_000_000_000;

/// The burst containerd gives with a bandwidth limit: as much as the bandwidth plugin takes.
const BANDWIDTH_BURST: u64 = u32::MAX as u64;

/// CNI_ARGS of a pod, as the kubelet's runtimes pass them; IgnoreUnknown lets plugins that know
/// none of these keys accept them.
pub(crate) fn k8s_args(namespace: &str, name: &str, pod_id: &str, uid: &str) -> Vec<(String, String)> {
    vec![
        ("IgnoreUnknown".into(), "1".into()),
        ("K8S_POD_NAMESPACE".into(), namespace.into()),
        ("K8S_POD_NAME".into(), name.into()),
        ("K8S_POD_INFRA_CONTAINER_ID".into(), pod_id.into()),
        ("K8S_POD_UID".into(), uid.into()),
    ]
}

/// Checks that a value can go into CNI_ARGS, whose `K=V;K=V` form has no escaping.
pub(crate) fn check_cni_arg(field: &str, value: &str) -> Result<(), CniError> {
    if value.contains([';', '=']) || value.chars().any(char::is_control) {
        return Err(CniError::InvalidArgs(format!(
            "{field} {value:?} cannot be passed to CNI plugins (no ';', '=' or control characters)"
        )));
    }
    Ok(())
}

/// The runtime's values for the capabilities it supports; `plugin_input` gives each plugin the
/// ones it declares.
pub(crate) fn capability_args(
    port_mappings: &[PortMapping],
    annotations: &BTreeMap<String, String>,
    pod_cidrs: &[String],
) -> Result<Map<String, Value>, CniError> {
    let mut args = Map::new();
    let mappings = port_mappings_arg(port_mappings).map_err(CniError::InvalidArgs)?;
    if !mappings.is_empty() {
        args.insert("portMappings".into(), Value::Array(mappings));
    }
    if let Some(bandwidth) = bandwidth_arg(annotations).map_err(CniError::InvalidArgs)? {
        args.insert("bandwidth".into(), bandwidth);
    }
    if !pod_cidrs.is_empty() {
        // One range set per CIDR: host-local then gives an address of each (dual stack).
        let ranges: Vec<Value> = pod_cidrs.iter().map(|cidr| json!([{ "subnet": cidr }])).collect();
        args.insert("ipRanges".into(), Value::Array(ranges));
    }
    Ok(args)
}

/// The portmap plugin's entries. As containerd does, mappings without a host port are left out:
/// they only document a container port and need no forwarding.
fn port_mappings_arg(mappings: &[PortMapping]) -> Result<Vec<Value>, String> {
    let mut entries = Vec::new();
    for mapping in mappings.iter().filter(|m| m.host_port > 0) {
        let protocol = match mapping.protocol.to_ascii_lowercase().as_str() {
            "" | "tcp" => "tcp",
            "udp" => "udp",
            "sctp" => "sctp",
            other => return Err(format!("port mapping protocol {other:?} is not tcp, udp or sctp")),
        };
        if !(1..=65535).contains(&mapping.host_port) || !(1..=65535).contains(&mapping.container_port) {
            return Err(format!(
                "port mapping {}:{} is out of range (ports are 1 to 65535)",
                mapping.host_port, mapping.container_port
            ));
        }
        let mut entry = json!({
            "hostPort": mapping.host_port,
            "containerPort": mapping.container_port,
            "protocol": protocol,
        });
        if !mapping.host_ip.is_empty() {
            mapping
                .host_ip
                .parse::<IpAddr>()
                .map_err(|_| format!("port mapping host IP {:?} is not an IP address", mapping.host_ip))?;
            entry["hostIP"] = Value::String(mapping.host_ip.clone());
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// The bandwidth plugin's limits from the pod's annotations, checked as the kubelet checks them.
fn bandwidth_arg(annotations: &BTreeMap<String, String>) -> Result<Option<Value>, String> {
    let mut limits = Map::new();
    for (annotation, rate, burst) in [
        (INGRESS_BANDWIDTH_ANNOTATION, "ingressRate", "ingressBurst"),
        (EGRESS_BANDWIDTH_ANNOTATION, "egressRate", "egressBurst"),
    ] {
        let Some(text) = annotations.get(annotation) else { continue };
        let bits = parse_quantity(text).map_err(|e| format!("annotation {annotation}: {e}"))?;
        if bits < MIN_BANDWIDTH {
            return Err(format!("annotation {annotation}: {text:?} is unreasonably small (< 1kbit)"));
        }
        if bits > MAX_BANDWIDTH {
            return Err(format!("annotation {annotation}: {text:?} is unreasonably large (> 1Pbit)"));
        }
        limits.insert(rate.into(), json!(bits as u64));
        limits.insert(burst.into(), json!(BANDWIDTH_BURST));
    }
    Ok((!limits.is_empty()).then_some(Value::Object(limits)))
}

/// A Kubernetes resource quantity (`100`, `1.5M`, `10Mi`, `2e6`, `500m`) as an integer, rounded
/// up as the kubelet's `Quantity.Value()` does.
pub(crate) fn parse_quantity(text: &str) -> Result<u128, String> {
    let bad = || format!("{text:?} is not a quantity (e.g. 10M, 512Ki, 1e6)");
    let number_end = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || !(whole.chars().chain(fraction.chars())).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    // Past 30 digits nothing is a reasonable bandwidth, and u128 arithmetic stays exact.
    if whole.len() + fraction.len() > 30 {
        return Err(format!("{text:?} is too large"));
    }
    let mantissa: u128 = format!("{whole}{fraction}").parse().map_err(|_| bad())?;
    // value = mantissa * base^exponent / 10^fraction_digits
    let (base, exponent): (u128, u32) = match suffix {
        "" => (10, 0),
        "m" => return Ok(div_ceil(mantissa, 10u128.pow(fraction.len() as u32 + 3))),
        "k" => (10, 3),
        "M" => (10, 6),
        "G" => (10, 9),
        "T" => (10, 12),
        "P" => (10, 15),
        "E" => (10, 18),
        "Ki" => (2, 10),
        "Mi" => (2, 20),
        "Gi" => (2, 30),
        "Ti" => (2, 40),
        "Pi" => (2, 50),
        "Ei" => (2, 60),
        exponent if exponent.starts_with(['e', 'E']) => {
            let exponent: u32 = exponent[1..].parse().map_err(|_| bad())?;
            if exponent > 30 {
                return Err(format!("{text:?} is too large"));
            }
            (10, exponent)
        }
        _ => return Err(bad()),
    };
    let scaled = mantissa.checked_mul(base.pow(exponent)).ok_or_else(|| format!("{text:?} is too large"))?;
    Ok(div_ceil(scaled, 10u128.pow(fraction.len() as u32)))
}

fn div_ceil(value: u128, divisor: u128) -> u128 {
    value.div_ceil(divisor)
}

/// The pod CIDRs of UpdateRuntimeConfig's `pod_cidr` (comma-separated for dual stack), each a
/// network address with its prefix length. Empty text means none.
pub(crate) fn parse_pod_cidrs(text: &str) -> Result<Vec<String>, CniError> {
    let mut cidrs = Vec::new();
    for cidr in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let bad = |why: &str| CniError::InvalidArgs(format!("pod CIDR {cidr:?} {why}"));
        let (address, prefix) = cidr.split_once('/').ok_or_else(|| bad("has no prefix length"))?;
        let address: IpAddr = address.parse().map_err(|_| bad("is not an IP address with a prefix length"))?;
        let prefix: u32 = prefix.parse().map_err(|_| bad("has a bad prefix length"))?;
        let host_bits = match address {
            IpAddr::V4(v4) if prefix <= 32 => u128::from(u32::from(v4)) & (u128::from(u32::MAX) >> prefix),
            IpAddr::V6(v6) if prefix <= 128 => u128::from(v6) & u128::MAX.checked_shr(prefix).unwrap_or(0),
            _ => return Err(bad("has a prefix length too long for its address")),
        };
        if host_bits != 0 {
            return Err(bad("has host bits set"));
        }
        if !cidrs.contains(&cidr.to_string()) {
            cidrs.push(cidr.to_string());
        }
    }
    Ok(cidrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(protocol: &str, container_port: i32, host_port: i32, host_ip: &str) -> PortMapping {
        PortMapping { protocol: protocol.into(), container_port, host_port, host_ip: host_ip.into() }
    }

    #[test]
    fn runtime_config_values_for_a_pod() {
        let annotations = BTreeMap::from([
            (INGRESS_BANDWIDTH_ANNOTATION.to_string(), "10M".to_string()),
            ("other".to_string(), "x".to_string()),
        ]);
        let args = capability_args(
            &[mapping("TCP", 80, 8080, ""), mapping("UDP", 53, 5353, "127.0.0.1"), mapping("TCP", 9000, 0, "")],
            &annotations,
            &["10.244.1.0/24".into(), "fd00:10:244:1::/64".into()],
        )
        .unwrap();
        assert_eq!(
            Value::Object(args),
            json!({
                "portMappings": [
                    {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                    {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
                ],
                "bandwidth": {"ingressRate": 10_000_000u64, "ingressBurst": 4294967295u64},
                "ipRanges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]],
            })
        );
        assert!(capability_args(&[], &BTreeMap::new(), &[]).unwrap().is_empty());
    }

    #[test]
    fn bad_port_mappings_are_refused() {
        for (bad, expected) in [
            (mapping("ICMP", 80, 8080, ""), "protocol"),
            (mapping("TCP", 80, 70000, ""), "out of range"),
            (mapping("TCP", 0, 8080, ""), "out of range"),
            (mapping("TCP", 80, 8080, "localhost"), "host IP"),
        ] {
            let err = capability_args(&[bad], &BTreeMap::new(), &[]).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn quantities_round_up_like_the_kubelet() {
        for (text, value) in [
            ("1000", 1000),
            ("1k", 1000),
            ("1.5M", 1_500_000),
            ("10Mi", 10 << 20),
            ("2e6", 2_000_000),
            ("1E3", 1000),
            ("1500m", 2),
            ("0.1", 1),
            ("+5G", 5_000_000_000),
            (".5k", 500),
        ] {
            assert_eq!(parse_quantity(text), Ok(value), "{text}");
        }
        for bad in ["", "M", "1.2.3", "ten", "1 M", "1MB", "-1k", "1e", "1e99"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bandwidth_bounds_are_the_kubelets() {
        let of = |ingress: &str| {
            bandwidth_arg(&BTreeMap::from([(INGRESS_BANDWIDTH_ANNOTATION.to_string(), ingress.to_string())]))
        };
        assert!(of("999").unwrap_err().contains("unreasonably small"));
        assert!(of("2P").unwrap_err().contains("unreasonably large"));
        assert!(of("fast").unwrap_err().contains("kubernetes.io/ingress-bandwidth"));
        let egress = BTreeMap::from([(EGRESS_BANDWIDTH_ANNOTATION.to_string(), "1Mi".to_string())]);
        assert_eq!(
            bandwidth_arg(&egress).unwrap(),
            Some(json!({"egressRate": 1_048_576, "egressBurst": 4294967295u64}))
        );
        assert_eq!(bandwidth_arg(&BTreeMap::new()).unwrap(), None);
    }

    #[test]
    fn pod_cidrs_are_checked() {
        assert_eq!(parse_pod_cidrs("10.244.1.0/24, fd00::/64").unwrap(), vec!["10.244.1.0/24", "fd00::/64"]);
        assert_eq!(parse_pod_cidrs("").unwrap(), Vec::<String>::new());
        assert_eq!(parse_pod_cidrs("0.0.0.0/0").unwrap(), vec!["0.0.0.0/0"]);
        for (bad, expected) in [
            ("10.244.1.5/24", "host bits"),
            ("10.244.1.0", "no prefix"),
            ("10.244.1.0/33", "too long"),
            ("fd00::1/64", "host bits"),
            ("pods/24", "not an IP"),
            ("10.0.0.0/x", "bad prefix"),
        ] {
            let err = parse_pod_cidrs(bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn cni_args_values_are_checked() {
        assert!(check_cni_arg("metadata.name", "web-0").is_ok());
        assert!(check_cni_arg("metadata.name", "a;b").is_err());
        assert!(check_cni_arg("metadata.uid", "a=b").is_err());
        let args = k8s_args("ns", "web", "abc", "uid-1");
        assert_eq!(args[0], ("IgnoreUnknown".to_string(), "1".to_string()));
        assert_eq!(args.len(), 5);
    }
}
