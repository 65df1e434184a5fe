//! End-to-end test support: throwaway systemd nodes (the `e2e/node` command) with cri-systemd
//! running inside as its production unit, and CRI clients that reach it over its socket.
//!
//! Tests need root and systemd-nspawn, and build nothing themselves: build the daemon first
//! (`cargo build -p cri-server`), as the README's test command does. Where root or nspawn is
//! missing (a developer's `cargo test`), the tests skip with a message ([`require_machine`]);
//! with `CRI_SYSTEMD_E2E_REQUIRED` set (scripts/test-all sets it) they fail instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use proto::{CriClient, cri};

pub mod crisimple;
pub mod oci;
pub mod rawgrpc;
pub mod registry;
pub mod streaming;

/// The `e2e/node` command.
pub fn node_command() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("node")
}

/// Set (to anything) by scripts/test-all: an e2e test whose prerequisites are missing then fails
/// instead of skipping, so that the suite cannot pass without having run.
pub const E2E_REQUIRED_VAR: &str = "CRI_SYSTEMD_E2E_REQUIRED";
/// The daemon's pod mount namespace, pinned in the node (`runtime::pod_mounts`).
pub const POD_MOUNTS: &str = "/run/cri-systemd/pod-mounts/mnt";

/// What the machine lacks of root and the `commands` (looked up in PATH), if anything.
fn missing_prerequisites(commands: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    let uid = rustix::process::geteuid();
    if !uid.is_root() {
        missing.push(format!("not root (uid {})", uid.as_raw()));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for command in commands {
        if !std::env::split_paths(&path).any(|dir| dir.join(command).is_file()) {
            missing.push(format!("no {command} in PATH"));
        }
    }
    missing
}

/// Makes sure the machine can run an e2e test: root and `commands` (Node::up asks for
/// systemd-nspawn; the VM test for QEMU). When something is missing, the test fails if
/// [`E2E_REQUIRED_VAR`] is set; otherwise the whole test binary stops here with a message and
/// success: every e2e test needs a node, so none of its tests could run (libtest has no run-time
/// skip, and one check here spares every test its own).
pub fn require_machine(commands: &[&str]) {
    let missing = missing_prerequisites(commands);
    if missing.is_empty() {
        return;
    }
    let needs = format!("root and {}", commands.join(", "));
    if std::env::var_os(E2E_REQUIRED_VAR).is_some() {
        panic!("the e2e tests need {needs} ({E2E_REQUIRED_VAR} is set, so they may not skip): {}", missing.join("; "));
    }
    static SKIP: std::sync::Once = std::sync::Once::new();
    SKIP.call_once(|| {
        // Past libtest's output capture, which an exit would swallow.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: needs {needs} (run scripts/test-all as root): {}",
            missing.join("; ")
        );
        std::process::exit(0);
    });
}

/// How a node is brought up.
#[derive(Debug, Default, Clone)]
pub struct NodeOptions {
    /// Boot without starting cri-systemd (tests that start it themselves).
    pub no_daemon: bool,
    /// A config file for the daemon instead of deploy/config.toml.
    pub config: Option<PathBuf>,
    /// Boot a node without the daemon's binary, unit and config, as a host before the package is
    /// installed (`e2e/node up --clean`; implies `no_daemon`).
    pub clean: bool,
    /// The state directory (the node's /var/lib/cri-systemd) on a fresh journaled ext4 of this
    /// size (`"16G"`), an image file loop-mounted by `e2e/node up --state-ext4`: what a
    /// production node's /var/lib is, whatever the host's root file system.
    pub state_ext4: Option<String>,
}

/// A running throwaway node, shut down and removed on drop.
#[derive(Debug)]
pub struct Node {
    name: String,
}

