//! Pod networking through CNI: the node's real plugins (Debian's containernetworking-plugins:
//! bridge, host-local, portmap, bandwidth) driven by a daemon in a throwaway node, with
//! deploy/cni/10-cri-systemd.conflist written into the node's /etc/cni/net.d by each test.
//! Everything happens inside the node's private network namespace: the bridge, the pods' veths,
//! the iptables rules and the addresses tested are the node's own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use e2e::crisimple::{kubelet_pod, remove_pod, run_pod_sandbox, stop_pod};
use e2e::{CriClient, Node, cri, eventually, node_with_local_registry, pull_busybox};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const CONFLIST: &str = e2e::CNI_CONFLIST;
const CONFLIST_PATH: &str = e2e::CNI_CONFLIST_PATH;
/// host-local's allocations for the network of deploy/cni/10-cri-systemd.conflist.
const IPAM_DIR: &str = "/var/lib/cni/networks/cri-systemd";
const CACHE_DIR: &str = "/var/lib/cri-systemd/cni/results";
/// The bridge's address (host-local's default gateway: the subnet's first address).
const GATEWAY: &str = "10.88.0.1";
/// An address of the node's own, on an interface in its root network namespace.
const NODE_IP: &str = "192.168.123.1";

/// Writes `script` as plugin `name` into the node's /opt/cni/bin (the first plugin dir).
fn install_plugin(node: &Node, name: &str, script: &str) {
    let path = format!("/opt/cni/bin/{name}");
    node.write_file(&path, script);
    node.sh(&format!("chmod 755 {path}"));
}

/// The deploy conflist with `extra` plugins appended after bridge (and portmap and bandwidth).
fn conflist_with(extra: &[&str]) -> String {
    let mut list: serde_json::Value = serde_json::from_str(CONFLIST).unwrap();
    let plugins = list["plugins"].as_array_mut().unwrap();
    for kind in extra {
        plugins.push(serde_json::json!({ "type": kind }));
    }
    list.to_string()
}

fn port(host_port: i32, container_port: i32, host_ip: &str) -> cri::PortMapping {
    cri::PortMapping { protocol: cri::Protocol::Tcp as i32, container_port, host_port, host_ip: host_ip.into() }
}

/// The pod IP and the additional IPs of PodSandboxStatus.
async fn pod_ips(client: &mut CriClient, id: &str) -> (String, Vec<String>) {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
    let status =
        client.runtime.pod_sandbox_status(request).await.expect("PodSandboxStatus").into_inner().status.unwrap();
    let network = status.network.unwrap_or_default();
    (network.ip, network.additional_ips.into_iter().map(|ip| ip.ip).collect())
}

/// Creates and starts a container running `script` with the node's /srv/out as /out.
async fn start_container(
    client: &mut CriClient,
    pod: &str,
    pod_name: &str,
    name: &str,
    image: &str,
    script: &str,
) -> String {
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        mounts: vec![cri::Mount { container_path: "/out".into(), host_path: "/srv/out".into(), ..Default::default() }],
        ..Default::default()
    };
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(kubelet_pod(pod_name).build()),
    };
    let id = client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id;
    client
        .runtime
        .start_container(cri::StartContainerRequest { container_id: id.clone() })
        .await
        .expect("StartContainer");
    id
}

async fn wait_exit_code(client: &mut CriClient, id: &str) -> i32 {
    eventually(Duration::from_secs(90), "the container to exit", || {
        let mut client = client.clone();
        let id = id.to_string();
        async move {
            let request = cri::ContainerStatusRequest { container_id: id, verbose: false };
            let status = client.runtime.container_status(request).await.ok()?.into_inner().status?;
            (status.state == cri::ContainerState::ContainerExited as i32).then_some(status.exit_code)
        }
    })
    .await
}

/// Shell functions for containers: `retry CMD...` retries up to 15 s (servers take a moment to
/// listen); `get HOST PORT FILE TEXT` saves an HTTP GET's response in /out/FILE and checks it has
/// TEXT (busybox nc: Debian's static busybox wget crashes).
const SHELL_FUNCTIONS: &str = "retry() { i=0; while [ $i -lt 30 ]; do \"$@\" && return 0; i=$((i+1)); busybox sleep 0.5; done; return 1; }; \
    get() { printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 \"$1\" \"$2\" > \"/out/$3\" && busybox grep -q \"$4\" \"/out/$3\"; }";

