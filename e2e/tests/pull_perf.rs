//! What a pull costs (issue 17, item 3), end to end through CRI PullImage against the registry on
//! the node's loopback: a re-pull of a present image is one HEAD request, as containerd's
//! resolver makes it (the manifest's digest, then the stored copy), also after a daemon restart;
//! and the daemon's peak RSS stays bounded while it unpacks four large layers at once.

use std::time::Duration;

use e2e::registry::{Registry, RegistryOptions};
use e2e::{CriClient, LOCAL_REGISTRY_PORT, Node, cri, eventually, node_with_local_registry, oci};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

async fn pull(client: &mut CriClient, image: &str) -> String {
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec { image: image.to_owned(), ..Default::default() }),
        ..Default::default()
    };
    client.image.pull_image(request).await.unwrap_or_else(|e| panic!("PullImage {image}: {e}")).into_inner().image_ref
}

/// The registry's access-log lines for `repo` ("METHOD path HTTP/1.1"), once `count` of them
/// are there and no more come for half a second (the log goes through the node's journal).
async fn requests_for(registry: &Registry<'_>, repo: &str, count: usize) -> Vec<String> {
    let needle = format!(" /v2/{repo}/");
    let read = || -> Vec<String> {
        registry.access_lines(&needle).iter().filter_map(|l| l.split('"').nth(1).map(str::to_owned)).collect()
    };
    let mut last =
        eventually(Duration::from_secs(10), &format!("{count} requests for {repo} in the registry's log"), || {
            let lines = read();
            std::future::ready((lines.len() >= count).then_some(lines))
        })
        .await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = read();
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn a_repull_of_a_present_image_is_one_head_request() {
    let node = node_with_local_registry("pullperf-repull", "");
    let registry = Registry::start(&node, "main", LOCAL_REGISTRY_PORT, RegistryOptions::default());
    let busybox = oci::busybox_image("");
    let reference = registry.push_image("e2e/repull", "1", &busybox);
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    assert_eq!(pull(&mut client, &reference).await, busybox.id());
    let first = requests_for(&registry, "e2e/repull", 1).await.len();
    assert_eq!(pull(&mut client, &reference).await, busybox.id());
    let lines = requests_for(&registry, "e2e/repull", first + 1).await;
    assert_eq!(
        lines[first..],
        ["HEAD /v2/e2e/repull/manifests/1 HTTP/1.1".to_owned()],
        "the re-pull asked for more than the digest: {lines:?}"
    );

    // What the daemon keeps survives its restart: still one HEAD.
    node.sh("systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    assert_eq!(pull(&mut client, &reference).await, busybox.id());
    let lines = requests_for(&registry, "e2e/repull", first + 2).await;
    assert_eq!(lines[first + 1..], ["HEAD /v2/e2e/repull/manifests/1 HTTP/1.1".to_owned()], "{lines:?}");

    // The tag moved: the new manifest is fetched and the new image pulled.
    let moved = oci::busybox_image("www-data");
    registry.push_image("e2e/repull", "1", &moved);
    assert_eq!(pull(&mut client, &reference).await, moved.id());
    let lines = requests_for(&registry, "e2e/repull", first + 3).await;
    assert!(lines[first + 2..].iter().any(|l| l.starts_with("GET /v2/e2e/repull/manifests/1 ")), "{lines:?}");
    let status = client
        .image
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec { image: reference.clone(), ..Default::default() }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.image.map(|i| i.id).as_deref(), Some(moved.id()));
}

/// The daemon's VmHWM in KiB after resetting it to the current RSS, then the peak after `f`.
fn daemon_pid(node: &Node) -> String {
    node.sh("systemctl show -p MainPID --value cri-systemd").trim().to_owned()
}

fn status_kib(node: &Node, pid: &str, field: &str) -> u64 {
    let status = node.sh(&format!("cat /proc/{pid}/status"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in the daemon's status:\n{status}"))
}

/// Four 32 MiB layers unpacked at once (the default `max_concurrent_downloads`): the registry on
/// loopback sends faster than the (debug-built) daemon unpacks, so whatever the daemon queues
/// per layer shows in its peak RSS. 64 queued chunks of up to ~400 KiB per layer made ~100 MiB.
#[tokio::test]
async fn pulling_four_large_layers_at_once_keeps_the_daemon_small() {
    let node = node_with_local_registry("pullperf-rss", "");
    let registry = Registry::start(&node, "main", LOCAL_REGISTRY_PORT, RegistryOptions::default());
    let image = oci::big_image(17, 4, 32 << 20);
    let reference = registry.push_image("e2e/big4", "1", &image);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let pid = daemon_pid(&node);
    node.sh(&format!("echo 5 > /proc/{pid}/clear_refs"));
    let before = status_kib(&node, &pid, "VmRSS:");

    assert_eq!(pull(&mut client, &reference).await, image.id());
    let peak = status_kib(&node, &pid, "VmHWM:");
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!("daemon RSS before the pull {} MiB, peak during it {} MiB", before / 1024, peak / 1024);
    assert!(growth_mib <= 48, "the daemon's peak RSS grew by {growth_mib} MiB during a 4-layer pull");
}
