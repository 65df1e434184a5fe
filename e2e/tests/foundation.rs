//! The daemon's foundation, driven through a real systemd node: Version, Status, RuntimeConfig,
//! restarts, start-up errors, and life without the system bus.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use e2e::{Node, NodeOptions, cri, eventually};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn condition(status: &cri::StatusResponse, kind: &str) -> cri::RuntimeCondition {
    status
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == kind))
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} condition in {status:?}"))
}

async fn status(client: &mut e2e::CriClient) -> cri::StatusResponse {
    client.runtime.status(cri::StatusRequest { verbose: true }).await.expect("Status").into_inner()
}

#[tokio::test]
async fn answers_version_status_and_runtime_config() {
    let node = Node::up("found-api", NodeOptions::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    let version = client.runtime.version(cri::VersionRequest { version: "v1".into() }).await.unwrap().into_inner();
    assert_eq!(version.runtime_name, "cri-systemd");
    assert_eq!(version.runtime_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.runtime_api_version, "v1");

    let config = client.runtime.runtime_config(cri::RuntimeConfigRequest {}).await.unwrap().into_inner();
    assert_eq!(config.linux.unwrap().cgroup_driver, cri::CgroupDriver::Systemd as i32);

    // systemd answers over the node's system bus; the node has no CNI config yet.
    let answer = status(&mut client).await;
    let runtime_ready = condition(&answer, "RuntimeReady");
    assert!(runtime_ready.status, "{runtime_ready:?}");
    let network_ready = condition(&answer, "NetworkReady");
    assert!(!network_ready.status);
    assert_eq!(network_ready.reason, "NetworkPluginNotReady");
    assert!(network_ready.message.contains("/etc/cni/net.d"), "{}", network_ready.message);
    let systemd_info = &answer.info["systemd"];
    let systemd_version = node.sh("systemctl --version | head -1 | cut -d' ' -f2");
    assert!(systemd_info.contains(&format!("\"{}", systemd_version.trim())), "{systemd_info}");

    // The daemon logged what systemd told it at start.
    let logs = node.logs();
    assert!(logs.contains("connected to systemd") && logs.contains(systemd_version.trim()), "{logs}");

    // A CNI config dropped in later makes the network ready without a restart.
    node.write_file(
        "/etc/cni/net.d/10-pods.conflist",
        r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap"}]}"#,
    );
    eventually(Duration::from_secs(10), "NetworkReady=true", || {
        let mut client = client.clone();
        async move { condition(&status(&mut client).await, "NetworkReady").status.then_some(()) }
    })
    .await;

    // Both services share the socket, which is a 0660 socket.
    let images = client.image.image_fs_info(cri::ImageFsInfoRequest {}).await;
    assert_ne!(images.map_err(|e| e.code()).err(), Some(tonic::Code::NotFound));
    let meta = std::fs::metadata(node.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
}

#[tokio::test]
async fn comes_back_after_restart_and_kill() {
    let node = Node::up("found-restart", NodeOptions::default());
    node.cri(ANSWER_TIMEOUT).await;

    node.sh("systemctl restart cri-systemd");
    node.cri(ANSWER_TIMEOUT).await;

    // SIGKILL leaves the socket file behind; the restarted daemon must replace it.
    let pid_before = node.sh("systemctl show -p MainPID --value cri-systemd");
    node.sh("systemctl kill -s KILL cri-systemd");
    eventually(Duration::from_secs(20), "a new daemon process", || {
        let pid = node.exec(&["systemctl", "show", "-p", "MainPID", "--value", "cri-systemd"]).stdout;
        let pid_before = pid_before.clone();
        async move { (pid.trim() != "0" && pid != pid_before).then_some(()) }
    })
    .await;
    node.cri(ANSWER_TIMEOUT).await;
    assert!(node.logs().contains("replacing stale socket"), "{}", node.logs());

    // SIGTERM is a clean stop: success, and the socket is gone.
    node.sh("systemctl stop cri-systemd");
    assert_eq!(node.sh("systemctl show -p Result --value cri-systemd").trim(), "success");
    assert!(!node.socket().exists());
}

#[tokio::test]
async fn bad_config_fails_start_naming_key_and_file() {
    let node = Node::up("found-badcfg", NodeOptions { no_daemon: true, ..Default::default() });
    for (config, key) in [("log_level = \"loud\"\n", "`log_level`"), ("[systemd]\nbus = \"x\"\n", "`systemd.bus`")] {
        node.write_file("/etc/cri-systemd/config.toml", config);
        let start = node.exec(&["systemctl", "start", "cri-systemd"]);
        assert!(!start.success(), "started with {config:?}");
        let logs = node.logs();
        assert!(logs.contains(key) && logs.contains("/etc/cri-systemd/config.toml"), "{key} not in:\n{logs}");
        node.sh("systemctl stop cri-systemd; systemctl reset-failed cri-systemd 2>/dev/null || true");
    }
}

#[tokio::test]
async fn without_the_system_bus_status_says_why_and_recovers() {
    let node = Node::up("found-nobus", NodeOptions::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    assert!(condition(&status(&mut client).await, "RuntimeReady").status);

    node.sh("systemctl stop dbus.socket dbus.service");
    let not_ready = condition(&status(&mut client).await, "RuntimeReady");
    assert!(!not_ready.status);
    assert_eq!(not_ready.reason, "SystemdUnreachable");
    assert!(not_ready.message.contains("/run/dbus/system_bus_socket"), "{}", not_ready.message);

    node.sh("systemctl start dbus.socket");
    eventually(Duration::from_secs(20), "RuntimeReady=true after the bus is back", || {
        let mut client = client.clone();
        async move { condition(&status(&mut client).await, "RuntimeReady").status.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn start_up_errors_say_what_is_wrong() {
    let node = Node::up("found-startup", NodeOptions::default());
    node.cri(ANSWER_TIMEOUT).await;

    // A second daemon on the live socket refuses to start and leaves the first one serving.
    let second = node.exec(&["cri-systemd"]);
    assert!(!second.success());
    assert!(second.stderr.contains("in use by a running process"), "{}", second.stderr);
    node.cri(ANSWER_TIMEOUT).await;

    // A state root that cannot be created, and one that exists but is read-only.
    node.sh("mkdir -p /srv/ro && mount -t tmpfs -o ro tmpfs /srv/ro");
    node.write_file("/etc/cri-systemd/ro.toml", "socket = \"/run/ro.sock\"\nstate_root = \"/srv/ro/state\"\n");
    let run = node.exec(&["cri-systemd", "--config", "/etc/cri-systemd/ro.toml"]);
    assert!(!run.success());
    assert!(
        run.stderr.contains("cannot create state root /srv/ro/state") && run.stderr.contains("state_root"),
        "{}",
        run.stderr
    );
    node.sh("mount -o remount,rw /srv/ro && mkdir /srv/ro/state && mount -o remount,ro /srv/ro");
    let run = node.exec(&["cri-systemd", "--config", "/etc/cri-systemd/ro.toml"]);
    assert!(!run.success());
    assert!(run.stderr.contains("state root /srv/ro/state is not writable"), "{}", run.stderr);

    // A missing state root is created, and a second daemon on its own socket serves beside the first.
    node.write_file(
        "/etc/cri-systemd/other.toml",
        "socket = \"/run/cri-systemd/other.sock\"\nstate_root = \"/srv/new/state\"\nrun_root = \"/run/other\"\n",
    );
    node.sh(
        "systemd-run --unit=other-cri -p Type=notify /usr/local/bin/cri-systemd --config /etc/cri-systemd/other.toml",
    );
    node.sh("test -d /srv/new/state && test -S /run/cri-systemd/other.sock");
    let other_socket = node.socket().with_file_name("other.sock");
    let mut other = e2e::CriClient::connect(&other_socket).await.unwrap();
    other.runtime.version(cri::VersionRequest::default()).await.unwrap();
}
