//! A thin layer between the unix socket and the HTTP/2 server that lets gRPC clients which send
//! the socket's path as `:authority` in (grpc-java and grpc C-core/Python dialling `unix:...`
//! send `/run/cri-systemd/cri-systemd.sock`, or its percent-encoded form). h2, under tonic and
//! hyper, resets every such stream with PROTOCOL_ERROR ("malformed authority", hyperium/h2#487
//! is open), while grpc-go servers (containerd, CRI-O) take them; on a unix socket the authority
//! means nothing anyway.
//!
//! The layer reads the client's side of the connection frame by frame. Every frame passes
//! through unchanged except header blocks (HEADERS and their CONTINUATIONs), which it decodes
//! with an HPACK decoder of its own that mirrors the client's encoder. A block whose `:authority`
//! is not a valid URI authority is re-encoded with `localhost` there; from then on every block of
//! that connection is re-encoded, as literals that never touch h2's HPACK table (which no longer
//! mirrors the client's once one entry differs). Clients that send valid authorities see no change
//! but the decoding. What the server writes passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer takes (h2's default SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16_384;
/// The HPACK table size h2 allows clients (its default SETTINGS_HEADER_TABLE_SIZE).
const HEADER_TABLE_SIZE: usize = 4_096;
const REPLACEMENT: &[u8] = b"localhost";

/// A connection whose client-sent `:authority` values are made acceptable to h2.
pub struct AuthorityFix<S> {
    inner: S,
    /// Read from the client, not yet looked at.
    input: Vec<u8>,
    /// Ready for the server.
    output: Vec<u8>,
    preface_left: usize,
    /// Payload bytes of a frame that passes through as it comes.
    passthrough_left: usize,
    block: Option<HeaderBlock>,
    decoder: loona_hpack::Decoder<'static>,
    /// A block was rewritten: h2's HPACK table no longer mirrors the client's.
    reencode: bool,
    /// The client's HPACK could not be decoded: everything passes through for h2 to judge.
    given_up: bool,
    eof: bool,
}

impl<S> std::fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix").field("reencode", &self.reencode).field("given_up", &self.given_up).finish()
    }
}

