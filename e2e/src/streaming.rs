//! Test clients of the Kubernetes streaming protocols, written from the protocol (SPDY/3 draft,
//! k8s.io/apimachinery httpstream/spdy and client-go remotecommand/portforward), independently
//! of the daemon's implementation: a blocking SPDY/3.1 client over a socket in the node's network
//! namespace, and the HTTP upgrade requests of both protocols.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use crate::Node;
use crate::registry::connect_in_node;

/// `http://host:port/path` (or https) → (`host:port`, `/path`).
pub fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).expect("an http(s):// URL");
    let (host, path) = rest.split_once('/').expect("a URL with a path");
    (host.to_string(), format!("/{path}"))
}

/// The answer to an upgrade request: status, headers, and the socket when it switched.
#[derive(Debug)]
pub struct Upgrade {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub socket: Option<BufReader<TcpStream>>,
}

impl Upgrade {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends `GET path` with `headers` to `url`'s host in the node and reads the response head.
pub fn upgrade_request(node: &Node, url: &str, headers: &[(&str, &str)]) -> io::Result<Upgrade> {
    let (host, path) = split_url(url);
    let mut stream = connect_in_node(node, &host)?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut response_headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((k, v)) = trimmed.split_once(':') {
            response_headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if status == 101 {
        return Ok(Upgrade { status, headers: response_headers, body: String::new(), socket: Some(reader) });
    }
    let length: usize = response_headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Upgrade { status, headers: response_headers, body: String::from_utf8_lossy(&body).into_owned(), socket: None })
}

/// The SPDY/3 zlib dictionary, from the draft's listing (section 2.6.10.1): 4-byte big-endian
/// lengths before each of the first 65 entries, then text.
fn spdy3_dictionary() -> Vec<u8> {
    let entries = "options head post put delete trace accept accept-charset accept-encoding accept-language \
        accept-ranges age allow authorization cache-control connection content-base content-encoding \
        content-language content-length content-location content-md5 content-range content-type date etag \
        expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since \
        last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer \
        retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate \
        method get status 200_OK version HTTP/1.1 url public set-cookie keep-alive origin";
    let mut dictionary = Vec::new();
    for entry in entries.split_whitespace() {
        let entry = entry.replace('_', " ");
        dictionary.extend_from_slice(&u32::try_from(entry.len()).unwrap().to_be_bytes());
        dictionary.extend_from_slice(entry.as_bytes());
    }
    let codes = "100 101 201 202 205 206 300 302 303 304 305 306 307 402 405 406 407 408 409 410 411 412 413 414 415 416 417 502 504 505";
    dictionary.extend(codes.split(' ').flat_map(|c| c.bytes()));
    dictionary.extend_from_slice(
        b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized\
403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable\
Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT\
chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,\
text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    assert_eq!(dictionary.len(), 1423, "the SPDY/3 dictionary is 1423 bytes");
    dictionary
}

/// A frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    Reply { stream: u32, headers: Vec<(String, String)> },
    Data { stream: u32, fin: bool, data: Vec<u8> },
    Reset { stream: u32, status: u32 },
    Ping { id: u32 },
    GoAway,
    Other { kind: u16 },
}

/// The writing half of a client SPDY connection (opens streams, sends data).
#[derive(Debug)]
pub struct SpdyWriter {
    socket: TcpStream,
    zlib: Compress,
    next_stream: u32,
}

/// The reading half.
#[derive(Debug)]
pub struct SpdyReader {
    socket: BufReader<TcpStream>,
    zlib: Decompress,
}

/// Upgrades to SPDY/3.1 offering `protocols` (X-Stream-Protocol-Version); returns the negotiated
/// protocol and the two halves.
pub fn spdy_connect(node: &Node, url: &str, protocols: &[&str]) -> Result<(String, SpdyWriter, SpdyReader), Upgrade> {
    let mut headers = vec![("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")];
    headers.extend(protocols.iter().map(|p| ("X-Stream-Protocol-Version", *p)));
    let mut upgrade = upgrade_request(node, url, &headers).expect("upgrade request");
    if upgrade.status != 101 {
        return Err(upgrade);
    }
    let protocol = upgrade.header("X-Stream-Protocol-Version").unwrap_or_default().to_string();
    let reader = upgrade.socket.take().expect("switched");
    let socket = reader.get_ref().try_clone().expect("clone socket");
    let mut zlib = Compress::new(Compression::best(), true);
    zlib.set_dictionary(&spdy3_dictionary()).expect("dictionary");
    Ok((
        protocol,
        SpdyWriter { socket, zlib, next_stream: 1 },
        SpdyReader { socket: reader, zlib: Decompress::new(true) },
    ))
}

impl SpdyWriter {
    fn control(&mut self, kind: u16, flags: u8, body: &[u8]) -> io::Result<()> {
        let mut frame = vec![0x80, 3];
        frame.extend_from_slice(&kind.to_be_bytes());
        frame.push(flags);
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        frame.extend_from_slice(body);
        self.socket.write_all(&frame)
    }

    /// SYN_STREAM with `headers`; returns the stream id (odd: opened by the client).
    pub fn open(&mut self, headers: &[(&str, &str)]) -> io::Result<u32> {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut block = u32::try_from(headers.len()).unwrap().to_be_bytes().to_vec();
        for (name, value) in headers {
            let name = name.to_lowercase();
            block.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
            block.extend_from_slice(name.as_bytes());
            block.extend_from_slice(&u32::try_from(value.len()).unwrap().to_be_bytes());
            block.extend_from_slice(value.as_bytes());
        }
        let mut compressed = Vec::with_capacity(block.len() + 1024);
        self.zlib.compress_vec(&block, &mut compressed, FlushCompress::Sync).expect("compress");
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&0u32.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&compressed);
        self.control(1, 0, &body)?;
        Ok(id)
    }

