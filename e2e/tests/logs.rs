//! Container output: stdout and stderr are pipes (as with runc) that the daemon reads into the
//! kubelet's CRI log files, re-openable by path (`/dev/stdout`, `/proc/self/fd/1`, the symlinks
//! of the upstream nginx and httpd images), complete for short-lived writers, across daemon
//! kills, and kept out of the node's journal.

use std::time::{Duration, Instant};

use e2e::crisimple::{container_config, create, parse_log, pod, remove_container, run_pod_sandbox, start, wait_exited};
use e2e::oci::{Compression, ConfigOptions, Image, LayerBuilder, busybox_layer};
use e2e::registry::{Registry, RegistryOptions};
use e2e::{CriClient, LOCAL_REGISTRY_PORT, Node, cri, eventually};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn node(label: &str) -> Node {
    e2e::node_with_local_registry(label, "")
}

/// The (stream, text) of every line of the log at `path` in the node.
fn log_lines(node: &Node, path: &str) -> Vec<(String, String)> {
    parse_log(&node.exec(&["cat", path]).stdout).into_iter().map(|(stream, _, text)| (stream, text)).collect()
}

/// RunPodSandbox of `pod_config(name)` with its logs under /var/log/pods/e2e_<name>.
async fn run_logging_pod(client: &mut CriClient, name: &str) -> (String, String) {
    let dir = format!("/var/log/pods/e2e_{name}");
    (run_pod_sandbox(client, pod(name).log_directory(&dir)).await.expect("RunPodSandbox"), dir)
}

/// Creates and starts a container logging to `<name>/0.log`; returns its id.
async fn run_logging_container(client: &mut CriClient, pod: &str, name: &str, image: &str, command: &[&str]) -> String {
    let mut config = container_config(name, image, command);
    config.log_path = format!("{name}/0.log");
    let id = create(client, pod, config).await.expect("CreateContainer");
    start(client, &id).await.expect("StartContainer");
    id
}

/// The busybox image, and an nginx-like one whose log files are symlinks to the container's
/// stdout and stderr, as the upstream nginx (`/dev/stdout`, `/dev/stderr`) and httpd
/// (`/proc/self/fd/1`, `/proc/self/fd/2`) images ship them.
async fn pull_images(node: &Node, client: &mut CriClient) -> (String, String) {
    let registry = Registry::start(node, "logs", LOCAL_REGISTRY_PORT, RegistryOptions::default());
    registry.push_image("busybox", "1", &e2e::oci::busybox_image(""));
    let mut logs = LayerBuilder::new();
    logs.dir("var/log", 0o755)
        .dir("var/log/x", 0o755)
        .symlink("var/log/x/access.log", "/dev/stdout")
        .symlink("var/log/x/error.log", "/dev/stderr")
        .symlink("var/log/x/httpd-access.log", "/proc/self/fd/1")
        .symlink("var/log/x/httpd-error.log", "/proc/self/fd/2");
    let image =
        Image::new(vec![busybox_layer(Compression::Gzip), logs.build(Compression::Gzip)], ConfigOptions::default());
    registry.push_image("nginx-like", "1", &image);
    let mut names = Vec::new();
    for repo in ["busybox:1", "nginx-like:1"] {
        let name = registry.repo(repo);
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: name.clone(), ..Default::default() }),
            ..Default::default()
        };
        client.image.pull_image(request).await.expect("PullImage");
        names.push(name);
    }
    (names.remove(0), names.remove(0))
}

