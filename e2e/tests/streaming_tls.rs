//! The streaming server with TLS (`streaming.tls_cert_file` / `tls_key_file`): Exec URLs are
//! https, an exec session works over TLS with a client that trusts the configured certificate,
//! and a plain-HTTP client gets no session.

use std::sync::Arc;
use std::time::Duration;

use e2e::streaming::split_url;
use e2e::{CriClient, Node, cri};
use futures_util::StreamExt;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

async fn exec_url(client: &mut CriClient, id: &str) -> String {
    let request = cri::ExecRequest {
        container_id: id.into(),
        cmd: vec!["sh".into(), "-c".into(), "echo over-tls; exit 4".into()],
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    client.runtime.exec(request).await.expect("Exec").into_inner().url
}

async fn tcp_in_node(node: &Node, url: &str) -> tokio::net::TcpStream {
    let (host, _) = split_url(url);
    let socket = e2e::registry::connect_in_node(node, &host).expect("connect to the streaming server");
    socket.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpStream::from_std(socket).expect("tokio socket")
}

#[tokio::test]
async fn exec_over_tls_with_the_configured_certificate() {
    // A throwaway certificate for the address the server listens on, in a directory the node
    // sees (its root is an overlay of this machine's, but not its /tmp).
    let dir = std::path::PathBuf::from(format!("/var/tmp/cri-e2e-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
    let (cert, key) = (dir.join("streaming.crt"), dir.join("streaming.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let extra = format!("[streaming]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", cert.display(), key.display());
    let node = e2e::node_with_local_registry("stream-tls", &extra);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let id = e2e::sleeping_container(&node, &mut client, "tls").await;
    std::fs::remove_dir_all(&dir).unwrap();

    let url = exec_url(&mut client, &id).await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // A client that trusts exactly that certificate: WebSocket v5 over TLS.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = connector.connect(name, tcp_in_node(&node, &url).await).await.expect("TLS handshake");
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.replace("https://", "wss://").into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "v5.channel.k8s.io".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await.expect("websocket over TLS");
    let mut channels: std::collections::HashMap<u8, Vec<u8>> = Default::default();
    while let Some(message) = tokio::time::timeout(ANSWER_TIMEOUT, ws.next()).await.expect("answers") {
        match message {
            Ok(Message::Binary(bytes)) if !bytes.is_empty() => {
                channels.entry(bytes[0]).or_default().extend_from_slice(&bytes[1..])
            }
            Ok(Message::Close(_)) | Err(_) => break,
            _ => {}
        }
    }
    assert_eq!(channels.get(&1).map(Vec::as_slice), Some(&b"over-tls\n"[..]));
    let status: serde_json::Value = serde_json::from_slice(&channels[&3]).expect("status");
    assert_eq!(status["details"]["causes"][0]["message"], "4", "{status}");

    // Plain HTTP to the TLS port: no session (and the token of this URL is not spent by it).
    let url = exec_url(&mut client, &id).await;
    let request = url.replace("https://", "ws://").into_client_request().unwrap();
    let plain = tokio_tungstenite::client_async(request, tcp_in_node(&node, &url).await).await;
    assert!(plain.is_err(), "a plain-HTTP client got a session from the TLS server");
}
