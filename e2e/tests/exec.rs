//! ExecSync, Exec, Attach and PortForward against a daemon in a real systemd node, on containers
//! of a busybox image pulled from a registry in the node. (The image's busybox has only `sh`,
//! `ls` and `true` links: other applets are called as `busybox X`.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::crisimple::{self, container_config, pod_config, run_pod};
use e2e::{CriClient, Node, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn node(label: &str, extra: &str) -> Node {
    e2e::node_with_local_registry(label, extra)
}

async fn pull_busybox(node: &Node, client: &mut CriClient) -> String {
    e2e::pull_busybox(node, client, "exec").await
}

async fn create(client: &mut CriClient, pod: &str, config: cri::ContainerConfig) -> String {
    crisimple::create(client, pod, config).await.expect("CreateContainer")
}

async fn start(client: &mut CriClient, id: &str) {
    crisimple::start(client, id).await.expect("StartContainer")
}

async fn exec_sync(
    client: &mut CriClient,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    let request =
        cri::ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout };
    client.runtime.exec_sync(request).await.map(|r| r.into_inner())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running sleeper container with a user, env, working dir and no_new_privs, in a fresh pod.
async fn sleeper(client: &mut CriClient, image: &str, pod_name: &str) -> (String, String) {
    let pod = run_pod(client, pod_name).await;
    let mut config = container_config("sleeper", image, &["/bin/busybox", "sleep", "100000"]);
    config.envs = vec![cri::KeyValue { key: "GREETING".into(), value: "hello from the container".into() }];
    config.working_dir = "/tmp".into();
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 33 }),
            no_new_privs: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create(client, &pod, config).await;
    start(client, &id).await;
    (pod, id)
}

#[tokio::test]
async fn exec_sync_runs_in_the_container() {
    let node = node("exec-sync", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let (_pod, id) = sleeper(&mut client, &image, "execsync").await;
    let unit = format!("cri-{id}.service");

    // Exit codes, and stdout and stderr kept apart.
    let ok = exec_sync(&mut client, &id, &["sh", "-c", "echo out; echo err >&2"], 0).await.unwrap();
    assert_eq!((text(&ok.stdout).as_str(), text(&ok.stderr).as_str(), ok.exit_code), ("out\n", "err\n", 0));
    assert_eq!(exec_sync(&mut client, &id, &["sh", "-c", "exit 1"], 0).await.unwrap().exit_code, 1);
    assert_eq!(exec_sync(&mut client, &id, &["sh", "-c", "exit 127"], 0).await.unwrap().exit_code, 127);
    // A command that is not in the image: 127 and a message, as a shell would.
    let missing = exec_sync(&mut client, &id, &["no-such-tool", "x"], 0).await.unwrap();
    assert_eq!(missing.exit_code, 127);
    assert!(
        text(&missing.stderr).contains("no-such-tool") && text(&missing.stderr).contains("not found"),
        "{missing:?}"
    );
    // A command killed by a signal: 128 + the signal.
    assert_eq!(exec_sync(&mut client, &id, &["sh", "-c", "kill -9 $$"], 0).await.unwrap().exit_code, 137);

    // The container's user, environment, working dir, no_new_privs and capabilities.
    let who = exec_sync(
        &mut client,
        &id,
        &[
            "sh",
            "-c",
            "busybox id -u; pwd; echo \"$GREETING\"; busybox grep -E '^(NoNewPrivs|CapEff)' /proc/self/status",
        ],
        10,
    )
    .await
    .unwrap();
    let main = exec_sync(&mut client, &id, &["busybox", "grep", "-E", "^(NoNewPrivs|CapEff)", "/proc/1/status"], 10)
        .await
        .unwrap();
    assert_eq!(text(&who.stdout), format!("33\n/tmp\nhello from the container\n{}", text(&main.stdout)), "{who:?}");
    assert!(text(&main.stdout).contains("NoNewPrivs:\t1"), "{main:?}");

    // The container's PID namespace (its PID 1 is the entrypoint), hostname, root and cgroup.
    let ps = exec_sync(&mut client, &id, &["busybox", "ps", "-o", "pid,args"], 10).await.unwrap();
    let first = text(&ps.stdout).lines().nth(1).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(first, "1 /bin/busybox sleep 100000", "{}", text(&ps.stdout));
    let host = exec_sync(&mut client, &id, &["busybox", "hostname"], 10).await.unwrap();
    assert_eq!(text(&host.stdout), "execsync\n");
    let root = exec_sync(&mut client, &id, &["ls", "/bin/busybox", "/etc/passwd"], 10).await.unwrap();
    assert_eq!(root.exit_code, 0, "{root:?}");
    let cgroup = exec_sync(&mut client, &id, &["busybox", "cat", "/proc/self/cgroup"], 10).await.unwrap();
    let systemd_line =
        text(&cgroup.stdout).lines().find(|l| l.contains(":name=systemd:")).unwrap_or_default().to_string();
    assert!(systemd_line.ends_with(&format!("/{unit}")), "{}", text(&cgroup.stdout));
    let unit_cgroup = node.sh(&format!("systemctl show -p ControlGroup --value {unit}")).trim().to_string();
    // While it runs, the exec'd process is one of the unit's processes in every hierarchy
    // systemd manages for it (name=systemd and the unified one on this hybrid node).
    let mut waiting = client.clone();
    let waiting_id = id.clone();
    let background =
        tokio::spawn(async move { exec_sync(&mut waiting, &waiting_id, &["busybox", "sleep", "3"], 10).await });
    let found = e2e::eventually(Duration::from_secs(10), "the exec'd sleep in the unit's cgroup", || {
        let script = format!(
            "for p in $(cat /sys/fs/cgroup/systemd{unit_cgroup}/cgroup.procs); do tr '\\0' ' ' < /proc/$p/cmdline; echo; done"
        );
        let listed = node.sh(&script);
        async move { listed.lines().any(|l| l.trim() == "busybox sleep 3").then_some(listed) }
    })
    .await;
    assert!(found.lines().any(|l| l.trim() == "/bin/busybox sleep 100000"), "{found}");
    assert_eq!(background.await.unwrap().unwrap().exit_code, 0);
    let unified = node.sh(&format!("cat /sys/fs/cgroup/unified{unit_cgroup}/cgroup.procs"));
    assert_eq!(unified.split_whitespace().count(), 1, "only the main process is left: {unified}");

    // The timeout kills the command, and the call fails with DeadlineExceeded.
    let begin = Instant::now();
    let err = exec_sync(&mut client, &id, &["sh", "-c", "echo started; busybox sleep 100"], 2).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(begin.elapsed() < Duration::from_secs(8), "took {:?}", begin.elapsed());
    assert!(err.message().contains("started"), "the output so far is in the message: {err:?}");
    let left = exec_sync(&mut client, &id, &["busybox", "ps", "-o", "args"], 10).await.unwrap();
    assert!(!text(&left.stdout).contains("sleep 100\n"), "{}", text(&left.stdout));

    // Output beyond 16 MiB (both streams together, less the answer's 32 bytes of framing) is read
    // and dropped; the command goes on to the end.
    let mut big =
        CriClient { runtime: client.runtime.clone().max_decoding_message_size(64 << 20), image: client.image.clone() };
    let flood = exec_sync(
        &mut big,
        &id,
        &["sh", "-c", "busybox head -c 20000000 /dev/zero; busybox head -c 17000000 /dev/zero >&2; echo done >&2"],
        60,
    )
    .await
    .unwrap();
    assert_eq!((flood.stdout.len(), flood.stderr.len(), flood.exit_code), ((16 << 20) - 32, 0, 0));

    // Many at once, each with its own output.
    let calls = (0..16).map(|i| {
        let mut client = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let out =
                exec_sync(&mut client, &id, &["sh", "-c", &format!("echo {i}; busybox sleep 0.2; echo {i} >&2")], 30)
                    .await
                    .unwrap();
            assert_eq!((text(&out.stdout), text(&out.stderr)), (format!("{i}\n"), format!("{i}\n")));
        })
    });
    for call in calls.collect::<Vec<_>>() {
        call.await.unwrap();
    }
    assert_eq!(node.sh(&format!("cat /sys/fs/cgroup/unified{unit_cgroup}/cgroup.procs")).split_whitespace().count(), 1);
}

