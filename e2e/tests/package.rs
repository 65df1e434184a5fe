//! The Debian package and the kubelet walk-through (issue 15 items 4 and 5), in a node booted
//! without any cri-systemd (`NodeOptions::clean`): the package of the debug binary
//! (`scripts/package --debug`, cargo-deb) is installed by running deploy/kubelet.md's `sh` blocks
//! as written, in order; its `sh needs-*` blocks (kubeadm, kubelet, crictl: not on test machines)
//! are listed, not run. Then: the unit was neither enabled nor started by the install, the CRI
//! answers (Version, RunPodSandbox) once `systemctl enable --now` ran, the drop-ins are what
//! Status(verbose) shows (and a second one merges over the first after a restart), a bad drop-in
//! fails the start with its file and key in the journal, the files the walk-through wrote are the
//! YAML the kubelet and kubeadm read, and `dpkg -r` keeps the conffiles that `dpkg -P` removes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::{Node, NodeOptions, cri, crisimple, require_machine};
use serde::Deserialize;
use serde_json::Value;

const ENDPOINT: &str = "unix:///run/cri-systemd/cri-systemd.sock";
const WALK_THROUGH: &str = include_str!("../../deploy/kubelet.md");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").to_path_buf()
}

/// `scripts/package --debug`: the .deb of `$CARGO_TARGET_DIR/debug/cri-systemd` (what e2e/node
/// would install), built without a release build. Its path, as the script prints it last.
fn build_package() -> PathBuf {
    let output = Command::new(repo().join("scripts/package")).arg("--debug").output().expect("run scripts/package");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "scripts/package --debug failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(deb.extension().is_some_and(|e| e == "deb") && deb.is_file(), "no .deb printed: {stdout}");
    deb
}