/// The body of GET / from the node's root network namespace.
fn node_get(node: &Node, url: &str) -> Option<String> {
    let run = node.exec(&["curl", "-sS", "--max-time", "5", url]);
    run.success().then_some(run.stdout)
}

/// What a removed pod must not leave: veths, IPAM allocations, iptables rules, cache entries.
fn assert_no_network_leftovers(node: &Node, pod_ids: &[&str]) {
    let links = node.sh("ip -o link");
    assert!(!links.contains("veth"), "veths left:\n{links}");
    let allocations =
        node.sh(&format!("ls {IPAM_DIR} 2>/dev/null | grep -v -e '^lock$' -e '^last_reserved_ip' || true"));
    assert_eq!(allocations.trim(), "", "IPAM allocations left");
    let rules = node.sh("iptables-save");
    for id in pod_ids {
        assert!(!rules.contains(id), "iptables rules of pod {id} left:\n{rules}");
    }
    assert!(!rules.contains("-A CNI-DN-"), "port mapping rules left:\n{rules}");
    assert_eq!(node.sh(&format!("ls -A {CACHE_DIR} 2>/dev/null || true")).trim(), "", "CNI result cache entries left");
}

/// What a pod that failed to come up must not leave either: no record, pins or slice.
fn assert_no_pod_leftovers(node: &Node) {
    assert_eq!(node.sh("ls -A /var/lib/cri-systemd/pods").trim(), "", "pod records left");
    assert_eq!(node.sh("ls -A /run/cri-systemd/pods 2>/dev/null || true").trim(), "", "pod run dirs (pins) left");
    let mounts = node.sh("findmnt -rn -o TARGET | grep /run/cri-systemd/pods || true");
    assert_eq!(mounts.trim(), "", "namespace pins still mounted");
    let slices = node.sh("systemctl list-units --plain --no-legend --state=active 'kubepods-*-pod*' || true");
    assert_eq!(slices.trim(), "", "pod slices left");
}