/// The output of a command run in a node, with its text decoded for assertions.
#[derive(Debug)]
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(output: Output) -> Run {
        Run {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl Node {
    /// Boots a node named after `label`, unique to this process and call.
    pub fn up(label: &str, options: NodeOptions) -> Node {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("{label}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        Node::up_named(&name, options)
    }

    /// Boots a node with exactly this name (which must not be running).
    pub fn up_named(name: &str, options: NodeOptions) -> Node {
        require_machine(&["systemd-nspawn"]);
        let name = name.to_string();
        let mut command = Command::new(node_command());
        command.arg("up").arg(&name);
        if options.no_daemon {
            command.arg("--no-daemon");
        }
        if options.clean {
            command.arg("--clean");
        }
        if let Some(config) = &options.config {
            command.arg("--config").arg(config);
        }
        if let Some(size) = &options.state_ext4 {
            command.arg("--state-ext4").arg(size);
        }
        let node = Node { name };
        let output = command.stdin(Stdio::null()).output().expect("cannot run e2e/node");
        assert!(
            output.status.success(),
            "e2e/node up {} failed:\n{}{}",
            node.name,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        node
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Leaves the node running after this handle is gone (the demo does; tests never should).
    pub fn keep(self) {
        std::mem::forget(self);
    }

    fn node_query(&self, verb: &str) -> String {
        let output = Command::new(node_command()).arg(verb).arg(&self.name).output().expect("cannot run e2e/node");
        assert!(output.status.success(), "e2e/node {verb} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// The daemon's socket as seen from the host.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(self.node_query("socket"))
    }

    /// The node's directory on the host (state/, run/, console.log).
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(self.node_query("dir"))
    }

    /// Runs a command inside the node, in all its namespaces.
    pub fn exec(&self, args: &[&str]) -> Run {
        let output = Command::new(node_command())
            .arg("exec")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run e2e/node exec");
        Run::from_output(output)
    }

    /// Runs a shell snippet inside the node and asserts that it succeeds.
    pub fn sh(&self, script: &str) -> String {
        let run = self.exec(&["sh", "-c", script]);
        assert!(
            run.success(),
            "in node {}: `{script}` failed ({}):\n{}{}",
            self.name,
            run.status,
            run.stdout,
            run.stderr
        );
        run.stdout
    }

    /// Runs `script` as [`Node::sh`] does, in the daemon's pod mount namespace, where the pods'
    /// IPC, UTS, user and PID pins and /dev/shm mounts are (`runtime::pod_mounts`).
    pub fn sh_in_pod_mounts(&self, script: &str) -> String {
        let run = self.exec(&["nsenter", &format!("--mount={POD_MOUNTS}"), "--", "sh", "-c", script]);
        assert!(
            run.success(),
            "in node {}, pod mount namespace: `{script}` failed ({}):\n{}{}",
            self.name,
            run.status,
            run.stdout,
            run.stderr
        );
        run.stdout
    }

    /// The daemon's journal in the node.
    pub fn logs(&self) -> String {
        self.exec(&["journalctl", "-u", "cri-systemd", "--no-pager", "-o", "cat"]).stdout
    }

    /// Writes `contents` to `path` inside the node.
    pub fn write_file(&self, path: &str, contents: &str) {
        let mut child = Command::new(node_command())
            .args(["exec", &self.name, "sh", "-c", "mkdir -p \"$(dirname \"$1\")\" && cat > \"$1\"", "sh", path])
            .stdin(Stdio::piped())
            .spawn()
            .expect("cannot run e2e/node exec");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(contents.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "cannot write {path} in node {}", self.name);
    }

    /// Connects to the daemon, waiting up to `timeout` for its socket to answer `Version`.
    pub async fn cri(&self, timeout: Duration) -> CriClient {
        let socket = self.socket();
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = async {
                let mut client = CriClient::connect(&socket).await.map_err(|e| e.to_string())?;
                client.runtime.version(cri::VersionRequest::default()).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(client)
            };
            match attempt.await {
                Ok(client) => return client,
                Err(e) if Instant::now() > deadline => {
                    panic!("daemon in node {} does not answer on {}: {e}\n{}", self.name, socket.display(), self.logs())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::env::var_os("E2E_KEEP_NODES").is_some() {
            eprintln!("keeping node {} (E2E_KEEP_NODES is set)", self.name);
            return;
        }
        let output = Command::new(node_command()).arg("down").arg(&self.name).output();
        match output {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!("e2e/node down {} failed: {}", self.name, String::from_utf8_lossy(&output.stderr)),
            Err(e) => eprintln!("cannot run e2e/node down {}: {e}", self.name),
        }
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ==== container rootfs helpers (runtime::init tests) ====

/// The busybox applets [`busybox_rootfs`] links by default.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ls", "id", "cat", "echo", "sleep", "hostname", "mount", "touch", "grep", "ps", "readlink", "stat", "mkdir",
    "true", "false", "wc", "head", "env", "sed", "seq",
];

/// Builds, inside `node`, a minimal image tree at `dir` from the host's static busybox
/// (Debian's busybox-static, /bin/busybox): bin/busybox with applet symlinks, empty /proc, /sys,
/// /dev, /tmp, and an /etc/passwd with root and a user 1000. Usable as an overlay lower dir.
pub fn busybox_rootfs(node: &Node, dir: &str, applets: &[&str]) {
    let links: String = applets.iter().map(|a| format!(" && ln -sf busybox \"$d/bin/{a}\"")).collect();
    node.sh(&format!(
        "d='{dir}' && test -x /bin/busybox && \
         mkdir -p \"$d/bin\" \"$d/etc\" \"$d/proc\" \"$d/sys\" \"$d/dev\" \"$d/tmp\" \"$d/root\" && \
         cp /bin/busybox \"$d/bin/busybox\"{links} && \
         printf 'root:x:0:0:root:/root:/bin/sh\\nuser:x:1000:1000:user:/home/user:/bin/sh\\n' > \"$d/etc/passwd\" && \
         printf 'root:x:0:\\nuser:x:1000:\\n' > \"$d/etc/group\" && chmod 1777 \"$d/tmp\""
    ));
}

// ==== end of container rootfs helpers ====

// --- A node with a local registry and the busybox image -----------------------------------------

/// The CNI config the README deploys (bridge, host-local, portmap, bandwidth: the node's real
/// plugins), and where a test writes it in a node to give its pods networking (nodes start
/// without one; the daemon reads it at each RunPodSandbox).
pub const CNI_CONFLIST: &str = include_str!("../../deploy/cni/10-cri-systemd.conflist");
pub const CNI_CONFLIST_PATH: &str = "/etc/cni/net.d/10-cri-systemd.conflist";

/// The port of the plain-HTTP registry the tests start on a node's loopback.
pub const LOCAL_REGISTRY_PORT: u16 = 5000;

/// Starts `slice` in the node the way the kubelet's systemd cgroup driver does before
/// RunPodSandbox (a transient slice with the pod's limits: CPUShares=2 for a best-effort pod).
pub fn start_kubelet_slice(node: &Node, slice: &str) {
    node.sh(&format!(
        "busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager \
         StartTransientUnit 'ssa(sv)a(sa(sv))' {slice} replace 3 Description s 'libcontainer container kubepods' \
         DefaultDependencies b false CPUShares t 2 0 && \
         for i in $(seq 50); do systemctl is-active -q {slice} && exit 0; sleep 0.1; done; exit 1"
    ));
}

/// A node whose daemon pulls from the plain-HTTP registry on the node's loopback;
/// `extra_config` is more daemon config TOML (may be empty).
pub fn node_with_local_registry(label: &str, extra_config: &str) -> Node {
    require_machine(&["systemd-nspawn"]);
    let config = std::env::temp_dir().join(format!("cri-e2e-{label}-{}.toml", std::process::id()));
    let text = format!("{extra_config}\n[images.registries.\"127.0.0.1:{LOCAL_REGISTRY_PORT}\"]\nplain_http = true\n");
    std::fs::write(&config, text).expect("write the node's daemon config");
    let node = Node::up(label, NodeOptions { config: Some(config.clone()), ..Default::default() });
    let _ = std::fs::remove_file(config);
    node
}

/// Starts registry `registry_name` on the node, pushes `busybox_image("")` as `busybox:1`, has
/// the daemon pull it, and returns the image's name.
pub async fn pull_busybox(node: &Node, client: &mut CriClient, registry_name: &str) -> String {
    use registry::{Registry, RegistryOptions};
    let registry = Registry::start(node, registry_name, LOCAL_REGISTRY_PORT, RegistryOptions::default());
    registry.push_image("busybox", "1", &oci::busybox_image(""));
    let image = registry.repo("busybox:1");
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
        ..Default::default()
    };
    client.image.pull_image(request).await.expect("PullImage");
    image
}

/// Pulls busybox from registry `name` on the node, runs pod `name` with one container that
/// sleeps, and returns the container's id: a target for exec and streaming tests.
pub async fn sleeping_container(node: &Node, client: &mut CriClient, name: &str) -> String {
    let image = pull_busybox(node, client, name).await;
    let pod_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-0000-1111-2222-333344445555"),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        ..Default::default()
    };
    let request = cri::RunPodSandboxRequest { config: Some(pod_config.clone()), runtime_handler: String::new() };
    let pod = client.runtime.run_pod_sandbox(request).await.expect("RunPodSandbox").into_inner().pod_sandbox_id;
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "sleeper".into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image, ..Default::default() }),
        command: vec!["/bin/busybox".into(), "sleep".into(), "100000".into()],
        ..Default::default()
    };
    let request =
        cri::CreateContainerRequest { pod_sandbox_id: pod, config: Some(config), sandbox_config: Some(pod_config) };
    let id = client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id;
    client
        .runtime
        .start_container(cri::StartContainerRequest { container_id: id.clone() })
        .await
        .expect("StartContainer");
    id
}

// --- A software TPM in a node (measured starts) -------------------------------------------------

/// The TCTI of the swtpm that [`start_swtpm`] starts (tpm2-tss's `swtpm` TCTI; control port + 1).
pub const SWTPM_TCTI: &str = "swtpm:host=127.0.0.1,port=2321";

/// Starts swtpm (Debian's `swtpm`) on the node's loopback as the unit `e2e-swtpm`, a fresh TPM 2.0
/// with its PCRs reset, and waits until `tpm2_pcrread` (Debian's `tpm2-tools`) gets an answer.
pub fn start_swtpm(node: &Node) {
    node.sh("mkdir -p /var/lib/e2e-swtpm && systemd-run --unit=e2e-swtpm --quiet swtpm socket --tpm2 \
         --tpmstate dir=/var/lib/e2e-swtpm --server type=tcp,port=2321,bindaddr=127.0.0.1 \
         --ctrl type=tcp,port=2322,bindaddr=127.0.0.1 --flags not-need-init,startup-clear");
    for _ in 0..100 {
        if node.exec(&["tpm2_pcrread", "-T", SWTPM_TCTI, "sha256:23"]).success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("swtpm does not answer in node {}:\n{}", node.name(), node.sh("journalctl -u e2e-swtpm --no-pager || true"));
}
