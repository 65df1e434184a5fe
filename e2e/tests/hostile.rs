//! Bounded memory against hostile registries, images and clients (issue 11, item 4): each test
//! attacks a real daemon in a node and checks that it answers with a clear error, that its
//! memory (VmHWM, the peak resident set, from /proc in the node) stays low, and that other calls
//! keep working.
//!
//! The hostile registry is a tiny HTTP server of this test process listening on the node's
//! loopback (its socket opened in the node's network namespace, as `e2e::registry` does): no
//! byte goes anywhere else.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use e2e::registry::NodeNet;
use e2e::{Node, cri, node_with_local_registry, pull_busybox};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// The hostile registry's port on the node's loopback (the real one is on 5000).
const HOSTILE_PORT: u16 = 5001;
/// How much the daemon's peak RSS may grow during an attack. The caps are 4 MiB (manifests,
/// configs) and 1 MiB (tokens, error bodies); the attacks send hundreds of MiB.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 << 10;
/// What a hostile answer streams: enough that reading it whole shows in the RSS, small enough
/// not to hurt the test machine when it is read whole (before the fix).
const HOSTILE_BODY_BYTES: u64 = 384 << 20;

/// Resets the daemon's VmHWM to its current RSS (`clear_refs` 5), so that a peak measured next
/// is the attack's, not the setup's; returns the RSS then, in KiB.
fn reset_daemon_peak_kib(node: &Node) -> u64 {
    let pid = node.sh("systemctl show -p MainPID --value cri-systemd");
    node.sh(&format!("echo 5 > /proc/{}/clear_refs", pid.trim()));
    daemon_memory_kib(node).0
}

/// The daemon's (VmHWM, VmRSS) in KiB, read from /proc in the node.
fn daemon_memory_kib(node: &Node) -> (u64, u64) {
    let pid = node.sh("systemctl show -p MainPID --value cri-systemd");
    let status = node.sh(&format!("cat /proc/{}/status", pid.trim()));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the daemon's status:\n{status}"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// How the hostile registry answers a path.
fn hostile_answer(path: &str, port: u16) -> (String, Vec<(String, String)>, Option<u64>) {
    let endless = Some(HOSTILE_BODY_BYTES);
    let index = ("Content-Type".to_string(), "application/vnd.oci.image.index.v1+json".to_string());
    match path {
        "/v2/" => ("200 OK".into(), vec![], None),
        // An endless manifest, close-delimited (no Content-Length).
        p if p.starts_with("/v2/endless/manifests/") => ("200 OK".into(), vec![index], endless),
        // A Content-Length far over the cap, then the bytes to match.
        p if p.starts_with("/v2/liar/manifests/") => {
            let length = ("Content-Length".to_string(), HOSTILE_BODY_BYTES.to_string());
            ("200 OK".into(), vec![index, length], endless)
        }
        // A 404 whose error body never ends.
        p if p.starts_with("/v2/errorbody/") => ("404 Not Found".into(), vec![], endless),
        // A token challenge whose token endpoint answers endlessly.
        p if p.starts_with("/v2/tokened/") => {
            let challenge = format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="hostile""#);
            ("401 Unauthorized".into(), vec![("WWW-Authenticate".into(), challenge)], Some(0))
        }
        p if p.starts_with("/token") => ("200 OK".into(), vec![], endless),
        _ => ("404 Not Found".into(), vec![], Some(0)),
    }
}

/// Serves one connection: reads the request head, answers per [`hostile_answer`], and streams
/// `{` until the body is sent or the daemon hangs up.
fn serve_hostile(stream: TcpStream, port: u16) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone the socket"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, headers, body) = hostile_answer(&path, port);
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if body == Some(0) && !headers.iter().any(|(k, _)| k == "Content-Length") {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    let mut stream = stream;
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![b'{'; 64 << 10];
    let mut left = body.unwrap_or(0);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if stream.write_all(&chunk[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
}

/// Starts the hostile registry on the node's loopback; it serves until the test process ends.
fn start_hostile_registry(node: &Node, port: u16) {
    let listener = NodeNet::of(node)
        .run(move || TcpListener::bind(("127.0.0.1", port)))
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port} in node {}: {e}", node.name()));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_hostile(stream, port));
        }
    });
}