#[tokio::test]
async fn exec_sync_refuses_what_it_cannot_run() {
    let node = node("exec-refuse", "[exec]\nsync_max_output_bytes = 1000\n");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let (pod, id) = sleeper(&mut client, &image, "execrefuse").await;

    // The configured cap: the whole answer, 32 bytes of framing included.
    let capped = exec_sync(&mut client, &id, &["busybox", "head", "-c", "5000", "/dev/zero"], 10).await.unwrap();
    assert_eq!((capped.stdout.len(), capped.exit_code), (1000 - 32, 0));

    let code = |r: Result<cri::ExecSyncResponse, tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(exec_sync(&mut client, &"f".repeat(64), &["true"], 0).await), tonic::Code::NotFound);
    assert_eq!(code(exec_sync(&mut client, &id, &[], 0).await), tonic::Code::InvalidArgument);
    assert_eq!(code(exec_sync(&mut client, &id, &["true"], -1).await), tonic::Code::InvalidArgument);
    let created = create(&mut client, &pod, container_config("idle", &image, &["true"])).await;
    let err = exec_sync(&mut client, &created, &["true"], 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not running"), "{err:?}");

    // A container that stopped.
    client.runtime.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 0 }).await.unwrap();
    let err = exec_sync(&mut client, &id, &["true"], 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
}

// ==== streaming: Exec, Attach and PortForward URLs ====

use e2e::streaming::{self, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

async fn exec_url(client: &mut CriClient, id: &str, cmd: &[&str], tty: bool, stdin: bool) -> String {
    let request = cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    };
    client.runtime.exec(request).await.expect("Exec").into_inner().url
}

fn status(error: &[u8]) -> serde_json::Value {
    serde_json::from_slice(error).unwrap_or_else(|e| panic!("status {:?}: {e}", text(error)))
}

