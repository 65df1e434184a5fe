//! gRPC clients that dial the daemon's unix socket and send the socket's path as `:authority`
//! (grpc-java; grpc C-core, so Python's grpcio, dialling `unix:...`, in plain or percent-encoded
//! form) get answers, as from grpc-go servers (containerd, CRI-O). The calls are raw HTTP/2 over
//! the socket, with the header blocks written by hand: no HTTP library sends such an authority.

use std::time::Duration;

use e2e::{Node, NodeOptions, cri};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal without Huffman coding (all strings here are under 127 bytes).
fn string(bytes: &[u8], out: &mut Vec<u8>) {
    assert!(bytes.len() < 127);
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// How a request's `:authority` is written.
enum Authority<'a> {
    /// A literal the client's encoder adds to its dynamic table (grpc C-core's way).
    Indexing(&'a [u8]),
    /// A literal that stays out of the table.
    Plain(&'a [u8]),
    /// An entry of the dynamic table, by index.
    Indexed(u8),
}

/// A unary call's header block: `POST`, `http` from the static table, then `:path`, `:authority`,
/// `content-type` and `te`.
fn request_block(method: &str, authority: Authority<'_>) -> Vec<u8> {
    let mut block = vec![0x83, 0x86, 0x04];
    string(method.as_bytes(), &mut block);
    match authority {
        Authority::Indexing(value) => {
            block.push(0x41);
            string(value, &mut block);
        }
        Authority::Plain(value) => {
            block.push(0x01);
            string(value, &mut block);
        }
        Authority::Indexed(index) => block.push(0x80 | index),
    }
    for (name, value) in [(&b"content-type"[..], &b"application/grpc"[..]), (b"te", b"trailers")] {
        block.push(0);
        string(name, &mut block);
        string(value, &mut block);
    }
    block
}

/// What came back on one stream.
#[derive(Debug, Default)]
struct Answer {
    headers: Vec<(String, String)>,
    data: Vec<u8>,
    reset: Option<u32>,
    ended: bool,
}

/// Sends a Version call on each of `streams` (id, :authority) over one connection; returns the
/// answers in the same order.
async fn version_calls(node: &Node, streams: Vec<(u32, Authority<'_>)>) -> Vec<Answer> {
    let mut socket = tokio::net::UnixStream::connect(node.socket()).await.expect("connect to the socket");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let request = cri::VersionRequest { version: "v1".into() }.encode_to_vec();
    let mut message = vec![0];
    message.extend_from_slice(&(request.len() as u32).to_be_bytes());
    message.extend_from_slice(&request);
    let ids: Vec<u32> = streams.iter().map(|(id, _)| *id).collect();
    for (id, authority) in streams {
        out.extend(frame(HEADERS, END_HEADERS, id, &request_block("/runtime.v1.RuntimeService/Version", authority)));
        out.extend(frame(DATA, END_STREAM, id, &message));
    }
    socket.write_all(&out).await.unwrap();

    let mut answers: Vec<Answer> = ids.iter().map(|_| Answer::default()).collect();
    let mut decoder = loona_hpack::Decoder::new();
    let read = async {
        while !answers.iter().all(|a| a.ended || a.reset.is_some()) {
            let mut head = [0u8; 9];
            socket.read_exact(&mut head).await.expect("the daemon closed the connection");
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
            let mut payload = vec![0u8; length];
            socket.read_exact(&mut payload).await.unwrap();
            match kind {
                SETTINGS if flags & ACK == 0 => socket.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap(),
                GOAWAY => panic!("GOAWAY from the daemon: {payload:?}"),
                _ => {}
            }
            let Some(at) = ids.iter().position(|id| *id == stream) else { continue };
            let answer = &mut answers[at];
            match kind {
                HEADERS => {
                    assert!(flags & END_HEADERS != 0, "no CONTINUATION expected");
                    for (name, value) in decoder.decode(&payload).expect("the daemon's HPACK") {
                        answer.headers.push((
                            String::from_utf8_lossy(&name).into_owned(),
                            String::from_utf8_lossy(&value).into_owned(),
                        ));
                    }
                }
                DATA => answer.data.extend_from_slice(&payload),
                RST_STREAM => answer.reset = Some(u32::from_be_bytes(payload[..4].try_into().unwrap())),
                _ => {}
            }
            if matches!(kind, HEADERS | DATA) && flags & END_STREAM != 0 {
                answer.ended = true;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("answers within 30 s");
    answers
}

fn assert_version_answer(answer: &Answer, what: &str) {
    assert_eq!(answer.reset, None, "{what}: RST_STREAM (1 is PROTOCOL_ERROR); {answer:?}");
    let header = |name: &str| answer.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!(header(":status"), Some("200"), "{what}: {answer:?}");
    assert_eq!(header("grpc-status"), Some("0"), "{what}: {answer:?}");
    assert!(answer.data.len() > 5, "{what}: no message: {answer:?}");
    let response = cri::VersionResponse::decode(&answer.data[5..]).expect("a VersionResponse");
    assert_eq!(response.runtime_name, "cri-systemd", "{what}");
}

#[tokio::test]
async fn a_socket_path_as_authority_gets_answers() {
    let node = Node::up("grpc-authority", NodeOptions::default());
    node.cri(Duration::from_secs(30)).await;
    let path = b"/run/cri-systemd/cri-systemd.sock";
    // What grpcio 1.85 sends for `unix:/run/cri-systemd/cri-systemd.sock` (seen in its http trace).
    let grpcio = b"run%2Fcri-systemd%2Fcri-systemd.sock";
    let encoded = b"%2Frun%2Fcri-systemd%2Fcri-systemd.sock";
    let answers = version_calls(
        &node,
        vec![
            // grpc C-core: the path into the dynamic table, then by index.
            (1, Authority::Indexing(path)),
            (3, Authority::Indexed(62)),
            (5, Authority::Plain(encoded)),
            (7, Authority::Plain(b"unix:/run/cri-systemd/cri-systemd.sock")),
            (9, Authority::Plain(grpcio)),
            (11, Authority::Plain(b"localhost")),
        ],
    )
    .await;
    let cases = ["path", "path by index", "percent-encoded", "unix:", "grpcio's", "localhost"];
    for (answer, what) in answers.iter().zip(cases) {
        assert_version_answer(answer, what);
    }
    // Clients with a valid authority, on a connection of their own, are unchanged.
    let answers = version_calls(&node, vec![(1, Authority::Indexing(b"localhost")), (3, Authority::Indexed(62))]).await;
    for answer in &answers {
        assert_version_answer(answer, "valid authority");
    }
}