    pub fn data(&mut self, stream: u32, data: &[u8], fin: bool) -> io::Result<()> {
        let mut frame = stream.to_be_bytes().to_vec();
        frame.push(u8::from(fin));
        frame.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes()[1..]);
        frame.extend_from_slice(data);
        self.socket.write_all(&frame)
    }

    pub fn ping(&mut self, id: u32) -> io::Result<()> {
        self.control(6, 0, &id.to_be_bytes())
    }

    /// Closes the connection abruptly (a client that goes away).
    pub fn drop_connection(self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl SpdyReader {
    /// How long a read waits (None: forever); a read that times out is an error.
    pub fn set_read_timeout(&mut self, timeout: Option<std::time::Duration>) {
        self.socket.get_ref().set_read_timeout(timeout).expect("set the read timeout");
    }

    /// The next frame; `None` at EOF.
    pub fn next_frame(&mut self) -> io::Result<Option<ServerFrame>> {
        let mut head = [0u8; 8];
        match self.socket.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut body = vec![0u8; length];
        self.socket.read_exact(&mut body)?;
        let flags = head[4];
        if head[0] & 0x80 == 0 {
            let stream = u32::from_be_bytes(head[..4].try_into().unwrap()) & 0x7fff_ffff;
            return Ok(Some(ServerFrame::Data { stream, fin: flags & 1 == 1, data: body }));
        }
        assert_eq!(u16::from_be_bytes([head[0] & 0x7f, head[1]]), 3, "SPDY version 3");
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let word = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        Ok(Some(match kind {
            2 => ServerFrame::Reply { stream: word(0) & 0x7fff_ffff, headers: self.headers(&body[4..])? },
            3 => ServerFrame::Reset { stream: word(0), status: word(4) },
            6 => ServerFrame::Ping { id: word(0) },
            7 => ServerFrame::GoAway,
            other => ServerFrame::Other { kind: other },
        }))
    }

    fn headers(&mut self, compressed: &[u8]) -> io::Result<Vec<(String, String)>> {
        let mut block = Vec::with_capacity(4096);
        let mut input = compressed;
        loop {
            let before = self.zlib.total_in();
            match self.zlib.decompress_vec(input, &mut block, FlushDecompress::Sync) {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.zlib.set_dictionary(&spdy3_dictionary()).map_err(io::Error::other)?;
                }
                Err(e) => return Err(io::Error::other(e)),
            }
            input = &input[(self.zlib.total_in() - before) as usize..];
            if input.is_empty() {
                break;
            }
            block.reserve(4096);
        }
        let mut at = 0;
        let mut take = |n: usize| {
            let slice = block[at..at + n].to_vec();
            at += n;
            slice
        };
        let count = u32::from_be_bytes(take(4).try_into().unwrap());
        let mut headers = Vec::new();
        for _ in 0..count {
            let n = u32::from_be_bytes(take(4).try_into().unwrap()) as usize;
            let name = String::from_utf8(take(n)).unwrap();
            let n = u32::from_be_bytes(take(4).try_into().unwrap()) as usize;
            let value = String::from_utf8(take(n)).unwrap();
            headers.push((name, value));
        }
        Ok(headers)
    }
}

/// What a remote command session brought back, by stream.
#[derive(Debug, Default)]
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub error: Vec<u8>,
    /// Every stream the server replied to.
    pub replied: Vec<u32>,
}

/// Reads until the error stream is finished (and stdout/stderr if given), collecting data.
pub fn collect(reader: &mut SpdyReader, error: u32, stdout: Option<u32>, stderr: Option<u32>) -> Collected {
    let mut collected = Collected::default();
    let mut open: Vec<u32> = [Some(error), stdout, stderr].into_iter().flatten().collect();
    while !open.is_empty() {
        match reader.next_frame().expect("read frame") {
            Some(ServerFrame::Reply { stream, .. }) => collected.replied.push(stream),
            Some(ServerFrame::Data { stream, fin, data }) => {
                if stream == error {
                    collected.error.extend_from_slice(&data);
                } else if Some(stream) == stdout {
                    collected.stdout.extend_from_slice(&data);
                } else if Some(stream) == stderr {
                    collected.stderr.extend_from_slice(&data);
                }
                if fin {
                    open.retain(|s| *s != stream);
                }
            }
            Some(ServerFrame::Reset { stream, .. }) => open.retain(|s| *s != stream),
            Some(_) => {}
            None => break,
        }
    }
    collected
}

/// A WebSocket to `url` (the daemon's streaming server in `node`) offering `protocols`; with the
/// protocol the server chose.
pub async fn websocket(
    node: &Node,
    url: &str,
    protocols: &str,
) -> (tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, Option<String>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (host, _) = split_url(url);
    let socket = connect_in_node(node, &host).expect("connect to the streaming server");
    socket.set_nonblocking(true).expect("nonblocking socket");
    let socket = tokio::net::TcpStream::from_std(socket).expect("tokio socket");
    let mut request = url.replace("http://", "ws://").into_client_request().expect("websocket request");
    request.headers_mut().insert("Sec-WebSocket-Protocol", protocols.parse().expect("protocols header"));
    let (ws, response) = tokio_tungstenite::client_async(request, socket).await.expect("websocket handshake");
    let protocol = response.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap_or_default().to_string());
    (ws, protocol)
}