async fn pull(client: &mut e2e::CriClient, image: &str) -> Result<String, tonic::Status> {
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        ..Default::default()
    };
    client.image.pull_image(request).await.map(|r| r.into_inner().image_ref)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_registry_bodies_are_read_with_a_cap() {
    let config =
        format!("[images]\nretries = 0\n[images.registries.\"127.0.0.1:{HOSTILE_PORT}\"]\nplain_http = true\n");
    let node = node_with_local_registry("hostile-reg", &config);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    start_hostile_registry(&node, HOSTILE_PORT);
    let baseline = reset_daemon_peak_kib(&node);

    let host = format!("127.0.0.1:{HOSTILE_PORT}");
    let cases = [
        ("endless", tonic::Code::ResourceExhausted, "4393216-byte limit"),
        ("liar", tonic::Code::ResourceExhausted, "4393216-byte limit"),
        ("tokened", tonic::Code::ResourceExhausted, "1048576-byte limit"),
        ("errorbody", tonic::Code::NotFound, "errorbody"),
    ];
    for (repo, code, needle) in cases {
        let started = Instant::now();
        let status = pull(&mut client, &format!("{host}/{repo}:1")).await.expect_err("a hostile pull must fail");
        let (peak, rss) = daemon_memory_kib(&node);
        eprintln!(
            "{repo}: {:?} {:?} in {:?}; daemon VmHWM {peak} KiB (baseline {baseline}), VmRSS {rss} KiB",
            status.code(),
            status.message(),
            started.elapsed()
        );
        assert!(
            peak < baseline + RSS_GROWTH_LIMIT_KIB,
            "{repo}: the daemon's peak RSS grew from {baseline} to {peak} KiB"
        );
        assert_eq!(status.code(), code, "{repo}: {}", status.message());
        assert!(status.message().contains(needle), "{repo}: {}", status.message());
    }

    // Other calls work: the daemon answers, and a real pull succeeds.
    client.runtime.version(cri::VersionRequest::default()).await.expect("Version");
    pull_busybox(&node, &mut client, "hostile-reg").await;
}

/// The kubelet's gRPC receive limit for CRI answers (`maxMsgSize` in k8s.io/cri-client).
const KUBELET_MAX_MESSAGE: usize = 16 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn exec_sync_output_cap_holds_for_both_streams_together() {
    let node = node_with_local_registry("hostile-exec", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let container = e2e::sleeping_container(&node, &mut client, "flood").await;
    let baseline = reset_daemon_peak_kib(&node);

    // A client with the kubelet's receive limit, not tonic's 4 MiB default.
    let channel = proto::connect(node.socket()).await.expect("connect");
    let mut kubelet =
        cri::runtime_service_client::RuntimeServiceClient::new(channel).max_decoding_message_size(KUBELET_MAX_MESSAGE);
    // 100 MiB on stdout and 100 MiB on stderr at once.
    let script = "/bin/busybox head -c 104857600 /dev/zero & /bin/busybox head -c 104857600 /dev/zero >&2; wait";
    let request = cri::ExecSyncRequest {
        container_id: container.clone(),
        cmd: vec!["/bin/busybox".into(), "sh".into(), "-c".into(), script.into()],
        timeout: 120,
    };
    let started = Instant::now();
    let answer = kubelet.exec_sync(request).await;
    let (peak, rss) = daemon_memory_kib(&node);
    let answer = answer.expect("ExecSync's answer fits the kubelet's 16 MiB message limit").into_inner();
    let total = answer.stdout.len() + answer.stderr.len();
    eprintln!(
        "exec flood: exit {} stdout {} + stderr {} = {total} bytes in {:?}; daemon VmHWM {peak} KiB (baseline {baseline}), VmRSS {rss} KiB",
        answer.exit_code,
        answer.stdout.len(),
        answer.stderr.len(),
        started.elapsed()
    );
    assert_eq!(answer.exit_code, 0);
    assert!(total <= 16 << 20, "stdout+stderr {total} bytes over the 16 MiB cap");
    assert!(total >= 15 << 20, "the cap is filled, not cut short: {total} bytes");
    assert!(peak < baseline + RSS_GROWTH_LIMIT_KIB, "the daemon's peak RSS grew from {baseline} to {peak} KiB");

    // Other calls work.
    let (code, out, _) = e2e::crisimple::sh(&mut client, &container, "echo still here").await;
    assert_eq!((code, out.as_str()), (0, "still here\n"));
}

/// How big the hostile image's /etc/passwd is: reading it whole shows in the RSS.
const HUGE_PASSWD_BYTES: usize = 200 << 20;

/// CreateContainer of `image` in a new pod, running as `user` (run_as_username).
async fn create_as(
    client: &mut e2e::CriClient,
    pod_name: &str,
    image: &str,
    user: &str,
) -> Result<String, tonic::Status> {
    let pod = e2e::crisimple::run_pod(client, pod_name).await;
    let mut config = e2e::crisimple::container_config("c", image, &["/bin/busybox", "sleep", "1000"]);
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: user.into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    e2e::crisimple::create(client, &pod, config).await
}

#[tokio::test(flavor = "multi_thread")]
async fn image_passwd_is_read_inside_the_layers_with_a_cap() {
    use e2e::oci::{Compression, ConfigOptions, Image, LayerBuilder, busybox_layer};
    use e2e::registry::{Registry, RegistryOptions};

    let node = node_with_local_registry("hostile-passwd", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    // A user of the node that the image does not define.
    assert!(node.sh("cat /etc/passwd").starts_with("root:") && node.sh("getent passwd daemon").starts_with("daemon:"));
    let registry = Registry::start(&node, "hostile-passwd", e2e::LOCAL_REGISTRY_PORT, RegistryOptions::default());
    // `etc` replaced by a symlink out of the layer, to the node's /etc.
    let mut escape = LayerBuilder::new();
    escape.symlink("etc", "../../../../../../../../etc");
    let escape = Image::new(
        vec![busybox_layer(Compression::Gzip), escape.build(Compression::Gzip)],
        ConfigOptions { ..Default::default() },
    );
    registry.push_image("escape", "1", &escape);
    // A 200 MiB /etc/passwd.
    let mut huge = LayerBuilder::new();
    huge.dir("etc", 0o755).file("etc/passwd", 0o644, &vec![b'x'; HUGE_PASSWD_BYTES]);
    let huge = Image::new(
        vec![busybox_layer(Compression::Gzip), huge.build(Compression::None)],
        ConfigOptions { ..Default::default() },
    );
    registry.push_image("huge", "1", &huge);
    for repo in ["escape", "huge"] {
        pull(&mut client, &registry.repo(&format!("{repo}:1"))).await.expect("PullImage");
    }
    let baseline = reset_daemon_peak_kib(&node);

    // The node's user is not the image's.
    let err = create_as(&mut client, "escape", &registry.repo("escape:1"), "daemon").await;
    eprintln!("escape: {err:?}");
    let err = err.expect_err("a user found through a symlink out of the image");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("unable to find user daemon"), "{err:?}");

    // A huge passwd is refused, not read.
    let err = create_as(&mut client, "huge", &registry.repo("huge:1"), "root").await;
    let (peak, rss) = daemon_memory_kib(&node);
    eprintln!("huge: {err:?}; daemon VmHWM {peak} KiB (baseline {baseline}), VmRSS {rss} KiB");
    assert!(peak < baseline + RSS_GROWTH_LIMIT_KIB, "the daemon's peak RSS grew from {baseline} to {peak} KiB");
    let err = err.expect_err("a 200 MiB passwd file");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("4194304"), "the message names the limit: {err:?}");

    // Other calls work.
    registry.push_image("plain", "1", &e2e::oci::busybox_image(""));
    pull(&mut client, &registry.repo("plain:1")).await.expect("PullImage");
    let ok = create_as(&mut client, "fine", &registry.repo("plain:1"), "www-data").await.expect("a user of the image");
    assert!(!ok.is_empty());
}