#[tokio::test]
async fn bridge_network_pods_node_port_mappings_and_host_network() {
    let node = node_with_local_registry("net-bridge", "");
    node.write_file(CONFLIST_PATH, CONFLIST);
    // A veth pair gives the node an address of its own (the node has no dummy driver).
    node.sh(&format!(
        "ip link add e2e-node type veth peer name e2e-peer && ip addr add {NODE_IP}/24 dev e2e-node && \
         ip link set e2e-node up && ip link set e2e-peer up"
    ));
    node.sh("mkdir -p /srv/out /srv/www && echo hello-from-the-node > /srv/www/index.html");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client, "network").await;

    // A server pod with port mappings: on every node address, and on one only.
    let mut server_config = kubelet_pod("server").build();
    server_config.port_mappings = vec![port(8080, 80, ""), port(9443, 80, NODE_IP)];
    let server = run_pod_sandbox(&mut client, server_config).await.expect("RunPodSandbox");
    let (server_ip, additional) = pod_ips(&mut client, &server).await;
    let server_ip: IpAddr = server_ip.parse().expect("the pod IP is an address");
    assert!(server_ip.to_string().starts_with("10.88."), "{server_ip}");
    assert!(additional.is_empty(), "{additional:?}");
    let hosts = node.sh(&format!("cat /run/cri-systemd/pods/{server}/hosts"));
    assert!(hosts.contains(&format!("{server_ip}\tserver\n")), "{hosts}");
    let addresses = node.sh(&format!("nsenter --net=/run/cri-systemd/pods/{server}/ns/net ip -o -4 addr show eth0"));
    assert!(addresses.contains(&format!("{server_ip}/16")), "{addresses}");
    start_container(&mut client, &server, "server", "httpd", &image,
        "busybox mkdir -p /www && echo hello-from-the-server-pod > /www/index.html && exec busybox httpd -f -p 80 -h /www").await;

    // A server on the node, on the bridge's address (which exists once a pod is attached).
    node.sh(&format!(
        "systemd-run --quiet --unit=e2e-node-httpd -p Type=exec busybox httpd -f -p {GATEWAY}:8081 -h /srv/www"
    ));

    // A client pod: to the other pod by IP (HTTP and ping), and to the node.
    let client_pod = run_pod_sandbox(&mut client, kubelet_pod("client")).await.expect("RunPodSandbox");
    let (client_ip, _) = pod_ips(&mut client, &client_pod).await;
    assert_ne!(client_ip, server_ip.to_string());
    let script = format!(
        "{SHELL_FUNCTIONS}; retry get {server_ip} 80 from-pod hello-from-the-server-pod && \
         busybox ping -c 1 -W 5 {server_ip} > /out/ping && \
         retry get {GATEWAY} 8081 from-node hello-from-the-node && \
         busybox cat /etc/hosts > /out/client-hosts"
    );
    let id = start_container(&mut client, &client_pod, "client", "wget", &image, &script).await;
    let code = wait_exit_code(&mut client, &id).await;
    assert_eq!(code, 0, "client failed; output: {}", node.sh("head -v /srv/out/* 2>&1 || true"));
    assert!(node.sh("cat /srv/out/from-pod").ends_with("\r\n\r\nhello-from-the-server-pod\n"));
    assert!(node.sh("cat /srv/out/ping").contains("1 packets received"));
    assert!(node.sh("cat /srv/out/from-node").ends_with("\r\n\r\nhello-from-the-node\n"));
    assert!(node.sh("cat /srv/out/client-hosts").contains(&format!("{client_ip}\tclient")));

    // Port mappings, from the node: its own address and loopback, and the host-IP-bound one only
    // on its address.
    for url in
        [format!("http://{NODE_IP}:8080/"), "http://127.0.0.1:8080/".to_string(), format!("http://{NODE_IP}:9443/")]
    {
        assert_eq!(node_get(&node, &url).as_deref(), Some("hello-from-the-server-pod\n"), "{url}");
    }
    assert_eq!(node_get(&node, "http://127.0.0.1:9443/"), None);

    // A host-network pod: the node's interfaces, no pod IP, no CNI call.
    let host = run_pod_sandbox(&mut client, kubelet_pod("host").network(cri::NamespaceMode::Node))
        .await
        .expect("RunPodSandbox");
    assert_eq!(pod_ips(&mut client, &host).await, (String::new(), Vec::new()));
    let id = start_container(&mut client, &host, "host", "links", &image, "busybox ip -o link > /out/host-links").await;
    assert_eq!(wait_exit_code(&mut client, &id).await, 0);
    let links = node.sh("cat /srv/out/host-links");
    assert!(links.contains("e2e-node") && links.contains("cni0"), "{links}");
    assert!(node.sh(&format!("ls {CACHE_DIR}")).lines().all(|entry| !entry.contains(&host)));

    // Stop releases the address (the status shows none); remove after stop is fine; nothing is
    // left behind.
    client.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: server.clone() }).await.unwrap();
    assert_eq!(pod_ips(&mut client, &server).await.0, "");
    assert!(!node.sh(&format!("ls {IPAM_DIR}")).contains(&server_ip.to_string()));
    for pod in [&server, &client_pod, &host] {
        stop_pod(&mut client, pod).await;
        remove_pod(&mut client, pod).await;
    }
    assert_no_network_leftovers(&node, &[&server, &client_pod]);
    assert_eq!(node_get(&node, "http://127.0.0.1:8080/"), None);
}

/// A chained test plugin that holds its ADD for a minute (the test kills the daemon meanwhile)
/// and records the config of every DEL.
const SLOW_PLUGIN: &str = r#"#!/bin/sh
input=$(cat)
case "$CNI_COMMAND" in
ADD) touch /run/e2e-slow-add; sleep 60; printf '{"cniVersion":"1.0.0"}' ;;
DEL) printf '%s\n' "$input" >> /run/e2e-slow-del.log ;;
VERSION) printf '{"cniVersion":"1.0.0","supportedVersions":["1.0.0"]}' ;;
esac
"#;

