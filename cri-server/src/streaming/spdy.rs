//! SPDY/3.1 framing, as far as the Kubernetes streaming protocols use it (moby/spdystream, which
//! client-go and the kubelet use, speaks SPDY/3 frames and no flow control).
//!
//! Control frames: `1 | version(15) | type(16) | flags(8) | length(24) | data`; data frames:
//! `0 | stream id(31) | flags(8) | length(24) | data`. Header blocks (SYN_STREAM, SYN_REPLY,
//! HEADERS) are `count(32) {name length(32) name, value length(32) value}` compressed with zlib,
//! one compression context per direction for the whole connection, preset with the SPDY/3
//! dictionary, each block ending in a sync flush. WINDOW_UPDATE and SETTINGS are read and ignored:
//! spdystream never sends or honours them.

use std::io;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_REFUSED_STREAM: u32 = 3;

/// The largest frame accepted from a peer (the format allows 16 MiB; clients write 32 KiB).
pub const MAX_FRAME: usize = 1 << 20;
/// The largest decompressed header block accepted, and the most its headers may take.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// What one header entry costs beyond its bytes (its two Strings).
const HEADER_ENTRY_COST: usize = 48;
/// Data frames written carry at most this much.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;

/// Header names (lowercase on the wire) and values (several are NUL-separated on the wire).
pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings,
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
    /// A control frame of another type or version, skipped.
    Unknown {
        kind: u16,
    },
}

/// The value of header `name` (case-insensitive), if present.
pub fn header<'h>(headers: &'h Headers, name: &str) -> Option<&'h str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00 section 2.6.10.1):
/// length-prefixed common header names and values, then a run of common text.
pub fn dictionary() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized",
        "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable",
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut dictionary = Vec::with_capacity(1423);
    for word in WORDS {
        dictionary.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dictionary.extend_from_slice(word.as_bytes());
    }
    dictionary.extend_from_slice(TAIL.as_bytes());
    dictionary
}

/// Compresses header blocks: one zlib stream for the connection's outgoing frames.
pub struct HeaderEncoder {
    zlib: Compress,
}

impl std::fmt::Debug for HeaderEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeaderEncoder")
    }
}

impl Default for HeaderEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderEncoder {
    pub fn new() -> HeaderEncoder {
        let mut zlib = Compress::new(Compression::default(), true);
        zlib.set_dictionary(&dictionary()).expect("a fresh zlib stream takes a dictionary");
        HeaderEncoder { zlib }
    }