#[tokio::test]
async fn stdout_and_stderr_reopen_by_path_as_nginx_and_httpd_images_do() {
    let node = node("logs-reopen");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let (busybox, nginx_like) = pull_images(&node, &mut client).await;
    let (pod, dir) = run_logging_pod(&mut client, "reopen").await;

    let script = "echo out > /dev/stdout; echo err > /dev/stderr; echo fd1 > /proc/self/fd/1";
    let paths = run_logging_container(&mut client, &pod, "paths", &busybox, &["sh", "-c", script]).await;
    // An entrypoint that writes its logs through the image's symlinks, as nginx does at start.
    let script = "echo GET /index.html >> /var/log/x/access.log && echo 'worker started' >> /var/log/x/error.log \
                  && echo httpd-access >> /var/log/x/httpd-access.log && echo httpd-error >> /var/log/x/httpd-error.log \
                  && echo done";
    let nginx = run_logging_container(&mut client, &pod, "nginx", &nginx_like, &["sh", "-c", script]).await;

    for (id, name, expected) in [
        (&paths, "paths", vec![("stdout", "out"), ("stderr", "err"), ("stdout", "fd1")]),
        (
            &nginx,
            "nginx",
            vec![
                ("stdout", "GET /index.html"),
                ("stderr", "worker started"),
                ("stdout", "httpd-access"),
                ("stderr", "httpd-error"),
                ("stdout", "done"),
            ],
        ),
    ] {
        let status = wait_exited(&mut client, id).await;
        let lines = log_lines(&node, &format!("{dir}/{name}/0.log"));
        // Two pipes: each stream's lines in order, the streams' order between them as read.
        let by_stream = |lines: Vec<(&'static str, &'static str)>| {
            let mut lines = lines;
            lines.sort_by_key(|(stream, _)| *stream);
            lines
        };
        let got: Vec<(&str, &str)> = lines.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
        let mut got_by_stream = got.clone();
        got_by_stream.sort_by_key(|(stream, _)| *stream);
        assert_eq!(
            got_by_stream,
            by_stream(expected),
            "log of {name} (exit code {}, {}): {got:?}",
            status.exit_code,
            status.message
        );
        assert_eq!(status.exit_code, 0, "{name}");
    }
}

#[tokio::test]
async fn short_lived_writers_lose_no_line() {
    let node = node("logs-short");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "logs").await;
    let (pod, dir) = run_logging_pod(&mut client, "short").await;
    let script = "i=1; while [ $i -le 50 ]; do echo line-$i; i=$((i+1)); done";
    let expected: Vec<(String, String)> = (1..=50).map(|i| ("stdout".to_string(), format!("line-{i}"))).collect();
    let started = Instant::now();
    // 100 containers, 10 at a time: each prints 50 lines and exits at once.
    for batch in 0..10 {
        let runs = (0..10).map(|n| {
            let mut client = client.clone();
            let (pod, image, node, dir, expected) = (&pod, &image, &node, &dir, &expected);
            async move {
                let name = format!("short-{batch}-{n}");
                let id = run_logging_container(&mut client, pod, &name, image, &["sh", "-c", script]).await;
                let status = wait_exited(&mut client, &id).await;
                assert_eq!(status.exit_code, 0, "{name}: {}", status.message);
                // Once the status says exited, the log is complete.
                let lines = log_lines(node, &format!("{dir}/{name}/0.log"));
                assert_eq!(&lines, expected, "log of {name}");
            }
        });
        futures_util::future::join_all(runs).await;
    }
    eprintln!("100 containers of 50 lines each in {:?}", started.elapsed());
}

/// The lines of the log at `path` as the kubelet reads them: partial (P) pieces joined to the
/// rest of their line, per stream.
fn whole_lines(node: &Node, path: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut partial: std::collections::HashMap<String, String> = Default::default();
    for (stream, tag, text) in parse_log(&node.exec(&["cat", path]).stdout) {
        let piece = partial.entry(stream).or_default();
        piece.push_str(&text);
        if tag == "F" {
            lines.push(std::mem::take(piece));
        }
    }
    lines
}

/// The ticks in a ticker's log as numbers, in log order: lines `tick-<n> whole` only (a line
/// that lost a piece is not a tick).
fn ticks(node: &Node, path: &str) -> Vec<u64> {
    whole_lines(node, path)
        .into_iter()
        .filter_map(|text| text.strip_prefix("tick-")?.strip_suffix(" whole")?.parse().ok())
        .collect()
}

