//! `cri-systemd check`, the node preflight (issue 15 items 3 and 6), run in a node as an operator
//! would, and its findings in Status(verbose)'s `checks` (what `crictl info` prints). The findings
//! are compared with what the node really has (the cgroup file system type as `stat -f` reports
//! it, the CNI config in /etc/cni/net.d), and a node broken on purpose (CNI config removed, a state
//! root on the node's overlayfs root, no system bus) reports what to do and exits non-zero only
//! for what blocks pods.

use std::time::Duration;

use e2e::{CNI_CONFLIST, CNI_CONFLIST_PATH, Node, NodeOptions, cri};
use serde_json::Value;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The finding of check `name` in a report (`cri-systemd check --json` or Status' `checks`).
fn finding<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["check"] == name)
        .unwrap_or_else(|| panic!("no {name:?} finding in {report:#}"))
}

/// Runs `cri-systemd [args] check --json` in the node: the report and the exit code.
fn check_json(node: &Node, config_args: &[&str]) -> (Value, Option<i32>) {
    let mut args = vec!["cri-systemd"];
    args.extend_from_slice(config_args);
    args.extend_from_slice(&["check", "--json"]);
    let run = node.exec(&args);
    let report = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("`{}` printed no JSON ({e}): {}{}", args.join(" "), run.stdout, run.stderr));
    (report, run.status.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_says_what_this_node_has_and_blocks_only_on_blocking_findings() {
    let node = Node::up("preflight-check", NodeOptions::default());
    // e2e nodes boot without a CNI config: the one deploy/ ships, as the network tests install it.
    node.write_file(CNI_CONFLIST_PATH, CNI_CONFLIST);

    // The node as booted: the table for people, exit 0.
    let run = node.exec(&["cri-systemd", "check"]);
    println!("cri-systemd check in node {}:\n{}{}", node.name(), run.stdout, run.stderr);
    assert_eq!(run.status.code(), Some(0), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("no blocking finding"), "{}", run.stdout);

    let (report, code) = check_json(&node, &[]);
    assert_eq!(code, Some(0));
    assert_eq!(report["blocking"], false, "{report:#}");
    let systemd = finding(&report, "systemd");
    assert_eq!(systemd["outcome"], "ok", "{systemd}");
    let version = node.sh("systemctl --version | head -1");
    let version = version.split_whitespace().nth(1).expect("systemctl --version");
    assert!(systemd["detail"].as_str().unwrap().contains(&format!("systemd {version}")), "{systemd} vs {version}");
    // The cgroup layout, as the node's own `stat -f` sees /sys/fs/cgroup.
    let cgroup = finding(&report, "cgroup version");
    let fs_type = node.sh("stat -f -c %T /sys/fs/cgroup");
    let unified = fs_type.trim() == "cgroup2fs";
    assert_eq!(cgroup["detail"].as_str().unwrap().starts_with("v2"), unified, "{cgroup} vs {fs_type}");
    assert_eq!(cgroup["outcome"], if unified { "ok" } else { "warn" });
    assert!(unified || cgroup["fix"].as_str().unwrap().contains("systemd.unified_cgroup_hierarchy=1"));
    // The state root is a real disk (e2e/node binds an ext4 directory): idmapped layers work.
    assert_eq!(finding(&report, "state dir")["outcome"], "ok", "{report:#}");
    assert_eq!(finding(&report, "idmapped mounts")["outcome"], "ok", "{report:#}");
    assert_eq!(finding(&report, "overlayfs")["outcome"], "ok");
    let cni = finding(&report, "CNI");
    assert_eq!(cni["outcome"], "ok", "{cni}");
    assert!(cni["detail"].as_str().unwrap().contains("/etc/cni/net.d/10-cri-systemd.conflist"), "{cni}");
    assert_eq!(finding(&report, "TPM")["outcome"], "info");
    // Whether a move into a cgroup waits: as the node's own mount table says.
    let moves = finding(&report, "cgroup task moves");
    let favoring = node.sh("grep -c 'cgroup.* [^ ]*favordynmods' /proc/self/mounts || true").trim() != "0";
    if favoring {
        assert_eq!(moves["outcome"], "ok", "{moves}");
    } else {
        // Before Linux 6.0 moves never wait; from 6.0 on they do, and the fix says how not to.
        let waits = moves["outcome"] == "info" && moves["fix"].as_str().is_some_and(|f| f.contains("favordynmods"));
        let old_kernel = moves["outcome"] == "ok" && moves["detail"].as_str().is_some_and(|d| d.contains("kernel"));
        assert!(waits || old_kernel, "{moves}");
    }

    // CNI config removed: not ready, with what to do, and still exit 0 (host-network pods run).
    node.sh("mkdir -p /root/cni-aside && mv /etc/cni/net.d/* /root/cni-aside/");
    let run = node.exec(&["cri-systemd", "check"]);
    println!("without a CNI config:\n{}", run.stdout);
    assert_eq!(run.status.code(), Some(0), "{}{}", run.stdout, run.stderr);
    let cni_line = run.stdout.lines().find(|l| l.starts_with("CNI ")).expect("a CNI line");
    assert!(
        cni_line.contains("fail") && cni_line.contains("no CNI network config found in /etc/cni/net.d"),
        "{cni_line}"
    );
    assert!(run.stdout.contains("fix: put a network config (.conflist) in /etc/cni/net.d"), "{}", run.stdout);
    let (report, code) = check_json(&node, &[]);
    assert_eq!(code, Some(0));
    assert_eq!(finding(&report, "CNI")["blocking"], false);

    // Blocking findings: a state root on the node's root (overlayfs, which refuses idmapped
    // mounts) and a bus that is not there: exit 1, each with what to do.
    node.write_file(
        "/root/broken.toml",
        "state_root = \"/srv/preflight-state\"\n[systemd]\nbus_address = \"unix:path=/run/no-such-bus\"\n",
    );
    node.sh("mkdir -p /srv/preflight-state && stat -f -c %T /srv/preflight-state | grep -qx overlayfs");
    let run = node.exec(&["cri-systemd", "--config", "/root/broken.toml", "check"]);
    println!("with state_root on overlayfs and no bus:\n{}", run.stdout);
    assert_eq!(run.status.code(), Some(1), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("3 blocking finding(s)"), "{}", run.stdout);
    let (report, code) = check_json(&node, &["--config", "/root/broken.toml"]);
    assert_eq!(code, Some(1));
    assert_eq!(report["blocking"], true);
    for name in ["systemd", "state dir", "idmapped mounts"] {
        let f = finding(&report, name);
        assert_eq!((&f["outcome"], &f["blocking"]), (&"fail".into(), &true.into()), "{f}");
        assert!(f["fix"].is_string(), "{f}");
    }
    assert!(finding(&report, "state dir")["detail"].as_str().unwrap().contains("on overlayfs"));
    assert!(finding(&report, "systemd")["detail"].as_str().unwrap().contains("/run/no-such-bus"));
}

#[tokio::test(flavor = "multi_thread")]
async fn status_verbose_has_the_checks_beside_the_config() {
    let node = Node::up("preflight-status", NodeOptions::default());
    node.write_file(CNI_CONFLIST_PATH, CNI_CONFLIST);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let status = client.runtime.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    // The `config` key stays as critest reads it.
    let config: Value = serde_json::from_str(&status.info["config"]).expect("config is JSON");
    assert_eq!(config["stateDir"], "/var/lib/cri-systemd/containers");
    let checks = status.info.get("checks").unwrap_or_else(|| panic!("no `checks` in {:?}", status.info.keys()));
    println!("Status verbose `checks`: {checks}");
    let report: Value = serde_json::from_str(checks).expect("checks is JSON");
    assert_eq!(report["blocking"], false, "{report:#}");
    assert_eq!(finding(&report, "systemd")["outcome"], "ok");
    assert_eq!(finding(&report, "CNI")["outcome"], "ok");
    assert_eq!(finding(&report, "idmapped mounts")["outcome"], "ok");

    // The daemon's view follows the node: without a CNI config, the CNI finding says what to do,
    // as NetworkReady does.
    node.sh("mkdir -p /root/cni-aside && mv /etc/cni/net.d/* /root/cni-aside/");
    let status = client.runtime.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let report: Value = serde_json::from_str(&status.info["checks"]).unwrap();
    let cni = finding(&report, "CNI");
    assert_eq!((&cni["outcome"], &cni["blocking"]), (&"fail".into(), &false.into()), "{cni}");
    assert!(cni["fix"].as_str().unwrap().contains("/etc/cni/net.d"), "{cni}");
    let network = status.status.unwrap().conditions.into_iter().find(|c| c.r#type == "NetworkReady").unwrap();
    assert!(!network.status && cni["detail"] == network.message.as_str(), "{cni} vs {network:?}");
    // Not verbose: no checks run (the kubelet's Status every few seconds stays cheap).
    let status = client.runtime.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    assert!(!status.info.contains_key("checks"));
}