    pub fn encode(&mut self, headers: &Headers) -> Vec<u8> {
        let mut block = Vec::new();
        block.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            block.extend_from_slice(&(name.len() as u32).to_be_bytes());
            block.extend_from_slice(name.as_bytes());
            block.extend_from_slice(&(value.len() as u32).to_be_bytes());
            block.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut input = &block[..];
        loop {
            out.reserve(256);
            let before = self.zlib.total_in();
            self.zlib
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("zlib compression does not fail on memory");
            input = &input[(self.zlib.total_in() - before) as usize..];
            // Done once all input is in and the sync flush fit (zlib leaves spare room then).
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

/// Decompresses header blocks: one zlib stream for the connection's incoming frames.
pub struct HeaderDecoder {
    zlib: Decompress,
}

impl std::fmt::Debug for HeaderDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeaderDecoder")
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecoder {
    pub fn new() -> HeaderDecoder {
        HeaderDecoder { zlib: Decompress::new(true) }
    }

    pub fn decode(&mut self, mut input: &[u8]) -> io::Result<Headers> {
        let mut block = Vec::with_capacity(input.len() * 4 + 64);
        loop {
            block.reserve(1024);
            let before = self.zlib.total_in();
            let result = self.zlib.decompress_vec(input, &mut block, FlushDecompress::Sync);
            let consumed = (self.zlib.total_in() - before) as usize;
            input = &input[consumed..];
            match result {
                Ok(Status::Ok | Status::BufError) => {}
                Ok(Status::StreamEnd) => return Err(invalid("header compression stream ended")),
                Err(e) if e.needs_dictionary().is_some() => {
                    self.zlib.set_dictionary(&dictionary()).map_err(|e| invalid(format!("header dictionary: {e}")))?;
                    continue;
                }
                Err(e) => return Err(invalid(format!("header block: {e}"))),
            }
            if block.len() > MAX_HEADER_BLOCK {
                return Err(invalid("header block too large"));
            }
            if input.is_empty() && block.len() < block.capacity() {
                break;
            }
        }
        parse_header_block(&block)
    }
}

fn parse_header_block(block: &[u8]) -> io::Result<Headers> {
    let mut at = 0usize;
    let u32_at = |at: &mut usize| -> io::Result<usize> {
        let bytes = block.get(*at..*at + 4).ok_or_else(|| invalid("truncated header block"))?;
        *at += 4;
        Ok(u32::from_be_bytes(bytes.try_into().expect("4 bytes")) as usize)
    };
    let count = u32_at(&mut at)?;
    let mut headers = Vec::new();
    // Each NUL-separated value becomes an entry with its own copy of the name: without a bound,
    // a 256 KiB block (a few hundred compressed bytes) of one long name and many NULs would make
    // gigabytes of headers. The entries may take what the block may.
    let mut decoded = 0usize;
    for _ in 0..count {
        let length = u32_at(&mut at)?;
        let name = block.get(at..at + length).ok_or_else(|| invalid("truncated header name"))?;
        at += length;
        let length = u32_at(&mut at)?;
        let value = block.get(at..at + length).ok_or_else(|| invalid("truncated header value"))?;
        at += length;
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        for value in value.split(|b| *b == 0) {
            decoded += name.len() + value.len() + HEADER_ENTRY_COST;
            if decoded > MAX_HEADER_BLOCK {
                return Err(invalid("header block decodes into too many headers"));
            }
            headers.push((name.clone(), String::from_utf8_lossy(value).into_owned()));
        }
    }
    Ok(headers)
}

/// Reads one frame; `None` at a clean EOF between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    decoder: &mut HeaderDecoder,
) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 8];
    match reader.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    reader.read_exact(&mut head[1..]).await?;
    let flags = head[4];
    let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    if length > MAX_FRAME {
        return Err(invalid(format!("frame of {length} bytes")));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    let word = |at: usize| -> io::Result<u32> {
        body.get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| invalid("short control frame"))
    };
    if head[0] & 0x80 == 0 {
        let stream_id = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) & 0x7fff_ffff;
        return Ok(Some(Frame::Data { stream_id, flags, data: body }));
    }
    let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
    let kind = u16::from_be_bytes([head[2], head[3]]);
    if version != VERSION {
        return Ok(Some(Frame::Unknown { kind }));
    }
    let frame = match kind {
        TYPE_SYN_STREAM => {
            if body.len() < 10 {
                return Err(invalid("short SYN_STREAM"));
            }
            Frame::SynStream {
                stream_id: word(0)? & 0x7fff_ffff,
                associated_to: word(4)? & 0x7fff_ffff,
                priority: body[8] >> 5,
                flags,
                headers: decoder.decode(&body[10..])?,
            }
        }
        TYPE_SYN_REPLY => Frame::SynReply {
            stream_id: word(0)? & 0x7fff_ffff,
            flags,
            headers: decoder.decode(body.get(4..).unwrap_or_default())?,
        },
        TYPE_HEADERS => Frame::Headers {
            stream_id: word(0)? & 0x7fff_ffff,
            flags,
            headers: decoder.decode(body.get(4..).unwrap_or_default())?,
        },
        TYPE_RST_STREAM => Frame::RstStream { stream_id: word(0)? & 0x7fff_ffff, status: word(4)? },
        TYPE_SETTINGS => Frame::Settings,
        TYPE_PING => Frame::Ping { id: word(0)? },
        TYPE_GOAWAY => Frame::GoAway { last_good_stream_id: word(0)? & 0x7fff_ffff, status: word(4).unwrap_or(0) },
        TYPE_WINDOW_UPDATE => Frame::WindowUpdate { stream_id: word(0)? & 0x7fff_ffff, delta: word(4)? & 0x7fff_ffff },
        other => Frame::Unknown { kind: other },
    };
    Ok(Some(frame))
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + body.len());
    frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(body);
    frame
}