/// The fenced blocks of a Markdown text: (info string, body), in order.
fn fenced_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines() {
        match (line.strip_prefix("```"), open.take()) {
            (Some(_), Some(block)) => blocks.push(block),
            (Some(info), None) => open = Some((info.trim().to_string(), String::new())),
            (None, Some((info, mut body))) => {
                body.push_str(line);
                body.push('\n');
                open = Some((info, body));
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "an unclosed code block in deploy/kubelet.md");
    blocks
}

/// The YAML documents of a file in the node, as JSON values.
fn yaml_documents(node: &Node, path: &str) -> Vec<Value> {
    let text = node.sh(&format!("cat {path}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap_or_else(|e| panic!("{path} is not YAML: {e}\n{text}")))
        .collect()
}

/// What Status(verbose) says the effective config is.
async fn status_config(client: &mut e2e::CriClient) -> Value {
    let status = client.runtime.status(cri::StatusRequest { verbose: true }).await.expect("Status").into_inner();
    serde_json::from_str(&status.info["config"]).expect("Status config is JSON")
}

fn unit_state(node: &Node) -> (String, String) {
    let state = |verb: &str| node.exec(&["systemctl", verb, "cri-systemd.service"]).stdout.trim().to_string();
    (state("is-enabled"), state("is-active"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_package_installs_in_a_clean_node_as_the_walk_through_says() {
    require_machine(&["systemd-nspawn", "cargo-deb", "dpkg-deb"]);
    let deb = build_package();
    let deb_dir = deb.parent().expect("the package's directory").display().to_string();
    let node = Node::up("package", NodeOptions { clean: true, ..Default::default() });
    let before =
        node.exec(&["sh", "-c", "command -v cri-systemd || systemctl cat cri-systemd.service || ls /etc/cri-systemd"]);
    assert!(!before.success(), "the clean node has cri-systemd already: {}", before.stdout);

    let blocks = fenced_blocks(WALK_THROUGH);
    for (info, _) in &blocks {
        assert!(info == "sh" || info.starts_with("sh needs-"), "a block neither run nor marked: ```{info}");
    }
    let not_run: Vec<&str> =
        blocks.iter().filter(|(info, _)| info != "sh").flat_map(|(_, body)| body.lines()).collect();
    println!("walk-through lines not run here (no kubeadm, kubelet or crictl):\n  {}", not_run.join("\n  "));
    let mut installed = false;
    for (_, block) in blocks.iter().filter(|(info, _)| info == "sh") {
        println!("$ {}", block.trim_end().replace('\n', "\n  "));
        // From the package's directory, as the walk-through's `dpkg -i ./...` expects; the host's
        // files are the node's lower layer.
        let out = node.sh(&format!("set -e\ncd '{deb_dir}'\n{block}"));
        print!("{out}");
        if block.contains("dpkg -i") {
            installed = true;
            // Debian policy: installed, daemon-reloaded, but neither enabled nor started.
            assert_eq!(unit_state(&node), ("disabled".into(), "inactive".into()));
            assert!(node.exec(&["test", "-d", "/etc/cri-systemd/config.d"]).success(), "no drop-in directory");
            assert!(node.exec(&["test", "!", "-e", "/etc/cni/net.d/10-cri-systemd.conflist"]).success());
            assert_eq!(node.sh("cat /etc/cri-systemd/config.toml"), include_str!("../../deploy/config.toml"));
            let conffiles = node.sh("dpkg-query --control-show cri-systemd conffiles");
            assert!(conffiles.contains("/etc/cri-systemd/config.toml") && conffiles.contains("/etc/crictl.yaml"));
        }
        if block.contains("cri-systemd config") {
            assert!(
                out.starts_with(
                    "# files read: /etc/cri-systemd/config.toml, /etc/cri-systemd/config.d/50-kubeadm.toml"
                ),
                "{out}"
            );
        }
    }
    assert!(installed, "the walk-through installs no package");
    assert_eq!(unit_state(&node), ("enabled".into(), "active".into()));
    assert_eq!(node.sh("command -v cri-systemd").trim(), "/usr/bin/cri-systemd");

    // The CRI over the socket: Version, and a pod with its own network (the example CNI config).
    let mut client = node.cri(Duration::from_secs(30)).await;
    let version = client.runtime.version(cri::VersionRequest::default()).await.expect("Version").into_inner();
    assert_eq!(version.runtime_name, "cri-systemd");
    let pod = crisimple::run_pod(&mut client, "packaged").await;
    // The walk-through's drop-in is in effect, and Status names the files read.
    let config = status_config(&mut client).await;
    assert_eq!(config["images"]["pinned_images"], serde_json::json!(["registry.k8s.io/pause:3.10"]), "{config}");
    assert_eq!(
        config["configFiles"],
        serde_json::json!(["/etc/cri-systemd/config.toml", "/etc/cri-systemd/config.d/50-kubeadm.toml"])
    );
    assert_eq!(config["images"]["retries"], 4);

    // A second drop-in merges over the first, key by key, after a restart; the pod survives it.
    node.write_file("/etc/cri-systemd/config.d/60-retries.toml", "[images]\nretries = 9\n");
    node.sh("systemctl restart cri-systemd");
    let mut client = node.cri(Duration::from_secs(30)).await;
    let config = status_config(&mut client).await;
    assert_eq!(
        (config["images"]["retries"].clone(), config["images"]["pinned_images"].clone()),
        (serde_json::json!(9), serde_json::json!(["registry.k8s.io/pause:3.10"])),
        "{config}"
    );
    let pods = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.expect("List").into_inner();
    assert!(pods.items.iter().any(|p| p.id == pod), "pod {pod} lost over the restart");

    // A bad drop-in: the start fails, the journal names the file and the key.
    node.write_file("/etc/cri-systemd/config.d/70-bad.toml", "\n[images]\nretriez = 1\n");
    let restart = node.exec(&["systemctl", "restart", "cri-systemd"]);
    assert!(!restart.success(), "the daemon started with a bad drop-in");
    let journal = node.logs();
    let line = journal.lines().rev().find(|l| l.contains("70-bad.toml")).unwrap_or_else(|| panic!("{journal}"));
    println!("bad drop-in: {line}");
    assert!(line.contains("retriez") && line.contains("line 3"), "{line}");
    node.sh("rm /etc/cri-systemd/config.d/70-bad.toml && systemctl reset-failed cri-systemd && systemctl restart cri-systemd");
    let mut client = node.cri(Duration::from_secs(30)).await;
    crisimple::stop_pod(&mut client, &pod).await;
    crisimple::remove_pod(&mut client, &pod).await;
    drop(client);

    // The files the walk-through wrote are what crictl, kubeadm and the kubelet read.
    let crictl = &yaml_documents(&node, "/etc/crictl.yaml")[0];
    assert_eq!(
        (crictl["runtime-endpoint"].as_str(), crictl["image-endpoint"].as_str()),
        (Some(ENDPOINT), Some(ENDPOINT))
    );
    let kubeadm = yaml_documents(&node, "/etc/kubernetes/kubeadm-config.yaml");
    assert_eq!(kubeadm.len(), 2, "{kubeadm:?}");
    assert_eq!(
        (kubeadm[0]["apiVersion"].as_str(), kubeadm[0]["kind"].as_str()),
        (Some("kubeadm.k8s.io/v1beta4"), Some("InitConfiguration"))
    );
    assert_eq!(kubeadm[0]["nodeRegistration"]["criSocket"].as_str(), Some(ENDPOINT));
    for kubelet in [&kubeadm[1], &yaml_documents(&node, "/var/lib/kubelet/config.yaml")[0]] {
        assert_eq!(kubelet["apiVersion"].as_str(), Some("kubelet.config.k8s.io/v1beta1"), "{kubelet}");
        assert_eq!(kubelet["kind"].as_str(), Some("KubeletConfiguration"));
        assert_eq!(kubelet["containerRuntimeEndpoint"].as_str(), Some(ENDPOINT));
        assert_eq!(kubelet["cgroupDriver"].as_str(), Some("systemd"));
    }
    assert!(WALK_THROUGH.contains(&format!("kubeadm init --cri-socket {ENDPOINT}")));

    // Removed: stopped, binary and unit gone, conffiles kept. Purged: conffiles gone too; the
    // drop-ins the admin wrote are the admin's.
    node.sh("dpkg -r cri-systemd");
    assert_eq!(unit_state(&node).1, "inactive");
    assert!(
        !node.exec(&["sh", "-c", "command -v cri-systemd || ls /usr/lib/systemd/system/cri-systemd.service"]).success()
    );
    // dh_installsystemd's way: masked while removed-not-purged, so that nothing starts it.
    assert_eq!(node.exec(&["systemctl", "is-enabled", "cri-systemd.service"]).stdout.trim(), "masked");
    assert_eq!(node.sh("dpkg-query -W -f '${db:Status-Status}' cri-systemd"), "config-files");
    node.sh("test -f /etc/cri-systemd/config.toml && test -f /etc/crictl.yaml");
    node.sh("dpkg -P cri-systemd");
    node.sh("test ! -e /etc/cri-systemd/config.toml && test ! -e /etc/crictl.yaml");
    node.sh("test -f /etc/cri-systemd/config.d/50-kubeadm.toml && test ! -e /etc/systemd/system/cri-systemd.service");
}