#[tokio::test]
async fn a_daemon_killed_during_add_rolls_the_pod_back_with_del() {
    let node = node_with_local_registry("net-kill", "");
    install_plugin(&node, "e2e-slow", SLOW_PLUGIN);
    node.write_file(CONFLIST_PATH, &conflist_with(&["e2e-slow"]));
    let client = node.cri(ANSWER_TIMEOUT).await;

    let mut config = kubelet_pod("doomed").build();
    config.port_mappings = vec![port(8080, 80, "")];
    let mut caller = client.clone();
    let run = tokio::spawn(async move { run_pod_sandbox(&mut caller, config).await });
    eventually(Duration::from_secs(30), "the slow plugin's ADD", || async {
        node.exec(&["test", "-e", "/run/e2e-slow-add"]).success().then_some(())
    })
    .await;
    // bridge, portmap and bandwidth are done: an address is allocated and the cache has the result.
    let id = node.sh("ls /var/lib/cri-systemd/pods").trim().to_string();
    assert_eq!(id.len(), 64, "one pod record: {id:?}");
    let allocated = node.sh(&format!("grep -l {id} {IPAM_DIR}/* || true"));
    let address = allocated.trim().rsplit('/').next().unwrap_or_default().to_string();
    assert!(address.starts_with("10.88."), "no allocation for {id}: {allocated:?}");
    let cached = node.sh(&format!("cat {CACHE_DIR}/cri-systemd-{id}-eth0.json"));
    assert!(cached.contains(&address), "{cached}");
    assert!(node.sh("iptables-save").contains(&id));

    node.sh("systemctl kill -s KILL cri-systemd");
    let outcome = run.await.unwrap();
    assert!(outcome.is_err(), "RunPodSandbox answered {outcome:?} from a killed daemon");

    // The restarted daemon rolls the pod back: DEL with the cached config, arguments and result.
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let deletes = node.sh("cat /run/e2e-slow-del.log");
    assert_eq!(deletes.lines().count(), 1, "{deletes}");
    let del: serde_json::Value = serde_json::from_str(deletes.trim()).unwrap();
    assert_eq!(del["name"], "cri-systemd");
    assert_eq!(del["prevResult"]["ips"][0]["address"].as_str().unwrap(), format!("{address}/16"));
    assert!(node.logs().contains("pod network detached"), "{}", node.logs());
    let listed =
        client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap().into_inner().items;
    assert!(listed.is_empty(), "{listed:?}");
    // Removing it is a no-op now: it is gone already.
    client.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.clone() }).await.unwrap();
    assert_no_network_leftovers(&node, &[&id]);
    assert_no_pod_leftovers(&node);

    // And the node still networks pods.
    node.write_file(CONFLIST_PATH, CONFLIST);
    let pod = run_pod_sandbox(&mut client, kubelet_pod("after")).await.expect("RunPodSandbox");
    assert!(pod_ips(&mut client, &pod).await.0.starts_with("10.88."));
}

const BROKEN_PLUGIN: &str = r#"#!/bin/sh
cat > /dev/null
case "$CNI_COMMAND" in
ADD) printf '{"cniVersion":"1.0.0","code":7,"msg":"e2e broken plugin","details":"refusing on purpose"}'; exit 1 ;;
esac
"#;

const HANGING_PLUGIN: &str = r#"#!/bin/sh
cat > /dev/null
[ "$CNI_COMMAND" = ADD ] && sleep 600
exit 0
"#;