/// The streaming server's `host:port` in the node, from an Exec URL for `container`.
async fn streaming_url(client: &mut e2e::CriClient, container: &str) -> String {
    let request = cri::ExecRequest {
        container_id: container.into(),
        cmd: vec!["/bin/busybox".into(), "true".into()],
        stdout: true,
        ..Default::default()
    };
    client.runtime.exec(request).await.expect("Exec").into_inner().url
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_server_sheds_slow_and_excess_connections() {
    use std::io::Read;
    let node = node_with_local_registry("hostile-slow", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let container = e2e::sleeping_container(&node, &mut client, "slowloris").await;
    let (host, _) = e2e::streaming::split_url(&streaming_url(&mut client, &container).await);
    let baseline = reset_daemon_peak_kib(&node);

    // 300 clients that send half a request head and then nothing.
    let net = NodeNet::of(&node);
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut socket = net.connect(&host).expect("connect to the streaming server");
        let _ = socket.write_all(b"GET /exec/x HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        slow.push(socket);
    }
    // The CRI socket is another door: it keeps answering meanwhile.
    let (code, out, _) = e2e::crisimple::sh(&mut client, &container, "echo busy").await;
    assert_eq!((code, out.as_str()), (0, "busy\n"));
    // Every slow connection is closed by the server: over the cap at once, the others when their
    // head is not complete in time.
    let started = Instant::now();
    let closed = std::thread::spawn(move || {
        slow.into_iter()
            .filter(|socket| {
                let mut socket = socket;
                let left = Duration::from_secs(40).saturating_sub(started.elapsed()).max(Duration::from_millis(10));
                let _ = socket.set_read_timeout(Some(left));
                let mut byte = [0u8; 256];
                loop {
                    match socket.read(&mut byte) {
                        Ok(0) => return true,
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                        Err(_) => return false,
                    }
                }
            })
            .count()
    })
    .join()
    .unwrap();
    let (peak, _) = daemon_memory_kib(&node);
    eprintln!(
        "slowloris: {closed} of 300 closed by the server in {:?}; VmHWM {peak} KiB (baseline {baseline})",
        started.elapsed()
    );
    assert_eq!(closed, 300, "slow connections left open");
    assert!(peak < baseline + RSS_GROWTH_LIMIT_KIB, "the daemon's peak RSS grew from {baseline} to {peak} KiB");

    // Once they are gone, streaming works again.
    let url = streaming_url(&mut client, &container).await;
    let upgrade = e2e::streaming::upgrade_request(
        &node,
        &url,
        &[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", "v4.channel.k8s.io")],
    )
    .expect("an upgrade request");
    assert_eq!(upgrade.status, 101, "{upgrade:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn port_forward_bounds_pending_streams_and_queued_data() {
    let node = node_with_local_registry("hostile-pf", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let container = e2e::sleeping_container(&node, &mut client, "pfflood").await;
    let pod = e2e::crisimple::pod_of(&mut client, &container).await;
    let request = cri::PortForwardRequest { pod_sandbox_id: pod, port: vec![] };
    let url = client.runtime.port_forward(request).await.expect("PortForward").into_inner().url;
    let baseline = reset_daemon_peak_kib(&node);

    // 200 data streams that never get their error stream, each sent 8 frames of 256 KiB: the
    // daemon would hold 400 MiB for them.
    let (_, mut writer, _reader) = e2e::streaming::spdy_connect(&node, &url, &["portforward.k8s.io"]).expect("SPDY");
    let flood = std::thread::spawn(move || {
        let frame = vec![b'x'; 256 << 10];
        for i in 0..200 {
            let id = i.to_string();
            let Ok(stream) = writer.open(&[("streamtype", "data"), ("port", "80"), ("requestid", &id)]) else { return };
            for _ in 0..8 {
                if writer.data(stream, &frame, false).is_err() {
                    return;
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (peak, rss) = daemon_memory_kib(&node);
    eprintln!(
        "port-forward flood: VmHWM {peak} KiB (baseline {baseline}), VmRSS {rss} KiB, writer done: {}",
        flood.is_finished()
    );
    assert!(peak < baseline + RSS_GROWTH_LIMIT_KIB, "the daemon's peak RSS grew from {baseline} to {peak} KiB");

    // Other calls work.
    let (code, out, _) = e2e::crisimple::sh(&mut client, &container, "echo fine").await;
    assert_eq!((code, out.as_str()), (0, "fine\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_messages_are_bounded() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let node = node_with_local_registry("hostile-ws", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let container = e2e::sleeping_container(&node, &mut client, "wsflood").await;
    let baseline = reset_daemon_peak_kib(&node);

    // Four exec sessions, each sent one 60 MiB stdin message (tungstenite's default limit is 64 MiB).
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let request = cri::ExecRequest {
            container_id: container.clone(),
            cmd: vec!["/bin/busybox".into(), "sleep".into(), "30".into()],
            stdin: true,
            stdout: true,
            ..Default::default()
        };
        let url = client.runtime.exec(request).await.expect("Exec").into_inner().url;
        let (ws, _) = e2e::streaming::websocket(&node, &url, "v5.channel.k8s.io").await;
        sessions.push(tokio::spawn(async move {
            use tokio_tungstenite::tungstenite::protocol::frame::Frame;
            use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
            let mut ws = ws;
            // Four 15 MiB fragments of one message (each under tungstenite's 16 MiB frame limit).
            let mut first = vec![b'x'; 15 << 20];
            first[0] = 0; // stdin
            let _ = ws.send(Message::Frame(Frame::message(first, OpCode::Data(Data::Binary), false))).await;
            for i in 1..4 {
                let more = vec![b'x'; 15 << 20];
                let _ = ws.send(Message::Frame(Frame::message(more, OpCode::Data(Data::Continue), i == 3))).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }));
    }
    for session in sessions {
        let _ = session.await;
    }
    let (peak, rss) = daemon_memory_kib(&node);
    eprintln!("websocket flood: VmHWM {peak} KiB (baseline {baseline}), VmRSS {rss} KiB");
    assert!(peak < baseline + RSS_GROWTH_LIMIT_KIB, "the daemon's peak RSS grew from {baseline} to {peak} KiB");

    // Other calls work.
    let (code, out, _) = e2e::crisimple::sh(&mut client, &container, "echo fine").await;
    assert_eq!((code, out.as_str()), (0, "fine\n"));
}
