//! The two CRI runtimes under test, both inside the same throwaway node: cri-systemd (the node's
//! `cri-systemd.service`) and containerd 1.6 with runc (a transient unit started here, with a
//! config of its own), reached from the host with the same Rust CRI client.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::{CriClient, Node, cri};

use crate::procs;

/// Where containerd keeps everything in the node. Its root must be on a real disk (the overlayfs
/// snapshotter's upper dirs cannot live on the node's overlay root): /var/lib/cri-systemd is the
/// node's ext4 bind, the same disk cri-systemd's store is on.
pub const CONTAINERD_ROOT: &str = "/var/lib/cri-systemd/bench-containerd/root";
pub const CONTAINERD_STATE: &str = "/run/bench-containerd/state";
pub const CONTAINERD_SOCKET: &str = "/run/bench-containerd/containerd.sock";
pub const CONTAINERD_CONFIG: &str = "/etc/bench-containerd/config.toml";
pub const CONTAINERD_UNIT: &str = "bench-containerd.service";
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    CriSystemd,
    Containerd,
}

/// One runtime: how to reach it and which process is its daemon.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub kind: Kind,
    /// For tables: name and version.
    pub label: String,
    /// The CRI socket as seen from the host.
    pub socket: PathBuf,
    /// Host PID of the daemon.
    pub daemon_pid: u32,
    /// systemd unit of the daemon in the node.
    pub unit: String,
}

impl Runtime {
    pub async fn client(&self) -> Result<CriClient, String> {
        let mut client = CriClient::connect(&self.socket)
            .await
            .map_err(|e| format!("{}: connect {}: {e}", self.label, self.socket.display()))?;
        client
            .runtime
            .version(cri::VersionRequest::default())
            .await
            .map_err(|e| format!("{}: Version: {e}", self.label))?;
        Ok(client)
    }

    pub fn short(&self) -> &'static str {
        match self.kind {
            Kind::CriSystemd => "cri-systemd",
            Kind::Containerd => "containerd",
        }
    }
}

/// The main PID (in the node) of a unit, mapped to its host PID.
fn unit_host_pid(node: &Node, pid1: u32, unit: &str) -> Result<u32, String> {
    let procs = procs::NodeProcs::of(&node.dir(), pid1)?;
    let run = node.exec(&["systemctl", "show", "-p", "MainPID", "--value", unit]);
    let node_pid: u32 =
        run.stdout.trim().parse().map_err(|_| format!("no main PID for {unit}: {}{}", run.stdout, run.stderr))?;
    if node_pid == 0 {
        return Err(format!("{unit} is not running in node {}", node.name()));
    }
    procs.host_pid(node_pid).ok_or_else(|| format!("{unit}: PID {node_pid} of the node not found on the host"))
}

async fn version_label(client: &mut CriClient, fallback: &str) -> String {
    match client.runtime.version(cri::VersionRequest::default()).await {
        Ok(v) => {
            let v = v.into_inner();
            format!("{} {}", v.runtime_name, v.runtime_version)
        }
        Err(_) => fallback.to_owned(),
    }
}

pub async fn cri_systemd(node: &Node, pid1: u32) -> Result<Runtime, String> {
    let mut client = node.cri(Duration::from_secs(30)).await;
    let label = version_label(&mut client, "cri-systemd").await;
    let unit = "cri-systemd.service".to_owned();
    Ok(Runtime {
        kind: Kind::CriSystemd,
        label,
        socket: node.socket(),
        daemon_pid: unit_host_pid(node, pid1, &unit)?,
        unit,
    })
}

/// containerd's config: CRI plugin with runc under systemd cgroups, our pause image, the
/// registry in the node as plain HTTP, the same CNI dirs cri-systemd uses.
pub fn containerd_config(registry_host: &str, sandbox_image: &str) -> String {
    format!(
        r#"version = 2
root = "{CONTAINERD_ROOT}"
state = "{CONTAINERD_STATE}"

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # The node lacks CAP_SYS_RESOURCE: the pause container's oom_score_adj of -998 cannot be set
  # (runc's init dies). This caps it at containerd's own score, as for containerd in a container.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{CNI_CONF_DIR}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry_host}"]
    endpoint = ["http://{registry_host}"]
"#
    )
}

/// Starts containerd in the node as a transient unit (like Debian's containerd.service:
/// Type=notify, Delegate=yes, KillMode=process) and waits until it answers CRI.
pub async fn containerd(node: &Node, pid1: u32, registry_host: &str, sandbox_image: &str) -> Result<Runtime, String> {
    for bin in ["/usr/bin/containerd", "/usr/bin/containerd-shim-runc-v2", "/usr/sbin/runc", "/usr/bin/ctr"] {
        if !std::path::Path::new(bin).exists() {
            return Err(format!("{bin} not found: install Debian's containerd and runc (scripts/setup does)"));
        }
    }
    node.write_file(CONTAINERD_CONFIG, &containerd_config(registry_host, sandbox_image));
    let unit = CONTAINERD_UNIT.to_owned();
    let run = node.exec(&[
        "systemd-run",
        "--quiet",
        &format!("--unit={unit}"),
        "-p",
        "Type=notify",
        "-p",
        "Delegate=yes",
        "-p",
        "KillMode=process",
        "-p",
        "LimitNOFILE=infinity",
        "-p",
        "TasksMax=infinity",
        "/usr/bin/containerd",
        "--config",
        CONTAINERD_CONFIG,
    ]);
    if !run.success() {
        return Err(format!("cannot start containerd in node {}: {}{}", node.name(), run.stdout, run.stderr));
    }
    let socket = PathBuf::from(format!("/proc/{pid1}/root{CONTAINERD_SOCKET}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        let attempt = async {
            let mut client = CriClient::connect(&socket).await.map_err(|e| e.to_string())?;
            client.runtime.version(cri::VersionRequest::default()).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(client)
        };
        match attempt.await {
            Ok(client) => break client,
            Err(e) if Instant::now() > deadline => {
                let logs = node.exec(&["journalctl", "-u", &unit, "--no-pager", "-o", "cat", "-n", "40"]).stdout;
                return Err(format!("containerd does not answer CRI on {}: {e}\n{logs}", socket.display()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let label = version_label(&mut client, "containerd").await;
    Ok(Runtime { kind: Kind::Containerd, label, socket, daemon_pid: unit_host_pid(node, pid1, &unit)?, unit })
}

/// `ctr` against the benchmark's containerd, run in the node.
pub fn ctr(node: &Node, args: &[&str]) -> e2e::Run {
    let mut all = vec!["ctr", "--address", CONTAINERD_SOCKET];
    all.extend_from_slice(args);
    node.exec(&all)
}