#[tokio::test]
async fn failing_plugins_fail_the_pod_and_leave_nothing() {
    let node = node_with_local_registry("net-broken", "[cni]\nplugin_timeout_secs = 3\n");
    install_plugin(&node, "e2e-broken", BROKEN_PLUGIN);
    install_plugin(&node, "e2e-hang", HANGING_PLUGIN);
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    // The plugin's own error reaches the caller; bridge's work before it is undone.
    node.write_file(CONFLIST_PATH, &conflist_with(&["e2e-broken"]));
    let mut config = kubelet_pod("broken").build();
    config.port_mappings = vec![port(8080, 80, "")];
    let err = run_pod_sandbox(&mut client, config).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unknown, "{err:?}");
    assert!(err.message().contains("e2e broken plugin: refusing on purpose"), "{}", err.message());
    assert!(err.message().contains("e2e-broken ADD"), "{}", err.message());
    assert_no_pod_leftovers(&node);
    assert_no_network_leftovers(&node, &[]);

    // A plugin that hangs is killed after cni.plugin_timeout_secs.
    node.write_file(CONFLIST_PATH, &conflist_with(&["e2e-hang"]));
    let started = Instant::now();
    let err = run_pod_sandbox(&mut client, kubelet_pod("hanging")).await.unwrap_err();
    assert!(err.message().contains("e2e-hang ADD did not finish within 3 s"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert_no_pod_leftovers(&node);
    assert_no_network_leftovers(&node, &[]);
    assert_eq!(node.sh("pgrep -c -f 'sleep [6]00' || true").trim(), "0", "the hanging plugin's sleep still runs");

    // A config naming a plugin that is not installed: the network is not ready, nothing is tried.
    node.write_file(CONFLIST_PATH, &conflist_with(&["e2e-not-installed"]));
    let err = run_pod_sandbox(&mut client, kubelet_pod("unready")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("e2e-not-installed"), "{}", err.message());
    assert_no_pod_leftovers(&node);
}

#[tokio::test]
async fn pod_cidr_from_update_runtime_config_and_bandwidth_annotations() {
    let node = node_with_local_registry("net-cidr", "");
    // host-local takes the runtime's ranges before its own: a config for the kubelet's pod CIDR
    // has none of its own, and declares the ipRanges capability.
    let mut list: serde_json::Value = serde_json::from_str(CONFLIST).unwrap();
    list["plugins"][0]["ipam"].as_object_mut().unwrap().remove("ranges");
    list["plugins"][0]["capabilities"] = serde_json::json!({ "ipRanges": true });
    node.write_file(CONFLIST_PATH, &list.to_string());
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    // Without a pod CIDR, host-local would have no range: the network is not ready, and a pod
    // is refused before anything is made.
    let network_ready = |client: &mut CriClient| {
        let mut client = client.clone();
        async move {
            let status = client.runtime.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
            let conditions = status.status.unwrap().conditions;
            conditions.into_iter().find(|c| c.r#type == "NetworkReady").unwrap()
        }
    };
    let not_ready = network_ready(&mut client).await;
    assert!(!not_ready.status && not_ready.message.contains("pod CIDR"), "{not_ready:?}");
    let err = run_pod_sandbox(&mut client, kubelet_pod("early")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("pod CIDR"), "{}", err.message());
    assert_no_pod_leftovers(&node);
    let update = |cidr: &str| cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig { network_config: Some(cri::NetworkConfig { pod_cidr: cidr.into() }) }),
    };

    // Dual stack: an address of each range, IPv4 first.
    client.runtime.update_runtime_config(update("10.99.7.0/24,fd00:99:7::/64")).await.expect("UpdateRuntimeConfig");
    assert!(network_ready(&mut client).await.status);
    let bad = client.runtime.update_runtime_config(update("10.99.8.1/24")).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("host bits"), "{}", bad.message());
    let pod = run_pod_sandbox(&mut client, kubelet_pod("ranged")).await.expect("RunPodSandbox");
    let (ip, additional) = pod_ips(&mut client, &pod).await;
    assert!(ip.starts_with("10.99.7."), "{ip}");
    assert_eq!(additional.len(), 1, "{additional:?}");
    assert!(additional[0].starts_with("fd00:99:7::"), "{additional:?}");
    let hosts = node.sh(&format!("cat /run/cri-systemd/pods/{pod}/hosts"));
    assert!(
        hosts.contains(&format!("{ip}\tranged\n")) && hosts.contains(&format!("{}\tranged\n", additional[0])),
        "{hosts}"
    );

    // The pod CIDR outlives a daemon restart (the kubelet does not send it again).
    node.sh("systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let mut limited = kubelet_pod("limited").build();
    limited.annotations = HashMap::from([("kubernetes.io/ingress-bandwidth".into(), "2M".into())]);
    let limited = run_pod_sandbox(&mut client, limited).await.expect("RunPodSandbox");
    let (ip, additional) = pod_ips(&mut client, &limited).await;
    assert!(ip.starts_with("10.99.7.") && additional.len() == 1, "{ip} {additional:?}");

    // Ingress bandwidth: a token bucket on the pod's host-side veth, at the annotation's rate.
    let qdiscs = node.sh("tc qdisc show");
    assert!(qdiscs.contains("tbf") && qdiscs.contains("rate 2Mbit"), "{qdiscs}");

    // A bad annotation is refused before anything is made.
    let mut bad = kubelet_pod("bad-bandwidth").build();
    bad.annotations = HashMap::from([("kubernetes.io/egress-bandwidth".into(), "fast".into())]);
    let err = run_pod_sandbox(&mut client, bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("kubernetes.io/egress-bandwidth"), "{}", err.message());

    for id in [&pod, &limited] {
        stop_pod(&mut client, id).await;
        remove_pod(&mut client, id).await;
    }
    assert_no_network_leftovers(&node, &[&pod, &limited]);
    assert_no_pod_leftovers(&node);
    assert!(!node.sh("tc qdisc show").contains("tbf"));
}