/// A header block being gathered: the HEADERS frame and its CONTINUATIONs.
struct HeaderBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// The frames as received, for passing them on unchanged.
    raw: Vec<u8>,
    fragment: Vec<u8>,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        AuthorityFix {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            preface_left: PREFACE_LEN,
            passthrough_left: 0,
            block: None,
            decoder,
            reencode: false,
            given_up: false,
            eof: false,
        }
    }

    /// Moves what can be moved from `input` to `output`.
    fn process(&mut self) {
        loop {
            if self.preface_left > 0 || self.passthrough_left > 0 || self.given_up {
                let wanted = if self.given_up { self.input.len() } else { self.preface_left + self.passthrough_left };
                let n = wanted.min(self.input.len());
                self.output.extend(self.input.drain(..n));
                if self.preface_left > 0 {
                    self.preface_left -= n;
                } else if !self.given_up {
                    self.passthrough_left -= n;
                }
                if self.preface_left > 0 || self.passthrough_left > 0 || self.given_up {
                    return;
                }
                continue;
            }
            if self.input.len() < FRAME_HEADER_LEN {
                return;
            }
            let length = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
            let kind = self.input[3];
            if kind != HEADERS && kind != CONTINUATION {
                if self.block.is_some() {
                    // Only CONTINUATIONs may follow an unfinished block: h2 will say so.
                    self.give_up();
                    continue;
                }
                self.output.extend(self.input.drain(..FRAME_HEADER_LEN));
                self.passthrough_left = length;
                continue;
            }
            if self.input.len() < FRAME_HEADER_LEN + length {
                return;
            }
            let frame: Vec<u8> = self.input.drain(..FRAME_HEADER_LEN + length).collect();
            if !self.header_frame(frame) {
                self.give_up();
            }
        }
    }

    /// Passes a pending block and everything after it through unchanged from now on.
    fn give_up(&mut self) {
        if let Some(block) = self.block.take() {
            self.output.extend_from_slice(&block.raw);
        }
        self.given_up = true;
    }

    /// Takes a HEADERS or CONTINUATION frame; false if it is not what HTTP/2 allows (it is then
    /// h2's to refuse, with the frames as they came).
    fn header_frame(&mut self, frame: Vec<u8>) -> bool {
        let kind = frame[3];
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER_LEN..];
        if kind == HEADERS {
            if self.block.is_some() {
                self.output.extend_from_slice(&frame);
                return false;
            }
            let mut body = payload;
            let mut padding = 0;
            if flags & PADDED != 0 {
                let Some((&pad, rest)) = body.split_first() else {
                    self.output.extend_from_slice(&frame);
                    return false;
                };
                padding = pad as usize;
                body = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                if body.len() < 5 {
                    self.output.extend_from_slice(&frame);
                    return false;
                }
                priority = Some(body[..5].try_into().expect("5 bytes"));
                body = &body[5..];
            }
            if padding > body.len() {
                self.output.extend_from_slice(&frame);
                return false;
            }
            let fragment = body[..body.len() - padding].to_vec();
            self.block =
                Some(HeaderBlock { stream, end_stream: flags & END_STREAM != 0, priority, raw: frame, fragment });
        } else {
            let Some(block) = self.block.as_mut().filter(|b| b.stream == stream) else {
                self.output.extend_from_slice(&frame);
                return false;
            };
            block.fragment.extend_from_slice(payload);
            block.raw.extend_from_slice(&frame);
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("a block");
            return self.finish(block);
        }
        true
    }

    fn finish(&mut self, block: HeaderBlock) -> bool {
        let mut headers = match self.decoder.decode(&block.fragment) {
            Ok(headers) => headers,
            Err(e) => {
                debug!("HPACK from a client not decodable ({e:?}): the connection passes through");
                self.output.extend_from_slice(&block.raw);
                return false;
            }
        };
        let mut rewritten = false;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && tonic::codegen::http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                debug!(authority = %String::from_utf8_lossy(value), "a client's :authority is not a URI authority: taken as localhost");
                *value = REPLACEMENT.to_vec();
                rewritten = true;
            }
        }
        self.reencode |= rewritten;
        if !self.reencode {
            self.output.extend_from_slice(&block.raw);
            return true;
        }
        let mut encoded = Vec::new();
        for (name, value) in &headers {
            // A literal header field without indexing, new name (RFC 7541 6.2.2), no Huffman.
            encoded.push(0);
            encode_string(name, &mut encoded);
            encode_string(value, &mut encoded);
        }
        self.emit_block(&block, &encoded);
        true
    }

    /// Writes a header block as a HEADERS frame and as many CONTINUATIONs as it takes.
    fn emit_block(&mut self, block: &HeaderBlock, encoded: &[u8]) {
        let first_room = MAX_FRAME - if block.priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        let priority = block.priority.as_ref().map(|p| &p[..]).unwrap_or_default();
        self.frame(HEADERS, flags, block.stream, &[priority, first].concat());
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = after;
            self.frame(CONTINUATION, if rest.is_empty() { END_HEADERS } else { 0 }, block.stream, chunk);
        }
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.output.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        self.output.extend_from_slice(&[kind, flags]);
        self.output.extend_from_slice(&stream.to_be_bytes());
        self.output.extend_from_slice(payload);
    }
}

