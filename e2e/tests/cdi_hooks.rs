//! OCI hooks from CDI specs: a device whose spec asks for a createContainer hook (a shell script
//! of the node, as nvidia-ctk's `update-ldcache` is a program of the node) that reads the OCI
//! state on stdin and the bundle's config.json (`root.path`) and writes an ld.so.conf.d entry into
//! the container's root file system, which the container then sees; a startContainer hook (a
//! path of the image) and a poststart hook (of the node) with their states; a poststop hook that
//! runs when the container stops; a failing createContainer hook fails StartContainer with its
//! path, exit status and stderr; a relative hook path is refused at CreateContainer. The hooks
//! are in the container's record: a daemon killed between CreateContainer and StartContainer
//! still runs them, though the spec file is gone by then.

use std::time::{Duration, Instant};

use e2e::crisimple::{container_config, create, run_pod, sh, start};
use e2e::{CriClient, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// An update-ldcache-like hook: the state from stdin, the rootfs from the bundle's config.json.
/// Its env is only what the spec gives (no PATH): busybox by its full path.
const LDCACHE_HOOK: &str = r#"#!/usr/bin/busybox sh
bb=/usr/bin/busybox
state=$($bb cat)
field() { echo "$state" | $bb sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p"; }
bundle=$(field bundle)
root=$($bb grep -A2 '"root"' "$bundle/config.json" | $bb sed -n 's/.*"path": *"\([^"]*\)".*/\1/p')
$bb mkdir -p "$root/etc/ld.so.conf.d"
echo "$2 # $LDCACHE_NOTE $1 id=$(field id) status=$(field status)" > "$root/etc/ld.so.conf.d/cdi-test.conf"
echo "$(field pid)" > "/tmp/cdi-hook-pid-$(field id)"
"#;

/// A poststop hook: records the state it got.
const POSTSTOP_HOOK: &str = r#"#!/usr/bin/busybox sh
bb=/usr/bin/busybox
state=$($bb cat)
id=$(echo "$state" | $bb sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
echo "$state" > "/tmp/cdi-poststop-$id"
"#;

const SPEC: &str = r#"{
  "cdiVersion": "0.6.0",
  "kind": "example.com/hook",
  "devices": [
    {"name": "ldcache", "containerEdits": {"hooks": [
      {"hookName": "createContainer", "path": "/etc/cdi/hooks/ldcache.sh",
       "args": ["ldcache.sh", "--folder", "/usr/lib/cdi-test"], "env": ["LDCACHE_NOTE=from-cdi"], "timeout": 10},
      {"hookName": "startContainer", "path": "/bin/sh", "args": ["sh", "-c", "cat > /start-hook-state"]},
      {"hookName": "poststart", "path": "/usr/bin/busybox", "args": ["sh", "-c", "cat > /tmp/cdi-poststart"]},
      {"hookName": "poststop", "path": "/etc/cdi/hooks/poststop.sh"}
    ]}},
    {"name": "relative", "containerEdits": {"hooks": [{"hookName": "createContainer", "path": "hooks/ldcache.sh"}]}},
    {"name": "broken", "containerEdits": {"hooks": [
      {"hookName": "createContainer", "path": "/usr/bin/busybox",
       "args": ["sh", "-c", "echo cannot find libcuda.so >&2; exit 3"]}
    ]}}
  ]
}"#;

fn with_cdi(mut config: cri::ContainerConfig, name: &str) -> cri::ContainerConfig {
    config.cdi_devices = vec![cri::CdiDevice { name: name.to_string() }];
    config
}

/// What the createContainer hook wrote, as the container sees it.
async fn check_ldcache_entry(node: &e2e::Node, client: &mut CriClient, id: &str) {
    let (code, out, err) = sh(client, id, "cat /etc/ld.so.conf.d/cdi-test.conf").await;
    assert_eq!(code, 0, "the hook's entry is not in the container: {out} {err}");
    assert_eq!(out, format!("/usr/lib/cdi-test # from-cdi --folder id={id} status=creating\n"));
    // startContainer ran in the container (its path, /bin/sh, is the image's) before the entrypoint.
    let (_, out, _) = sh(client, id, "cat /start-hook-state").await;
    assert!(out.contains(&format!("\"id\":\"{id}\"")) && out.contains("\"status\":\"created\""), "{out:?}");
    // poststart ran on the node before StartContainer returned.
    let poststart = node.sh("cat /tmp/cdi-poststart");
    assert!(
        poststart.contains(&format!("\"id\":\"{id}\"")) && poststart.contains("\"status\":\"running\""),
        "{poststart:?}"
    );
    // The state's pid is the container's process as the node sees it (it became the entrypoint).
    let pid = node.sh(&format!("cat /tmp/cdi-hook-pid-{id}"));
    let cmdline = node.sh(&format!("tr '\\0' ' ' < /proc/{}/cmdline", pid.trim()));
    assert_eq!(cmdline.trim(), "/bin/busybox sleep 100000", "pid {pid}");
}

#[tokio::test]
async fn cdi_hooks_run_at_their_oci_stages() {
    let node = e2e::node_with_local_registry("cdihooks", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "cdihooks").await;
    node.sh("mkdir -p /etc/cdi/hooks");
    node.write_file("/etc/cdi/hooks/ldcache.sh", LDCACHE_HOOK);
    node.write_file("/etc/cdi/hooks/poststop.sh", POSTSTOP_HOOK);
    node.sh("chmod 755 /etc/cdi/hooks/ldcache.sh /etc/cdi/hooks/poststop.sh");
    node.write_file("/etc/cdi/hooks.json", SPEC);
    let sleep = ["/bin/busybox", "sleep", "100000"];
    let pod = run_pod(&mut client, "cdihooks").await;

    // createContainer: the entry is in the container's rootfs when it runs.
    let config = with_cdi(container_config("ldcache", &image, &sleep), "example.com/hook=ldcache");
    let id = create(&mut client, &pod, config).await.expect("CreateContainer with a hooked CDI device");
    start(&mut client, &id).await.expect("StartContainer");
    check_ldcache_entry(&node, &mut client, &id).await;

    // poststop: runs when the container stops, with the state (status stopped).
    let poststop_file = format!("/tmp/cdi-poststop-{id}");
    assert_eq!(node.sh(&format!("cat {poststop_file} 2>/dev/null || echo none")).trim(), "none");
    client
        .runtime
        .stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 10 })
        .await
        .expect("StopContainer");
    let deadline = Instant::now() + Duration::from_secs(30);
    let state = loop {
        let text = node.sh(&format!("cat {poststop_file} 2>/dev/null || true"));
        if !text.trim().is_empty() || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        state.contains(&format!("\"id\":\"{id}\"")) && state.contains("\"status\":\"stopped\""),
        "poststop state: {state:?}"
    );

    // A failing createContainer hook fails the start, saying which hook and how.
    let config = with_cdi(container_config("broken", &image, &sleep), "example.com/hook=broken");
    let broken = create(&mut client, &pod, config).await.expect("CreateContainer");
    let error = start(&mut client, &broken).await.expect_err("StartContainer with a failing hook");
    let message = error.message();
    assert!(
        message.contains("createContainer hook /usr/bin/busybox")
            && message.contains("exit status 3")
            && message.contains("cannot find libcuda.so"),
        "{message}"
    );

    // A hook path that is not absolute (the OCI spec's rule) is refused, naming the device; nothing is made.
    let before = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
    let config = with_cdi(container_config("relative", &image, &sleep), "example.com/hook=relative");
    let error = create(&mut client, &pod, config).await.expect_err("CreateContainer with a relative hook path");
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(
        error.message().contains("example.com/hook=relative") && error.message().contains("not absolute"),
        "{}",
        error.message()
    );
    let after = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
    assert_eq!(after.containers.len(), before.containers.len());

    // The hooks are in the record: kept across a daemon kill, without the spec file.
    let config = with_cdi(container_config("later", &image, &sleep), "example.com/hook=ldcache");
    let later = create(&mut client, &pod, config).await.expect("CreateContainer");
    node.sh("rm /etc/cdi/hooks.json");
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd; systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    start(&mut client, &later).await.expect("StartContainer after the restart");
    check_ldcache_entry(&node, &mut client, &later).await;
}