/// PodSandboxStats (and ListPodSandboxStats) carry the pod's network counters, read from its own
/// network namespace as containerd reads them: eth0 as the default interface, every interface
/// but loopback in the list.
#[tokio::test]
async fn pod_sandbox_stats_count_the_pods_network_traffic() {
    let node = node_with_local_registry("net-stats", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client, "network").await;
    node.write_file(CONFLIST_PATH, CONFLIST);
    node.sh("mkdir -p /srv/out && chmod 777 /srv/out");
    let pod = run_pod_sandbox(&mut client, kubelet_pod("netstats")).await.unwrap();
    // Traffic to the bridge's address, the node's own: 20 pings of 1000 bytes each way.
    let script =
        format!("busybox ping -c 20 -i 0.2 -s 1000 {GATEWAY} > /out/ping.txt 2>&1; echo done >> /out/ping.txt");
    let id = start_container(&mut client, &pod, "netstats", "pinger", &image, &script).await;
    assert_eq!(wait_exit_code(&mut client, &id).await, 0, "{}", node.sh("cat /srv/out/ping.txt"));

    let request = cri::PodSandboxStatsRequest { pod_sandbox_id: pod.clone() };
    let stats = client.runtime.pod_sandbox_stats(request).await.expect("PodSandboxStats").into_inner().stats.unwrap();
    let network = stats.linux.unwrap().network.expect("network stats of a pod with its own network namespace");
    assert!(network.timestamp > 0);
    let eth0 = network.default_interface.expect("a default interface");
    assert_eq!(eth0.name, "eth0");
    let value = |v: &Option<cri::UInt64Value>| v.as_ref().map(|v| v.value);
    assert!(value(&eth0.rx_bytes).unwrap() > 20_000, "{eth0:?}");
    assert!(value(&eth0.tx_bytes).unwrap() > 20_000, "{eth0:?}");
    assert_eq!((value(&eth0.rx_errors), value(&eth0.tx_errors)), (Some(0), Some(0)));
    let names: Vec<&str> = network.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["eth0"], "every interface but loopback");
    // The node's side of the veth saw the same packets the other way round.
    let host_veth_rx: u64 = node
        .sh("for l in /sys/class/net/veth*; do cat $l/statistics/tx_bytes; done | sort -n | tail -1")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(host_veth_rx >= value(&eth0.rx_bytes).unwrap(), "the node's veth sent {host_veth_rx} bytes");

    let listed = client
        .runtime
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .stats;
    let listed = listed[0].linux.clone().unwrap().network.unwrap().default_interface.unwrap();
    assert!(value(&listed.rx_bytes).unwrap() >= value(&eth0.rx_bytes).unwrap());
    stop_pod(&mut client, &pod).await;
    remove_pod(&mut client, &pod).await;
}
