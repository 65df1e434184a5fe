//! The streaming server under stress: many exec sessions at once, clients that vanish
//! mid-stream, and a client that stops reading while the command writes without end. Through
//! the real path: Exec URLs from the daemon in a systemd node, WebSocket v5 clients.

use std::collections::HashMap;
use std::time::Duration;

use e2e::streaming::websocket;
use e2e::{CriClient, Node, cri, eventually};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const V5: &str = "v5.channel.k8s.io";

async fn exec_url(client: &mut CriClient, id: &str, cmd: &[&str]) -> String {
    let request = cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    client.runtime.exec(request).await.expect("Exec").into_inner().url
}

/// Bytes by channel until the server closes.
async fn collect(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> HashMap<u8, Vec<u8>> {
    let mut channels: HashMap<u8, Vec<u8>> = HashMap::new();
    while let Some(message) = tokio::time::timeout(ANSWER_TIMEOUT, ws.next()).await.expect("websocket answers") {
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

/// The next frame that carries data (the server opens each channel with an empty frame).
async fn next_data(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Vec<u8> {
    loop {
        let message = tokio::time::timeout(ANSWER_TIMEOUT, ws.next()).await.expect("output in time");
        match message.expect("the stream goes on").expect("a frame") {
            Message::Binary(bytes) if bytes.len() > 1 => return bytes.to_vec(),
            _ => {}
        }
    }
}

/// The processes of the node whose command line starts with `command` (the command itself, not
/// the exec-in process that started it).
fn processes_with(node: &Node, command: &str) -> usize {
    // `[s]leep` matches "sleep" but not the pattern itself, which is in this script's own
    // command line.
    let pattern = format!("^[{}]{}", &command[..1], &command[1..]);
    let script = format!(
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c -- '{pattern}' || true"
    );
    node.sh(&script).trim().parse().unwrap_or(0)
}

fn daemon_rss_kib(node: &Node) -> u64 {
    let pid = node.sh("systemctl show -P MainPID cri-systemd.service");
    let status = node.sh(&format!("cat /proc/{}/status", pid.trim()));
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
}

#[tokio::test]
async fn sessions_in_parallel_vanishing_clients_and_slow_readers() {
    let node = e2e::node_with_local_registry("stream-robust", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let id = e2e::sleeping_container(&node, &mut client, "robust").await;
    let node = std::sync::Arc::new(node);

    // 1. Twenty sessions at once: each gets its own output and its own exit status.
    let mut sessions = tokio::task::JoinSet::new();
    for i in 0..20 {
        let script = format!("echo session-{i}; echo err-{i} >&2; exit {}", i % 3);
        let url = exec_url(&mut client, &id, &["sh", "-c", &script]).await;
        let node = node.clone();
        sessions.spawn(async move {
            let (mut ws, protocol) = websocket(&node, &url, V5).await;
            assert_eq!(protocol.as_deref(), Some(V5));
            (i, collect(&mut ws).await)
        });
    }
    while let Some(joined) = sessions.join_next().await {
        let (i, channels) = joined.expect("session task");
        let text =
            |c: u8| String::from_utf8_lossy(channels.get(&c).map(Vec::as_slice).unwrap_or_default()).into_owned();
        assert_eq!((text(1), text(2)), (format!("session-{i}\n"), format!("err-{i}\n")));
        let status: serde_json::Value = serde_json::from_str(&text(3)).expect("status on the error channel");
        if i % 3 == 0 {
            assert_eq!(status["status"], "Success", "{status}");
        } else {
            assert_eq!(status["details"]["causes"][0]["message"], (i % 3).to_string(), "{status}");
        }
    }

    // 2. A client that goes away mid-stream takes its command with it.
    let marker = "busybox sleep 4243";
    let url = exec_url(&mut client, &id, &["sh", "-c", &format!("echo started; exec {marker}")]).await;
    let (mut ws, _) = websocket(&node, &url, V5).await;
    assert_eq!(next_data(&mut ws).await, b"\x01started\n");
    assert_eq!(processes_with(&node, marker), 1, "the exec'd command runs");
    drop(ws);
    eventually(ANSWER_TIMEOUT, "the command of a vanished client is killed", || async {
        (processes_with(&node, marker) == 0).then_some(())
    })
    .await;

    // 3. A client that stops reading while the command writes without end: the daemon's
    // buffers are bounded (its memory stays put), the command is held back by the full pipe,
    // and it goes when the client does.
    let before = daemon_rss_kib(&node);
    let url = exec_url(&mut client, &id, &["busybox", "yes", "robust-output-line"]).await;
    let (mut ws, _) = websocket(&node, &url, V5).await;
    assert!(next_data(&mut ws).await.starts_with(b"\x01robust-output-line\n"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = daemon_rss_kib(&node);
    assert!(after < before + 32 * 1024, "daemon RSS grew from {before} KiB to {after} KiB with a stalled reader");
    assert_eq!(processes_with(&node, "busybox yes robust-output-line"), 1);
    // Still a live stream: reading resumes where it stopped.
    for _ in 0..50 {
        assert!(next_data(&mut ws).await.starts_with(b"\x01"));
    }
    drop(ws);
    eventually(ANSWER_TIMEOUT, "the stalled command is killed with its client", || async {
        (processes_with(&node, "busybox yes robust-output-line") == 0).then_some(())
    })
    .await;
}