/// An HPACK string literal, not Huffman-coded: length as a 7-bit-prefix integer, then the bytes.
fn encode_string(bytes: &[u8], out: &mut Vec<u8>) {
    let mut length = bytes.len();
    if length < 0x7f {
        out.push(length as u8);
    } else {
        out.push(0x7f);
        length -= 0x7f;
        while length >= 0x80 {
            out.push((length % 0x80) as u8 | 0x80);
            length /= 0x80;
        }
        out.push(length as u8);
    }
    out.extend_from_slice(bytes);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A partial frame left at the end goes to h2 as it is.
                if !this.input.is_empty() {
                    this.output = std::mem::take(&mut this.input);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf) {
                Poll::Ready(Ok(())) => {
                    let filled = chunk_buf.filled();
                    if filled.is_empty() {
                        this.eof = true;
                    } else {
                        this.input.extend_from_slice(filled);
                        this.process();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Runs `input`, fed `step` bytes at a time, through the layer; returns what h2 would read.
    fn through(input: &[u8], step: usize) -> Vec<u8> {
        let mut fix = AuthorityFix::new(());
        for piece in input.chunks(step) {
            fix.input.extend_from_slice(piece);
            fix.process();
        }
        fix.output
    }

    /// The frames after the preface: (kind, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + length].to_vec()));
            bytes = &bytes[9 + length..];
        }
        out
    }

    /// A request's header block as grpc C-core writes one: `:method POST` and `:scheme http`
    /// from the static table, `:authority` either a literal added to the dynamic table (name
    /// index 1) or, in a later request, that entry by index (62), the rest literals.
    fn request(authority: Result<&[u8], u8>) -> Vec<u8> {
        let mut block = vec![0x83, 0x86, 0x04];
        encode_string(b"/runtime.v1.RuntimeService/Version", &mut block);
        match authority {
            Ok(literal) => {
                block.push(0x41);
                encode_string(literal, &mut block);
            }
            Err(index) => block.push(0x80 | index),
        }
        block.push(0);
        encode_string(b"content-type", &mut block);
        encode_string(b"application/grpc", &mut block);
        block
    }

    #[test]
    fn valid_authorities_pass_unchanged_and_a_path_becomes_localhost() {
        let settings = frame(0x4, 0, 0, &[]);
        let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
        let good = [
            PREFACE,
            &settings,
            &frame(HEADERS, END_HEADERS, 1, &request(Ok(b"localhost"))),
            &data,
            &frame(HEADERS, END_HEADERS, 3, &request(Err(62))),
        ]
        .concat();
        for step in [1, 7, 4096] {
            assert_eq!(through(&good, step), good, "step {step}");
        }

        // The path, indexed by the client's encoder: the second request refers to it by index.
        let first = request(Ok(b"/run/cri-systemd/cri-systemd.sock"));
        let second = request(Err(62));
        let big = vec![b'x'; 40_000];
        let third = loona_hpack::Encoder::new().encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"%2Frun%2Fx.sock"),
            (b"x-big", &big[..]),
        ]);
        let padded_with_priority = [&[3u8][..], &[0, 0, 0, 0, 16], &third, &[0, 0, 0]].concat();
        let input = [
            PREFACE,
            &settings,
            &frame(HEADERS, END_HEADERS, 1, &first),
            &data,
            // Split across a CONTINUATION.
            &frame(HEADERS, 0, 3, &second[..3]),
            &frame(CONTINUATION, END_HEADERS, 3, &second[3..]),
            &frame(HEADERS, END_HEADERS | PADDED | PRIORITY | END_STREAM, 5, &padded_with_priority),
        ]
        .concat();
        for step in [1, 13, 100_000] {
            let out = frames(&through(&input, step));
            let mut decoder = loona_hpack::Decoder::new();
            let mut blocks = Vec::new();
            let mut current: Option<(u8, u32, Vec<u8>)> = None;
            for (kind, flags, stream, payload) in &out {
                match *kind {
                    HEADERS => {
                        let mut body = &payload[..];
                        if flags & PRIORITY != 0 {
                            assert_eq!(&body[..5], &[0, 0, 0, 0, 16]);
                            body = &body[5..];
                        }
                        assert_eq!(flags & PADDED, 0);
                        current = Some((*flags, *stream, body.to_vec()));
                    }
                    CONTINUATION => current.as_mut().unwrap().2.extend_from_slice(payload),
                    _ => {}
                }
                if matches!(*kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                    let (first_flags, stream, block) = current.take().unwrap();
                    blocks.push((first_flags & END_STREAM != 0, stream, decoder.decode(&block).unwrap()));
                }
            }
            let authority = |headers: &Vec<(Vec<u8>, Vec<u8>)>| {
                headers.iter().find(|(n, _)| n == b":authority").map(|(_, v)| v.clone()).unwrap()
            };
            assert_eq!(blocks.len(), 3, "step {step}");
            for (_, _, headers) in &blocks {
                assert_eq!(authority(headers), b"localhost");
            }
            assert_eq!(blocks.iter().map(|b| (b.0, b.1)).collect::<Vec<_>>(), [(false, 1), (false, 3), (true, 5)]);
            assert!(blocks[2].2.iter().any(|(n, v)| n == b"x-big" && v == &big));
            assert!(out.iter().all(|(_, _, _, payload)| payload.len() <= MAX_FRAME));
            assert!(out.iter().any(|(kind, _, stream, payload)| *kind == 0 && *stream == 1 && payload.len() == 5));
        }
    }

    #[test]
    fn undecodable_blocks_pass_through_for_h2_to_refuse() {
        let bogus = frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let after = frame(0x0, END_STREAM, 1, b"abc");
        let input = [PREFACE, &bogus, &after].concat();
        assert_eq!(through(&input, 5), input);
    }

    #[test]
    fn long_strings_have_multi_byte_lengths() {
        let mut out = Vec::new();
        encode_string(&[b'a'; 300], &mut out);
        assert_eq!(&out[..3], &[0x7f, 0xad, 0x01]);
        let mut decoder = loona_hpack::Decoder::new();
        let mut block = vec![0u8];
        encode_string(b"name", &mut block);
        encode_string(&[b'a'; 300], &mut block);
        assert_eq!(decoder.decode(&block).unwrap(), vec![(b"name".to_vec(), vec![b'a'; 300])]);
    }
}