/// Serialises a frame (header blocks through `encoder`, which must see every frame written).
pub fn encode_frame(frame: &Frame, encoder: &mut HeaderEncoder) -> Vec<u8> {
    match frame {
        Frame::SynStream { stream_id, associated_to, priority, flags, headers } => {
            let mut body = Vec::new();
            body.extend_from_slice(&stream_id.to_be_bytes());
            body.extend_from_slice(&associated_to.to_be_bytes());
            body.push(priority << 5);
            body.push(0);
            body.extend_from_slice(&encoder.encode(headers));
            control(TYPE_SYN_STREAM, *flags, &body)
        }
        Frame::SynReply { stream_id, flags, headers } => {
            let mut body = stream_id.to_be_bytes().to_vec();
            body.extend_from_slice(&encoder.encode(headers));
            control(TYPE_SYN_REPLY, *flags, &body)
        }
        Frame::Headers { stream_id, flags, headers } => {
            let mut body = stream_id.to_be_bytes().to_vec();
            body.extend_from_slice(&encoder.encode(headers));
            control(TYPE_HEADERS, *flags, &body)
        }
        Frame::RstStream { stream_id, status } => {
            let mut body = stream_id.to_be_bytes().to_vec();
            body.extend_from_slice(&status.to_be_bytes());
            control(TYPE_RST_STREAM, 0, &body)
        }
        Frame::Settings => control(TYPE_SETTINGS, 0, &0u32.to_be_bytes()),
        Frame::Ping { id } => control(TYPE_PING, 0, &id.to_be_bytes()),
        Frame::GoAway { last_good_stream_id, status } => {
            let mut body = last_good_stream_id.to_be_bytes().to_vec();
            body.extend_from_slice(&status.to_be_bytes());
            control(TYPE_GOAWAY, 0, &body)
        }
        Frame::WindowUpdate { stream_id, delta } => {
            let mut body = stream_id.to_be_bytes().to_vec();
            body.extend_from_slice(&delta.to_be_bytes());
            control(TYPE_WINDOW_UPDATE, 0, &body)
        }
        Frame::Data { stream_id, flags, data } => {
            let mut frame = Vec::with_capacity(8 + data.len());
            frame.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            frame.push(*flags);
            frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
            frame.extend_from_slice(data);
            frame
        }
        Frame::Unknown { kind } => control(*kind, 0, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        let dictionary = dictionary();
        assert_eq!(dictionary.len(), 1423);
        assert_eq!(&dictionary[..11], b"\0\0\0\x07options");
        assert!(dictionary.ends_with(b",*,enq=0."));
        // zlib names a preset dictionary by its Adler-32 (RFC 1950), which a peer checks.
        let (mut a, mut b) = (1u32, 0u32);
        for byte in &dictionary {
            a = (a + *byte as u32) % 65521;
            b = (b + a) % 65521;
        }
        let mut encoder = HeaderEncoder::new();
        let first = encoder.encode(&vec![("a".into(), "b".into())]);
        assert_eq!(first[0] & 0x20, 0x20, "FDICT set");
        assert_eq!(u32::from_be_bytes(first[2..6].try_into().unwrap()), (b << 16) | a);
    }

    #[tokio::test]
    async fn frames_round_trip_with_one_compression_context_per_direction() {
        let mut encoder = HeaderEncoder::new();
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "error".into())],
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 0,
                flags: FLAG_FIN,
                headers: vec![("streamtype".into(), "stdout".into()), ("port".into(), "80".into())],
            },
            Frame::SynReply { stream_id: 3, flags: 0, headers: vec![] },
            Frame::Data { stream_id: 3, flags: FLAG_FIN, data: b"hello".to_vec() },
            Frame::Data { stream_id: 5, flags: 0, data: vec![7; 70000] },
            Frame::RstStream { stream_id: 3, status: 5 },
            Frame::Ping { id: 2 },
            Frame::GoAway { last_good_stream_id: 3, status: 0 },
            Frame::WindowUpdate { stream_id: 1, delta: 1000 },
            Frame::Headers { stream_id: 1, flags: 0, headers: vec![("x".into(), "y".into())] },
        ];
        let mut wire = Vec::new();
        for frame in &frames {
            wire.extend_from_slice(&encode_frame(frame, &mut encoder));
        }
        let mut decoder = HeaderDecoder::new();
        let mut reader = &wire[..];
        for frame in &frames {
            assert_eq!(read_frame(&mut reader, &mut decoder).await.unwrap().as_ref(), Some(frame));
        }
        assert_eq!(read_frame(&mut reader, &mut decoder).await.unwrap(), None);
    }

    #[tokio::test]
    async fn multi_valued_headers_split_on_nul_and_names_are_lowercased() {
        let mut encoder = HeaderEncoder::new();
        let frame = Frame::SynReply { stream_id: 1, flags: 0, headers: vec![("X-Many".into(), "a\0b".into())] };
        let wire = encode_frame(&frame, &mut encoder);
        let read = read_frame(&mut &wire[..], &mut HeaderDecoder::new()).await.unwrap().unwrap();
        let Frame::SynReply { headers, .. } = read else { panic!("{read:?}") };
        assert_eq!(headers, vec![("x-many".to_string(), "a".to_string()), ("x-many".to_string(), "b".to_string())]);
        assert_eq!(header(&headers, "X-MANY"), Some("a"));
    }

    /// Seen while writing the spdy_headers fuzz target (whose bound it breaks): one long name
    /// with a value of NULs became one header entry, with its own copy of the name, per NUL.
    #[test]
    fn a_header_block_cannot_multiply_a_long_name() {
        // A 68 KiB block: 4097 copies of a 64 KiB name (256 MiB) before the fix.
        let name = vec![b'a'; 64 * 1024];
        let mut block = 1u32.to_be_bytes().to_vec();
        block.extend_from_slice(&(name.len() as u32).to_be_bytes());
        block.extend_from_slice(&name);
        block.extend_from_slice(&4096u32.to_be_bytes());
        block.extend_from_slice(&[0u8; 4096]);
        match parse_header_block(&block) {
            Ok(headers) => panic!("a {} byte block decoded into {} headers", block.len(), headers.len()),
            Err(error) => assert!(error.to_string().contains("too many headers"), "{error}"),
        }
        // What clients send still reads.
        let mut block = 1u32.to_be_bytes().to_vec();
        for part in [&b"streamtype"[..], b"error"] {
            block.extend_from_slice(&(part.len() as u32).to_be_bytes());
            block.extend_from_slice(part);
        }
        assert_eq!(parse_header_block(&block).unwrap(), vec![("streamtype".to_string(), "error".to_string())]);
    }

    #[tokio::test]
    async fn hostile_frames_are_refused() {
        // A frame longer than the cap, and garbage in a header block.
        let mut big = control(TYPE_PING, 0, &[]);
        big[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(read_frame(&mut &big[..], &mut HeaderDecoder::new()).await.is_err());
        let garbage = control(TYPE_SYN_REPLY, 0, &[0, 0, 0, 1, 1, 2, 3, 4, 5]);
        assert!(read_frame(&mut &garbage[..], &mut HeaderDecoder::new()).await.is_err());
        let short = control(TYPE_RST_STREAM, 0, &[0, 0]);
        assert!(read_frame(&mut &short[..], &mut HeaderDecoder::new()).await.is_err());
    }
}