/// Runs `f` on a blocking thread (the SPDY test client is blocking).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Reads channel-prefixed messages until the server closes: bytes by channel.
async fn ws_collect(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> HashMap<u8, Vec<u8>> {
    let mut channels: HashMap<u8, Vec<u8>> = HashMap::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("websocket answers")
    {
        match message {
            Ok(Message::Binary(bytes)) if !bytes.is_empty() => {
                channels.entry(bytes[0]).or_default().extend_from_slice(&bytes[1..])
            }
            Ok(Message::Close(_)) | Err(_) => break,
            _ => {}
        }
    }
    channels
}

#[tokio::test]
async fn exec_and_attach_stream_over_spdy_and_websocket() {
    let node = node("exec-stream", "[streaming]\ntoken_ttl_secs = 3\n");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let (_pod, id) = sleeper(&mut client, &image, "execstream").await;
    let node = std::sync::Arc::new(node);

    // SPDY v4: stdout and stderr apart, the exit code in the status on the error stream.
    let url = exec_url(&mut client, &id, &["sh", "-c", "echo out; echo err >&2; exit 3"], false, false).await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let n = node.clone();
    let (protocol, got) = blocking(move || {
        let (protocol, mut writer, mut reader) =
            streaming::spdy_connect(&n, &url, &["v4.channel.k8s.io", "v3.channel.k8s.io"]).expect("upgrade");
        let error = writer.open(&[("streamType", "error")]).unwrap();
        let stdout = writer.open(&[("streamType", "stdout")]).unwrap();
        let stderr = writer.open(&[("streamType", "stderr")]).unwrap();
        writer.ping(1).unwrap();
        let got = streaming::collect(&mut reader, error, Some(stdout), Some(stderr));
        assert_eq!(got.replied, vec![error, stdout, stderr], "a SYN_REPLY for every stream");
        (protocol, got)
    })
    .await;
    assert_eq!(protocol, "v4.channel.k8s.io");
    assert_eq!((text(&got.stdout).as_str(), text(&got.stderr).as_str()), ("out\n", "err\n"));
    let failed = status(&got.error);
    assert_eq!(
        (failed["status"].as_str(), failed["reason"].as_str()),
        (Some("Failure"), Some("NonZeroExitCode")),
        "{failed}"
    );
    assert_eq!(failed["details"]["causes"][0], serde_json::json!({"reason": "ExitCode", "message": "3"}));

    // SPDY: stdin round trip (FIN on stdin is the command's end of file), success status.
    let url = exec_url(&mut client, &id, &["busybox", "cat"], false, true).await;
    let n = node.clone();
    let got = blocking(move || {
        let (_, mut writer, mut reader) = streaming::spdy_connect(&n, &url, &["v4.channel.k8s.io"]).expect("upgrade");
        let error = writer.open(&[("streamType", "error")]).unwrap();
        let stdin = writer.open(&[("streamType", "stdin")]).unwrap();
        let stdout = writer.open(&[("streamType", "stdout")]).unwrap();
        let stderr = writer.open(&[("streamType", "stderr")]).unwrap();
        writer.data(stdin, b"hello over spdy\n", false).unwrap();
        writer.data(stdin, &vec![b'x'; 300_000], true).unwrap();
        streaming::collect(&mut reader, error, Some(stdout), Some(stderr))
    })
    .await;
    assert_eq!(got.stdout.len(), 16 + 300_000);
    assert!(got.stdout.starts_with(b"hello over spdy\n"));
    assert_eq!(status(&got.error), serde_json::json!({"metadata": {}, "status": "Success"}));

    // SPDY with a tty: terminal size from the resize stream, exit code through the error stream.
    let url = exec_url(&mut client, &id, &["sh"], true, true).await;
    let n = node.clone();
    let got = blocking(move || {
        let (_, mut writer, mut reader) = streaming::spdy_connect(&n, &url, &["v4.channel.k8s.io"]).expect("upgrade");
        let error = writer.open(&[("streamType", "error")]).unwrap();
        let stdin = writer.open(&[("streamType", "stdin")]).unwrap();
        let stdout = writer.open(&[("streamType", "stdout")]).unwrap();
        let resize = writer.open(&[("streamType", "resize")]).unwrap();
        writer.data(resize, br#"{"Width":123,"Height":45}"#, false).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        writer.data(stdin, b"busybox stty size; busybox tty; exit 5\n", false).unwrap();
        streaming::collect(&mut reader, error, Some(stdout), None)
    })
    .await;
    let screen = text(&got.stdout);
    assert!(screen.contains("45 123"), "{screen}");
    assert!(screen.contains("/dev/pts/"), "{screen}");
    assert_eq!(status(&got.error)["details"]["causes"][0]["message"], "5", "{screen}");

    // SPDY v3: the error stream carries the failure's message only.
    let url = exec_url(&mut client, &id, &["sh", "-c", "exit 2"], false, false).await;
    let n = node.clone();
    let got = blocking(move || {
        let (protocol, mut writer, mut reader) =
            streaming::spdy_connect(&n, &url, &["v3.channel.k8s.io"]).expect("upgrade");
        assert_eq!(protocol, "v3.channel.k8s.io");
        let error = writer.open(&[("streamType", "error")]).unwrap();
        let stdout = writer.open(&[("streamType", "stdout")]).unwrap();
        let stderr = writer.open(&[("streamType", "stderr")]).unwrap();
        streaming::collect(&mut reader, error, Some(stdout), Some(stderr))
    })
    .await;
    assert!(
        text(&got.error).starts_with("command terminated with non-zero exit code")
            && text(&got.error).ends_with("exit code 2"),
        "{}",
        text(&got.error)
    );

    // WebSocket v5: stdin closed with the close signal, output and status by channel.
    let url = exec_url(&mut client, &id, &["sh", "-c", "busybox cat; echo done >&2"], false, true).await;
    let (mut ws, protocol) = streaming::websocket(&node, &url, "v5.channel.k8s.io, v4.channel.k8s.io").await;
    assert_eq!(protocol.as_deref(), Some("v5.channel.k8s.io"));
    ws.send(Message::Binary([&[0u8][..], b"hello over websocket\n"].concat().into())).await.unwrap();
    ws.send(Message::Binary(vec![255u8, 0].into())).await.unwrap();
    let channels = ws_collect(&mut ws).await;
    assert_eq!(text(&channels[&1]), "hello over websocket\n");
    assert_eq!(text(&channels[&2]), "done\n");
    assert_eq!(status(&channels[&3]), serde_json::json!({"metadata": {}, "status": "Success"}));

    // WebSocket v4 with a tty: resize on channel 4, exit code in the status.
    let url = exec_url(&mut client, &id, &["sh"], true, true).await;
    let (mut ws, protocol) = streaming::websocket(&node, &url, "v4.channel.k8s.io").await;
    assert_eq!(protocol.as_deref(), Some("v4.channel.k8s.io"));
    ws.send(Message::Binary([&[4u8][..], br#"{"Width":77,"Height":22}"#].concat().into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.send(Message::Binary([&[0u8][..], b"busybox stty size; exit 4\n"].concat().into())).await.unwrap();
    let channels = ws_collect(&mut ws).await;
    assert!(text(&channels[&1]).contains("22 77"), "{}", text(&channels[&1]));
    assert_eq!(status(&channels[&3])["details"]["causes"][0]["message"], "4");

    // A client that goes away takes its command with it.
    let url = exec_url(&mut client, &id, &["busybox", "sleep", "777"], false, false).await;
    let n = node.clone();
    blocking(move || {
        let (_, mut writer, mut reader) = streaming::spdy_connect(&n, &url, &["v4.channel.k8s.io"]).expect("upgrade");
        let _error = writer.open(&[("streamType", "error")]).unwrap();
        let _stdout = writer.open(&[("streamType", "stdout")]).unwrap();
        let _stderr = writer.open(&[("streamType", "stderr")]).unwrap();
        // The first reply: the session is up.
        let _ = reader.next_frame();
        std::thread::sleep(Duration::from_secs(1));
        writer.drop_connection();
    })
    .await;
    let mut probe = client.clone();
    let probe_id = id.clone();
    e2e::eventually(Duration::from_secs(15), "the disconnected exec's sleep to be killed", || {
        let mut probe = probe.clone();
        let probe_id = probe_id.clone();
        async move {
            let ps = exec_sync(&mut probe, &probe_id, &["busybox", "ps", "-o", "args"], 10).await.ok()?;
            (!text(&ps.stdout).contains("sleep 777")).then_some(())
        }
    })
    .await;

    // Many sessions at once.
    let mut sessions = Vec::new();
    for i in 0..12 {
        let url = exec_url(&mut probe, &id, &["sh", "-c", &format!("busybox sleep 0.5; echo {i}")], false, false).await;
        let n = node.clone();
        sessions.push(tokio::task::spawn_blocking(move || {
            let (_, mut writer, mut reader) =
                streaming::spdy_connect(&n, &url, &["v4.channel.k8s.io"]).expect("upgrade");
            let error = writer.open(&[("streamType", "error")]).unwrap();
            let stdout = writer.open(&[("streamType", "stdout")]).unwrap();
            let stderr = writer.open(&[("streamType", "stderr")]).unwrap();
            let got = streaming::collect(&mut reader, error, Some(stdout), Some(stderr));
            assert_eq!(text(&got.stdout), format!("{i}\n"));
        }));
    }
    for session in sessions {
        session.await.unwrap();
    }

    // Attach: the container's output as it goes to the journal.
    let pod = run_pod(&mut client, "attach").await;
    let talker = create(
        &mut client,
        &pod,
        container_config(
            "talker",
            &image,
            &[
                "sh",
                "-c",
                "busybox sleep 2; for i in 1 2 3; do echo line $i; echo oops $i >&2; busybox sleep 0.3; done",
            ],
        ),
    )
    .await;
    start(&mut client, &talker).await;
    let request =
        cri::AttachRequest { container_id: talker.clone(), stdin: false, tty: false, stdout: true, stderr: true };
    let url = client.runtime.attach(request).await.expect("Attach").into_inner().url;
    let n = node.clone();
    let got = blocking(move || {
        let (_, mut writer, mut reader) = streaming::spdy_connect(&n, &url, &["v4.channel.k8s.io"]).expect("upgrade");
        let error = writer.open(&[("streamType", "error")]).unwrap();
        let stdout = writer.open(&[("streamType", "stdout")]).unwrap();
        let stderr = writer.open(&[("streamType", "stderr")]).unwrap();
        streaming::collect(&mut reader, error, Some(stdout), Some(stderr))
    })
    .await;
    assert_eq!(text(&got.stdout), "line 1\nline 2\nline 3\n");
    assert_eq!(text(&got.stderr), "oops 1\noops 2\noops 3\n");
    assert_eq!(status(&got.error)["status"], "Success");
    let stdin_attach =
        cri::AttachRequest { container_id: id.clone(), stdin: true, tty: false, stdout: true, stderr: false };
    assert_eq!(client.runtime.attach(stdin_attach).await.unwrap_err().code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn port_forward_and_tokens() {
    let node = node("portfwd", "[streaming]\ntoken_ttl_secs = 2\n");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_pod(&mut client, "portfwd").await;
    let echo = create(
        &mut client,
        &pod,
        container_config("echo", &image, &["/bin/busybox", "nc", "-ll", "-p", "8080", "-e", "/bin/busybox", "cat"]),
    )
    .await;
    start(&mut client, &echo).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let node = std::sync::Arc::new(node);
    let payload: Vec<u8> = (0..10_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let payload = std::sync::Arc::new(payload);

    // SPDY: 10 MB to the pod's port and back, intact; the data stream's FIN half-closes.
    let request = cri::PortForwardRequest { pod_sandbox_id: pod.clone(), port: vec![8080] };
    let url = client.runtime.port_forward(request.clone()).await.expect("PortForward").into_inner().url;
    let (n, sent) = (node.clone(), payload.clone());
    let echoed = blocking(move || {
        let (protocol, mut writer, mut reader) =
            streaming::spdy_connect(&n, &url, &["portforward.k8s.io"]).expect("upgrade");
        assert_eq!(protocol, "portforward.k8s.io");
        let error = writer.open(&[("streamType", "error"), ("port", "8080"), ("requestID", "0")]).unwrap();
        let data = writer.open(&[("streamType", "data"), ("port", "8080"), ("requestID", "0")]).unwrap();
        let sender = std::thread::spawn(move || {
            for chunk in sent.chunks(32 * 1024) {
                writer.data(data, chunk, false).unwrap();
            }
            writer.data(data, &[], true).unwrap();
            writer
        });
        let got = streaming::collect(&mut reader, error, Some(data), None);
        sender.join().unwrap();
        assert_eq!(text(&got.error), "", "no error");
        got.stdout
    })
    .await;
    assert!(echoed.len() == payload.len() && echoed == *payload, "echoed {} of {} bytes", echoed.len(), payload.len());

    // SPDY: a port nobody listens on gives a message on the error stream.
    let url = client
        .runtime
        .port_forward(cri::PortForwardRequest { pod_sandbox_id: pod.clone(), port: vec![] })
        .await
        .unwrap()
        .into_inner()
        .url;
    let n = node.clone();
    let got = blocking(move || {
        let (_, mut writer, mut reader) = streaming::spdy_connect(&n, &url, &["portforward.k8s.io"]).expect("upgrade");
        let error = writer.open(&[("streamType", "error"), ("port", "9"), ("requestID", "1")]).unwrap();
        let data = writer.open(&[("streamType", "data"), ("port", "9"), ("requestID", "1")]).unwrap();
        streaming::collect(&mut reader, error, Some(data), None)
    })
    .await;
    assert!(text(&got.error).contains("error forwarding port 9"), "{}", text(&got.error));

    // WebSocket: the port opens each channel, then 10 MB echoed.
    let url = client.runtime.port_forward(request.clone()).await.unwrap().into_inner().url;
    let (ws, protocol) = streaming::websocket(&node, &url, "v4.channel.k8s.io").await;
    assert_eq!(protocol.as_deref(), Some("v4.channel.k8s.io"));
    let (mut sink, mut stream) = ws.split();
    let mut preamble = HashMap::new();
    while preamble.len() < 2 {
        let Some(Ok(Message::Binary(bytes))) = stream.next().await else { panic!("no port preamble") };
        preamble.insert(bytes[0], bytes[1..].to_vec());
    }
    assert_eq!(preamble, HashMap::from([(0u8, 8080u16.to_le_bytes().to_vec()), (1u8, 8080u16.to_le_bytes().to_vec())]));
    let sent = payload.clone();
    let sender = tokio::spawn(async move {
        for chunk in sent.chunks(32 * 1024) {
            sink.send(Message::Binary([&[0u8][..], chunk].concat().into())).await.unwrap();
        }
        sink
    });
    let mut echoed = Vec::with_capacity(payload.len());
    while echoed.len() < payload.len() {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("echo keeps coming") {
            Some(Ok(Message::Binary(bytes))) if bytes.first() == Some(&0) => echoed.extend_from_slice(&bytes[1..]),
            Some(Ok(Message::Binary(bytes))) => panic!("channel {}: {}", bytes[0], text(&bytes[1..])),
            Some(Ok(_)) => {}
            other => panic!("websocket ended after {} bytes: {other:?}", echoed.len()),
        }
    }
    assert!(echoed == *payload, "websocket echo differs");
    let mut sink = sender.await.unwrap();
    let _ = sink.close().await;

    // Tokens: unknown, used, expired, and of another kind are all refused.
    let bad = |upgrade: streaming::Upgrade| (upgrade.status, upgrade.body);
    let spdy_headers =
        [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", "portforward.k8s.io")];
    let url = client.runtime.port_forward(request.clone()).await.unwrap().into_inner().url;
    let (host, path) = streaming::split_url(&url);
    let forged = format!("http://{host}/portforward/{}", "0".repeat(32));
    assert_eq!(bad(streaming::upgrade_request(&node, &forged, &spdy_headers).unwrap()).0, 404);
    let used = streaming::upgrade_request(&node, &url, &spdy_headers).unwrap();
    assert_eq!(used.status, 101);
    drop(used);
    let again = bad(streaming::upgrade_request(&node, &url, &spdy_headers).unwrap());
    assert_eq!(again.0, 404, "a token works once: {}", again.1);
    let as_exec = format!("http://{host}{}", path.replace("/portforward/", "/exec/"));
    let url = client.runtime.port_forward(request.clone()).await.unwrap().into_inner().url;
    let (_, fresh) = streaming::split_url(&url);
    assert_eq!(
        bad(streaming::upgrade_request(
            &node,
            &format!("http://{host}{}", fresh.replace("/portforward/", "/exec/")),
            &spdy_headers
        )
        .unwrap())
        .0,
        404
    );
    assert_eq!(
        bad(streaming::upgrade_request(&node, &url, &spdy_headers).unwrap()).0,
        404,
        "the exec attempt spent it"
    );
    let _ = as_exec;
    let url = client.runtime.port_forward(request.clone()).await.unwrap().into_inner().url;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bad(streaming::upgrade_request(&node, &url, &spdy_headers).unwrap()).0, 404, "expired");
    // No protocol in common: 403 with the server's list.
    let url = client.runtime.port_forward(request.clone()).await.unwrap().into_inner().url;
    let refused = streaming::upgrade_request(
        &node,
        &url,
        &[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", "v9.nope")],
    )
    .unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("X-Accepted-Stream-Protocol-Versions"), Some("portforward.k8s.io"));

    // Bad requests at the CRI.
    let code = |r: Result<tonic::Response<cri::PortForwardResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(
            client
                .runtime
                .port_forward(cri::PortForwardRequest { pod_sandbox_id: "nope".into(), port: vec![80] })
                .await
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            client
                .runtime
                .port_forward(cri::PortForwardRequest { pod_sandbox_id: pod.clone(), port: vec![70000] })
                .await
        ),
        tonic::Code::InvalidArgument
    );
    let exec = |cmd: Vec<String>, stdout: bool| cri::ExecRequest {
        container_id: echo.clone(),
        cmd,
        stdout,
        ..Default::default()
    };
    assert_eq!(client.runtime.exec(exec(vec![], true)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(
        client.runtime.exec(exec(vec!["true".into()], false)).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
}

/// A pod whose containers log under `/var/log/pods/e2e_<name>/`.
async fn run_logged_pod(client: &mut CriClient, name: &str) -> String {
    let mut config = pod_config(name);
    config.log_directory = format!("/var/log/pods/e2e_{name}");
    crisimple::run_pod_sandbox(client, config).await.expect("RunPodSandbox")
}

/// A container reading stdin (and with `tty`, a terminal), logging to `<name>/0.log`.
fn interactive_config(name: &str, image: &str, command: &[&str], stdin_once: bool, tty: bool) -> cri::ContainerConfig {
    let mut config = container_config(name, image, command);
    config.stdin = true;
    config.stdin_once = stdin_once;
    config.tty = tty;
    config.log_path = format!("{name}/0.log");
    config
}

async fn attach_url(client: &mut CriClient, id: &str, tty: bool) -> String {
    let request = cri::AttachRequest { container_id: id.into(), stdin: true, tty, stdout: true, stderr: !tty };
    client.runtime.attach(request).await.expect("Attach").into_inner().url
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Sends `bytes` on WebSocket channel `channel`.
async fn ws_send(ws: &mut Ws, channel: u8, bytes: &[u8]) {
    ws.send(Message::Binary([&[channel][..], bytes].concat().into())).await.expect("websocket send");
}

/// Reads WebSocket channel 1 (stdout) until its text contains every one of `needles`.
async fn ws_read_until(ws: &mut Ws, needles: &[&str]) -> String {
    let mut stdout = Vec::new();
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while !needles.iter().all(|n| text(&stdout).contains(n)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) if bytes.first() == Some(&1) => stdout.extend_from_slice(&bytes[1..]),
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => {
                panic!("the session ended before {needles:?}; stdout: {:?}", text(&stdout))
            }
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("no {needles:?} within {ANSWER_TIMEOUT:?}; stdout: {:?}", text(&stdout)),
        }
    }
    text(&stdout)
}

async fn container_status(client: &mut CriClient, id: &str) -> cri::ContainerStatus {
    let request = cri::ContainerStatusRequest { container_id: id.into(), verbose: true };
    client.runtime.container_status(request).await.expect("ContainerStatus").into_inner().status.unwrap()
}

/// Waits until the node's file `path` contains `needle`; returns the file.
async fn file_containing(node: &Node, path: &str, needle: &str) -> String {
    let what = format!("{needle:?} in {path}");
    e2e::eventually(ANSWER_TIMEOUT, &what, || {
        let content = node.exec(&["cat", path]).stdout;
        let found = content.contains(needle);
        async move { found.then_some(content) }
    })
    .await
}

#[tokio::test]
async fn attach_carries_stdin_and_stdin_once_closes_it() {
    let node = node("attach-stdin", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_logged_pod(&mut client, "attachstdin").await;
    let node = std::sync::Arc::new(node);
    let reader = ["sh", "-c", "while read l; do echo \"got $l\"; done; echo eof-seen"];

    // stdin kept open between sessions: two WebSocket sessions write to the same stdin.
    let id = create(&mut client, &pod, interactive_config("reader", &image, &reader, false, false)).await;
    start(&mut client, &id).await;
    for word in ["hello", "again"] {
        let url = attach_url(&mut client, &id, false).await;
        let (mut ws, protocol) = streaming::websocket(&node, &url, "v5.channel.k8s.io").await;
        assert_eq!(protocol.as_deref(), Some("v5.channel.k8s.io"));
        ws_send(&mut ws, 0, format!("{word}\n").as_bytes()).await;
        ws_read_until(&mut ws, &[&format!("got {word}")]).await;
        ws.close(None).await.unwrap();
    }
    let log = file_containing(&node, "/var/log/pods/e2e_attachstdin/reader/0.log", " stdout F got again\n").await;
    assert!(log.contains(" stdout F got hello\n"), "{log}");
    let status = container_status(&mut client, &id).await;
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32, "stdin without stdin_once stays open");
    let info: serde_json::Value = serde_json::from_str(&status_info(&mut client, &id).await).unwrap();
    assert_eq!((info["spec"]["stdin"].as_bool(), info["spec"]["tty"].as_bool()), (Some(true), Some(false)));

    // stdin_once over SPDY: the end of the first session with stdin is the container's EOF.
    let once = create(&mut client, &pod, interactive_config("once", &image, &reader, true, false)).await;
    start(&mut client, &once).await;
    let url = attach_url(&mut client, &once, false).await;
    let n = node.clone();
    let stdout = blocking(move || {
        let (_, mut writer, mut reader) = streaming::spdy_connect(&n, &url, &["v4.channel.k8s.io"]).expect("upgrade");
        let _error = writer.open(&[("streamType", "error")]).unwrap();
        let stdin = writer.open(&[("streamType", "stdin")]).unwrap();
        let stdout = writer.open(&[("streamType", "stdout")]).unwrap();
        let _stderr = writer.open(&[("streamType", "stderr")]).unwrap();
        writer.data(stdin, b"only once\n", false).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while !text(&got).contains("got only once") && Instant::now() < deadline {
            match reader.next_frame().expect("read frame") {
                Some(ServerFrame::Data { stream, data, .. }) if stream == stdout => got.extend_from_slice(&data),
                Some(_) => {}
                None => break,
            }
        }
        writer.drop_connection();
        text(&got)
    })
    .await;
    assert!(stdout.contains("got only once"), "{stdout}");
    let exited = crisimple::wait_exited(&mut client, &once).await;
    assert_eq!((exited.exit_code, exited.reason.as_str()), (0, "Completed"), "{exited:?}");
    file_containing(&node, "/var/log/pods/e2e_attachstdin/once/0.log", " stdout F eof-seen\n").await;

    // Attach refuses stdin to a container created without it, and a tty to one without a tty.
    let plain = create(&mut client, &pod, container_config("plain", &image, &["busybox", "sleep", "1000"])).await;
    start(&mut client, &plain).await;
    let request =
        cri::AttachRequest { container_id: plain.clone(), stdin: true, tty: false, stdout: true, stderr: true };
    assert_eq!(client.runtime.attach(request).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let request = cri::AttachRequest { container_id: id.clone(), stdin: true, tty: true, stdout: true, stderr: false };
    assert_eq!(client.runtime.attach(request).await.unwrap_err().code(), tonic::Code::InvalidArgument);
}

async fn status_info(client: &mut CriClient, id: &str) -> String {
    let request = cri::ContainerStatusRequest { container_id: id.into(), verbose: true };
    let response = client.runtime.container_status(request).await.expect("ContainerStatus").into_inner();
    response.info.get("info").cloned().unwrap_or_default()
}

#[tokio::test]
async fn attach_to_a_tty_with_resize_and_across_a_daemon_kill() {
    let node = node("attach-tty", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_logged_pod(&mut client, "attachtty").await;

    // A shell on a terminal, ticking in the background so that it has output while the daemon is
    // down; and a stdin reader without a terminal.
    let shell = ["sh", "-c", "(i=0; while :; do echo tick-$i; i=$((i+1)); busybox sleep 0.5; done) & exec sh"];
    let tty = create(&mut client, &pod, interactive_config("shell", &image, &shell, false, true)).await;
    start(&mut client, &tty).await;
    let reader = ["sh", "-c", "while read l; do echo \"got $l\"; done"];
    let piped = create(&mut client, &pod, interactive_config("reader", &image, &reader, false, false)).await;
    start(&mut client, &piped).await;

    let url = attach_url(&mut client, &tty, true).await;
    let (mut ws, _) = streaming::websocket(&node, &url, "v4.channel.k8s.io").await;
    ws_send(&mut ws, 4, br#"{"Width":100,"Height":40}"#).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws_send(&mut ws, 0, b"[ -t 0 ] && echo is-a-$((6*7))-tty; busybox stty size; busybox tty\n").await;
    let screen = ws_read_until(&mut ws, &["is-a-42-tty", "40 100", "/dev/pts/0"]).await;
    assert!(!screen.contains("not a tty"), "{screen}");
    ws.close(None).await.unwrap();
    let log_path = "/var/log/pods/e2e_attachtty/shell/0.log";
    file_containing(&node, log_path, " stdout F is-a-42-tty\n").await;

    // tty with stdin_once (kubectl run -it): the end of the session is ^D, and the shell exits.
    let once = create(&mut client, &pod, interactive_config("once", &image, &["sh"], true, true)).await;
    start(&mut client, &once).await;
    let url = attach_url(&mut client, &once, true).await;
    let (mut ws, _) = streaming::websocket(&node, &url, "v4.channel.k8s.io").await;
    ws_send(&mut ws, 0, b"echo once-$((6*7))\n").await;
    ws_read_until(&mut ws, &["once-42"]).await;
    ws.close(None).await.unwrap();
    let exited = crisimple::wait_exited(&mut client, &once).await;
    assert_eq!(exited.exit_code, 0, "{exited:?}");

    // In a pod with its own user namespace the terminal is the container's own: its devpts, and
    // owned by the container's root (a pty of the node would show as nobody's).
    let config = crisimple::userns_pod_config("attachuserns");
    let userns_pod = crisimple::run_pod_sandbox(&mut client, config).await.expect("RunPodSandbox");
    let contained = create(&mut client, &userns_pod, interactive_config("shell", &image, &["sh"], false, true)).await;
    start(&mut client, &contained).await;
    let url = attach_url(&mut client, &contained, true).await;
    let (mut ws, _) = streaming::websocket(&node, &url, "v4.channel.k8s.io").await;
    ws_send(&mut ws, 0, b"[ -t 0 ] && echo is-a-$((6*7))-tty; busybox stat -c owner-%u-%n $(busybox tty)\n").await;
    ws_read_until(&mut ws, &["is-a-42-tty", "owner-0-/dev/pts/0"]).await;
    ws.close(None).await.unwrap();

    // SIGKILL: systemd restarts the daemon, which gets the terminal and the stdin pipe back from
    // its fd store; ticks written meanwhile waited in the terminal and reach the log.
    let before = ticks(&node.exec(&["cat", log_path]).stdout);
    node.sh("systemctl kill -s KILL cri-systemd");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut client = node.cri(Duration::from_secs(90)).await;
    let restarts = node.sh("systemctl show -p NRestarts --value cri-systemd");
    assert_eq!(restarts.trim(), "1", "restarted by systemd, not stopped and started");

    let url = attach_url(&mut client, &tty, true).await;
    let (mut ws, _) = streaming::websocket(&node, &url, "v4.channel.k8s.io").await;
    ws_send(&mut ws, 4, br#"{"Width":90,"Height":30}"#).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws_send(&mut ws, 0, b"echo back-$((6*7)); busybox stty size\n").await;
    ws_read_until(&mut ws, &["back-42", "30 90"]).await;
    ws.close(None).await.unwrap();

    let url = attach_url(&mut client, &piped, false).await;
    let (mut ws, _) = streaming::websocket(&node, &url, "v5.channel.k8s.io").await;
    ws_send(&mut ws, 0, b"after restart\n").await;
    ws_read_until(&mut ws, &["got after restart"]).await;
    ws.close(None).await.unwrap();

    let last = *before.last().unwrap_or(&0);
    let log = file_containing(&node, log_path, &format!("tick-{}\n", last + 12)).await;
    let after = ticks(&log);
    let expected: Vec<u32> = (0..=*after.last().unwrap()).collect();
    assert_eq!(after, expected, "every tick, including those of the daemon's downtime, in {log}");
}

/// The tick numbers in a CRI log, sorted, without repeats.
fn ticks(log: &str) -> Vec<u32> {
    // A tick may follow the shell's prompt on the same line.
    let number = |line: &str| {
        let (_, rest) = line.split_once("tick-")?;
        rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
    };
    let mut numbers: Vec<u32> = log.lines().filter(|l| l.contains(" stdout F ")).filter_map(number).collect();
    numbers.sort_unstable();
    numbers.dedup();
    numbers
}

/// critest's Attach conformance flow as client-go's SPDY executor runs it: a `/bin/sh` container
/// with stdin and stdin_once, attached with stdin, stdout and stderr; nothing comes out until a
/// command goes in; the command's output comes back on stdout alone; then the client half-closes
/// stdin (a FIN, not a dropped connection), which is the shell's end of file: the session ends
/// with a Success status and the container exits 0.
#[tokio::test]
async fn attach_to_a_shell_as_critest_does_and_half_close_stdin() {
    let node = node("attach-critest", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_logged_pod(&mut client, "attachcritest").await;
    let id = create(&mut client, &pod, interactive_config("shell", &image, &["/bin/sh"], true, false)).await;
    start(&mut client, &id).await;
    let request = cri::AttachRequest { container_id: id.clone(), stdin: true, tty: false, stdout: true, stderr: true };
    let url = client.runtime.attach(request).await.expect("Attach").into_inner().url;
    let node = std::sync::Arc::new(node);
    let n = node.clone();
    let (protocol, before, collected) = blocking(move || {
        let protocols = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io"];
        let (protocol, mut writer, mut reader) = streaming::spdy_connect(&n, &url, &protocols).expect("upgrade");
        let error = writer.open(&[("streamType", "error")]).unwrap();
        let stdin = writer.open(&[("streamType", "stdin")]).unwrap();
        let stdout = writer.open(&[("streamType", "stdout")]).unwrap();
        let stderr = writer.open(&[("streamType", "stderr")]).unwrap();
        // No output before any input (the replies to the stream openings only).
        let mut before = Vec::new();
        reader.set_read_timeout(Some(Duration::from_secs(2)));
        while let Ok(Some(frame)) = reader.next_frame() {
            if let ServerFrame::Data { data, .. } = frame {
                before.extend_from_slice(&data);
            }
        }
        reader.set_read_timeout(None);
        // critest's exact input: no newline after the output, so a source that adds one shows.
        writer.data(stdin, b"echo -n hello\n", false).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while !text(&got).contains("hello") && Instant::now() < deadline {
            match reader.next_frame().expect("read frame") {
                Some(ServerFrame::Data { stream, data, .. }) if stream == stdout => got.extend_from_slice(&data),
                Some(ServerFrame::Data { stream, data, .. }) if stream == stderr => {
                    panic!("stderr: {:?}", text(&data))
                }
                Some(_) => {}
                None => break,
            }
        }
        // client-go closes its stdin stream when the input ends.
        writer.data(stdin, b"", true).unwrap();
        let mut rest = streaming::collect(&mut reader, error, Some(stdout), Some(stderr));
        got.append(&mut rest.stdout);
        rest.stdout = got;
        (protocol, before, rest)
    })
    .await;
    assert_eq!(protocol, "v4.channel.k8s.io");
    assert_eq!(text(&before), "", "output before any input");
    assert_eq!(text(&collected.stdout), "hello");
    assert_eq!(text(&collected.stderr), "");
    let status = text(&collected.error);
    assert!(status.is_empty() || status.contains(r#""status":"Success""#), "error stream: {status}");
    let exited = crisimple::wait_exited(&mut client, &id).await;
    assert_eq!((exited.exit_code, exited.reason.as_str()), (0, "Completed"), "{exited:?}");
}

/// How long after its last output an attach session to a tty container that exits may take to
/// end: the terminal's end or the exit's event (the exit record's inotify watch) ends it, not a
/// poll of the container's state every 500 ms (which ended it 500 ms after the last output).
const ATTACH_END_BOUND: Duration = Duration::from_millis(400);
/// The same without a terminal: the session ends with the output pipes or the exit's event, both
/// of which follow the exit record that systemd's ExecStopPost writes (slower on a loaded node).
const ATTACH_END_BOUND_PIPES: Duration = Duration::from_secs(1);

/// Reads a WebSocket attach session until `needle` is on stdout, then until the server closes:
/// how long the close took after the needle.
async fn attach_end_after(ws: &mut Ws, needle: &str) -> Duration {
    ws_read_until(ws, &[needle]).await;
    let seen = Instant::now();
    loop {
        match tokio::time::timeout(ANSWER_TIMEOUT, ws.next()).await.expect("the session ends") {
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return seen.elapsed(),
            Some(Ok(_)) => {}
        }
    }
}

/// An attach session ends promptly when the container exits by itself, with or without a
/// terminal, in several rounds.
#[tokio::test]
async fn attach_ends_promptly_when_the_container_exits() {
    let node = node("attach-exit", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client).await;
    let pod = run_logged_pod(&mut client, "attachexit").await;
    let script = ["sh", "-c", "echo started; busybox sleep 3; echo bye"];
    let mut latencies = Vec::new();
    for round in 0..3 {
        let mut sessions = Vec::new();
        for tty in [false, true] {
            let mut config = container_config(&format!("exits-{round}-{tty}"), &image, &script);
            config.tty = tty;
            config.log_path = format!("exits-{round}-{tty}/0.log");
            let id = create(&mut client, &pod, config).await;
            start(&mut client, &id).await;
            let request =
                cri::AttachRequest { container_id: id.clone(), stdin: false, tty, stdout: true, stderr: !tty };
            let url = client.runtime.attach(request).await.expect("Attach").into_inner().url;
            let (ws, _) = streaming::websocket(&node, &url, "v4.channel.k8s.io").await;
            sessions.push((id, tty, ws));
        }
        let ended = futures_util::future::join_all(
            sessions.iter_mut().map(|(_, _, ws)| async move { attach_end_after(ws, "bye").await }),
        )
        .await;
        for ((id, tty, _), took) in sessions.iter().zip(ended) {
            let exited = crisimple::wait_exited(&mut client, id).await;
            assert_eq!(exited.exit_code, 0, "{exited:?}");
            latencies.push((round, *tty, took));
        }
    }
    eprintln!("attach ended after the container's last output: {latencies:?}");
    for (round, tty, took) in &latencies {
        let bound = if *tty { ATTACH_END_BOUND } else { ATTACH_END_BOUND_PIPES };
        assert!(*took < bound, "round {round}, tty {tty}: the session ended {took:?} after the exit");
    }
}
