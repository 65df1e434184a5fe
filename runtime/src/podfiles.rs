//! The per-pod files every container of the pod sees: /etc/hostname, /etc/hosts, /etc/resolv.conf.

use std::net::IpAddr;
use std::path::Path;

use crate::pod::DnsConfig;

/// The node's resolver config, used when the pod brings no DNS config of its own.
const NODE_RESOLV_CONF: &str = "/etc/resolv.conf";

/// Writes the pod's files; `ips` (the pod's addresses from CNI, if any) name the pod's hostname
/// in /etc/hosts, as the kubelet's managed hosts file does. The files are owned by `owner` (a
/// host id, as uid and gid: the root of the pod's user namespace) if given, else by the daemon.
pub(crate) fn write(
    dir: &Path,
    hostname: &str,
    dns: Option<&DnsConfig>,
    host_network: bool,
    ips: &[IpAddr],
    owner: Option<u32>,
) -> std::io::Result<()> {
    // The pod's run dir (parent of its /dev/shm too) is root's only; the files themselves stay
    // readable, as bind mounts in containers whose root is not the node's.
    crate::store::create_private_dir_all(dir)?;
    std::fs::write(dir.join("hostname"), format!("{hostname}\n"))?;
    let hosts = if host_network {
        // Host-network pods see the node's own names, as with containerd.
        std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| default_hosts(hostname, ips))
    } else {
        default_hosts(hostname, ips)
    };
    std::fs::write(dir.join("hosts"), hosts)?;
    let resolv = match dns {
        Some(dns) if !(dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty()) => resolv_conf(dns),
        _ => std::fs::read_to_string(NODE_RESOLV_CONF).unwrap_or_default(),
    };
    std::fs::write(dir.join("resolv.conf"), resolv)?;
    if let Some(owner) = owner {
        for file in ["hostname", "hosts", "resolv.conf"] {
            std::os::unix::fs::chown(dir.join(file), Some(owner), Some(owner))?;
        }
    }
    Ok(())
}

fn default_hosts(hostname: &str, ips: &[IpAddr]) -> String {
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if ips.is_empty() {
        // No network address (loopback only): the Debian convention keeps the name resolvable.
        hosts += &format!("127.0.1.1\t{hostname}\n");
    }
    for ip in ips {
        hosts += &format!("{ip}\t{hostname}\n");
    }
    hosts
}

fn resolv_conf(dns: &DnsConfig) -> String {
    let mut text = String::new();
    if !dns.searches.is_empty() {
        text += &format!("search {}\n", dns.searches.join(" "));
    }
    for server in &dns.servers {
        text += &format!("nameserver {server}\n");
    }
    if !dns.options.is_empty() {
        text += &format!("options {}\n", dns.options.join(" "));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_dns_config() {
        let dns = DnsConfig {
            servers: vec!["10.0.0.10".into(), "10.0.0.11".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(&dns),
            "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\nnameserver 10.0.0.11\noptions ndots:5\n"
        );
    }

    #[test]
    fn files_are_written() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web-0", None, false, &[], None).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("hostname")).unwrap(), "web-0\n");
        assert!(std::fs::read_to_string(dir.path().join("hosts")).unwrap().contains("127.0.1.1\tweb-0"));
        assert!(dir.path().join("resolv.conf").exists());
        write(dir.path(), "web-0", None, false, &[], Some(0x9_0000)).unwrap();
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(dir.path().join("hosts")).unwrap();
        assert_eq!((md.uid(), md.gid()), (0x9_0000, 0x9_0000));
    }

    #[test]
    fn hosts_names_the_pod_ips() {
        let dir = tempfile::tempdir().unwrap();
        let ips = ["10.88.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        write(dir.path(), "web-0", None, false, &ips, None).unwrap();
        let hosts = std::fs::read_to_string(dir.path().join("hosts")).unwrap();
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.ends_with("\n10.88.0.5\tweb-0\nfd00::5\tweb-0\n"), "{hosts}");
        assert!(!hosts.contains("127.0.1.1"), "{hosts}");
    }
}
