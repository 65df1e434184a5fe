//! `demo`: the main job, end to end. Boots a throwaway systemd node named `demo` with cri-systemd
//! running in it as its production unit, starts a registry inside the node, pushes a busybox
//! image built from the host's busybox-static, and has cri-systemd pull it and run a pod whose
//! container serves HTTP and logs. Leaves the node running and says how to reach it.

use std::collections::HashMap;
use std::time::Duration;

use e2e::oci::busybox_image;
use e2e::registry::{Registry, RegistryOptions};
use e2e::{Node, NodeOptions, cri};

const NAME: &str = "demo";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let config = std::env::temp_dir().join("cri-systemd-demo.toml");
    std::fs::write(&config, "[images.registries.\"127.0.0.1:5000\"]\nplain_http = true\n").expect("write demo config");
    let node = Node::up_named(NAME, NodeOptions { config: Some(config), ..Default::default() });
    let mut client = node.cri(Duration::from_secs(30)).await;

    let registry = Registry::start(&node, "demo", 5000, RegistryOptions::default());
    registry.push_image("busybox", "demo", &busybox_image(""));
    let image = registry.repo("busybox:demo");
    step("PullImage", &image);
    let pulled = client
        .image
        .pull_image(cri::PullImageRequest { image: Some(spec(&image)), ..Default::default() })
        .await
        .expect("PullImage");
    println!("  image id {}", pulled.into_inner().image_ref);

    let pod_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "web".into(),
            uid: "de300000-0000-4000-8000-000000000001".into(),
            namespace: "demo".into(),
            attempt: 0,
        }),
        hostname: "web".into(),
        log_directory: "/var/log/pods/demo_web".into(),
        labels: HashMap::from([("app".into(), "web".into())]),
        ..Default::default()
    };
    step("RunPodSandbox", "demo/web");
    let pod = client
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(pod_config.clone()), runtime_handler: String::new() })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    println!("  pod {pod}");

    let script = "echo 'hello from a cri-systemd container' > /tmp/index.html; \
                  busybox httpd -p 127.0.0.1:8080 -h /tmp; \
                  while :; do echo \"$(busybox date) serving /tmp on 127.0.0.1:8080\"; busybox sleep 5; done";
    let container_config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "httpd".into(), attempt: 0 }),
        image: Some(spec(&image)),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: "httpd/0.log".into(),
        ..Default::default()
    };
    step("CreateContainer + StartContainer", "httpd");
    let container = client
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config),
            sandbox_config: Some(pod_config),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    client
        .runtime
        .start_container(cri::StartContainerRequest { container_id: container.clone() })
        .await
        .expect("StartContainer");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let unit = format!("cri-{container}.service");
    step("systemd's view", &unit);
    print!("{}", node.exec(&["systemctl", "status", "--no-pager", "--lines=0", &unit]).stdout);
    step("the pod's network namespace answers", "busybox wget http://127.0.0.1:8080/");
    let netns = format!("/run/cri-systemd/pods/{pod}/ns/net");
    let page = node.exec(&["nsenter", &format!("--net={netns}"), "busybox", "wget", "-qO-", "http://127.0.0.1:8080/"]);
    print!("  {}", page.stdout);
    step("container log (CRI format)", "/var/log/pods/demo_web/httpd/0.log");
    print!("{}", node.exec(&["cat", "/var/log/pods/demo_web/httpd/0.log"]).stdout);

    let socket = node.socket();
    println!(
        "\ncri-systemd is serving CRI in node \"{NAME}\", with pod {pod} and container {container} running:\n\
         \x20 socket on this host:  {socket}   (inside the node: /run/cri-systemd/cri-systemd.sock, as deploy/crictl.yaml says)\n\
         \x20 query it:             target/debug/cri --socket {socket} ps   (also: pods, inspect ID, images, status)\n\
         \x20 enter the node:       e2e/node exec {NAME} bash\n\
         \x20 daemon logs:          e2e/node logs {NAME}\n\
         \x20 stop and clean up:    e2e/node down {NAME}",
        socket = socket.display()
    );
    node.keep();
}

fn spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec { image: image.into(), ..Default::default() }
}

fn step(what: &str, detail: &str) {
    println!("\n== {what}: {detail}");
}