/// SIGKILLs the daemon (systemd restarts it, Restart=always, and hands its fd store back) and
/// waits for 50 more ticks in the ticker's log at `log`.
async fn kill_the_daemon_and_see_ticks_go_on(node: &Node, log: &str) {
    node.sh("systemctl kill -s KILL cri-systemd");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ticks(node, log).len();
    let _ = node.cri(ANSWER_TIMEOUT).await;
    eventually(Duration::from_secs(20), "ticks after the restart", || {
        let n = ticks(node, log).len();
        async move { (n > before + 50).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_daemon_killed_or_stopped_while_a_container_writes_loses_and_repeats_no_line() {
    let node = node("logs-kill");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "logs").await;
    let (pod, dir) = run_logging_pod(&mut client, "kill").await;
    // Each tick is written in two halves 5 ms apart, so that the daemon mostly holds an
    // unfinished line when it is killed; a tick that lost its first half is missing below.
    let script =
        "i=0; while :; do echo -n tick-$i; busybox usleep 5000; echo ' whole'; i=$((i+1)); busybox usleep 5000; done";
    run_logging_container(&mut client, &pod, "ticker", &image, &["sh", "-c", script]).await;
    let log = format!("{dir}/ticker/0.log");
    eventually(Duration::from_secs(10), "the first ticks", || {
        let n = ticks(&node, &log).len();
        async move { (n > 20).then_some(()) }
    })
    .await;
    for _ in 0..3 {
        kill_the_daemon_and_see_ticks_go_on(&node, &log).await;
    }
    // An explicit stop: before systemd 254 (FileDescriptorStorePreserve=) systemd drops the fd
    // store, and the started daemon opens the pipes again through the container's /proc/<pid>/fd.
    node.sh("systemctl stop cri-systemd && sleep 2 && systemctl start cri-systemd");
    let _ = node.cri(ANSWER_TIMEOUT).await;
    let before = ticks(&node, &log).len();
    eventually(Duration::from_secs(20), "ticks after the stop and start", || {
        let n = ticks(&node, &log).len();
        async move { (n > before + 50).then_some(()) }
    })
    .await;
    let version: u32 = node.sh("systemctl --version | head -1 | cut -d' ' -f2").trim().parse().unwrap();
    if version < 254 {
        assert!(node.logs().contains("took the output pipes back"), "systemd {version}: the pipes found through /proc");
    }
    let ticks = ticks(&node, &log);
    let last = ticks.iter().copied().max().unwrap_or(0);
    let expected: Vec<u64> = (0..=last).collect();
    let missing: Vec<u64> = expected.iter().copied().filter(|t| !ticks.contains(t)).collect();
    let unordered: Vec<(u64, u64)> = ticks.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
    assert!(
        ticks == expected,
        "every tick once, in order: ticks 0..={last}, missing {missing:?}, out of order {unordered:?}"
    );

    // A writer that fills its pipe (1 MiB) while the daemon is away blocks, and loses nothing.
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let script = "busybox sleep 2; busybox seq 1 200000; echo done";
    let writer = run_logging_container(&mut client, &pod, "writer", &image, &["sh", "-c", script]).await;
    // Killed (a stop would read on for its 5 s of grace), and kept down.
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let unit = format!("cri-{writer}.service");
    let active = node.sh(&format!("systemctl is-active {unit} || true"));
    let journal = node
        .sh(&format!("journalctl --no-pager -o cat -u {unit}; journalctl --no-pager -o cat -u cri-systemd | tail -20"));
    assert_eq!(active.trim(), "active", "blocked, not dead: {journal}");
    node.sh("systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let status = wait_exited(&mut client, &writer).await;
    assert_eq!(status.exit_code, 0, "{}", status.message);
    let lines: Vec<String> = log_lines(&node, &format!("{dir}/writer/0.log")).into_iter().map(|(_, t)| t).collect();
    let expected: Vec<String> = (1..=200000).map(|i| i.to_string()).chain(["done".to_string()]).collect();
    assert!(
        lines == expected,
        "{} lines, the first differing at {:?}",
        lines.len(),
        lines.iter().zip(&expected).position(|(a, b)| a != b)
    );
}

/// The entries in the daemon's fd store.
fn fd_store_entries(node: &Node) -> u32 {
    node.sh("systemctl show -p NFileDescriptorStore --value cri-systemd").trim().parse().expect("NFileDescriptorStore")
}

#[tokio::test]
async fn all_output_pipes_are_kept_in_one_stored_queue_across_removals_and_kills() {
    let node = node("logs-vault");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "logs").await;
    let (pod, dir) = run_logging_pod(&mut client, "vault").await;
    let script = "i=0; while :; do echo tick-$i whole; i=$((i+1)); busybox usleep 10000; done";
    for name in ["ticker", "second", "third"] {
        run_logging_container(&mut client, &pod, name, &image, &["sh", "-c", script]).await;
    }
    // systemd compares each fd it stores with every one it holds: the queue's two ends for all
    // the pipes (it was two entries per container), whatever the number of containers.
    assert_eq!(fd_store_entries(&node), 2, "three running containers");
    // Removed containers leave dead entries in the queue until it is rebuilt (at 64 and more
    // than the live ones): 40 containers, 80 entries.
    for n in 0..40 {
        let name = format!("short-{n}");
        let id = run_logging_container(&mut client, &pod, &name, &image, &["sh", "-c", "echo short"]).await;
        assert_eq!(wait_exited(&mut client, &id).await.exit_code, 0);
        remove_container(&mut client, &id).await;
    }
    assert!(node.logs().contains("rebuilt the queue of output pipes"), "a rebuild after 32 removals");
    assert_eq!(fd_store_entries(&node), 2, "after the rebuild");
    let log = format!("{dir}/ticker/0.log");
    for _ in 0..2 {
        kill_the_daemon_and_see_ticks_go_on(&node, &log).await;
        assert_eq!(fd_store_entries(&node), 2, "the restarted daemon's queue replaced the stored one");
    }
    let journal = node.logs();
    let said: Vec<&str> =
        journal.lines().filter(|line| line.contains("output pipes") || line.contains("descriptor")).collect();
    assert!(!journal.contains("took the output pipes back"), "the pipes came from the queue, not /proc: {said:#?}");
    for name in ["ticker", "second", "third"] {
        let ticks = ticks(&node, &format!("{dir}/{name}/0.log"));
        let last = ticks.iter().copied().max().unwrap_or(0);
        assert!(ticks == (0..=last).collect::<Vec<u64>>(), "{name}: every tick once, in order, up to {last}");
    }
}

#[tokio::test]
async fn a_flooding_container_neither_floods_the_journal_nor_starves_other_logs() {
    let node = node("logs-flood");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "logs").await;
    let (pod, dir) = run_logging_pod(&mut client, "flood").await;
    node.sh("logger -t e2e-marker written-before-the-flood");
    let script = "i=0; while :; do echo tick-$i $(busybox date +%s); i=$((i+1)); busybox usleep 100000; done";
    let ticker = run_logging_container(&mut client, &pod, "ticker", &image, &["sh", "-c", script]).await;
    let flood = run_logging_container(&mut client, &pod, "yes", &image, &["busybox", "yes"]).await;
    let (ticker_log, yes_log) = (format!("{dir}/ticker/0.log"), format!("{dir}/yes/0.log"));
    let started = Instant::now();
    let mut flooded = 0u64;
    let mut worst_lag = 0i64;
    let mut slowest_status = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let asked = Instant::now();
        e2e::crisimple::status(&mut client, &ticker).await;
        slowest_status = slowest_status.max(asked.elapsed());
        // The kubelet would rotate: keep the node's disk from filling.
        flooded +=
            node.sh(&format!("stat -c %s {yes_log}; truncate -s 0 {yes_log}")).trim().parse::<u64>().unwrap_or(0);
        let now: i64 = node.sh("date +%s").trim().parse().unwrap();
        let last = log_lines(&node, &ticker_log)
            .iter()
            .rev()
            .find_map(|(_, text)| text.split(' ').nth(1)?.parse::<i64>().ok())
            .unwrap_or(0);
        worst_lag = worst_lag.max(now - last);
    }
    client.runtime.stop_container(cri::StopContainerRequest { container_id: flood, timeout: 0 }).await.unwrap();
    eprintln!(
        "the yes container wrote {flooded} bytes of CRI log in 10 s; the ticker's log lagged {worst_lag} s at most; \
         ContainerStatus took {slowest_status:?} at most"
    );
    assert!(slowest_status < Duration::from_secs(1), "the daemon kept answering: {slowest_status:?}");
    assert!(flooded > 1_000_000, "the yes container's output reached its log: {flooded} bytes");
    assert!(worst_lag <= 2, "the ticker's log kept flowing during the flood: lagged {worst_lag} s");
    let marker = node.sh("journalctl --no-pager -o cat -t e2e-marker");
    assert!(marker.contains("written-before-the-flood"), "the node's own journal entry survived: {marker:?}");
    let yes_in_journal = node.sh("journalctl --no-pager -o cat | grep -c '^y$' || true");
    assert_eq!(yes_in_journal.trim(), "0", "the container's output stays out of the node's journal");
    let ticks = ticks(&node, &ticker_log);
    let expected: Vec<u64> = (0..ticks.len() as u64).collect();
    assert!(ticks == expected, "every tick once, in order: {ticks:?}");
}
